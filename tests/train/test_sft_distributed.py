"""Native SFT under torchrun (2 CPU processes, gloo, expert parallelism 2) with no SFT-specific distributed code:
the same losses as one process on the whole global batch, with the per-conversation normalization (each rank's
weights come from the whole global batch)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from ranks import start_ranks
from test_finetune import tokenizer_dir  # noqa: F401 (fixture)
from test_sft import chats, native_recipe, step_records  # noqa: F401 (fixture)

from hybridmoe.train.sft import sft

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _rank(rank, world, port, args):
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    out_dir, chats_path, tok, sections = args
    sft(native_recipe(out_dir, chats_path, tok, steps=3, **sections))


def test_two_processes_with_expert_parallelism_match_one(tmp_path, chats, tokenizer_dir):  # noqa: F811
    sections = {"sft": {"loss_normalization": "conversation"}, "optim": {"lr": 1e-3}}
    sft(native_recipe(tmp_path / "one", chats, tokenizer_dir, steps=3, **sections))
    two = dict(sections, parallel={"ep": 2})
    args = (str(tmp_path / "two"), chats, tokenizer_dir, two)
    start_ranks(_rank, (2, 29460, args), nprocs=2)
    ref, got = step_records(tmp_path / "one"), step_records(tmp_path / "two")
    assert [r["step"] for r in got] == [1, 2, 3]
    for a, b in zip(ref, got):
        for key in ("loss", "lm_loss", "mtp_loss", "aux_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key, a[key], b[key])
        assert b["tokens"] == a["tokens"] and b["loss_tokens"] == a["loss_tokens"]
    assert (tmp_path / "two" / "checkpoints" / "step-0000003" / "dcp").is_dir()
