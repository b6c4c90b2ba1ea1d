"""torch.distributed for everything that trains: one device mesh (`mesh`), one set of parallelize functions
(`fsdp`, `ep`, `tp`, `cp`, `pp`) for the native model and for transformers models (`automodel.parallel`), gradient
clipping across meshes, and distributed checkpoints (DCP, in `train.checkpoint`).

Faithful to torchtitan's layout for MoE models (pytorch/torchtitan, `torchtitan/models/deepseek_v3/infra/
parallelize.py`, `torchtitan/distributed/expert_parallel.py`). The W ranks of a `torchrun` job form the mesh
("pp", "dp", "cp", "tp") of `mesh.ParallelDims` with pp x dp x cp x tp = W, and the routed experts see the same ranks
as ("pp", "edp", "ep") (MoE parallel folding, `mesh`):
  - data: the dp = W / (pp cp tp) data-parallel ranks take their own rows of the global batch; the ranks of a
    tensor- or context-parallel group and the pp stages of a pipeline take the same rows (expert parallelism borrows
    its ranks from the ranks of a stage);
  - pipeline parallelism (`pp`, parallel.pp > 1): each rank holds one stage of the layers (the embedding on the
    first, the LM head, loss and MTP on the last) and runs a 1F1B schedule over micro-batches; everything below
    applies within a stage (its dp ranks, its cp and tp groups: the stages pass each rank's sequence shard);
  - tensor parallelism (`tp`, parallel.tp > 1): attention heads, Mamba-2 heads and groups, MLPs, shared experts and
    the LM head split over "tp", the residual stream and norms sequence-parallel, the loss vocab-parallel;
  - FSDP2 (`fsdp`): every block is `fully_shard`-ed over the dp ranks (the mesh "dp"), and so are the
    embeddings, final norm and LM head (the root);
  - expert parallelism (`ep`): each MoE layer's routed experts are split over "ep" (any ranks of the stage: under
    sequence and context parallelism every rank routes its own tokens), tokens travel to their experts and back
    with all-to-alls (`kernels.moe`), and the experts are `fully_shard`-ed over "edp";
  - gradients: every data-parallel rank's loss is the mean over its own tokens, so a parameter's gradient is
    averaged over the dp ranks; FSDP divides by the size of its mesh; the experts' gradients sum the contributions
    of all ep peers' tokens, so the experts scale them by tp / ep first (`Parallel.expert_grad_scale`);
  - context parallelism (`cp`, parallel.cp > 1): the ranks of a cp group take the same rows and each runs two
    chunks of every sequence (zig-zag: the causal work balanced); attention gathers the group's keys and values,
    Mamba-2 passes the conv inputs and SSM states between chunks, the loss is cp x each rank's share; FSDP shards
    over dp x cp;
  - MoE balancing: token counts per expert are summed over all ranks before the bias update (`train.balance`).

The same code runs on gloo (CPU) and NCCL (GPU); launch with `torchrun --nproc-per-node N -m hybridmoe.cli
pretrain RECIPE parallel.tp=T parallel.cp=C parallel.pp=P parallel.ep=E`. Without torchrun (no WORLD_SIZE in the
environment) nothing here is used and the trainer runs in one process.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .mesh import Parallel, ParallelDims, launched_with_torchrun, setup, teardown

__all__ = [
    "Parallel",
    "ParallelDims",
    "clip_grad_norm_",
    "launched_with_torchrun",
    "parallelize",
    "reduce_partial_grads",
    "setup",
    "teardown",
]


def parallelize(model, par: Parallel, reshard_after_forward: bool = True, pp_split_points: list[int] | None = None):
    """Pipeline stages, tensor parallelism, expert parallelism, then FSDP2 per block and at the root, for
    `HybridMoEForCausalLM`; returns the model to train (under pipeline parallelism this rank's stage, a
    `pp.PipelineStageModel`, else `model` sharded in place). The model must hold the full weights (every rank the
    same: built from the same seed or loaded from the same checkpoint)."""
    from ..modeling import LatentMoE
    from . import ep, fsdp

    if par.pp > 1:
        from .pp import pipeline_stage

        model = pipeline_stage(model, par, pp_split_points)
    moes = [m for m in model.modules() if isinstance(m, LatentMoE)]
    if par.tp > 1:
        from .tp import parallelize_native

        parallelize_native(model, par)
    if par.cp > 1:
        from .cp import ContextParallel

        model.context_parallel = ContextParallel(par.cp_group, par.cp_rank, par.cp)
    ignored: set[torch.nn.Parameter] = set()
    for moe in moes:
        experts = moe.experts
        if par.ep > 1 or par.tp > 1:  # the experts' mesh: split over "ep", FSDP over "edp" (`mesh`)
            if par.ep > 1:
                ep.check_divides(par.ep, experts.up_proj.shape[0])
                ep.split_by_expert(experts, experts.up_proj.shape[0], par)
                experts.ep_group = par.ep_group
            experts.grad_scale = par.expert_grad_scale
            ep.shard_experts(experts, par, reshard_after_forward, ignored)
    # The router stays fp32 in a bf16 model and under mixed precision: it gets a unit of its own. The MTP blocks
    # stay in the root unit: forward_mtp uses their enorm/hnorm/eh_proj/final_layernorm outside the blocks' own
    # forward, where a per-block unit would not have gathered them.
    return fsdp.shard_model(
        model, model.backbone.layers, par, reshard_after_forward, ignored, own_units=[(m.gate, True) for m in moes]
    )


def reduce_partial_grads(model, par: Parallel | None) -> None:
    """After backward, before clipping: under tensor parallelism, sum over the tp ranks the gradients of what ran
    on each rank's own tokens (`tp.reduce_partial_grads`); a no-op otherwise."""
    if par is not None and par.tp > 1:
        from .tp import reduce_partial_grads as reduce

        reduce(model, par)


@torch.no_grad()
def clip_grad_norm_(params, max_norm: float, par: Parallel | None) -> torch.Tensor:
    """Clip the global gradient norm. Under FSDP/EP/TP a gradient lives as DTensor shards on meshes that differ
    between parameters, some of them replicated over ranks (what tensor parallelism leaves whole), so each local
    shard's squared norm is divided by the number of ranks of its pipeline stage holding a copy of it and the sum is
    taken over all ranks (torch's clip_grad_norm_ expects a single mesh)."""
    if par is None:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    from torch.distributed.tensor import DTensor, Partial

    grads = [p.grad for p in params if p.grad is not None]
    total = torch.zeros((), dtype=torch.float64, device=par.device)
    for g in grads:
        shards = 1
        if isinstance(g, DTensor):
            if any(isinstance(p, Partial) for p in g.placements):
                raise RuntimeError("clip_grad_norm_: a gradient is still a partial sum (not reduced over its mesh)")
            # the mesh dimensions that split it (Shard, or FSDP's _StridedShard over a tensor-parallel Shard)
            shards = math.prod(g.device_mesh.size(i) for i, p in enumerate(g.placements) if not p.is_replicate())
            g = g.to_local()
        total += g.detach().double().pow(2).sum() * (shards / par.stage_size)  # (a stage's parameters: its ranks)
    dist.all_reduce(total)
    norm = total.sqrt().float()
    if max_norm and math.isfinite(max_norm):
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for g in grads:
            (g.to_local() if isinstance(g, DTensor) else g).mul_(scale.to(g.dtype))
    return norm
