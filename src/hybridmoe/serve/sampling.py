"""Per-request sampling parameters and the sampling step of the engine.

Names and meanings follow vLLM's `SamplingParams` where users meet them: `temperature` (below 1e-5 = greedy, as in
vLLM: dividing logits by a smaller number overflows fp32), `top_p`, `top_k` (0 or None = off), `max_tokens`,
`stop_token_ids`, `stop` (strings), `ignore_eos`, `seed`, `logprobs` (how many top alternatives to report besides
the chosen token), `prompt_logprobs` (the same for the prompt's tokens; with it `max_tokens` may be 0: score the
prompt, generate nothing), and `logits_processors` (vLLM's hook: callables `(output_token_ids, logits_v) -> logits_v`
that the engine applies before sampling; the chat layer's reasoning budget is one). Temperature, top-k and top-p
are applied by `hybridmoe.generation.sampling_distribution`, in transformers' order, as offline `generate` does.

Reported logprobs are by default those of the model's own distribution, `log_softmax(logits)`, before temperature
and the filters (vLLM's default `logprobs_mode="raw_logprobs"`), so they mean the same thing whatever the request's
sampling settings. `logprobs_mode="processed_logprobs"` (vLLM's engine option, here per request) reports those of the
distribution the token was drawn from: after the logits processors, temperature, top-k and top-p (`-inf` for a token
the filters removed). An RL trainer that samples at a temperature other than 1 needs these: its importance weights
compare the sampling policy's probabilities with its own at the same temperature. Prompt logprobs are always raw.

Legend: t tokens, v vocab.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..generation import sample_from, sampling_distribution

GREEDY_BELOW = 1e-5  # temperatures below this sample greedily (vLLM's _SAMPLING_EPS)
LOGPROBS_MODES = ("raw_logprobs", "processed_logprobs")


@dataclass
class SamplingParams:
    temperature: float = 1.0  # below GREEDY_BELOW: greedy
    top_p: float = 1.0  # 1: off
    top_k: int | None = None  # None or 0: off
    max_tokens: int = 16
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)  # needs the engine to have a detokenizer
    ignore_eos: bool = False  # True: the model's eos does not end the request (stop_token_ids still do)
    seed: int | None = None  # a private generator per request: the same seed gives the same tokens in any batch
    logprobs: int | None = None  # None: no logprobs; 0: the chosen token's; n: also the n most likely tokens
    # The same for every prompt token after the first (its logprob given the tokens before it): vLLM's
    # prompt_logprobs, what scoring a text needs (OpenAI's legacy `echo` with `logprobs`).
    prompt_logprobs: int | None = None
    # Applied in order to each step's logits before sampling (raw logprobs stay the model's own); the engine
    # calls them from its worker thread. Not used by speculative decoding.
    logits_processors: list[Callable[[list[int], torch.Tensor], torch.Tensor]] = field(default_factory=list)
    # vLLM's names: "raw_logprobs" (the model's log_softmax) or "processed_logprobs" (of the sampling distribution)
    logprobs_mode: str = "raw_logprobs"

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop_token_ids = list(self.stop_token_ids)
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = no nucleus filtering), got {self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 or None = no top-k filtering), got {self.top_k}")
        if self.max_tokens < (0 if self.prompt_logprobs is not None else 1):
            raise ValueError(f"max_tokens must be >= 1 (0 only with prompt_logprobs: a request that scores its prompt "
                             f"and generates nothing), got {self.max_tokens}")  # fmt: skip
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be None or >= 0 (the number of top alternatives), got "
                                 f"{getattr(self, name)}")  # fmt: skip
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {', '.join(LOGPROBS_MODES)}, got {self.logprobs_mode!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


@dataclass
class TokenLogprob:
    """The chosen token's logprob and, when asked for, the `n` most likely tokens with theirs (most likely first)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


