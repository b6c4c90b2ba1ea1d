"""The one device mesh of a torchrun job, and this process's place in it.

As torchtitan's `ParallelDims` (pytorch/torchtitan, `torchtitan/distributed/parallel_dims.py`) the layout names
every dimension, dp_replicate x dp_shard x cp x tp x pp = world. hybridmoe runs dp_shard (FSDP2), cp (context
parallel), tp (tensor + sequence parallel), pp (pipeline stages) and ep today, composed; dp_replicate is named here so
that a layout asking for it fails at start with a clear error rather than later.

Two meshes over the same ranks, as Megatron-LM's MoE parallel folding lays them out (Liu et al., "MoE Parallel
Folding", 2025, arXiv:2504.14960): the dense layers see ("pp", "dp", "cp", "tp"), outermost first, and the routed
experts see ("pp", "edp", "ep"), the ranks of each pipeline stage folded into edp x ep with ep innermost.
  - "pp" outermost in both (as torchtitan orders it: the stages exchange one activation per micro-batch, the least
    traffic, so they may span nodes); everything below is within this rank's pipeline stage;
  - "tp" innermost (on GPUs the ranks of a tensor-parallel group share a node), "cp" the ranks holding the shards of
    the same sequences, "dp" the data-parallel ranks (their own rows of the batch);
  - "ep": the ranks that split the routed experts among them. Under sequence parallelism and context parallelism
    every rank of a stage routes its own tokens, so ep may borrow ranks from tp, cp and dp alike (in that order:
    consecutive ranks) and only has to divide dp x cp x tp; "edp" the ranks holding the same experts.
FSDP shards the dense parameters over the ranks holding the same ones: "dp" when cp = 1, else "dp_cp" = ("dp", "cp")
flattened (torchtitan's dp_shard_cp), and the routed experts over "edp".
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

IMPLEMENTED = ("dp_shard", "cp", "tp", "pp", "ep")  # the dimensions hybridmoe runs today
DENSE_DIMS = ("pp", "dp", "cp", "tp")
EXPERT_DIMS = ("pp", "edp", "ep")


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of every dimension; dp_shard -1 takes what the others leave of the world."""

    world_size: int
    dp_replicate: int = 1
    dp_shard: int = -1
    cp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1

    def resolved(self) -> ParallelDims:
        """Check the degrees against the world size; dp_shard filled in."""
        for name in ("dp_replicate", "cp", "tp", "pp", "ep"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name}={getattr(self, name)} must be >= 1")
        if self.dp_replicate != 1:
            raise ValueError(
                f"parallel.dp_replicate={self.dp_replicate}: hybridmoe runs {' x '.join(IMPLEMENTED)} so far "
                "(FSDP2 data parallel, context, tensor, pipeline and expert parallel); set parallel.dp_replicate=1"
            )
        other = self.dp_replicate * self.cp * self.tp * self.pp
        if self.world_size % other:
            raise ValueError(
                f"parallel.pp={self.pp} x parallel.tp={self.tp} x parallel.cp={self.cp} must divide the number of "
                f"processes ({self.world_size}): launch torchrun with a multiple of {other} processes"
            )
        dp_shard = self.world_size // other if self.dp_shard == -1 else self.dp_shard
        if dp_shard * other != self.world_size:
            raise ValueError(
                f"dp_shard {dp_shard} x cp {self.cp} x tp {self.tp} x pp {self.pp} = {dp_shard * other} is not the "
                f"{self.world_size} processes"
            )
        if (dp_shard * self.cp * self.tp) % self.ep:
            raise ValueError(
                f"parallel.ep={self.ep} must divide the ranks of a pipeline stage (processes / pp = dp {dp_shard} x cp "
                f"{self.cp} x tp {self.tp} = {dp_shard * self.cp * self.tp}): expert parallelism borrows its ranks "
                "from data, context and tensor parallelism"
            )
        return ParallelDims(self.world_size, self.dp_replicate, dp_shard, self.cp, self.tp, self.pp, self.ep)

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    def build_mesh(self, device_type: str):
        """The dense ("pp", "dp", "cp", "tp") mesh, the flattened FSDP mesh and the experts' ("pp", "edp", "ep") mesh
        over the same ranks (see the module docstring)."""
        from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

        mesh = init_device_mesh(device_type, (self.pp, self.dp_shard, self.cp, self.tp), mesh_dim_names=DENSE_DIMS)
        dp_mesh = mesh["dp", "cp"]._flatten("dp_cp") if self.cp > 1 else mesh["dp"]
        stage = self.dp_shard * self.cp * self.tp
        ranks = torch.arange(self.world_size).view(self.pp, stage // self.ep, self.ep)
        expert_mesh = DeviceMesh(device_type, ranks, mesh_dim_names=EXPERT_DIMS)
        return mesh, dp_mesh, expert_mesh


@dataclass
class Parallel:
    """This process's place in the job: `mesh` ("pp", "dp", "cp", "tp"), `dp_mesh` the ranks FSDP shards the dense
    parameters over (the data-parallel ranks of its pipeline stage, x cp), `expert_mesh` ("pp", "edp", "ep")."""

    rank: int
    world_size: int
    ep: int
    device: torch.device
    mesh: object  # DeviceMesh ("pp", "dp", "cp", "tp")
    dp_mesh: object  # FSDP's ranks as one dimension: "dp" (the data-parallel ranks), or "dp_cp" under cp
    expert_mesh: object = None  # DeviceMesh ("pp", "edp", "ep"): the same ranks as the routed experts see them
    tp: int = 1
    cp: int = 1
    pp: int = 1  # pipeline stages (`distributed.pp`)
    mixed_precision: str | None = None  # "bf16": FSDP2 gathers bf16 copies of fp32 weights (parallel.mixed_precision)

    @property
    def ep_mesh(self):
        return self.expert_mesh["ep"]

    @property
    def ep_group(self):
        return self.ep_mesh.get_group() if self.ep > 1 else None

    @property
    def expert_grad_scale(self) -> float:
        """What a routed expert's gradient is multiplied by before FSDP averages it over "edp": it sums the tokens
        of all ep peers, and the ranks of the stage (dp x cp x tp = edp x ep) hold the losses of dp x cp averaged
        rows, the tp ranks of one row group each its own tokens of the same loss (summed, not averaged)."""
        return self.tp / self.ep

    @property
    def tp_mesh(self):
        return self.mesh["tp"]

    @property
    def tp_group(self):
        return self.mesh["tp"].get_group() if self.tp > 1 else None

    @property
    def cp_group(self):
        return self.mesh["cp"].get_group() if self.cp > 1 else None

    @property
    def cp_rank(self) -> int:
        return self.mesh.get_local_rank("cp")

    @property
    def pp_group(self):
        return self.mesh["pp"].get_group()

    @property
    def pp_rank(self) -> int:
        """This rank's pipeline stage."""
        return self.mesh["pp"].get_local_rank()

    @property
    def experts_dp_mesh(self):
        """The ranks that hold the same routed experts (FSDP shards the experts over them)."""
        return self.expert_mesh["edp"]

    @property
    def dp_size(self) -> int:
        return self.world_size // (self.tp * self.cp * self.pp)

    @property
    def stage_size(self) -> int:
        """The ranks of one pipeline stage (all of them without pipeline parallelism)."""
        return self.world_size // self.pp

    @property
    def dp_rank(self) -> int:
        return self.mesh.get_local_rank("dp")

    @property
    def experts_unreplicated(self) -> bool:
        """ep spans every rank of the pipeline stage ("edp" of size 1): each expert lives on one rank, so FSDP has
        nothing of theirs to gather or reduce and leaves them alone."""
        return self.ep > 1 and self.ep == self.stage_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def local_rows(self, batch: dict) -> dict:
        """This rank's rows of a global batch (every rank builds the same global batch from the same loader; the
        ranks of a tensor- or context-parallel group take the same rows)."""
        rows = next(iter(batch.values())).shape[0]
        if rows % self.dp_size:
            raise ValueError(
                f"the global batch has {rows} sequences, which {self.dp_size} data-parallel ranks cannot split "
                f"evenly: make data.batch_size (and each data.seq_mix batch_size) a multiple of the number of "
                f"processes / (parallel.tp x parallel.cp x parallel.pp)"
            )
        per, r = rows // self.dp_size, self.dp_rank
        return {k: (v[r * per : (r + 1) * per] if v is not None else None) for k, v in batch.items()}

    def sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)  # NCCL reduces device tensors only
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        dist.barrier()


