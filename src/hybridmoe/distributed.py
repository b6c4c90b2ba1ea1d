"""torch.distributed for everything that trains: the device mesh, FSDP2, expert parallelism, gradient clipping
across meshes, and distributed checkpoints (DCP).

Faithful to torchtitan's layout for MoE models (pytorch/torchtitan, `torchtitan/models/deepseek_v3/infra/
parallelize.py` and `torchtitan/distributed/expert_parallel.py`). The W ranks of a `torchrun`
job form a 2-D mesh ("dp_shard", "ep") with dp_shard * ep = W:
  - data: every rank is a data-parallel rank and takes its own rows of the global batch (expert parallelism
    borrows its ranks from data parallelism; it does not replicate the batch);
  - FSDP2: every block is `fully_shard`-ed over all W ranks (the flattened mesh "dp"), and so are the
    embeddings, final norm and LM head (the root);
  - expert parallelism: each MoE layer's routed experts are split in contiguous blocks over "ep" (a DTensor
    sharded on dim 0), tokens travel to their experts and back with all-to-alls (`kernels.moe`), and the
    experts are then `fully_shard`-ed over "dp_shard" (the ranks that hold the same experts), or, when ep is
    the whole world (dp_shard of size 1), left out of FSDP: nothing to shard or reduce, and no copies;
  - gradients: every rank's loss is the mean over its own tokens, so a parameter's gradient is averaged over all
    W ranks. FSDP divides by the size of its mesh; the experts' mesh is dp_shard, but their gradients already sum
    the contributions of all ep peers' tokens, so the experts divide them by ep first (`modeling.Experts`; a
    custom FSDP divide factor would need PREMUL_SUM, which gloo lacks);
  - MoE balancing: token counts per expert are summed over all ranks before the bias update (`train.balance`).

The same code runs on gloo (CPU) and NCCL (GPU); launch with `torchrun --nproc-per-node N -m hybridmoe.cli
pretrain RECIPE parallel.ep=E`. Without torchrun (no WORLD_SIZE in the environment) nothing here is used and the
trainer runs in one process as before.
"""

from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Parallel:
    """This process's place in the job. `mesh` is the 2-D ("dp_shard", "ep") mesh; "dp" is its flattening."""

    rank: int
    world_size: int
    ep: int
    device: torch.device
    mesh: object  # DeviceMesh ("dp_shard", "ep")
    dp_mesh: object  # the same ranks as one flat dimension, "dp"

    @property
    def ep_group(self):
        return self.mesh["ep"].get_group() if self.ep > 1 else None

    @property
    def experts_unreplicated(self) -> bool:
        """ep spans the whole world ("dp_shard" of size 1): each expert lives on one rank, so FSDP has nothing of
        theirs to gather or reduce and leaves them alone."""
        return self.ep > 1 and self.ep == self.world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def local_rows(self, batch: dict) -> dict:
        """This rank's rows of a global batch (every rank builds the same global batch from the same loader)."""
        rows = next(iter(batch.values())).shape[0]
        if rows % self.world_size:
            raise ValueError(
                f"the global batch has {rows} sequences, which {self.world_size} ranks cannot split evenly: "
                f"make data.batch_size (and each data.seq_mix batch_size) a multiple of the number of processes"
            )
        per = rows // self.world_size
        return {k: (v[self.rank * per : (self.rank + 1) * per] if v is not None else None) for k, v in batch.items()}

    def sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)  # NCCL reduces device tensors only
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        dist.barrier()


