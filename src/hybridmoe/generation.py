"""Autoregressive generation over the hybrid cache: prefill once, then one recurrent step per token.

Follows transformers' `generate` conventions where users meet them: left-padded batches with an `attention_mask`,
`max_new_tokens`, `do_sample` / `temperature` / `top_k` / `top_p` applied in that order, `eos_token_id` (one id or
several), finished rows filled with `pad_token_id`, and the prompt returned in front of the new tokens.
"""

from __future__ import annotations

import torch

from .modeling import HybridMoEForCausalLM


def sampling_distribution(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """The distribution sampling draws from, fp32 (..., v): softmax(logits / temperature) restricted to the top_k
    most likely tokens (0 or None: all), then to the smallest prefix of the remaining tokens, most likely first, whose
    probability reaches top_p (1 or None: all), renormalized. The one home of these filters, in transformers' order
    (temperature, top-k, top-p): `sample_next_token` and the serving engine (`serve.sampling`) both use it.
    Expects temperature > 0, top_k >= 0 and top_p in (0, 1]; the callers check what users pass."""
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        sorted_probs = sorted_logits.softmax(-1)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, -torch.inf)
        logits = torch.full_like(logits, -torch.inf).scatter(-1, order, sorted_logits)
    return logits.softmax(-1)


def sample_from(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of probabilities (..., v) -> (...): inverse transform sampling, one uniform draw per row
    located in the row's cumulative sum (fp64). The same distribution as `torch.multinomial(probs, 1)`, which on a
    CPU draws an exponential variate for every token of the vocabulary (measured ~150 us a row at v = 8192 on a
    2-core EPYC against ~17 us here). Rows need not sum to 1; a token of probability 0 is never drawn: the draw u
    lies in (0, total] and the first index whose cumulative sum reaches u has a positive probability."""
    cdf = probs.cumsum(-1, dtype=torch.float64)
    u = torch.rand(cdf.shape[:-1] + (1,), generator=generator, dtype=torch.float64, device=cdf.device)
    return torch.searchsorted(cdf, (1 - u) * cdf[..., -1:]).squeeze(-1)


def sample_next_token(
    logits: torch.Tensor,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (b, v) -> token ids (b,). Greedy unless do_sample."""
    if not do_sample:
        return logits.argmax(dim=-1)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}; use do_sample=False for greedy")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 or None: no top-k filtering), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 or None: no nucleus filtering), got {top_p}")
    probs = sampling_distribution(logits, temperature, top_k, top_p)
    total = probs.sum(-1)
    if not bool(((total > 0) & (total < torch.inf)).all()):  # NaN fails both
        raise ValueError("cannot sample: the sampling distribution is not finite (NaN logits, or logits that overflow "
                         "after the temperature) or allows no token")  # fmt: skip
    return sample_from(probs, generator)


@torch.no_grad()
def generate(
    model: HybridMoEForCausalLM,
    input_ids: torch.Tensor,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | list[int] | None = None,
    attention_mask: torch.Tensor | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Returns (b, prompt + generated) token ids; generation stops early once every row has produced an eos."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (batch, time), got {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    b, t = input_ids.shape
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids {tuple(input_ids.shape)}"
            )
        mask = attention_mask.bool()
        # Left padding means every row is zeros then ones: the mask never goes from 1 back to 0.
        if bool((mask[:, :-1] & ~mask[:, 1:]).any()):
            raise ValueError(
                "generate needs left padding (padding before the prompt); tokenize with padding_side='left'"
            )
        if not bool(mask[:, -1].all()):
            raise ValueError("a row of attention_mask is all padding; every prompt needs at least one token")
        attention_mask = mask.long()
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
    if pad_token_id is None:
        pad_token_id = model.config.pad_token_id if model.config.pad_token_id is not None else (min(eos) if eos else 0)
    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(b, capacity=t + max_new_tokens)
        out = model(input_ids, cache=cache, attention_mask=attention_mask, logits_to_keep=1)
        tokens = [input_ids]
        done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        eos_ids = torch.tensor(sorted(eos), dtype=input_ids.dtype, device=input_ids.device)
        for step in range(max_new_tokens):
            nxt = sample_next_token(out.logits[:, -1], do_sample, temperature, top_k, top_p, generator)
            nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt.to(input_ids.dtype))
            tokens.append(nxt[:, None])
            if eos:
                done |= torch.isin(nxt, eos_ids)
                if bool(done.all()):
                    break
            if step + 1 == max_new_tokens:
                break
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(b, 1)], dim=1)
            out = model(nxt[:, None], cache=cache, attention_mask=attention_mask)
        return torch.cat(tokens, dim=1)
    finally:
        model.train(was_training)
