"""benchmarks/device/: the kit that runs the GPU checks on a lent device machine. Its full dry run needs the wheels
(`wheels.sh` fetches them from the package index), so here: the scripts parse, refuse what they cannot do with a
message that says why, and run.sh's stage names."""

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KIT = os.path.join(ROOT, "benchmarks", "device")


@pytest.mark.parametrize("script", ["wheels.sh", "run.sh"])
def test_shell_scripts_parse(script):
    subprocess.run(["bash", "-n", os.path.join(KIT, script)], check=True)


def test_run_refuses_an_unknown_stage(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), SITE=str(tmp_path / "site"))
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / ".ready").touch()  # as after setup: no install attempted
    proc = subprocess.run(["bash", os.path.join(KIT, "run.sh"), "benchmark"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "unknown stage benchmark: use setup, tests, bench" in proc.stdout
    assert "unknown stage" in (tmp_path / "device.log").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_conv_build_needs_a_gpu(tmp_path):
    cmd = [sys.executable, os.path.join(KIT, "build_causal_conv1d.py"), "missing.tar.gz", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 1 and "no CUDA GPU" in proc.stderr
