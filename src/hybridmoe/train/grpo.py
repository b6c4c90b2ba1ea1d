"""GRPO's arithmetic as pure functions on tensors: advantages, importance weights, the clipped loss, the KL term,
the trainer's per-token log-probabilities, the pass-rate filter and the prompt order.

Faithful to NeMo-RL's GRPO (`NVIDIA-NeMo/RL`: nemo_rl/algorithms/grpo.py, nemo_rl/algorithms/loss_functions.py
`ClippedPGLossFn`, nemo_rl/algorithms/utils.py) as the Nemotron 3 Super and Ultra reports use it:
  - advantages against the group of G samples of one prompt (`group_advantages`): A_i = r_i - mean_{j != i} r_j
    (leave-one-out, RLOO, arXiv 2402.14740), optionally divided by the leave-one-out standard deviation (the
    unbiased std of the other G - 1 rewards) + 1e-6 where that std is > 0; a zero-variance group gives 0;
    optionally clipped to [-clip, clip];
  - per token (`policy_loss`): rho = exp(logp - logp_old), L = max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high))
    (asymmetric "clip-higher" of DAPO, arXiv 2503.14476: 0.2 / 0.28), times an importance weight w between the
    rollout engine and the trainer (`importance_weights`): TIS (truncated, [0.2, 5]), or whole sequences masked when
    their mismatch exp(mean_t |logp_old - logp_rollout|) exceeds a threshold (NeMo-RL's
    `seq_logprob_error_threshold`), or none; plus `kl_coef` times the k3 estimator of KL(pi || pi_ref)
    (Schulman 2020, "Approximating KL divergence"); summed over the loss tokens and divided by the number of loss
    tokens of the GLOBAL batch (every micro-batch and rank; the caller passes that count);
  - with one optimizer step per rollout batch (the trainer here), logp_old is the trainer's own logp detached, rho
    is 1 and the loss is the importance-weighted REINFORCE -sg(w) A logp (its gradient), as the reference notes.

The trainer's log-probabilities (`linear_token_logprobs`) come from the final hidden states and the LM head in chunks
of tokens, the logits of one chunk at a time (recomputed in backward), so no (tokens, vocab) tensor outlives a chunk;
`linear_token_logprobs_reference` is its plain twin. Masks: every per-token tensor here holds only the tokens that
are trained on (the model's own generated tokens); prompt, tool-output and padding tokens never enter them.
"""

from __future__ import annotations

import math
import random
import zlib

import torch

IMPORTANCE = ("tis", "mask", "none")


# ---------------------------------------------------------------------------------------------- advantages


def group_advantages(
    rewards: torch.Tensor, groups: torch.Tensor, std_norm: bool = True, eps: float = 1e-6, clip: float | None = None
) -> torch.Tensor:
    """rewards (n,) and groups (n,) integer ids (the samples of one prompt share one) -> advantages (n,).

    A_i = r_i - (sum of the group's other rewards) / (G - 1); with std_norm, divided by (s_i + eps) where s_i, the
    unbiased std of the group's other rewards, is > 0 (s_i = 0 leaves A_i as it is: NeMo-RL's rule). A group whose
    rewards are all equal gets 0; a group of one sample has no baseline and gets 0. clip: A clipped to
    [-clip, clip] (the reference's +-20 / +-50 after normalization)."""
    if rewards.shape != groups.shape or rewards.dim() != 1:
        raise ValueError(
            f"rewards and groups must be 1-D of one length, got {tuple(rewards.shape)}, {tuple(groups.shape)}"
        )
    r = rewards.double()
    _, index = torch.unique(groups, return_inverse=True)
    k = int(index.max()) + 1 if len(index) else 0
    size = torch.zeros(k, dtype=r.dtype).index_add_(0, index, torch.ones_like(r))[index]  # G of each sample's group
    total = torch.zeros(k, dtype=r.dtype).index_add_(0, index, r)[index]
    squares = torch.zeros(k, dtype=r.dtype).index_add_(0, index, r * r)[index]
    others = size - 1
    alone = others < 1
    others = others.clamp(min=1)
    mean = (total - r) / others
    adv = torch.where(alone, 0.0, r - mean)
    # a group whose rewards are all equal gets exactly 0 (no rounding residue)
    top = torch.zeros(k, dtype=r.dtype).scatter_reduce(0, index, r, "amax", include_self=False)
    bottom = torch.zeros(k, dtype=r.dtype).scatter_reduce(0, index, r, "amin", include_self=False)
    spread = (top - bottom)[index]
    adv = torch.where(spread == 0, 0.0, adv)
    if std_norm:
        # unbiased variance of the other G - 1 rewards: (sum_sq - n * mean^2) / (n - 1), n = G - 1
        n = others
        var = ((squares - r * r) - n * mean * mean) / (n - 1).clamp(min=1)
        std = torch.where(n > 1, var.clamp(min=0).sqrt(), 0.0)
        std = torch.where(std > 1e-12, std, 0.0)  # a rounding residue of an exactly constant set is no spread
        adv = torch.where(std > 0, adv / (std + eps), adv)
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    return adv.to(rewards.dtype if rewards.is_floating_point() else torch.float32)


