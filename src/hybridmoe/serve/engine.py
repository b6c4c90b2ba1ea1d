"""The inference engine: token ids in, token ids out, continuous batching over per-request cache slots.

vLLM's shape at a readable size. A request (`add_request`) waits until a slot is free, is prefilled in chunks of at
most `prefill_chunk` tokens, then decodes one token per `step()` alongside every other running request; requests
join and leave at every step, and a finished or cancelled request frees its slot for the next one.

Slots. `SlotPool` is one `HybridCache` with a row per slot and room for `max_model_len` tokens per row, allocated
once: the Mamba layers' conv window and SSM state (constant size) and the attention layers' KV. Memory is therefore
`max_num_seqs x max_model_len` KV plus `max_num_seqs` constant-size Mamba states (`Engine.cache_bytes`); there is no
paging, so pick the two numbers to fit (or pass `max_cache_bytes` and the engine fits `max_num_seqs` to it).

One step = one batched decode forward (one new token for every decoding request) + one prefill chunk (one request,
batch 1). The chunk runs the model's ordinary cached forward on a view of its slot's row, so chunked prefill is
exactly the model's own cache continuation. The decode batch mixes requests whose caches hold different lengths;
the model's forward has one `start` for the whole batch, which the engine turns into per-row positions through the
padding machinery the model already has (left-padded batches):
  - each attention layer sees a `_RowKV` that writes row r's new key at that row's own length and returns the
    rows' keys up to S = longest + 1 (positions beyond a row's length are masked out with `attention_mask`);
  - the forward is told that the new token sits at position S (`seq_len = S`): with no positional encoding (NoPE)
    a position only matters for the causal mask, and a query at S sees exactly the unmasked keys 0..S-1;
  - the Mamba layers take one recurrent step on the rows' states in place when the batch's slots follow each other
    (views of the pool), else on gathered copies that are written back afterwards. Slots are handed out lowest
    first, a finished request's slot is refilled by the request in the highest slot (its cache copied once), and a
    request that finishes its prefill above one still waiting for its own swaps slots with it, so the decoding
    requests hold slots 0..k-1 at every step.
Greedy outputs therefore equal decoding each prompt alone (tested against `model.generate`).

Shared work. Requests with the same prompt admitted together (the samples of a GRPO group, a request with n > 1)
prefill it once: when the first finishes its prompt, its cache is copied into the slots of the others that have not
started theirs (`_share_prompt`; a request asking for prompt logprobs prefills itself). And the decoded rows of
requests with the same plain sampling params (no logits processors, top-k, top-p or logprob alternatives) drawing
from the engine's generator are sampled in one batch (`sampling.sample_rows`: the same draws, in the same order, as
row by row). On a CPU with a small model both are most of the cost they remove: with groups of 8, prefill was a
third of a rollout worker's time, and sampling row by row a tenth.

Decode modes (`decode_mode`). That batch has a new shape every step, which is cheap on a CPU but on a GPU costs
hundreds of kernel launches per token paid on the host. "static" runs `serve.graphs.StaticDecoder` instead: the
same step with shapes fixed per padded batch size (1, 2, 4, ... slots) and key range (256, 512, ... max_model_len),
every row attending over that range with a length mask, padding rows on a spare scratch slot; "graphs" captures it
in one CUDA graph per shape and "compile" runs it through torch.compile (the first step of each shape captures or
compiles it: tens of seconds for a compilation). "eager" (above) stays the twin they are tested against; the default
is "graphs" on CUDA and "eager" on the CPU. On CUDA every phase pins its SDPA backends
(`kernels.attention.sdpa_backend`), so that no attention plan is built per key length.

Prompt logprobs (`SamplingParams.prompt_logprobs`, vLLM's): the prefill chunks of such a request keep the logits of
every position, not only the last; position i scores prompt token i + 1 (log_softmax of the raw logits, as for
generated tokens; the first token has none). One chunk's (chunk, v) fp32 logits exist at a time, turned into
log-probabilities in place. They arrive on the request's first RequestOutput; with `max_tokens=0` that output also
finishes the request (finish_reason "length", nothing sampled).

Thread-safety: `add_request` and `cancel` may be called from another thread (an asyncio loop) while `step` runs in
a worker thread: they only append to inboxes that `step` drains at its start.

Weight updates (asynchronous RL: a trainer publishes new weights to its rollout engines after each optimizer step,
as NeMo-RL's and prime-rl's generation workers take them): `load_weights(state_dict, version)` copies new tensors
into the model in place, between two steps (from the thread that runs `step`; `check_weights` alone may run
anywhere). Requests in flight go on with the new weights, their caches as they are (PipelineRL's in-flight update,
arXiv 2509.19128). Every request records the version of the weights its first forward ran with, which is the oldest
that produced any of its tokens since versions only increase, and reports it on every output (`weight_version`).

Failures stay with one request. A request whose sampling raises (NaN logits, a logits processor that fails) or whose
prefill chunk raises ends with finish_reason "error" and its `error` message; if a batched decode forward raises,
each of its requests is decoded alone so that only those whose own forward fails end that way. The engine goes on
with the others. `reset()` drops every request (a server's last resort after a failure outside any request).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..cache import KVState, MambaState
from ..checkpoint import checkpoint_tensors
from ..kernels.attention import sdpa_backend
from ..modeling import HybridMoEForCausalLM
from .graphs import DECODE_MODES, StaticDecoder
from .sampling import (
    SamplingError,
    SamplingParams,
    TokenLogprob,
    batchable,
    prompt_token_logprobs,
    sample,
    sample_rows,
    token_logprob,
)

logger = logging.getLogger("hybridmoe.serve")


class AdmissionError(ValueError):
    """A request (or an engine configuration) that cannot be served as configured; the message names the numbers
    and the fix."""


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    slot: int | None = None
    num_prefilled: int = 0  # prompt tokens already in the slot's cache
    generator: torch.Generator | None = None
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended the request
    error: str | None = None  # what failed, when finish_reason is "error"
    prompt_logprobs: list[TokenLogprob | None] | None = None  # with params.prompt_logprobs: filled during prefill
    prompt_logprobs_sent: bool = False
    weight_version: int | None = None  # the weights' version at the request's first forward (None before it)

    @property
    def prefilling(self) -> bool:
        return self.num_prefilled < len(self.prompt_token_ids)


@dataclass
class RequestOutput:
    """What one `step` produced for one request: the new tokens since the last output (0 or 1 per step), and on the
    first output of a request with prompt_logprobs, those (None for the first prompt token)."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob] | None
    finished: bool
    finish_reason: str | None
    stop_reason: int | str | None
    num_prompt_tokens: int
    num_generated_tokens: int
    error: str | None = None  # what failed, when finish_reason is "error"
    prompt_logprobs: list[TokenLogprob | None] | None = None
    weight_version: int | None = None  # the oldest weight version that produced any of its tokens


