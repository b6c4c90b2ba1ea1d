"""Distributed checkpoints resumed with another layout: another tensor-parallel degree (whose Mamba in_proj / conv1d
rows, and their AdamW moments, are stored in another order), another number of processes, one process. The loaded
model and optimizer state equal the saved one exactly; a resumed `hybridmoe pretrain` run logs the uninterrupted
run's steps."""

from __future__ import annotations

import os

import pytest
import test_distributed
import torch
import torch.distributed as dist
from ranks import start_ranks
from safetensors.torch import load_file, save_file
from test_distributed import _assert_same_trajectory, _ranks, _resume_from_step5
from test_pretrain import step_records

from hybridmoe import HybridMoEConfig, HybridMoEForCausalLM

dist_setup = test_distributed.dist_setup  # the debug recipe and its single-process run (a module-scoped fixture)

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

TP4 = {"n_groups": 4, "num_key_value_heads": 4}  # debug, splittable over 4 tp ranks


def _state_worker(rank, world, store, out_dir, tp, role, overrides):
    """role "save": 2 AdamW steps in layout (world, tp), then a distributed checkpoint; role "load": that checkpoint
    loaded into a fresh model and optimizer of layout (world, tp) (world 1: one process, no process group). Either
    way rank 0 writes the full model and optimizer state, Mamba rows in the Hugging Face order, to
    <role>.safetensors."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from hybridmoe.distributed import parallelize, reduce_partial_grads, setup
    from hybridmoe.distributed.tp import convert_rows
    from hybridmoe.train.checkpoint import (
        latest_checkpoint,
        load_distributed_checkpoint,
        save_distributed_checkpoint,
    )

    torch.set_num_threads(1)
    par = None
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        os.environ.update(WORLD_SIZE=str(world), RANK=str(rank))
        par = setup(tp=tp, backend="gloo")
    try:
        torch.manual_seed(0 if role == "save" else 1)  # the loaded state must come from the checkpoint
        config = HybridMoEConfig.from_preset("debug", **overrides)
        model = HybridMoEForCausalLM(config).train()
        if par is not None:
            parallelize(model, par)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=True)
        if role == "save":
            ids = torch.randint(0, config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(2))
            rows = par.local_rows({"ids": ids})["ids"]
            for _ in range(2):
                model(rows, labels=rows, return_logits=False).loss.backward()
                reduce_partial_grads(model, par)
                opt.step()
                opt.zero_grad()
            save_distributed_checkpoint(out_dir, 2, model, opt, {"data": {}}, "", None, par, consolidate=False)
        else:
            load_distributed_checkpoint(latest_checkpoint(out_dir), model, opt, par)
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd, optim_sd = get_state_dict(model, opt, options=options)  # on rank 0 (cpu_offload)
        if rank == 0:
            tensors = {n: convert_rows(n, t, config, tp, 1) for n, t in model_sd.items()}
            for n, entries in optim_sd["state"].items():
                for k, t in entries.items():
                    tensors[f"{k}:{n}"] = convert_rows(n, t, config, tp, 1) if t.dim() else t
            save_file({n: t.contiguous() for n, t in tensors.items()}, os.path.join(out_dir, f"{role}.safetensors"))
    finally:
        if par is not None:
            dist.destroy_process_group()


def _run(tmp_path, world, tp, role, overrides):
    store = tmp_path / f"store-{role}"
    args = (world, str(store), str(tmp_path), tp, role, overrides)
    if world == 1:
        _state_worker(0, *args)
    else:
        start_ranks(_state_worker, args, nprocs=world)


@pytest.mark.parametrize(
    "saved,resumed,overrides",
    [((2, 2), (1, 1), {}), ((2, 2), (4, 4), TP4)],
    ids=["tp2-to-one-process", "tp2-to-tp4"],
)  # (world, tp) of the saving and the resuming job
def test_state_resumes_across_tp_degrees(tmp_path, saved, resumed, overrides):
    """Every parameter and every AdamW state (the Mamba rows and their moments in the saved degree's order,
    converted to the resuming one's) is loaded exactly as saved. (dp 2 -> tp 2: the pretrain test below.)"""
    _run(tmp_path, *saved, "save", overrides)
    _run(tmp_path, *resumed, "load", overrides)
    expected, loaded = load_file(tmp_path / "save.safetensors"), load_file(tmp_path / "load.safetensors")
    assert sorted(loaded) == sorted(expected)
    assert any(k.startswith("exp_avg:") and ".mixer.in_proj." in k for k in expected)
    for name, t in expected.items():
        assert torch.equal(loaded[name], t), name


def test_pretrain_resumes_across_tp_degrees(dist_setup, tmp_path):
    """`hybridmoe pretrain` with dp 2 saved at step 5 resumes with tp 2 and in one process: steps 6-10 are the
    uninterrupted single-process run's. (The other direction, tp 2 x pp 2 resumed as dp 4, is
    `test_pipeline_parallel.test_cli_pipeline_tensor_parallel_matches_single_process`.)"""
    root, path, reference, _ = dist_setup
    steps = list(range(1, 11))
    dp2 = tmp_path / "dp2"
    _ranks(2, path, f"train.out_dir={dp2}", "parallel.consolidate=false")  # the schedule of 10 steps
    _resume_from_step5(dp2, tmp_path / "dp2-tp2", 2, path, "parallel.tp=2")
    _assert_same_trajectory(step_records(tmp_path / "dp2-tp2"), reference, steps)
    _resume_from_step5(dp2, tmp_path / "dp2-one", 1, path)
    _assert_same_trajectory(step_records(tmp_path / "dp2-one"), reference, steps)