# ---------------------------------------------------------------------------------------------- importance weights


def importance_weights(
    trainer_logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    sequence: torch.Tensor,
    mode: str = "tis",
    tis_min: float = 0.2,
    tis_max: float = 5.0,
    mask_threshold: float = 2.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-token weights w between the rollout engine's distribution mu and the trainer's pi_old (both (n,), over
    the loss tokens; `sequence` (n,) the trajectory each token belongs to). Returns (w (n,) detached, stats).

    tis: w = clamp(exp(logp_old - logp_rollout), tis_min, tis_max) (truncated importance sampling);
    mask: w = 0 on every token of a sequence whose error exp(mean over its tokens of |logp_old - logp_rollout|)
    exceeds mask_threshold, else 1; none: w = 1.
    stats (sums, so that the caller can add them over micro-batches and ranks): tokens, abs_diff_sum (sum of
    |logp_old - logp_rollout|), abs_diff_max, kl_sum (the k3 estimate of KL(mu || pi_old) summed), clipped (tokens
    TIS moved), masked_tokens and masked_sequences."""
    if mode not in IMPORTANCE:
        raise ValueError(f"importance mode {mode!r}: use one of {', '.join(IMPORTANCE)}")
    diff = (trainer_logp - rollout_logp).detach().double()  # log(pi_old / mu)
    n = diff.numel()
    stats = {
        "tokens": float(n),
        "abs_diff_sum": float(diff.abs().sum()),
        "abs_diff_max": float(diff.abs().max()) if n else 0.0,
        "kl_sum": float((torch.exp(-diff) + diff - 1).sum()),  # k3 of KL(mu || pi): r = pi/mu, r - 1 - log r
        "clipped": 0.0,
        "masked_tokens": 0.0,
        "masked_sequences": 0.0,
    }
    if mode == "none":
        w = torch.ones_like(diff)
    elif mode == "tis":
        ratio = diff.exp()
        w = ratio.clamp(tis_min, tis_max)
        stats["clipped"] = float((w != ratio).sum())
    else:
        _, index = torch.unique(sequence, return_inverse=True)
        k = int(index.max()) + 1 if n else 0
        count = torch.zeros(k, dtype=diff.dtype).index_add_(0, index, torch.ones_like(diff))
        error = (torch.zeros(k, dtype=diff.dtype).index_add_(0, index, diff.abs()) / count.clamp(min=1)).exp()
        bad = error > mask_threshold
        w = torch.where(bad[index], 0.0, 1.0).to(diff.dtype)
        stats["masked_tokens"] = float((w == 0).sum())
        stats["masked_sequences"] = float(bad.sum())
    return w.to(trainer_logp.dtype), stats


# ---------------------------------------------------------------------------------------------- the loss


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    num_tokens: int | float,
    weights: torch.Tensor | None = None,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped policy-gradient loss of some loss tokens (all (n,): the trainer's logp with gradient, pi_old's,
    the per-token advantage, the importance weight), summed and divided by `num_tokens`, the loss tokens of the
    GLOBAL batch, so that the micro-batches' and ranks' losses add up to the batch's token mean.

    L_t = w_t * max(-A_t rho_t, -A_t clip(rho_t, 1 - eps_low, 1 + eps_high)), rho_t = exp(logp_t - old_logp_t);
    with kl_coef > 0 and ref_logp, + kl_coef * w_t * k3_t, k3_t = exp(ref - logp) - (ref - logp) - 1 >= 0 (the
    importance weight applies to it too: it is an expectation under pi_old estimated from mu's samples).
    Returns (loss, stats): pg (the policy-gradient part), kl (the mean k3 part, both over num_tokens) and
    clip_fraction_sum (tokens whose ratio was clipped against the advantage's sign)."""
    if num_tokens <= 0:
        raise ValueError(f"num_tokens={num_tokens}: the global batch has no loss tokens")
    w = torch.ones_like(logp) if weights is None else weights.detach()
    adv = advantages.detach().to(logp.dtype)
    ratio = torch.exp(logp - old_logp.detach())
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - eps_low, 1 + eps_high)
    per_token = torch.maximum(unclipped, clipped)
    pg = (w * per_token).sum() / num_tokens
    loss = pg
    stats = {"pg": float(pg.detach()), "kl": 0.0, "clip_fraction_sum": float((clipped > unclipped).sum())}
    if kl_coef > 0:
        if ref_logp is None:
            raise ValueError("kl_coef > 0 needs the reference model's log-probabilities (ref_logp)")
        log_r = ref_logp.detach() - logp
        kl = (w * (log_r.exp() - log_r - 1)).sum() / num_tokens
        loss = loss + kl_coef * kl
        stats["kl"] = float(kl.detach())
    return loss, stats


