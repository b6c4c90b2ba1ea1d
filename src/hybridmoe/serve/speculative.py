"""MTP speculative decoding: the model's own multi-token-prediction head drafts, the main model verifies.

Faithful to speculative sampling (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative
Decoding", Algorithm 1; Chen et al. 2023): draft token d_i ~ q_i is kept with probability min(1, p_i(d_i) / q_i(d_i));
at the first rejection one token is drawn from norm(max(0, p_i - q_i)); when all k are kept a bonus token is drawn
from p_{k+1}. The output is distributed exactly as sampling from the main model one token at a time; with greedy
decoding (p and q one-hot) it is exactly the greedy sequence. p and q are the request's sampling distributions
(temperature, top-k, top-p applied to each model's logits).

Drafting (as Nemotron 3 and vLLM's MTP proposer use the head): with the main model's final hidden state h_j at the
last processed position j and the next token x_{j+1}, the first MTP layer computes
`x = eh_proj([enorm(emb(x_{j+1})), hnorm(h_j)])` -> its "*E" blocks -> final_layernorm -> the shared lm_head, a
guess for x_{j+2}. Further drafts chain: the MTP output x and the drafted token go through the same layer at the
next position (Super/Ultra train one MTP layer applied at several depths with shared weights; a checkpoint with
several MTP layers drafts with the first). The MTP attention keeps its own KV over the committed positions,
filled with the main model's hidden states as they are verified; chained drafts write past it and are overwritten.

Rollback of the Mamba layers: snapshot-and-replay. Before verifying, the conv window and SSM state of every Mamba
layer (constant size, small) are copied; the k+1 tokens go through the main model in one forward; when a draft
is rejected the snapshot is restored and the accepted tokens are run again (one short forward) so the recurrent
state is exactly the state after the accepted prefix. The attention KV needs no copy: the cache length is set back
and the stale entries are overwritten. (Keeping per-position states instead would avoid the replay but needs the
scan to emit every intermediate state.) When every draft is accepted there is nothing to replay.

This is a standalone batch-1 decode loop (`speculative_generate`); the engine's batched decoding does not use it.
On CUDA its forwards run with the SDPA backend pinned per phase (`kernels.attention.sdpa_backend`: the prompt as a
prefill, the draft / verify / replay / commit forwards as decode), so no attention plan is built per key length; they
can run in static shapes (`decode_mode`, `serve.graphs.StaticSequence`: attention over the cache's whole capacity,
the start position a device tensor), captured in one CUDA graph per kind of forward and token count on CUDA.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..cache import HybridCache, MambaState
from ..generation import sample_from
from ..kernels.attention import sdpa_backend
from ..modeling import ForwardContext, HybridMoEForCausalLM
from .graphs import StaticSequence
from .sampling import SamplingParams, sample, sampling_probs


@dataclass
class SpeculativeStats:
    num_drafted: int = 0  # draft tokens verified
    num_accepted: int = 0  # of which the main model accepted
    num_verify_steps: int = 0  # verification forwards of the main model
    num_replays: int = 0  # rollbacks that re-ran the accepted tokens
    # where the time went (seconds): MTP drafting, the main model's verification forwards (with the Mamba snapshot
    # and the acceptance test), replays after a rejection, and committing accepted positions to the MTP layer
    draft_s: float = 0.0
    verify_s: float = 0.0
    replay_s: float = 0.0
    commit_s: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted / self.num_drafted if self.num_drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens gained per verification forward (accepted drafts + the one token the main model adds)."""
        return (self.num_accepted + self.num_verify_steps) / self.num_verify_steps if self.num_verify_steps else 0.0


@dataclass
class SpeculativeOutput:
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    stats: SpeculativeStats


def verify_drafts(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    draft_ids: list[int],
    greedy: bool,
    generator: torch.Generator | None = None,
) -> list[int]:
    """target_probs (k+1, v): the main model's distributions at the k draft positions and one beyond; draft_probs
    (k, v): the distributions the drafts were drawn from; draft_ids: the k drafts. Returns the accepted drafts
    followed by one token from the main model (the residual resample at the first rejection, or the bonus)."""
    out = []
    for i, d in enumerate(draft_ids):
        if greedy:
            if int(target_probs[i].argmax()) == d:
                out.append(d)
                continue
            out.append(int(target_probs[i].argmax()))
            return out
        p, q = target_probs[i, d], draft_probs[i, d]
        u = torch.rand((), generator=generator, device=target_probs.device)
        if u * q < p:  # u < p / q (q > 0 since d was drawn from q)
            out.append(d)
            continue
        residual = (target_probs[i] - draft_probs[i]).clamp(min=0)  # nonzero: a rejection means p(d) < q(d)
        out.append(int(sample_from(residual, generator)))
        return out
    last = target_probs[len(draft_ids)]
    out.append(int(last.argmax()) if greedy else int(sample_from(last, generator)))
    return out


