"""GRPO under torchrun (2 CPU processes, gloo, expert parallelism 2): rank 0 samples on its engine with the gathered
full weights and sends the trajectories to both ranks, each trains on its rows; the same losses, rewards and
gradient norms as one process, and the weights published after each step are the trainer's."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
from ranks import start_ranks
from test_finetune import tokenizer_dir  # noqa: F401 (fixture)
from test_rl import fake_agent, rl_recipe, step_records

from hybridmoe.train.rl import rl

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _rank(rank, world, port, args):
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    sys.modules["hybridmoe.envs.agent"] = fake_agent()
    out_dir, tok, sections = args
    rl(rl_recipe(out_dir, tok, steps=3, **sections))


def test_two_processes_with_expert_parallelism_match_one(tmp_path, tokenizer_dir, monkeypatch):  # noqa: F811
    monkeypatch.setitem(sys.modules, "hybridmoe.envs.agent", fake_agent())
    sections = {"rl": {"seq_len": 0, "micro_batch_size": 3}, "parallel": {"consolidate": False}}
    rl(rl_recipe(tmp_path / "one", tokenizer_dir, steps=3, **sections))
    args = (str(tmp_path / "two"), tokenizer_dir, dict(sections, parallel={"ep": 2, "consolidate": False}))
    start_ranks(_rank, (2, 29470, args), nprocs=2)
    ref, got = step_records(tmp_path / "one"), step_records(tmp_path / "two")
    assert [r["step"] for r in got] == [1, 2, 3]
    for a, b in zip(ref, got):
        for key in ("loss", "pg", "grad_norm", "reward", "accuracy", "mismatch_mean", "loss_tokens", "trajectories"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key, a[key], b[key])
        assert b["mismatch_max"] < 1e-3  # rank 0's engine holds the weights the ranks train
    assert (tmp_path / "two" / "checkpoints" / "step-0000003" / "dcp").is_dir()
