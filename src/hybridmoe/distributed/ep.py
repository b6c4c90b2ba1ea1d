"""Expert parallelism: the routed experts split in contiguous blocks over the "ep" mesh dimension.

As torchtitan's (pytorch/torchtitan, `torchtitan/distributed/expert_parallel.py`): each parameter whose first
dimension is the expert dimension becomes a DTensor sharded on dim 0 over "ep" of the experts' mesh (`mesh`: ep
folded into the ranks of a pipeline stage, borrowed from tp, cp and dp); the experts' forward sends the token copies
to the ranks that own their experts and back with all-to-alls (`kernels.moe`) and scales the experts' gradients by
tp / ep (`Parallel.expert_grad_scale`: they sum the tokens of all ep peers, while FSDP averages over "edp"). The
experts are then `fully_shard`-ed over "edp", or left out of FSDP when ep spans every rank of the stage (nothing to
gather or reduce, and no copies).
"""

from __future__ import annotations

from torch import nn


def check_divides(ep: int, n_experts: int, name: str = "the model") -> None:
    if n_experts % ep:
        raise ValueError(f"parallel.ep={ep} must divide the number of routed experts of {name} ({n_experts})")


def split_by_expert(params: nn.Module | nn.ParameterDict, n_experts: int, par) -> list[nn.Parameter]:
    """Replace each own parameter of `params` whose first dimension is n_experts (2-D or more) by its DTensor
    sharded on dim 0 over par.ep_mesh; returns the new parameters."""
    from torch.distributed.tensor import Shard, distribute_tensor

    out = []
    items = params.items() if isinstance(params, nn.ParameterDict) else params.named_parameters(recurse=False)
    for name, p in list(items):
        if p.dim() >= 2 and p.shape[0] == n_experts:
            sharded = nn.Parameter(
                distribute_tensor(p.data, par.ep_mesh, [Shard(0)], src_data_rank=None), requires_grad=p.requires_grad
            )
            if isinstance(params, nn.ParameterDict):
                params[name] = sharded
            else:
                setattr(params, name, sharded)
            out.append(sharded)
    return out


def shard_experts(experts: nn.Module, par, reshard_after_forward: bool, ignored: set) -> None:
    """After `split_by_expert`: FSDP over the ranks holding the same experts, or (ep spanning every data-parallel
    stage) the split parameters added to `ignored` for the enclosing units."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from .fsdp import mp_policy

    if par.experts_unreplicated:
        ignored.update(p for p in experts.parameters(recurse=False) if isinstance(p, DTensor))
    else:
        fully_shard(experts, mesh=par.experts_dp_mesh, reshard_after_forward=reshard_after_forward,
                    mp_policy=mp_policy(par.mixed_precision))  # fmt: skip
