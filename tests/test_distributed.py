"""torch.distributed on CPU with gloo: expert parallelism against the single-device MoE, and the trainer on several
processes (dp, ep, dp x ep; under torchrun itself or on ranks forked with its environment) against the
single-process run on the same global batch, including resuming from a distributed checkpoint on another number of
processes and exporting it to the Hugging Face layout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import yaml
from helpers import write_prepared
from ranks import run_cli_ranks, start_ranks
from safetensors.torch import load_file
from test_pretrain import VOCAB, pattern_docs, step_records

from hybridmoe import HybridMoEConfig, HybridMoEForCausalLM
from hybridmoe.cli import main as cli_main
from hybridmoe.kernels.moe import experts_grouped, experts_reference
from hybridmoe.train.config import Recipe
from hybridmoe.train.metrics import read_log
from hybridmoe.train.pretrain import pretrain as train

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _spawn(fn, world: int, tmp_path, *args):
    """Run fn(rank, world, init_file, out_dir, *args) in `world` processes joined by a gloo group."""
    start_ranks(fn, (world, str(tmp_path / "store"), str(tmp_path), *args), nprocs=world)


# ---------------------------------------------------------------------------------------------- EP kernel


def _ep_worker(rank, world, store, out_dir, e, k, d, i):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(0)  # the same weights and all ranks' tokens on every rank
        w_up = torch.randn(e, i, d, generator=g) / d**0.5
        w_down = torch.randn(e, d, i, generator=g) / i**0.5
        xs, idxs, ws, cots = [], [], [], []
        for r in range(world):
            t = 5 + 3 * r  # ranks hold different numbers of tokens
            xs.append(torch.randn(t, d, generator=g))
            idxs.append(torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]))
            if r == 1:
                idxs[-1][:] = idxs[-1] % 2  # this rank sends everything to experts 0/1: others receive nothing
            ws.append(torch.rand(t, k, generator=g))
            cots.append(torch.randn(t, d, generator=g))
        # reference: one device, all tokens, full weights
        ref_up, ref_down = w_up.clone().requires_grad_(), w_down.clone().requires_grad_()
        ref_x = [x.clone().requires_grad_() for x in xs]
        ref_out = [experts_reference(x, ref_up, ref_down, ix, w) for x, ix, w in zip(ref_x, idxs, ws)]
        sum((o * c).sum() for o, c in zip(ref_out, cots)).backward()
        # expert parallel: this rank's tokens, this rank's experts
        per = e // world
        up = w_up[rank * per : (rank + 1) * per].clone().requires_grad_()
        down = w_down[rank * per : (rank + 1) * per].clone().requires_grad_()
        x = xs[rank].clone().requires_grad_()
        out = experts_grouped(x, up, down, idxs[rank], ws[rank], ep_group=dist.group.WORLD)
        (out * cots[rank]).sum().backward()
        result = {
            "out": (out - ref_out[rank]).abs().max().item(),
            "x": (x.grad - ref_x[rank].grad).abs().max().item(),
            "up": (up.grad - ref_up.grad[rank * per : (rank + 1) * per]).abs().max().item(),
            "down": (down.grad - ref_down.grad[rank * per : (rank + 1) * per]).abs().max().item(),
        }
        with open(os.path.join(out_dir, f"ep-{rank}.json"), "w") as fh:
            json.dump(result, fh)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_matches_single_device(tmp_path, world):
    _spawn(_ep_worker, world, tmp_path, 8, 2, 6, 5)
    for rank in range(world):
        errors = json.loads((tmp_path / f"ep-{rank}.json").read_text())
        assert all(v <= 1e-5 for v in errors.values()), (rank, errors)


# ---------------------------------------------------------------------------------------------- trainer


def _torchrun(nproc: int, recipe_path, *args):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        "-m", "hybridmoe.cli", "pretrain", str(recipe_path), *args,
    ]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-6000:])
    return proc


def _ranks(nproc: int, recipe_path, *args):
    """`hybridmoe pretrain RECIPE ARGS` on `nproc` ranks forked with torchrun's environment (`ranks.run_cli_ranks`:
    no interpreter start-up per rank); each rank's output in `<train.out_dir>-ranks/`."""
    out = next(a.split("=", 1)[1] for a in args if a.startswith("train.out_dir="))
    run_cli_ranks(nproc, ["pretrain", str(recipe_path), *args], f"{out}-ranks")