def launched_with_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def setup(
    ep: int = 1,
    backend: str | None = None,
    tp: int = 1,
    mixed_precision: str | None = None,
    cp: int = 1,
    pp: int = 1,
) -> Parallel | None:
    """Join the torchrun job (process group + mesh), or return None when not launched with torchrun."""
    if mixed_precision not in (None, "bf16"):
        raise ValueError(f"parallel.mixed_precision={mixed_precision!r}: use bf16 or null")
    if not launched_with_torchrun():
        for name, value in (("ep", ep), ("tp", tp), ("cp", cp), ("pp", pp)):
            if value != 1:
                raise ValueError(
                    f"parallel.{name}={value} needs several processes: launch with torchrun --nproc-per-node N"
                )
        if mixed_precision is not None:
            raise ValueError(
                "parallel.mixed_precision is FSDP2's (torchrun); in one process use train.precision=autocast-bf16"
            )
        return None
    world = int(os.environ["WORLD_SIZE"])
    dims = ParallelDims(world, tp=tp, ep=ep, cp=cp, pp=pp).resolved()
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"), timeout=datetime.timedelta(minutes=30))
    mesh, dp_mesh, expert_mesh = dims.build_mesh(device.type)
    return Parallel(
        rank=dist.get_rank(), world_size=world, ep=ep, device=device, mesh=mesh, dp_mesh=dp_mesh, tp=tp,
        mixed_precision=mixed_precision, cp=cp, pp=pp, expert_mesh=expert_mesh,
    )  # fmt: skip


def teardown(failed: bool = False) -> None:
    """Leave the process group: after a barrier (no rank leaves while another is still in a collective), or at once
    when this rank is leaving on an exception (`failed`): the others may never reach the barrier, and torchrun stops
    them when this process exits with the error."""
    if dist.is_initialized():
        if not failed:
            dist.barrier()
        dist.destroy_process_group()