@dataclass
class CompletionOutput:
    """A finished request, as `Engine.generate` returns it."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str
    stop_reason: int | str | None
    error: str | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    weight_version: int | None = None


# ---------------------------------------------------------------------------------------------- slots


class SlotPool:
    """`num_slots` cache rows of `max_len` tokens each; `lengths[s]` tokens of slot s are in the cache.

    spare=1 adds a scratch row (`scratch`, never handed out) that the padding rows of a static decode batch read and
    write (`serve.graphs`)."""

    def __init__(self, model: HybridMoEForCausalLM, num_slots: int, max_len: int, spare: int = 0):
        if spare not in (0, 1):
            raise ValueError(f"SlotPool spare must be 0 or 1, got {spare}")
        self.cache = model.new_cache(num_slots + spare, capacity=max_len)
        self.max_len = max_len
        self.num_slots = num_slots
        self.scratch = num_slots if spare else None
        self.lengths = [0] * num_slots
        self._free = list(range(num_slots))  # a heap: the lowest free slot is handed out first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        slot = heapq.heappop(self._free)
        self.lengths[slot] = 0
        for state in self.cache.layers:
            if isinstance(state, MambaState):
                state.conv[slot].zero_()
                state.ssm[slot].zero_()
        return slot

    def clear(self) -> None:
        """Every slot free."""
        self.lengths = [0] * len(self.lengths)
        self._free = list(range(len(self.lengths)))

    def release(self, slot: int) -> None:
        self.lengths[slot] = 0
        heapq.heappush(self._free, slot)

    def move(self, src: int, dst: int) -> None:
        """Copy slot `src`'s cache into slot `dst`: the Mamba layers' states and the `lengths[src]` cached keys and
        values of the attention layers."""
        n = self.lengths[src]
        for state in self.cache.layers:
            if isinstance(state, MambaState):
                state.conv[dst].copy_(state.conv[src])
                state.ssm[dst].copy_(state.ssm[src])
            elif isinstance(state, KVState):
                state.key[dst, :, :n].copy_(state.key[src, :, :n])
                state.value[dst, :, :n].copy_(state.value[src, :, :n])
        self.lengths[dst] = n

    def swap(self, a: int, b: int) -> None:
        """Exchange the caches of slots `a` and `b` (and their lengths)."""
        n = max(self.lengths[a], self.lengths[b])
        pair, flipped = [a, b], [b, a]
        for state in self.cache.layers:
            if isinstance(state, MambaState):
                state.conv[pair] = state.conv[flipped]
                state.ssm[pair] = state.ssm[flipped]
            elif isinstance(state, KVState):
                state.key[pair, :, :n] = state.key[flipped, :, :n]
                state.value[pair, :, :n] = state.value[flipped, :, :n]
        self.lengths[a], self.lengths[b] = self.lengths[b], self.lengths[a]

    def row(self, slot: int) -> _CacheRows:
        """A batch-1 cache over slot `slot` whose tensors are views of the pool: the model's cached forward writes
        the slot in place."""
        layers = []
        for state in self.cache.layers:
            if isinstance(state, MambaState):
                layers.append(MambaState(state.conv[slot : slot + 1], state.ssm[slot : slot + 1]))
            elif isinstance(state, KVState):
                layers.append(KVState(state.key[slot : slot + 1], state.value[slot : slot + 1]))
            else:
                layers.append(None)
        return _CacheRows(layers, seq_len=self.lengths[slot], batch_size=1)

    def decode_batch(self, slots: list[int]) -> tuple[_CacheRows, torch.Tensor]:
        """A cache over `slots` for one decode token each, and the attention_mask (b, S + 1) that gives every row its
        own length (see the module docstring). Call `write_back` after the forward.

        Slots that follow each other (s, s + 1, ...: the engine decodes slots 0..k-1) are read as views of the pool,
        which the forward updates in place; others are gathered into copies that `write_back` scatters back (the
        Mamba states: every row's whole state, twice a step)."""
        lengths = torch.tensor([self.lengths[s] for s in slots], device=_device_of(self.cache))
        index = torch.tensor(slots, device=lengths.device)
        first = slots[0]
        rows = slice(first, first + len(slots)) if slots == list(range(first, first + len(slots))) else index
        S = int(lengths.max()) + 1  # keys per row after the write: the longest row + its new token
        layers = []
        for state in self.cache.layers:
            if isinstance(state, MambaState):
                layers.append(MambaState(state.conv[rows], state.ssm[rows]))
            elif isinstance(state, KVState):
                layers.append(_RowKV(state, index, rows, lengths, S))
            else:
                layers.append(None)
        mask = torch.ones(len(slots), S + 1, dtype=torch.long, device=lengths.device)
        mask[:, :S] = torch.arange(S, device=lengths.device)[None, :] <= lengths[:, None]  # history + new key
        return _CacheRows(layers, seq_len=S, batch_size=len(slots), rows=rows), mask

    def write_back(self, batch: _CacheRows, slots: list[int]) -> None:
        if not isinstance(batch.rows, slice):  # views were written in place
            for pool_state, state in zip(self.cache.layers, batch.layers):
                if isinstance(pool_state, MambaState):
                    pool_state.conv[batch.rows] = state.conv
                    pool_state.ssm[batch.rows] = state.ssm
        for s in slots:
            self.lengths[s] += 1

    def bytes_per_slot(self) -> int:
        return self.cache.memory_bytes() // self.cache.batch_size  # (the scratch row included)


class _CacheRows:
    """The part of HybridCache's interface the model's forward uses (`layers`, `seq_len`, `batch_size`), over some
    rows of a SlotPool."""

    def __init__(self, layers, seq_len: int, batch_size: int, rows: torch.Tensor | None = None):
        self.layers, self.seq_len, self.batch_size, self.rows = layers, seq_len, batch_size, rows


class _RowKV:
    """An attention layer's KV for a decode batch of slots with different lengths: `update` writes row r's new key at
    position lengths[r] of its slot (`index` (b,), the slots) and returns every row's keys 0..S-1 (b, kv, S, d): views
    of the pool where `rows` is a slice (consecutive slots), copies where it is the index."""

    def __init__(self, pool_state: KVState, index: torch.Tensor, rows, lengths: torch.Tensor, S: int):
        self.pool, self.index, self.rows, self.lengths, self.S = pool_state, index, rows, lengths, S

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if k.shape[2] != 1:
            raise ValueError("a slot decode batch takes one token per row")
        self.pool.key[self.index, :, self.lengths] = k[:, :, 0]
        self.pool.value[self.index, :, self.lengths] = v[:, :, 0]
        return self.pool.key[self.rows, :, : self.S], self.pool.value[self.rows, :, : self.S]


def _device_of(cache) -> torch.device:
    for state in cache.layers:
        if state is not None:
            return next(iter(vars(state).values())).device
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------- engine


class Engine:
    """Continuous-batching engine over a HybridMoEForCausalLM.

    max_num_seqs: slots (requests running at once; more wait in a queue). max_model_len: prompt + max_tokens limit
    per request (each slot's KV capacity). prefill_chunk: the most prompt tokens one forward takes (bounds prefill
    activation memory). max_cache_bytes: optional cap on the slot pool's memory; max_num_seqs is lowered to fit it.
    eos_token_id: ends a request unless its params say ignore_eos (default: the model config's).
    detokenize: ids -> text (or a tokenizer with `.decode`), needed for stop strings. seed: the generator of requests
    without their own seed. weight_version: the version of the model's weights as loaded (`load_weights` raises
    it). decode_mode: how the batched decode step runs (`serve.graphs`): "eager" (the batch of dynamic shape this
    module's docstring describes; the twin), "static" (static shapes per padded batch size, eager), "graphs" (the
    static step captured in CUDA graphs; CUDA only) or "compile" (the static step through torch.compile); default
    "graphs" on CUDA, "eager" elsewhere. The static modes keep one spare scratch slot in the pool."""

    def __init__(
        self,
        model: HybridMoEForCausalLM,
        max_num_seqs: int = 8,
        max_model_len: int = 4096,
        prefill_chunk: int = 512,
        max_cache_bytes: int | None = None,
        eos_token_id: int | Sequence[int] | None | str = "config",
        detokenize: Callable[[list[int]], str] | object | None = None,
        seed: int = 0,
        weight_version: int = 0,
        decode_mode: str | None = None,
    ):
        device = model.lm_head.weight.device
        if decode_mode is None:
            decode_mode = "graphs" if device.type == "cuda" else "eager"
        if decode_mode not in DECODE_MODES:
            raise ValueError(f"decode_mode must be one of {DECODE_MODES}, got {decode_mode!r}")
        if decode_mode == "graphs" and device.type != "cuda":
            raise ValueError(f"decode_mode 'graphs' needs a CUDA model (this one is on {device}); use 'eager', "
                             "'static' or 'compile'")  # fmt: skip
        spare = 0 if decode_mode == "eager" else 1
        if max_num_seqs < 1 or max_model_len < 2 or prefill_chunk < 1:
            raise ValueError(
                f"need max_num_seqs >= 1, max_model_len >= 2 and prefill_chunk >= 1; got {max_num_seqs}, "
                f"{max_model_len}, {prefill_chunk}"
            )
        self.model = model.eval()
        self.config = model.config
        self.max_model_len, self.prefill_chunk = max_model_len, prefill_chunk
        per_slot = _bytes_per_slot(model, max_model_len)
        if max_cache_bytes is not None:
            fits = max_cache_bytes // per_slot - spare
            if fits < 1:
                raise AdmissionError(
                    f"one slot of max_model_len={max_model_len} tokens needs {per_slot / 2**20:.1f} MiB of cache but "
                    f"max_cache_bytes is {max_cache_bytes / 2**20:.1f} MiB; lower max_model_len or raise "
                    "max_cache_bytes"
                )
            max_num_seqs = min(max_num_seqs, fits)
        self.max_num_seqs = max_num_seqs
        self.pool = SlotPool(model, max_num_seqs, max_model_len, spare=spare)
        self.decode_mode = decode_mode
        self._static = StaticDecoder(model, self.pool, decode_mode) if decode_mode != "eager" else None
        if eos_token_id == "config":
            eos_token_id = self.config.eos_token_id
        self.eos_token_ids = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
        if hasattr(detokenize, "decode"):  # a tokenizer (transformers tokenizers are callable too: encode)
            detokenize = detokenize.decode
        self.detokenize = detokenize
        self.device = model.lm_head.weight.device
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self._ids = itertools.count()
        self._inbox: deque[Request] = deque()  # appended by add_request (any thread), drained by step
        self._cancel_inbox: deque[str] = deque()
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []  # holding a slot, in admission order
        self._requests: dict[str, Request] = {}  # added and not yet finished, by id
        self.weight_version = weight_version

    # ------------------------------------------------------------------ the API a server drives
    @property
    def cache_bytes(self) -> int:
        return self.pool.cache.memory_bytes()

    @property
    def num_free_slots(self) -> int:
        return self.pool.num_free

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting) + len(self._inbox)

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def add_request(
        self, prompt_token_ids: Sequence[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> str:
        """Queue a request; returns its id. Raises AdmissionError when it can never fit, ValueError when invalid."""
        params = params or SamplingParams()
        prompt = [int(t) for t in prompt_token_ids]
        if not prompt:
            raise ValueError("the prompt is empty; pass at least one token id")
        bad = [t for t in prompt if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})")
        if len(prompt) + params.max_tokens > self.max_model_len:
            raise AdmissionError(
                f"prompt of {len(prompt)} tokens + max_tokens {params.max_tokens} = "
                f"{len(prompt) + params.max_tokens} exceeds the engine's max_model_len of {self.max_model_len}; "
                "shorten the prompt, lower max_tokens, or build the Engine with a larger max_model_len"
            )
        if params.stop and self.detokenize is None:
            raise ValueError("stop strings need a detokenizer: build the Engine with detokenize= (or a tokenizer)")
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        generator = None
        if params.seed is not None:
            generator = torch.Generator(self.device).manual_seed(params.seed)
        req = Request(request_id, prompt, params, generator=generator)
        self._requests[request_id] = req
        self._inbox.append(req)
        return request_id

    def cancel(self, request_id: str) -> bool:
        """Ask to stop a request; the next `step` frees its slot and reports it finished with reason "cancelled".
        Returns False when the id is unknown or already finished."""
        if request_id not in self._requests:
            return False
        self._cancel_inbox.append(request_id)
        return True

    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        """Admit, run one decode token for every decoding request and one prefill chunk, sample, finish; return what
        changed for each request."""
        outputs: list[RequestOutput] = []
        while self._inbox:  # in waiting before out of the inbox: num_waiting (admission control) never reads low
            self._waiting.append(self._inbox[0])
            self._inbox.popleft()
        while self._cancel_inbox:
            req = self._requests.get(self._cancel_inbox.popleft())
            if req is not None and req.finish_reason is None:
                req.finish_reason = "cancelled"
                outputs.append(self._finish(req, []))
        while self._waiting and self.pool.num_free:
            req = self._waiting.popleft()
            req.slot = self.pool.allocate()
            self._running.append(req)

        decoding = self._decoding_in_front()
        if decoding:
            try:
                rows = list(zip(decoding, self._decode(decoding)))
            except Exception:  # find the request(s) at fault: each alone (the pool is written only on success)
                rows = []
                for req in decoding:
                    try:
                        rows.append((req, self._decode([req])[0]))
                    except Exception as e:
                        outputs.append(self._fail(req, e))
            outputs += self._sample_decoded(rows)
        prefilling = next((r for r in self._running if r.prefilling), None)
        if prefilling is not None:
            try:
                logits = self._prefill_chunk(prefilling)
            except Exception as e:
                outputs.append(self._fail(prefilling, e))
            else:
                if not prefilling.prefilling and prefilling.params.max_tokens == 0:  # scored the prompt: done
                    prefilling.finish_reason = "length"
                    outputs.append(self._finish(prefilling, []))
                elif not prefilling.prefilling:  # the prompt is in: its last logits give the first token
                    twins = self._share_prompt(prefilling)  # before any sampling can finish one and move slots
                    outputs.append(self._append_token(prefilling, logits))
                    outputs += [self._append_token(twin, logits.clone()) for twin in twins]
        return outputs

    def _share_prompt(self, leader: Request) -> list[Request]:
        """Copy the cache of `leader`, which has just prefilled its prompt, into the slots of the running requests
        with the same prompt that have not started theirs (the samples of one GRPO group, a request with n > 1), and
        mark them prefilled; returns them. Their caches are what their own prefill would have written: the same
        tokens through the same weights. Requests that ask for prompt logprobs prefill themselves."""
        if leader.params.prompt_logprobs is not None:
            return []
        twins = [r for r in self._running if r is not leader and r.num_prefilled == 0
                 and r.params.prompt_logprobs is None and r.prompt_token_ids == leader.prompt_token_ids]  # fmt: skip
        for twin in twins:
            self.pool.move(leader.slot, twin.slot)
            twin.num_prefilled, twin.weight_version = len(twin.prompt_token_ids), leader.weight_version
        return twins

    def reset(self) -> list[RequestOutput]:
        """Drop every request (each reported finished with reason "cancelled") and free every slot."""
        outputs = []
        for req in list(self._requests.values()):
            req.finish_reason = "cancelled"
            outputs.append(self._finish(req, []))
        self._inbox.clear()
        self._cancel_inbox.clear()
        self._waiting.clear()
        self._running.clear()
        self.pool.clear()
        return outputs

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> list[CompletionOutput]:
        """Run `prompts` to completion (continuous batching over the slots); results in the order of the prompts."""
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        requests = [self._requests[i] for i in ids]
        while any(r.finish_reason is None for r in requests):
            self.step()
        results = []
        for i, r in zip(ids, requests):
            logprobs = r.logprobs if r.params.logprobs is not None else None
            results.append(CompletionOutput(i, r.prompt_token_ids, r.output_token_ids, logprobs, r.finish_reason,
                                            r.stop_reason, r.error, r.prompt_logprobs, r.weight_version))  # fmt: skip
        return results

    # ------------------------------------------------------------------ weights
    def check_weights(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model's tensors that `state_dict` would overwrite, by its names; raises ValueError unless its names
        and shapes are exactly the model's, in either layout: the module's (`model.state_dict()`) or the checkpoint's
        (`hybridmoe.checkpoint.checkpoint_tensors`, one tensor per expert: what model.safetensors holds). Values
        must be finite floating-point tensors; the dtype may differ (copies convert)."""
        targets = self.model.state_dict()
        if set(state_dict) != set(targets):
            targets = checkpoint_tensors(self.model)
        missing, unexpected = sorted(set(targets) - set(state_dict)), sorted(set(state_dict) - set(targets))
        if missing or unexpected:
            what = [f"{len(missing)} tensor(s) missing, e.g. {missing[:3]}"] if missing else []
            what += [f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[:3]}"] if unexpected else []
            raise ValueError(
                f"the new weights do not match the served model ({'; '.join(what)}); send every tensor of the same "
                "model config, named as in model.state_dict() or model.safetensors"
            )
        for name, tensor in state_dict.items():
            want = targets[name]
            if tuple(tensor.shape) != tuple(want.shape):
                raise ValueError(f"new weight {name!r} has shape {tuple(tensor.shape)}, the served model's "
                                 f"{tuple(want.shape)}; send weights of the same model config")  # fmt: skip
            if tensor.dtype.is_floating_point != want.dtype.is_floating_point:
                raise ValueError(f"new weight {name!r} has dtype {tensor.dtype}, the served model {want.dtype}")
            if tensor.dtype.is_floating_point and not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"new weight {name!r} holds NaN or infinite values; refusing to load it")
        return targets

    @torch.no_grad()
    def load_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        """Copy `state_dict` (checked by `check_weights`; nothing changes when it fails) into the model and set
        `weight_version = version`, which must be higher than the current one. Call it between steps, from the
        thread that runs `step` (`EngineWorker.load_weights` does)."""
        if version <= self.weight_version:
            raise ValueError(f"weight version {version} is not newer than the loaded version {self.weight_version}; "
                             "versions must increase")  # fmt: skip
        targets = self.check_weights(state_dict)
        for name, tensor in state_dict.items():
            targets[name].copy_(tensor)
        self.weight_version = version

    # ------------------------------------------------------------------ model calls
    def _prefill_chunk(self, req: Request) -> torch.Tensor:
        """Feed the next <= prefill_chunk prompt tokens into the request's slot (with prompt_logprobs, score the
        prompt tokens they predict); returns the last logits (v,)."""
        start = req.num_prefilled
        chunk = req.prompt_token_ids[start : start + self.prefill_chunk]
        cache = self.pool.row(req.slot)
        ids = torch.tensor([chunk], device=self.device)
        top_n = req.params.prompt_logprobs
        if start == 0:
            req.weight_version = self.weight_version
        with sdpa_backend("prefill", self.device):
            out = self.model(ids, cache=cache, logits_to_keep=1 if top_n is None else 0)
        req.num_prefilled += len(chunk)
        self.pool.lengths[req.slot] = cache.seq_len
        if top_n is not None:
            if start == 0:
                req.prompt_logprobs = [None]  # the first token has no context to be scored in
            targets = req.prompt_token_ids[start + 1 : start + 1 + len(chunk)]  # position i predicts token i + 1
            # The last chunk's last row (the first generated token's logits) is not a target and stays raw.
            req.prompt_logprobs += prompt_token_logprobs(out.logits[0, : len(targets)], targets, top_n)
        return out.logits[0, -1]

    def _decode(self, reqs: list[Request]) -> torch.Tensor:
        """Feed each request's last token into its slot, all in one forward; returns logits (b, v)."""
        slots = [r.slot for r in reqs]
        if self._static is not None:
            tokens, lengths = [r.output_token_ids[-1] for r in reqs], [self.pool.lengths[s] for s in slots]
            logits = self._static.decode(slots, tokens, lengths)
            for s in slots:
                self.pool.lengths[s] += 1
            return logits
        cache, mask = self.pool.decode_batch(slots)
        ids = torch.tensor([[r.output_token_ids[-1]] for r in reqs], device=self.device)
        with sdpa_backend("decode", self.device):
            out = self.model(ids, cache=cache, attention_mask=mask)
        self.pool.write_back(cache, slots)
        return out.logits[:, -1]

    # ------------------------------------------------------------------ bookkeeping
    def _sample_decoded(self, rows: list[tuple[Request, torch.Tensor]]) -> list[RequestOutput]:
        """`_append_token` for every decoded (request, logits) row, in order. Rows of requests that share their
        sampling params (`sampling.batchable` ones) and draw from the engine's generator are sampled together
        (`sample_rows`: the same draws in the same order as row by row when all rows share them, the usual case)."""
        groups: dict[tuple, list[int]] = {}
        for i, (req, _) in enumerate(rows):
            p = req.params
            if req.generator is None and batchable(p):
                groups.setdefault((p.greedy, p.temperature, p.logprobs, p.logprobs_mode), []).append(i)
        drawn: dict[int, tuple[int, float | None]] = {}
        for members in groups.values():
            if len(members) < 2:
                continue
            try:
                tokens, logprobs = sample_rows(torch.stack([rows[i][1] for i in members]), rows[members[0]][0].params,
                                               self.generator)  # fmt: skip
            except SamplingError:  # a row that cannot be sampled: row by row, so that only its request fails
                continue
            for k, i in enumerate(members):
                drawn[i] = (tokens[k], None if logprobs is None else logprobs[k])
        return [self._append_token(req, row, drawn.get(i)) for i, (req, row) in enumerate(rows)]

    def _append_token(self, req: Request, logits_v: torch.Tensor, drawn: tuple[int, float | None] | None = None
                      ) -> RequestOutput:  # fmt: skip
        """Sample the request's next token from logits_v (or take `drawn`: the token and its logprob, already
        sampled by `sample_rows`), record it and its logprob, and finish the request when it ends."""
        p = req.params
        if drawn is not None:
            token, logprob = drawn
            new_logprobs = None if logprob is None else [TokenLogprob(token, logprob)]
        else:
            try:
                sample_logits = logits_v
                for process in p.logits_processors:
                    sample_logits = process(req.output_token_ids, sample_logits)
                token = sample(sample_logits, p, req.generator or self.generator)
            except Exception as e:
                return self._fail(req, e)
            new_logprobs = None
            if p.logprobs is not None:
                processed = p.logprobs_mode == "processed_logprobs"
                new_logprobs = [token_logprob(sample_logits if processed else logits_v, token, p.logprobs, p)]
        req.output_token_ids.append(token)
        if new_logprobs is not None:
            req.logprobs.extend(new_logprobs)
        if token in p.stop_token_ids or (token in self.eos_token_ids and not p.ignore_eos):
            req.finish_reason, req.stop_reason = "stop", token
        elif p.stop and (hit := _first_stop_string(self.detokenize(req.output_token_ids), p.stop)) is not None:
            req.finish_reason, req.stop_reason = "stop", hit
        elif len(req.output_token_ids) >= p.max_tokens:
            req.finish_reason = "length"
        if req.finish_reason is not None:
            return self._finish(req, [token], new_logprobs)
        return self._output(req, [token], new_logprobs)

    def _decoding_in_front(self) -> list[Request]:
        """The decoding requests in slots 0..k-1, in slot order (one consecutive batch, read in place): one that
        finished its prefill in a higher slot swaps caches with a request still waiting for its prefill below
        (`_release_slot` keeps the occupied slots 0..n-1, so every slot below k is taken)."""
        decoding = sorted((r for r in self._running if not r.prefilling), key=lambda r: r.slot)
        k = len(decoding)
        if not decoding or decoding[-1].slot == k - 1:
            return decoding
        waiting_below = sorted((r for r in self._running if r.prefilling and r.slot < k), key=lambda r: r.slot)
        for req, other in zip([r for r in decoding if r.slot >= k], waiting_below):
            self.pool.swap(req.slot, other.slot)
            req.slot, other.slot = other.slot, req.slot
        return sorted(decoding, key=lambda r: r.slot)

    def _release_slot(self, req: Request) -> None:
        """Free the request's slot. The request in the highest occupied slot, when it is above, moves down into it
        (its cache copied once), so that the occupied slots stay 0..n-1 and the decode batches consecutive: read in
        place, where a batch with holes gathers and scatters every row's states at every step."""
        slot, req.slot = req.slot, None
        top = max((r for r in self._running if r.slot is not None), key=lambda r: r.slot, default=None)
        if top is not None and top.slot > slot:
            self.pool.move(top.slot, slot)
            slot, top.slot = top.slot, slot
        self.pool.release(slot)

    def _fail(self, req: Request, e: Exception) -> RequestOutput:
        logger.warning("request %s failed: %s: %s", req.request_id, type(e).__name__, e)
        req.finish_reason, req.error = "error", f"{type(e).__name__}: {e}"
        return self._finish(req, [])

    def _finish(self, req: Request, new_tokens: list[int], new_logprobs=None) -> RequestOutput:
        if req.slot is not None:
            self._release_slot(req)
        if req in self._running:
            self._running.remove(req)
        if req in self._waiting:
            self._waiting.remove(req)
        self._requests.pop(req.request_id, None)
        return self._output(req, new_tokens, new_logprobs)

    def _output(self, req: Request, new_tokens: list[int], new_logprobs) -> RequestOutput:
        prompt_logprobs = None
        if req.prompt_logprobs is not None and not req.prefilling and not req.prompt_logprobs_sent:
            prompt_logprobs, req.prompt_logprobs_sent = req.prompt_logprobs, True
        return RequestOutput(
            req.request_id, new_tokens, new_logprobs, req.finish_reason is not None, req.finish_reason,
            req.stop_reason, len(req.prompt_token_ids), len(req.output_token_ids), req.error, prompt_logprobs,
            req.weight_version,
        )  # fmt: skip


LLMEngine = Engine  # vLLM's name


def _first_stop_string(text: str, stops: list[str]) -> str | None:
    """The stop string that occurs earliest in `text`, or None."""
    hits = [(text.find(s), s) for s in stops if s in text]
    return min(hits)[1] if hits else None


def _bytes_per_slot(model: HybridMoEForCausalLM, max_len: int) -> int:
    """Cache bytes of one slot with room for max_len tokens, measured on 1-row caches of 1 and 2 tokens (constant
    Mamba state + KV per token) rather than re-derived."""
    one, two = model.new_cache(1, capacity=1).memory_bytes(), model.new_cache(1, capacity=2).memory_bytes()
    return one + (max_len - 1) * (two - one)
