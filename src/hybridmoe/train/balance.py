"""MoE load balancing between optimizer steps: the aux-loss-free expert-bias update and the imbalance metric.

Aux-loss-free balancing (Wang et al. 2024, arXiv 2408.15664; used by DeepSeek-V3 and Nemotron 3): after each
optimizer step every MoE layer moves its selection-only bias `e_score_correction_bias` by
`rate * sign(mean_load - load_i)`, with loads counted over the step's tokens and summed over data-parallel ranks.
The counts are reset afterwards. The sequence-level aux loss lives in the model (`router_aux_loss_coef`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..modeling import LatentMoE


def moe_layers(model) -> list[LatentMoE]:
    return [m for m in model.modules() if isinstance(m, LatentMoE)]


@torch.no_grad()
def balance_experts(model, rate: float) -> float | None:
    """Apply the bias update (when rate > 0), reset the counts, and return the expert-load imbalance
    max/mean averaged over MoE layers (None without MoE layers or routed tokens)."""
    layers = moe_layers(model)
    # A pipeline stage (`distributed.pp`) holds some of the layers: its counts go to their rows among all the
    # model's MoE layers (zeros elsewhere), so the sum over all ranks is each layer's over its stage's ranks.
    names = getattr(model, "all_moe_layer_names", None)
    if names is not None:
        own = {n: m for n, m in model.named_modules() if isinstance(m, LatentMoE)}
        slots = [names.index(n) for n in own]
        layers = list(own.values())
    if not (names or layers):
        return None
    if names is None:
        counts = torch.stack([m.tokens_per_expert for m in layers]).float()  # (layers, experts)
    else:
        device = next(model.parameters()).device
        counts = torch.zeros(len(names), model.config.n_routed_experts, device=device)
        for slot, m in zip(slots, layers):
            counts[slot] = m.tokens_per_expert
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
    imbalance = None
    routed = counts.sum(1) > 0
    if bool(routed.any()):
        mean = counts.mean(1, keepdim=True)
        imbalance = float((counts.max(1).values / mean.squeeze(1))[routed].mean())
        if names is not None:
            counts, mean, routed = counts[slots], mean[slots], routed[slots]
        if rate > 0:
            for m, c, mu, active in zip(layers, counts, mean, routed):
                if active:
                    bias = m.gate.e_score_correction_bias
                    bias += rate * torch.sign(mu - c).to(bias.dtype)
    for m in layers:
        m.tokens_per_expert.zero_()
    return imbalance
