"""FSDP2 (`fully_shard`) for every model: the mixed-precision policy, one unit per block, the root last.

As torchtitan's `apply_fsdp` (pytorch/torchtitan, `torchtitan/models/llama3/infra/parallelize.py`): each block is a
unit over the data-parallel mesh, then the root (embeddings, final norm, LM head and whatever no block holds). Under
tensor parallelism the blocks' parameters are already DTensors on the "tp" mesh and FSDP shards them further over
"dp" (2-D: dp x tp); parameters that tensor parallelism leaves whole are sharded over "dp" alone.

Precision: gradients are always reduced in fp32 (the Nemotron 3 recipe). `parallel.mixed_precision: bf16` keeps fp32
master weights (and fp32 AdamW state) and gathers bf16 copies for forward and backward:
`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`, what the planner assumes for GPU runs.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

MIXED_PRECISION = {None: None, "bf16": torch.bfloat16}


def mp_policy(mixed_precision: str | None, keep_fp32: bool = False):
    """FSDP2's policy: fp32 reduction; bf16 compute copies under mixed precision unless keep_fp32 (the router)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    param_dtype = None if keep_fp32 else MIXED_PRECISION[mixed_precision]
    # cast_forward_inputs=False: float inputs (SFT's loss weights) stay as the caller made them
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)


def shard_model(
    model: nn.Module, blocks, par, reshard_after_forward: bool = True, ignored=frozenset(), own_units=()
) -> nn.Module:
    """fully_shard each block over par.dp_mesh, then the root. `own_units`: (module, keep_fp32) pairs sharded
    first as units of their own (the routers that stay fp32); a module whose parameters have another dtype than
    its block's also becomes its own unit, since one unit holds one dtype. `ignored`: parameters FSDP leaves alone
    (experts split over every data-parallel rank)."""
    from torch.distributed.fsdp import fully_shard

    mp = mp_policy(par.mixed_precision)
    for module, keep_fp32 in own_units:
        fully_shard(module, mesh=par.dp_mesh, reshard_after_forward=reshard_after_forward,
                    mp_policy=mp_policy(par.mixed_precision, keep_fp32))  # fmt: skip
    for block in blocks:
        _shard_other_dtypes(block, par.dp_mesh, reshard_after_forward, mp)
        fully_shard(block, mesh=par.dp_mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp,
                    ignored_params=set(ignored))  # fmt: skip
    _shard_other_dtypes(model, par.dp_mesh, False, mp)
    fully_shard(model, mesh=par.dp_mesh, reshard_after_forward=False, mp_policy=mp, ignored_params=set(ignored))
    return model


def _shard_other_dtypes(root: nn.Module, mesh, reshard_after_forward: bool, mp) -> None:
    """fully_shard the submodules of `root` whose own parameters are not in root's most common dtype."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    def unsharded(m, recurse):
        return [p for p in m.parameters(recurse=recurse) if not _is_fsdp_param(p)]

    dtypes = Counter(p.dtype for p in unsharded(root, True))
    if len(dtypes) < 2:
        return
    main = dtypes.most_common(1)[0][0]
    for sub in root.modules():
        own = unsharded(sub, False)
        if sub is not root and not isinstance(sub, FSDPModule) and own and any(p.dtype != main for p in own):
            fully_shard(sub, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp)


def _is_fsdp_param(p) -> bool:
    """Already a DTensor on a data-parallel mesh (split by expert parallelism or sharded by FSDP)."""
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor) and "tp" not in (p.device_mesh.mesh_dim_names or ())
