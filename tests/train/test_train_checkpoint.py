"""Run checkpoints (`train.checkpoint`): every file fsynced, stale temporaries removed, and a pickled RNG state in
a distributed checkpoint refused without running it."""

import os
import sys

import pytest
import torch

from hybridmoe import HybridMoEConfig, HybridMoEForCausalLM
from hybridmoe.train.checkpoint import load_distributed_checkpoint, save_checkpoint
from hybridmoe.train.config import OptimSection
from hybridmoe.train.optim import build_optimizer


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP in one process, as intended here
def test_distributed_resume_refuses_a_pickled_rng_state(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = HybridMoEForCausalLM(HybridMoEConfig.from_preset("debug"))
    optimizer = build_optimizer(model, OptimSection())
    model_sd, optim_sd = get_state_dict(model, optimizer)
    ckpt = tmp_path / "step-0000001"
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(ckpt / "dcp"), no_dist=True)
    (ckpt / "trainer_state").mkdir()
    (ckpt / "trainer_state" / "state.json").write_text('{"step": 1}')
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"torch_rng": Payload()}, ckpt / "trainer_state" / "rng-0.pt")
    with pytest.raises(ValueError, match="rng-0.pt holds more than tensors"):
        load_distributed_checkpoint(str(ckpt), model, optimizer, None)
    assert not marker.exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")
def test_checkpoint_files_are_fsynced_and_stale_temporaries_removed(tmp_path, monkeypatch):
    tok = tmp_path / "tok"
    tok.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tok / name).write_text("{}")
    stale = tmp_path / "run" / "checkpoints" / ".step-0000001.abcd1234"
    stale.mkdir(parents=True)
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    model = HybridMoEForCausalLM(HybridMoEConfig.from_preset("debug"))
    optimizer = build_optimizer(model, OptimSection())
    save_checkpoint(str(tmp_path / "run"), 1, model, optimizer, {}, "train: {}\n", str(tok))
    assert (tmp_path / "run" / "checkpoints" / "step-0000001" / "tokenizer.json").read_text() == "{}"
    for name in ("tokenizer.json", "tokenizer_config.json", "model.safetensors", "recipe.yaml", "optimizer.pt"):
        assert any(s == name or s.startswith(f".{name}.") for s in synced), (name, synced)
    assert not stale.exists()