@pytest.fixture(scope="module")
def dist_setup(tmp_path_factory):
    """Prepared data, a recipe (debug preset with MTP, global batch 4, 10 steps, a checkpoint at step 5) and the
    single-process run of it."""
    root = tmp_path_factory.mktemp("dist")
    data = write_prepared(root / "data", pattern_docs(300, 1), vocab=VOCAB, dtype="uint16")
    path = root / "recipe.yaml"
    recipe = {
        "model": {"preset": "debug"},
        "data": {"phases": [{"datasets": {str(data): 1.0}}], "seq_len": 64, "batch_size": 4, "val_fraction": 0.05},
        # a gentle learning rate: the runs differ in rounding (smaller per-rank matmuls), and a larger step
        # amplifies the odd flipped near-tie in top-k routing into a drift of the trajectory
        "optim": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 2, "decay_fraction": 0.3},
        "train": {
            "steps": 10, "save_every": 5, "keep_last": 3, "progress": False, "tensorboard": False,
            "val_batches": 2, "peak_gflops": 100.0, "out_dir": str(root / "single"),
        },
    }  # fmt: skip
    path.write_text(yaml.safe_dump(recipe))
    single = train(Recipe.from_yaml(str(path)))
    return root, path, step_records(root / "single"), single


def _assert_same_trajectory(records, reference, steps):
    assert [r["step"] for r in records] == steps
    by_step = {r["step"]: r for r in reference}
    for r in records:
        ref = by_step[r["step"]]
        for key in ("loss", "lm_loss", "mtp_loss", "aux_loss", "grad_norm"):
            assert r[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), (r["step"], key, r[key], ref[key])
        assert r["tokens"] == ref["tokens"] and r["lr"] == ref["lr"]
        # the same routing but for the odd near-tie decided the other way by a rounding difference
        assert r["expert_imbalance"] == pytest.approx(ref["expert_imbalance"], rel=2e-2)


def _resume_from_step5(first, resumed, nproc: int, recipe_path, *args):
    """A copy of `first`'s step-5 checkpoint and log (as a run interrupted after step 5 leaves them: steps 6+ dropped),
    resumed in `resumed` with `nproc` processes (1: in this process; more: `_ranks`)."""
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(first / "checkpoints" / "step-0000005", resumed / "checkpoints" / "step-0000005")
    shutil.copy(first / "log.jsonl", resumed / "log.jsonl")
    if nproc == 1:
        return train(Recipe.from_yaml(str(recipe_path), [f"train.out_dir={resumed}", *args]), resume=True)
    _ranks(nproc, recipe_path, f"train.out_dir={resumed}", *args, "--resume")


def _assert_exported_equals(run, exported, expected: dict, step: int = 10):
    """`hybridmoe export` of the run and its consolidated checkpoint of that step equal the state dict `expected`."""
    assert cli_main(["export", str(run), str(exported)]) == 0
    for model_dir in (exported, run / "checkpoints" / f"step-{step:07d}"):
        model = HybridMoEForCausalLM.from_pretrained(str(model_dir))
        for name, tensor in model.state_dict().items():
            if not name.endswith("tokens_per_expert"):
                torch.testing.assert_close(tensor, expected[name], rtol=1e-4, atol=1e-5, msg=f"{model_dir}: {name}")


