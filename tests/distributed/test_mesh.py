"""The mesh of a torchrun job (`hybridmoe.distributed.mesh`): the layout rules, the experts' folded mesh, and leaving
the process group when one rank fails."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch.distributed as dist
from ranks import start_ranks

from hybridmoe.distributed import ParallelDims

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def test_expert_parallelism_borrows_from_every_rank_of_a_stage():
    # 8 processes, pp 2 x tp 2 x cp 2: dp 1, and ep 2 or 4 borrows from tp and cp
    assert ParallelDims(8, pp=2, tp=2, cp=2, ep=2).resolved().dp_shard == 1
    assert ParallelDims(8, pp=2, tp=2, cp=2, ep=4).resolved().dp_shard == 1
    with pytest.raises(ValueError, match=r"parallel.ep=8 must divide the ranks of a pipeline stage .* = 4\)"):
        ParallelDims(8, pp=2, tp=2, cp=2, ep=8).resolved()
    with pytest.raises(ValueError, match="parallel.ep=3"):
        ParallelDims(4, ep=3).resolved()


def _mesh_worker(rank, world, store, out_dir, pp, tp, cp, ep):
    from hybridmoe.distributed import setup

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank))
    try:
        par = setup(pp=pp, tp=tp, cp=cp, ep=ep, backend="gloo")
        groups = {
            "tp": dist.get_process_group_ranks(par.tp_mesh.get_group()),
            "ep": dist.get_process_group_ranks(par.ep_group),
            "edp": dist.get_process_group_ranks(par.experts_dp_mesh.get_group()),
            "pp": dist.get_process_group_ranks(par.pp_group),
            "dp_rank": par.dp_rank, "scale": par.expert_grad_scale, "unreplicated": par.experts_unreplicated,
        }  # fmt: skip
        with open(os.path.join(out_dir, f"{rank}.json"), "w") as fh:
            json.dump(groups, fh)
    finally:
        dist.destroy_process_group()


def test_the_experts_mesh_folds_the_ranks_of_a_stage(tmp_path):
    """pp 2 x cp 2 x tp 2 on 8 ranks (stage 0: ranks 0-3, cp-major, tp innermost), ep 2: the experts' groups are
    consecutive ranks of a stage (here the tp pairs), "edp" the ranks holding the same experts; the experts'
    gradients are scaled by tp / ep."""
    start_ranks(_mesh_worker, (8, str(tmp_path / "store"), str(tmp_path), 2, 2, 2, 2), nprocs=8)
    r = {rank: json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(8)}
    assert r[0]["tp"] == [0, 1] and r[2]["tp"] == [2, 3]
    assert r[0]["ep"] == [0, 1] and r[6]["ep"] == [6, 7]
    assert r[0]["edp"] == [0, 2] and r[5]["edp"] == [5, 7]
    assert r[1]["pp"] == [1, 5]
    assert {x["dp_rank"] for x in r.values()} == {0}
    assert all(x["scale"] == 1.0 and not x["unreplicated"] for x in r.values())


def _failing_worker(rank, world, store, out_dir):
    from hybridmoe.distributed import teardown

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    done, ready = os.path.join(out_dir, "left"), os.path.join(out_dir, "ready")
    if rank == 1:  # this rank raised: it leaves without waiting for rank 0 at a barrier, once rank 0's connections
        while not os.path.exists(ready):  # are up (leaving earlier fails rank 0's init: "connectFullMesh failed")
            time.sleep(0.05)
        teardown(failed=True)
        open(done, "w").close()
    else:  # rank 0 is busy elsewhere (here: waiting for rank 1 to have left) and never reaches a barrier first
        open(ready, "w").close()
        while not os.path.exists(done):
            time.sleep(0.05)
        teardown(failed=True)


def test_a_failed_rank_leaves_without_a_barrier(tmp_path):
    """Before, a rank leaving on an exception waited at a barrier that the other ranks (still in their step's
    collectives) never reached: the job hung until the 30-minute collective timeout instead of exiting, and
    torchrun never got to stop the others. (Here that would deadlock, and the join below would time out.)"""
    ctx = start_ranks(_failing_worker, (2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("a rank leaving on an exception waited at a barrier for the other ranks")
    assert os.path.exists(tmp_path / "left")
