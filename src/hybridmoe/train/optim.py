"""AdamW with the tagged no-decay parameters, and the learning-rate schedules of the Nemotron 3 recipe.

Warmup-stable-decay (WSD, Hu et al. 2024 "MiniCPM"): linear warmup to the peak, constant, then a decay over the
last `decay_fraction` of the steps to `min_lr`. The Nemotron 3 pretraining recipe (the Nemotron 3 Nano and Super
technical reports, NVIDIA, 2025) decays with minus-sqrt: lr = min + (peak - min) * (1 - sqrt((s - s0) / D)); cosine
decay and a plain cosine schedule are options, and `constant` is the long-context stage's schedule.
"""

from __future__ import annotations

import math

import torch

from .config import OptimSection


def build_optimizer(model, cfg: OptimSection, fused: bool = True) -> torch.optim.AdamW:
    """AdamW over two groups: weight decay on matrices and embeddings, none on what the model tags (norms,
    biases, A_log, D, dt_bias); a transformers model tags nothing, so there its vectors (norms, biases) get none.
    Frozen parameters (LoRA's base weights) are left out. `fused=False` (the foreach implementation) for sharded
    DTensor parameters."""
    if hasattr(model, "no_weight_decay_parameter_names"):
        no_decay = model.no_weight_decay_parameter_names()
    else:
        no_decay = {name for name, p in model.named_parameters() if p.dim() < 2}
    decay, plain = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (plain if name in no_decay else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "name": "decay"},
        {"params": plain, "weight_decay": 0.0, "name": "no_decay"},
    ]
    fused = fused and all(p.device.type in ("cpu", "cuda") for p in model.parameters())
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)


def lr_at(step: int, total_steps: int, cfg: OptimSection) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total_steps`."""
    peak, low = cfg.lr, cfg.min_lr
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "cosine":
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return low + (peak - low) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_steps = max(1, round(cfg.decay_fraction * total_steps)) if cfg.decay_fraction > 0 else 0
    decay_start = total_steps - decay_steps
    if not decay_steps or step < decay_start:
        return peak
    progress = min(1.0, (step - decay_start) / decay_steps)
    if cfg.schedule == "wsd-sqrt":
        return low + (peak - low) * (1 - math.sqrt(progress))
    return low + (peak - low) * 0.5 * (1 + math.cos(math.pi * progress))  # wsd-cosine


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