# dp 2 started by torchrun itself, dp 2 x ep 2 on forked ranks (ep 2 alone: the first run of
# test_distributed_resume_on_another_world_size_and_export)
@pytest.mark.parametrize("nproc,ep", [(2, 1), (4, 2)], ids=["dp2-torchrun", "dp2xep2"])
def test_multi_process_matches_single_process(dist_setup, nproc, ep):
    root, path, reference, _ = dist_setup
    out = root / f"run-{nproc}-{ep}"
    (_torchrun if ep == 1 else _ranks)(nproc, path, f"parallel.ep={ep}", f"train.out_dir={out}")
    _assert_same_trajectory(step_records(out), reference, list(range(1, 11)))
    ckpt = out / "checkpoints" / "step-0000010"
    assert (ckpt / "dcp").is_dir() and (ckpt / "trainer_state" / f"rng-{nproc - 1}.pt").exists()


def test_distributed_resume_on_another_world_size_and_export(dist_setup, tmp_path):
    """A 2-process expert-parallel run matches the single process; its step-5 checkpoint, resumed on 4 processes
    (dp2 x ep2), logs steps 6-10 as the uninterrupted runs do; the exported and the consolidated models equal the
    single-process model."""
    root, path, reference, single = dist_setup
    first = tmp_path / "first"
    _ranks(2, path, "parallel.ep=2", f"train.out_dir={first}", "train.steps=10", "parallel.consolidate=false")
    _assert_same_trajectory(step_records(first), reference, list(range(1, 11)))
    assert (first / "checkpoints" / "step-0000010" / "trainer_state" / "rng-1.pt").exists()
    resumed = tmp_path / "resumed"
    _resume_from_step5(first, resumed, 4, path, "parallel.ep=2")
    _assert_same_trajectory(step_records(resumed), reference, list(range(1, 11)))
    assert not (first / "checkpoints" / "step-0000010" / "model.safetensors").exists()  # consolidate=false
    _assert_exported_equals(resumed, tmp_path / "exported", single["model"].state_dict())


def test_parallel_settings_are_checked(dist_setup):
    root, path, _, _ = dist_setup
    with pytest.raises(ValueError, match="torchrun"):
        train(Recipe.from_yaml(str(path), ["parallel.ep=2", f"train.out_dir={root / 'x'}"]))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "hybridmoe.cli",
         "pretrain", str(path), "data.batch_size=3", f"train.out_dir={root / 'y'}"],
        capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=600,
    )  # fmt: skip
    assert proc.returncode != 0 and "multiple of the number of processes" in proc.stderr + proc.stdout


def test_bf16_weights_with_activation_checkpointing(dist_setup):
    """bf16 weights (the router stays fp32 in its own FSDP unit) and recomputed activations, expert parallel."""
    root, path, reference, _ = dist_setup
    out = root / "bf16-ckpt"
    _ranks(2, path, "parallel.ep=2", "train.precision=bf16", "train.activation_checkpointing=true",
           f"train.out_dir={out}")  # fmt: skip
    records = read_log(str(out / "log.jsonl"))
    losses = [r["loss"] for r in records if "loss" in r]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(losses) == 10 and val[-1] < val[0] - 0.5, (losses, val)
    assert losses[0] == pytest.approx(reference[0]["loss"], rel=2e-2)  # bf16 rounding of the same first step
    weights = load_file(str(out / "checkpoints" / "step-0000010" / "model.safetensors"))
    assert weights["lm_head.weight"].dtype == torch.bfloat16
    assert weights["backbone.layers.2.mixer.gate.weight"].dtype == torch.float32


def test_export_rejects_a_checkpoint_without_shards(tmp_path, capsys):
    model_dir = tmp_path / "plain"
    HybridMoEForCausalLM(HybridMoEConfig.from_preset("debug")).save_pretrained(str(model_dir))
    assert cli_main(["export", str(model_dir), str(tmp_path / "out")]) == 2
    assert "not a distributed checkpoint" in capsys.readouterr().err
