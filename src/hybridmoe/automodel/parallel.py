"""Expert parallelism and FSDP2 for any transformers MoE model that `patch_model` accelerated, with no per-family code.

The same layout as `hybridmoe.distributed` (torchtitan's for MoE models: pytorch/torchtitan,
`torchtitan/distributed/expert_parallel.py` and `torchtitan/models/deepseek_v3/infra/parallelize.py`) on the
mesh of `hybridmoe.distributed.setup`, with the same functions (`hybridmoe.distributed.ep` and `.fsdp`):
  - every experts module found by `find_moe_experts` has each parameter whose first dimension is the expert
    dimension (the 3D weights, GPT-OSS's (e, out) biases, the grouped LoRA factors of `apply_lora`, which must come
    first) split in contiguous blocks over "ep" (a DTensor sharded on dim 0); its patched forward then sends the
    token copies to the ranks that own their experts and back with all-to-alls
    (`kernels.moe.expert_parallel_segments`), and divides the experts' gradients by ep (they sum the tokens of all
    ep peers, while FSDP averages over "dp_mod_ep" only);
  - the experts modules are `fully_shard`-ed over "dp_mod_ep" (or left out of FSDP when ep is the whole world:
    each expert then lives on one rank, so there is nothing to gather or reduce), every decoder layer over all
    ranks ("dp"), and the root last; a module whose own parameters have another dtype than its layer's (an fp32
    router in a bf16 model) becomes its own FSDP unit, since one unit holds one dtype;
  - every rank feeds its own rows of the batch; a parameter's gradient is the average over all ranks.

NeMo AutoModel gives HF-native MoE models (Mixtral, OLMoE, ...) no expert parallelism; this does, for every family
`patch_model` knows. The model must hold the same full weights on every rank (same seed or same checkpoint).
"""

from __future__ import annotations

from torch import nn

from .patch import EP_GROUP_ATTR, PATCHED_ATTR, find_moe_experts


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers: the ModuleList holding the most parameters (`model.model.layers` in
    every transformers causal LM)."""
    best, size = None, 0
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            n = sum(p.numel() for p in module.parameters())
            if n > size:
                best, size = module, n
    if best is None:
        raise ValueError(f"{type(model).__name__}: no nn.ModuleList of layers to shard with FSDP")
    return best


def parallelize(model: nn.Module, par, reshard_after_forward: bool = True) -> nn.Module:
    """Expert parallelism over par.ep ranks, then FSDP2, in place. par: `hybridmoe.distributed.Parallel`. What is
    specific to transformers models is only where the experts and the decoder layers are; the rest is
    `hybridmoe.distributed`'s (`ep`, `fsdp`)."""
    from torch.distributed.fsdp import fully_shard

    from ..distributed import ep as expert_parallel
    from ..distributed import fsdp

    if par.tp > 1:
        raise ValueError(
            f"parallel.tp={par.tp}: tensor parallelism is implemented for hybridmoe's native model only; "
            "fine-tune transformers models with parallel.tp=1 (FSDP2 and parallel.ep)"
        )
    if par.cp > 1:
        raise ValueError(f"parallel.cp={par.cp}: context parallelism is implemented for hybridmoe's native model only")
    found = find_moe_experts(model)
    ignored: set[nn.Parameter] = set()
    if par.ep > 1:
        if not found:
            raise ValueError(f"ep={par.ep}: {type(model).__name__} has no MoE experts to split")
        for name, experts in found:
            if not hasattr(experts, PATCHED_ATTR):
                raise ValueError(
                    f"ep={par.ep}: {name} ({type(experts).__name__}) runs transformers' own forward, which has no "
                    "all-to-all dispatch; load the model with hybridmoe.automodel or use ep=1"
                )
            n_experts = next(p.shape[0] for p in experts.parameters(recurse=False) if p.dim() == 3)
            expert_parallel.check_divides(par.ep, n_experts, name)
            weight_dtype = next(p.dtype for p in experts.parameters(recurse=False) if p.dim() == 3)
            expert_parallel.split_by_expert(experts, n_experts, par)
            for adapters in (getattr(experts, "lora_A", None), getattr(experts, "lora_B", None)):
                if isinstance(adapters, nn.ParameterDict):  # grouped expert LoRA: A, B split with their experts
                    expert_parallel.split_by_expert(adapters, n_experts, par)
                    if par.experts_unreplicated:
                        ignored.update(adapters.parameters())
                    elif any(p.dtype != weight_dtype for p in adapters.parameters()):  # fp32 adapters, bf16 experts
                        fully_shard(adapters, mesh=par.experts_dp_mesh, reshard_after_forward=reshard_after_forward,
                                    mp_policy=fsdp.mp_policy(par.mixed_precision))  # fmt: skip
            setattr(experts, EP_GROUP_ATTR, par.ep_group)
            # the parameters split over ep; any other stays in its layer's FSDP unit
            expert_parallel.shard_experts(experts, par, reshard_after_forward, ignored)
    return fsdp.shard_model(model, decoder_layers(model), par, reshard_after_forward, ignored)
