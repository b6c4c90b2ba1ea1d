"""Expert parallelism and FSDP2 for any transformers MoE model that `patch_model` accelerated, with no per-family code.

The same layout as `hybridmoe.distributed` (torchtitan's for MoE models: pytorch/torchtitan,
`torchtitan/distributed/expert_parallel.py` and `torchtitan/models/deepseek_v3/infra/parallelize.py`) on the
("dp_shard", "ep") mesh of `hybridmoe.distributed.setup`:
  - every experts module found by `find_moe_experts` has each parameter whose first dimension is the expert
    dimension (the 3D weights, GPT-OSS's (e, out) biases, the grouped LoRA factors of `apply_lora`, which must come
    first) split in contiguous blocks over "ep" (a DTensor sharded on dim 0); its patched forward then sends the
    token copies to the ranks that own their experts and back with all-to-alls
    (`kernels.moe.expert_parallel_segments`), and divides the experts' gradients by ep (they sum the tokens of all
    ep peers, while FSDP averages over "dp_shard" only);
  - the experts modules are `fully_shard`-ed over "dp_shard" (or left out of FSDP when ep is the whole world:
    each expert then lives on one rank, so there is nothing to gather or reduce), every decoder layer over all
    ranks ("dp"), and the root last; a module whose own parameters have another dtype than its layer's (an fp32
    router in a bf16 model) becomes its own FSDP unit, since one unit holds one dtype;
  - every rank feeds its own rows of the batch; a parameter's gradient is the average over all ranks.

NeMo AutoModel gives HF-native MoE models (Mixtral, OLMoE, ...) no expert parallelism; this does, for every family
`patch_model` knows. The model must hold the same full weights on every rank (same seed or same checkpoint).
"""

from __future__ import annotations

from collections import Counter

import torch
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
    """Expert parallelism over par.ep ranks, then FSDP2, in place. par: `hybridmoe.distributed.Parallel`."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    mp = MixedPrecisionPolicy(reduce_dtype=torch.float32)  # fp32 gradient reduction whatever the parameter dtype
    dp_mesh = par.dp_mesh
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
            if n_experts % par.ep:
                raise ValueError(f"ep={par.ep} must divide the {n_experts} experts of {name}")
            for pname, p in list(experts.named_parameters(recurse=False)):
                if p.dim() >= 2 and p.shape[0] == n_experts:
                    sharded = distribute_tensor(p.data, par.mesh["ep"], [Shard(0)], src_data_rank=None)
                    setattr(experts, pname, nn.Parameter(sharded, requires_grad=p.requires_grad))
            weight_dtype = next(p.dtype for p in experts.parameters(recurse=False) if p.dim() == 3)
            for adapters in (getattr(experts, "lora_A", None), getattr(experts, "lora_B", None)):
                if isinstance(adapters, nn.ParameterDict):  # grouped expert LoRA: A, B split with their experts
                    for pname, p in list(adapters.items()):
                        sharded = distribute_tensor(p.data, par.mesh["ep"], [Shard(0)], src_data_rank=None)
                        adapters[pname] = nn.Parameter(sharded, requires_grad=p.requires_grad)
                    if par.experts_unreplicated:
                        ignored.update(adapters.parameters())
                    elif any(p.dtype != weight_dtype for p in adapters.parameters()):  # fp32 adapters, bf16 experts
                        fully_shard(adapters, mesh=par.mesh["dp_shard"], reshard_after_forward=reshard_after_forward,
                                    mp_policy=mp)  # fmt: skip
            setattr(experts, EP_GROUP_ATTR, par.ep_group)
            if par.experts_unreplicated:  # the parameters split over ep; any other stays in its layer's FSDP unit
                ignored.update(p for p in experts.parameters(recurse=False) if isinstance(p, DTensor))
            else:
                fully_shard(experts, mesh=par.mesh["dp_shard"], reshard_after_forward=reshard_after_forward,
                            mp_policy=mp)  # fmt: skip
    for layer in decoder_layers(model):
        _shard_other_dtypes(layer, dp_mesh, reshard_after_forward, mp)
        fully_shard(layer, mesh=dp_mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp,
                    ignored_params=ignored)  # fmt: skip
    _shard_other_dtypes(model, dp_mesh, False, mp)
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=False, mp_policy=mp, ignored_params=ignored)
    return model


def _shard_other_dtypes(root: nn.Module, mesh, reshard_after_forward: bool, mp) -> None:
    """fully_shard the submodules of `root` whose own parameters are not in root's most common dtype."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    def unsharded(m, recurse):
        return [p for p in m.parameters(recurse=recurse) if not isinstance(p, DTensor)]

    dtypes = Counter(p.dtype for p in unsharded(root, True))
    if len(dtypes) < 2:
        return
    main = dtypes.most_common(1)[0][0]
    for sub in root.modules():
        own = unsharded(sub, False)
        if sub is not root and own and any(p.dtype != main for p in own):
            fully_shard(sub, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp)
