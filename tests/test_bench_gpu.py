"""benchmarks/bench_gpu.py end to end with `--smoke`: every row measured in its own subprocess, no error, the
implementations agreeing on the first training loss (same weights, same batch) and the comparisons filled in. On CPU
here; on CUDA too where there is a GPU (the benchmark's CUDA-only lines: device maps, synchronization, CUDA peaks)."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import hybridmoe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXPECTED = {
    ("train", "1.2b", "hybridmoe"),
    ("train", "1.2b", "hybridmoe-compiled"),
    ("train", "1.2b", "transformers"),
    ("train", "nano-slice", "hybridmoe"),
    ("train", "nano-slice", "transformers"),
    ("serve", "1.2b", "hybridmoe", "eager"),
    ("serve", "1.2b", "hybridmoe", "static"),
    ("serve", "1.2b", "transformers"),
    ("finetune", "qwen3-moe", "hybridmoe.automodel"),
    ("finetune", "qwen3-moe", "transformers"),
}


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))],
)
def test_bench_gpu_smoke(tmp_path, device):
    out = tmp_path / "gpu.json"
    src = os.path.dirname(os.path.dirname(hybridmoe.__file__))  # the hybridmoe under test, in the workers too
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_gpu.py"), "--smoke", "--device", device,
           "--jobs", "2" if device == "cpu" else "1", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads(out.read_text())
    assert results["device"] == device and results["machine"]
    # the kernel libraries the run found, named in the table's first line
    assert set(results["kernels"]) == {"triton", "mamba_ssm", "causal_conv1d"}
    assert (tmp_path / "gpu.md").read_text().startswith(results["machine"] + "; transformers ")
    rows = results["rows"]
    assert [r for r in rows if "error" in r] == []
    assert {(r["part"], r["shape"], r["impl"]) + ((r["decode_mode"],) if "decode_mode" in r else ()) for r in rows} == (
        EXPECTED if device == "cpu" else {k[:3] + (("graphs",) if k[3:] == ("static",) else k[3:]) for k in EXPECTED}
    )
    assert len(rows) == len(EXPECTED)
    for r in rows:
        assert r["peak_gb"] > 0, r
        if r["part"] in ("train", "finetune"):
            assert r["tokens_per_s"] > 0 and len(r["losses"]) == 2 and all(map(math.isfinite, r["losses"])), r
            if r["impl"] not in ("hybridmoe", "transformers"):
                # the same weights and batch: the first losses agree to bf16 rounding
                assert r["loss_vs"]["first"] < 1e-2, r
        if r["part"] == "train":
            assert r["mfu"] > 0, r
            if r["impl"] != "hybridmoe":
                assert r["loss_vs"]["impl"] == "hybridmoe" and r["loss_vs"]["first"] < 1e-2, r
        if r["part"] == "serve":
            assert r["prefill_tokens_per_s"] > 0, r
            for b in ("1", "4"):
                assert r["decode"][b]["tokens_per_s"] > 0 and len(r["decode"][b]["tokens"]) == int(b), r
                assert all(len(t) == 12 for t in r["decode"][b]["tokens"]), r
    theirs = next(r for r in rows if r["part"] == "serve" and r["impl"] == "transformers")
    assert set(theirs["greedy_vs_hybridmoe"]) == {"eager", "static" if device == "cpu" else "graphs"}
    for per_batch in theirs["greedy_vs_hybridmoe"].values():
        assert set(per_batch) == {"1", "4"}
    table = out.with_suffix(".md").read_text()
    assert table in proc.stdout
    assert "| finetune | qwen3-moe | hybridmoe.automodel |" in table and "| hybridmoe | " in table