def sampling_probs(logits_v: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a request samples from, fp32 (..., v): `sampling_distribution` (softmax(logits / temperature)
    restricted to the top-k, then to the top-p nucleus, renormalized). Greedy requests get a one-hot on the argmax
    (what speculative decoding needs to treat greedy as a special case of sampling)."""
    if params.greedy:
        logits_v = logits_v.float()
        return torch.zeros_like(logits_v).scatter_(-1, logits_v.argmax(-1, keepdim=True), 1.0)
    return sampling_distribution(logits_v, params.temperature, params.top_k, params.top_p)


class SamplingError(ValueError):
    """Logits that cannot be sampled from (NaN, or every token at -inf): the request fails, not the engine."""


def sample(logits_v: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from one row of logits (v,). Raises SamplingError when the logits hold NaN or allow no token
    (checked before drawing, which could otherwise return a token the distribution does not allow). One
    reduction and one host sync per token, as before the checks."""
    if params.greedy:
        value, index = logits_v.max(-1)  # max is NaN when any logit is
        value = float(value)
        if not value > -torch.inf:
            raise SamplingError("the model produced NaN logits" if value != value else "every logit is -inf")
        return int(index)
    probs = sampling_probs(logits_v, params)
    total = float(probs.sum())  # NaN or inf when any probability is, 0 when none is left
    if not 0 < total < torch.inf:
        raise SamplingError("the sampling distribution is not finite (NaN logits, or logits that overflow after the "
                            "temperature)")  # fmt: skip
    return int(sample_from(probs, generator))


def batchable(params: SamplingParams) -> bool:
    """Whether `sample_rows` can take a request with these params: no logits processors, top-k or top-p, and no
    logprob alternatives (the chosen token's alone, or none)."""
    return not params.logits_processors and not params.top_k and params.top_p >= 1 and not params.logprobs


def sample_rows(
    logits_bv: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> tuple[list[int], list[float] | None]:
    """`sample`, then (when params.logprobs is 0) `token_logprob`, for every row of `logits_bv` (b, v) of requests
    sharing `params` (`batchable`) and `generator`: a few batched ops rather than a few per row, which on a CPU cost
    more than the math for a small model's vocabulary. The rows draw from `generator` in row order, as `sample`
    called row by row does, so the tokens are the same. Raises SamplingError when any row cannot be sampled (the
    caller then samples row by row, so that only that row's request fails); nothing is drawn then."""
    logits_bv = logits_bv.float()
    if params.greedy:
        values, tokens = logits_bv.max(-1)
        if not bool((values > -torch.inf).all()):  # NaN (max propagates it) or a row all -inf
            raise SamplingError("a row's logits are NaN or all -inf")
    else:
        probs = sampling_distribution(logits_bv, params.temperature, None, None)
        totals = probs.sum(-1)
        if not bool(((totals > 0) & (totals < torch.inf)).all()):
            raise SamplingError("a row's sampling distribution is not finite")
        tokens = sample_from(probs, generator)
    if params.logprobs is None:
        return tokens.tolist(), None
    if params.logprobs_mode == "processed_logprobs" and not params.greedy:
        logits_bv = logits_bv / params.temperature
    chosen = torch.log_softmax(logits_bv, dim=-1).gather(-1, tokens[:, None])[:, 0]
    return tokens.tolist(), chosen.tolist()


def prompt_token_logprobs(logits_tv: torch.Tensor, targets: list[int], top_n: int) -> list[TokenLogprob]:
    """The logprob of `targets[i]` under row i of `logits_tv` (t, v) fp32, with the `top_n` most likely tokens of
    each row. In place: the rows become their log_softmax (so a chunk of prompt logits costs no second copy)."""
    logp_tv = logits_tv.sub_(torch.logsumexp(logits_tv, dim=-1, keepdim=True))
    index = torch.tensor(targets, dtype=torch.long, device=logp_tv.device)[:, None]
    chosen = logp_tv.gather(-1, index)[:, 0].tolist()
    if not top_n:
        return [TokenLogprob(t, v) for t, v in zip(targets, chosen)]
    values, ids = logp_tv.topk(min(top_n, logp_tv.shape[-1]), dim=-1)
    return [TokenLogprob(t, v, list(zip(i, w))) for t, v, i, w in zip(targets, chosen, ids.tolist(), values.tolist())]


def token_logprob(
    logits_v: torch.Tensor, token_id: int, top_n: int, params: SamplingParams | None = None
) -> TokenLogprob:
    """The logprob (v,) at `token_id`, plus the `top_n` most likely tokens: of log_softmax(logits_v), or with
    `params.logprobs_mode == "processed_logprobs"` of the distribution `params` samples from (logits_v then being the
    processed logits). Greedy requests report raw logprobs in either mode (their distribution is a one-hot)."""
    if params is None or params.logprobs_mode == "raw_logprobs" or params.greedy:
        logp = torch.log_softmax(logits_v.float(), dim=-1)
    elif params.top_k or params.top_p < 1:
        logp = sampling_probs(logits_v, params).log()
    else:  # log_softmax(logits / T) directly: exact where the log of a tiny probability would lose digits
        logp = torch.log_softmax(logits_v.float() / params.temperature, dim=-1)
    top = []
    if top_n:
        values, ids = logp.topk(min(top_n, logp.shape[-1]))
        top = [(int(i), float(v)) for i, v in zip(ids, values)]
    return TokenLogprob(int(token_id), float(logp[token_id]), top)