# ---------------------------------------------------------------------------------------------- trainer log-probs


def linear_token_logprobs_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(hidden @ weight^T)[target] per row, from the full (n, v) fp32 logits: the twin of the chunked one."""
    logits = hidden.float() @ weight.float().T
    return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)


def linear_token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int | None = None
) -> torch.Tensor:
    """hidden (n, d), weight (v, d) (the LM head), targets (n,) -> log p(target) (n,) fp32, differentiable in
    hidden and weight. The logits are formed in fp32 one chunk of rows at a time, in forward and again in backward,
    so memory stays at one (chunk, v) block whatever n is."""
    if hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"{hidden.shape[0]} rows of hidden states but {targets.shape[0]} targets")
    if chunk_size is None:
        chunk_size = max(256, min(2048, 2**26 // weight.shape[0]))
    return _TokenLogprobs.apply(hidden, weight, targets, chunk_size)


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size):
        w = weight.float()
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            logits = hidden[rows].float() @ w.T
            out[rows] = logits.gather(1, targets[rows, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
            del logits
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets = ctx.saved_tensors
        w = weight.float()
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=hidden.device) if want_w else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            h = hidden[rows].float()
            g = grad_out[rows].float()
            # d logp / d logits = onehot - softmax, times the incoming gradient
            d = torch.softmax(h @ w.T, dim=-1).mul_(-g[:, None])
            d.scatter_add_(1, targets[rows, None], g[:, None])
            if want_h:
                grad_h[rows] = d @ w
            if want_w:
                grad_w += d.T @ h
            del d
        return (
            grad_h.to(hidden.dtype) if want_h else None,
            grad_w.to(weight.dtype) if want_w else None,
            None,
            None,
        )


# ---------------------------------------------------------------------------------------------- prompts


def pass_rate_filter(
    pools: dict[str, list[int]],
    pass_rates: dict[tuple[str, int], float],
    drop_at: float = 1.0,
    drop_unsolved: bool = False,
) -> tuple[dict[str, list[int]], dict[str, int]]:
    """Drop up front the prompts the starting model already solves: those whose measured pass rate is >= drop_at
    (1.0: solved by every sample); with drop_unsolved also those it never solves (rate 0). pools: env -> training
    seeds; pass_rates: (env, seed) -> the fraction of samples with full reward (every prompt of the pools must have
    one). Returns (kept pools, dropped count per env)."""
    kept, dropped = {}, {}
    for env, seeds in pools.items():
        missing = [s for s in seeds if (env, s) not in pass_rates]
        if missing:
            raise ValueError(f"no pass rate for {len(missing)} prompts of {env!r} (seeds {missing[:5]} ...)")
        kept[env] = [
            s for s in seeds if pass_rates[(env, s)] < drop_at and (pass_rates[(env, s)] > 0 or not drop_unsolved)
        ]
        dropped[env] = len(seeds) - len(kept[env])
        if not kept[env]:
            kept_range = f"0 < rate < {drop_at}" if drop_unsolved else f"rate < {drop_at}"
            raise ValueError(
                f"none of the {len(seeds)} prompts of environment {env!r} has a pass rate with the starting model in "
                f"{kept_range}: nothing is left to learn; raise envs.pool, change envs.difficulty, or drop the "
                "environment"
            )
    return kept, dropped


def domain_counts(ratios: dict[str, float], prompts_per_step: int) -> dict[str, int]:
    """Prompts of each environment in every batch: round(ratio * prompts_per_step) by largest remainder (ratios are
    normalized to sum 1; ties go to the larger ratio, then the name), so the counts always sum to prompts_per_step."""
    if not ratios or any(not (r > 0 and math.isfinite(r)) for r in ratios.values()):
        raise ValueError(f"environment ratios must be positive numbers, got {ratios}")
    total = sum(ratios.values())
    exact = {name: r / total * prompts_per_step for name, r in ratios.items()}
    counts = {name: math.floor(x) for name, x in exact.items()}
    left = prompts_per_step - sum(counts.values())
    order = sorted(exact, key=lambda name: (-(exact[name] - counts[name]), -exact[name], name))
    for name in order[:left]:
        counts[name] += 1
    empty = [name for name, c in counts.items() if c == 0]
    if empty:
        raise ValueError(
            f"environment(s) {empty} get 0 of {prompts_per_step} prompts per step at ratios {ratios}: raise their "
            "ratio or rl.prompts_per_step"
        )
    return counts


class PromptIterator:
    """The endless sequence of (env, seed) prompts: batch after batch of prompts_per_step, each holding exactly
    `domain_counts` of each environment (interleaved), each environment walking through its pool of seeds in seeded
    epoch shuffles. Its position is one number (`state_dict`), so a resumed run continues with the same prompts."""

    def __init__(self, pools: dict[str, list[int]], ratios: dict[str, float], prompts_per_step: int, seed: int = 0):
        unknown = sorted(set(ratios) - set(pools))
        if unknown:
            raise ValueError(f"no prompt pool for environment(s) {unknown}")
        self.pools = {name: list(pools[name]) for name in ratios}
        for name, pool in self.pools.items():
            if not pool:
                raise ValueError(f"environment {name!r} has no prompts")
        self.counts = domain_counts(ratios, prompts_per_step)
        self.prompts_per_step, self.seed = prompts_per_step, seed
        # each environment's slots in a batch, spread evenly: slot j of an env with c prompts sits at (j + 0.5) / c
        slots = sorted(((j + 0.5) / c, name) for name, c in self.counts.items() for j in range(c))
        self.layout = [name for _, name in slots]
        self.before = [self.layout[:i].count(name) for i, name in enumerate(self.layout)]  # same env earlier
        self.position = 0  # prompts handed out
        self._orders: dict[tuple[str, int], list[int]] = {}  # (env, epoch) -> the epoch's shuffle

    def __iter__(self):
        return self

    def __next__(self) -> tuple[str, int]:
        out = self.prompt(self.position)
        self.position += 1
        return out

    def prompt(self, k: int) -> tuple[str, int]:
        """The k-th prompt of the sequence."""
        batch, i = divmod(k, self.prompts_per_step)
        name = self.layout[i]
        n = batch * self.counts[name] + self.before[i]  # this environment's prompts before this one
        pool = self.pools[name]
        epoch, j = divmod(n, len(pool))
        if (name, epoch) not in self._orders:
            order = list(range(len(pool)))
            random.Random(f"{self.seed}:{zlib.crc32(name.encode())}:{epoch}").shuffle(order)
            self._orders = {key: v for key, v in self._orders.items() if key[0] != name}  # one epoch per env
            self._orders[(name, epoch)] = order
        return name, pool[self._orders[(name, epoch)][j]]

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])