@torch.no_grad()
def speculative_generate(
    model: HybridMoEForCausalLM,
    prompt_token_ids: list[int],
    params: SamplingParams | None = None,
    num_draft_tokens: int = 2,
    eos_token_id: int | list[int] | None | str = "config",
    generator: torch.Generator | None = None,
    decode_mode: str | None = None,
) -> SpeculativeOutput:
    """Generate up to params.max_tokens tokens after the prompt, drafting `num_draft_tokens` per step with the MTP
    head. Stops at params.stop_token_ids or eos (unless params.ignore_eos); stop strings are the engine's job.
    decode_mode: "eager" (the model's cached forwards; the twin), "static" (the drafts, verifications, replays and
    commits in static shapes, `serve.graphs.StaticSequence`) or "graphs" (those captured in CUDA graphs, one per kind
    and token count, for this call); default "graphs" on CUDA, "eager" elsewhere."""
    c = model.config
    if not c.num_nextn_predict_layers or model.mtp is None:
        raise ValueError("speculative decoding drafts with the MTP head; this model has num_nextn_predict_layers=0")
    if num_draft_tokens < 1:
        raise ValueError(f"num_draft_tokens must be >= 1, got {num_draft_tokens}")
    device = model.lm_head.weight.device
    if decode_mode is None:
        decode_mode = "graphs" if device.type == "cuda" else "eager"
    if decode_mode not in ("eager", "static", "graphs"):
        raise ValueError(f"decode_mode must be 'eager', 'static' or 'graphs', got {decode_mode!r}")
    params = params or SamplingParams()
    if params.seed is not None and generator is None:
        generator = torch.Generator(model.lm_head.weight.device).manual_seed(params.seed)
    if eos_token_id == "config":
        eos_token_id = c.eos_token_id
    stop_ids = set(params.stop_token_ids)
    if not params.ignore_eos:
        stop_ids |= {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
    model.eval()
    k = num_draft_tokens
    prompt = [int(t) for t in prompt_token_ids]
    cache = model.new_cache(1, capacity=len(prompt) + params.max_tokens + k + 2, include_mtp=True)
    stats = SpeculativeStats()
    runner = StaticSequence(model, cache, decode_mode) if decode_mode != "eager" else None

    mtp = _MTP(model, cache)
    with sdpa_backend("prefill", device):
        out = model(torch.tensor([prompt], device=device), cache=cache, logits_to_keep=1)
        tokens = [sample(out.logits[0, -1], params, generator)]
        # MTP entries j = 0..n-1 pair the main hidden state h_j with token x_{j+1} (the prompt shifted, then x_n).
        mtp_x, mtp_logits = mtp.commit(out.hidden_states, prompt[1:] + tokens)
    mtp.runner = runner  # the prompt's forwards stay eager (one shape per prompt length); the steps below are static

    finish = _finish_reason(tokens, params, stop_ids)
    # On CUDA the SDPA backend is pinned (never cuDNN, which plans anew for every key length: `sdpa_backend`)
    with sdpa_backend("decode", device):
        while finish is None:
            t0 = time.perf_counter()
            draft_ids, draft_probs = _draft(mtp, mtp_x, mtp_logits, k, params, generator)
            t1 = time.perf_counter()
            stats.draft_s += t1 - t0

            # Verify: the pending token and the k drafts in one forward of the main model.
            m = cache.seq_len
            snapshot = _save_mamba(cache, range(c.num_hidden_layers))
            verify_ids = [tokens[-1], *draft_ids]
            if runner is None:
                out = model(torch.tensor([verify_ids], device=device), cache=cache)
                logits, hidden = out.logits, out.hidden_states
            else:
                logits, hidden = runner.main(verify_ids)
            target_probs = sampling_probs(logits[0], params)  # (k+1, v)
            new = verify_drafts(target_probs, torch.stack(draft_probs), draft_ids, params.greedy, generator)
            accepted = len(new) - 1
            t2 = time.perf_counter()
            stats.verify_s += t2 - t1
            stats.num_verify_steps += 1
            stats.num_drafted += k
            stats.num_accepted += accepted

            for t in new:  # stop ids and max_tokens may end the request inside the accepted run
                tokens.append(t)
                finish = _finish_reason(tokens, params, stop_ids)
                if finish is not None:
                    break
            if finish is not None:
                break
            if accepted < k:
                rollback(model, cache, snapshot, m, verify_ids[: accepted + 1], runner)
                stats.num_replays += 1
            t3 = time.perf_counter()
            stats.replay_s += t3 - t2
            # Positions m..m+accepted are now processed: commit them to the MTP with the tokens that follow each.
            mtp_x, mtp_logits = mtp.commit(hidden[:, : accepted + 1], new)
            stats.commit_s += time.perf_counter() - t3
    return SpeculativeOutput(tokens, finish, stats)


def _draft(mtp: _MTP, mtp_x, mtp_logits, k: int, params: SamplingParams, generator):
    """k drafts and the distributions they were drawn from: the first from the last committed MTP output, the
    rest by chaining the MTP layer on its own output."""
    draft_ids, draft_probs = [], []
    x, logits = mtp_x[:, -1:], mtp_logits[0, -1]
    for i in range(k):
        draft_probs.append(sampling_probs(logits, params))
        draft_ids.append(sample(logits, params, generator))
        if i + 1 < k:
            x, step_logits = mtp.draft_step(x, draft_ids[-1])
            logits = step_logits[0, -1]
    mtp.rollback()
    return draft_ids, draft_probs


def rollback(
    model: HybridMoEForCausalLM, cache: HybridCache, snapshot: dict, start: int, ids: list[int], runner=None
) -> None:
    """Put the cache in the state after `start` tokens + `ids`: restore the Mamba snapshot taken at `start`, set the
    length back (stale KV past it is overwritten later) and replay `ids` (through `runner`, a StaticSequence, if
    given)."""
    _restore_mamba(cache, snapshot)
    cache.seq_len = start
    if runner is not None:
        runner.main(ids)
        return
    model(torch.tensor([ids], device=model.lm_head.weight.device), cache=cache, logits_to_keep=1)


class _MTP:
    """The first MTP layer over its own cache positions (the MTP blocks' layer indices point past the backbone's
    into the same HybridCache, built with include_mtp=True)."""

    def __init__(self, model: HybridMoEForCausalLM, cache: HybridCache, runner: StaticSequence | None = None):
        self.model, self.cache, self.runner = model, cache, runner
        self.blocks = model.mtp.layers[: len(model.config.mtp_hybrid_override_pattern)]
        self.length = 0  # committed positions
        self.draft_length = 0  # positions written by chained drafts past the committed ones
        self._snapshot = None

    def _forward(self, h_prev, next_ids: list[int], start: int):
        if self.runner is not None:
            return self.runner.mtp(h_prev, next_ids, start)
        ids = torch.tensor([next_ids], device=h_prev.device)
        x = self.blocks[0].mtp_input(self.model.backbone.embeddings(ids), h_prev)
        ctx = ForwardContext(start=start, cache=self.cache)
        for block in self.blocks:
            x = block(x, ctx)
        return x, self.model.lm_head(self.blocks[-1].final_layernorm(x)).float()

    def commit(self, h_main, next_ids: list[int]):
        """Positions length.. get (main hidden state, the token after it); returns the MTP output and logits."""
        x, logits = self._forward(h_main, next_ids, self.length)
        self.length += len(next_ids)
        self.draft_length = 0
        return x, logits

    def draft_step(self, x_prev, draft_id: int):
        if self.draft_length == 0:
            self._snapshot = _save_mamba(self.cache, range(self.model.config.num_hidden_layers, len(self.cache.layers)))
        x, logits = self._forward(x_prev, [draft_id], self.length + self.draft_length)
        self.draft_length += 1
        return x, logits

    def rollback(self):
        """Forget the chained drafts (only MTP Mamba layers, if a pattern has any, need their state back)."""
        if self.draft_length and self._snapshot:
            _restore_mamba(self.cache, self._snapshot)
        self.draft_length = 0


def _save_mamba(cache: HybridCache, layers: range) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Copies of the conv window and SSM state of the Mamba layers among `layers`."""
    return {i: (cache.layers[i].conv.clone(), cache.layers[i].ssm.clone()) for i in layers
            if isinstance(cache.layers[i], MambaState)}  # fmt: skip


def _restore_mamba(cache: HybridCache, snapshot: dict[int, tuple]) -> None:
    for i, (conv, ssm) in snapshot.items():
        cache.layers[i].conv.copy_(conv)
        cache.layers[i].ssm.copy_(ssm)


def _finish_reason(tokens: list[int], params: SamplingParams, stop_ids: set[int]) -> str | None:
    if tokens[-1] in stop_ids:
        return "stop"
    if len(tokens) >= params.max_tokens:
        return "length"
    return None
