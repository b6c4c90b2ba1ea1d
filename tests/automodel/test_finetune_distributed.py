"""`hybridmoe finetune` (the SFT stage with model.source=transformers) on 2 ranks with torchrun's environment (CPU,
gloo, expert parallelism 2): the same losses as one process on the whole batch, distributed checkpoints that resume
exactly, and a `final/` that transformers loads."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
import torch.distributed as dist
import transformers
from ranks import start_ranks
from test_finetune import CHATS, _model_dir, _qwen3_moe, _write_chats, tokenizer_dir  # noqa: F401 (fixture)

from hybridmoe.train.metrics import read_log
from hybridmoe.train.sft import finetune_recipe, sft

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

WORLD = 2


def _rank(rank, world, port, flags, resume):
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    sft(finetune_recipe(**flags), resume=resume, peak_gflops=100.0)


def _run_ranks(flags: dict, port: int, resume: bool = False) -> None:
    start_ranks(_rank, (WORLD, port, flags, resume), nprocs=WORLD)


@pytest.mark.parametrize("lora", [False, True])
def test_two_processes_with_expert_parallelism_match_one(tmp_path, tokenizer_dir, lora):  # noqa: F811
    base = _model_dir(tmp_path, tokenizer_dir, _qwen3_moe)
    data = tmp_path / "chats.jsonl"
    _write_chats(data, CHATS * 4)
    common = dict(model=base, data=str(data), seq_len=96, batch_size=4, steps=4, lr=3e-3, dtype="fp32",
                  save_every=2, progress=False, lora=lora, lora_r=4)  # fmt: skip
    one = dict(common, out_dir=str(tmp_path / "one"))
    two = dict(common, out_dir=str(tmp_path / "two"), ep=2)
    sft(finetune_recipe(**one), peak_gflops=100.0)
    port = 29400 + int(lora)
    _run_ranks(two, port)
    ref, got = read_log(os.path.join(one["out_dir"], "log.jsonl")), read_log(os.path.join(two["out_dir"], "log.jsonl"))
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(ref, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), (a, b)
    assert ref[-1]["loss"] < ref[0]["loss"]
    # the distributed checkpoint holds every rank's shards; final/ is a plain model equal to the one-process one
    assert os.path.isdir(os.path.join(two["out_dir"], "checkpoints", "step-0000002", "dcp"))
    m1 = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(one["out_dir"], "final"))
    m2 = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(two["out_dir"], "final"))
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    worst = max((s1[k] - s2[k]).abs().max().item() for k in s1)
    assert worst < 1e-4, worst
    if lora:
        assert os.path.isfile(os.path.join(two["out_dir"], "final", "adapter", "adapter_model.safetensors"))
    # resumed on 2 processes from step 2: steps 3-4 log the same losses
    shutil.rmtree(os.path.join(two["out_dir"], "checkpoints", "step-0000004"))
    _run_ranks(two, port + 10, resume=True)
    again = read_log(os.path.join(two["out_dir"], "log.jsonl"))
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    for a, b in zip(got[2:], again[2:]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-7), (a, b)