def launched_with_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def setup(ep: int = 1, backend: str | None = None) -> Parallel | None:
    """Join the torchrun job (process group + mesh), or return None when not launched with torchrun."""
    if not launched_with_torchrun():
        if ep != 1:
            raise ValueError(f"parallel.ep={ep} needs several processes: launch with torchrun --nproc-per-node N")
        return None
    from torch.distributed.device_mesh import init_device_mesh

    world = int(os.environ["WORLD_SIZE"])
    if ep < 1 or world % ep:
        raise ValueError(f"parallel.ep={ep} must divide the number of processes ({world})")
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"), timeout=datetime.timedelta(minutes=30))
    mesh = init_device_mesh(device.type, (world // ep, ep), mesh_dim_names=("dp_shard", "ep"))
    dp_mesh = mesh["dp_shard", "ep"]._flatten("dp")
    return Parallel(rank=dist.get_rank(), world_size=world, ep=ep, device=device, mesh=mesh, dp_mesh=dp_mesh)


def teardown() -> None:
    if dist.is_initialized():
        dist.barrier()  # no rank leaves while another is still in a collective
        dist.destroy_process_group()


def parallelize(model, par: Parallel, reshard_after_forward: bool = True):
    """Expert parallelism, then FSDP2 per block and at the root, in place. The model must hold the full weights
    (every rank the same: built from the same seed or loaded from the same checkpoint)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    from .modeling import LatentMoE

    n_experts = [m.experts.up_proj.shape[0] for m in model.modules() if isinstance(m, LatentMoE)]
    if par.ep > 1 and n_experts and n_experts[0] % par.ep:
        raise ValueError(f"parallel.ep={par.ep} must divide the number of routed experts ({n_experts[0]})")
    dp_mesh, ep_mesh = par.dp_mesh, par.mesh["ep"]
    # fp32 gradient reduction whatever the parameter dtype (the Nemotron 3 recipe reduces in fp32)
    mp = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    ignored: set[torch.nn.Parameter] = set()
    for module in model.modules():
        if not isinstance(module, LatentMoE):
            continue
        # The router stays fp32 in a bf16 model, and FSDP wants one dtype per unit: the router gets its own.
        fully_shard(module.gate, mesh=dp_mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp)
        experts = module.experts
        if par.ep > 1:
            for name in ("up_proj", "down_proj"):
                full = getattr(experts, name)
                sharded = distribute_tensor(full.data, ep_mesh, [Shard(0)], src_data_rank=None)
                setattr(experts, name, torch.nn.Parameter(sharded, requires_grad=full.requires_grad))
            experts.ep_group = par.ep_group
            if par.experts_unreplicated:
                ignored.update(experts.parameters())
            else:
                fully_shard(experts, mesh=par.mesh["dp_shard"], reshard_after_forward=reshard_after_forward,
                            mp_policy=mp)  # fmt: skip
    # The MTP blocks stay in the root unit: forward_mtp uses their enorm/hnorm/eh_proj/final_layernorm outside
    # the blocks' own forward, where a per-block unit would not have gathered them.
    for block in model.backbone.layers:
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp,
                    ignored_params=ignored)  # fmt: skip
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=False, mp_policy=mp, ignored_params=ignored)
    return model


@torch.no_grad()
def clip_grad_norm_(params, max_norm: float, par: Parallel | None) -> torch.Tensor:
    """Clip the global gradient norm. Under FSDP/EP each gradient element lives on exactly one rank (a DTensor
    shard), on meshes that differ between expert and other parameters, so the squared norms of the local shards
    are summed over all ranks (torch's clip_grad_norm_ expects a single mesh)."""
    if par is None:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    grads = [p.grad for p in params if p.grad is not None]
    from torch.distributed.tensor import DTensor, Replicate

    total = torch.zeros((), dtype=torch.float64, device=par.device)
    for g in grads:
        if isinstance(g, DTensor):
            if any(isinstance(p, Replicate) for p in g.placements):
                raise RuntimeError("clip_grad_norm_: a replicated gradient would be counted more than once")
            g = g.to_local()
        total += g.detach().double().pow(2).sum()
    dist.all_reduce(total)
    norm = total.sqrt().float()
    if max_norm and math.isfinite(max_norm):
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for g in grads:
            (g.to_local() if isinstance(g, DTensor) else g).mul_(scale.to(g.dtype))
    return norm
