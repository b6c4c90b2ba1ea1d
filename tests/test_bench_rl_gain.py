"""benchmarks/bench_rl_gain.py: the summary of finished runs (no model: the evaluations and the RL log are written
here), its table and issue 14's target read off it (+10 points on at least 2 environments, none lower by more than 2),
and the refusal of step counts it cannot evaluate after."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_rl_gain.py")


def load():
    spec = importlib.util.spec_from_file_location("bench_rl_gain", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_eval(path, acc: dict[str, float]):
    os.makedirs(path, exist_ok=True)
    summary = [{"env": e, "accuracy": a, "solved": a} for e, a in acc.items()]
    with open(os.path.join(path, "envs.json"), "w") as fh:
        json.dump({"summary": summary}, fh)


def test_summary_reads_the_target_off_finished_runs(tmp_path, monkeypatch):
    out, run = tmp_path / "out", tmp_path / "run"
    write_eval(out / "before", {"a": 0.50, "b": 0.20, "c": 0.90})
    write_eval(out / "after-2", {"a": 0.55, "b": 0.25, "c": 0.89})
    write_eval(out / "after-4", {"a": 0.61, "b": 0.30, "c": 0.885})  # +11, +10, -1.5
    run.mkdir()
    log = [{"step": s, "loss": 0.0, "reward": 0.1 * s, "reward_a": 0.1 * s} for s in (1, 2, 3, 4)]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    ran = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: ran.append(cmd) or subprocess.CompletedProcess(cmd, 0, ""))
    bench = load()
    monkeypatch.setattr(sys, "argv", ["bench_rl_gain.py", "--init", "sft", "--out", str(out), "--run-dir", str(run),
                                      "--envs", "a,b,c", "--steps", "2,4"])  # fmt: skip
    bench.main()
    assert [c for c in ran if c[0] == "hybridmoe"] == []  # every evaluation and step count was there already
    result = json.loads((out / "rl-gain.json").read_text())
    assert result["change_points"] == pytest.approx({"a": 11.0, "b": 10.0, "c": -1.5})
    assert result["target"] == {"gained_10": ["a", "b"], "lowered_more_than_2": [], "met": True}
    assert [r["step"] for r in result["train"]] == [1, 2, 3, 4]
    table = (out / "rl-gain.md").read_text()
    assert "| a | 50.0% | 55.0% | 61.0% | +11.0 |" in table and "target met" in table
    assert (out / "rl-gain.png").stat().st_size > 0

    write_eval(out / "after-4", {"a": 0.61, "b": 0.30, "c": 0.87})  # c: -3 points
    bench.main()
    result = json.loads((out / "rl-gain.json").read_text())
    assert result["target"] == {"gained_10": ["a", "b"], "lowered_more_than_2": ["c"], "met": False}


def test_step_counts_must_increase(tmp_path):
    p = subprocess.run([sys.executable, SCRIPT, "--init", "x", "--out", str(tmp_path), "--steps", "40,20"],
                       capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 2 and "give increasing positive step counts" in p.stderr


def test_train_envs_are_trained_on_and_every_env_is_evaluated(tmp_path, monkeypatch):
    out, run = tmp_path / "out", tmp_path / "run"
    ran = []

    def fake_run(cmd, **kw):  # the evaluation writes its table, the RL run its log
        ran.append(cmd)
        if cmd[:3] == ["hybridmoe", "eval", "envs"]:
            envs = cmd[cmd.index("--envs") + 1].split(",")
            write_eval(cmd[cmd.index("--out") + 1], {e: 0.5 for e in envs})
        elif cmd[:2] == ["hybridmoe", "rl"]:
            run.mkdir(exist_ok=True)
            (run / "log.jsonl").write_text(json.dumps({"step": 1, "loss": 0.0, "reward": 0.5, "reward_a": 0.5}) + "\n")
        return subprocess.CompletedProcess(cmd, 0, "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    bench = load()
    monkeypatch.setattr(sys, "argv", ["bench_rl_gain.py", "--init", "sft", "--out", str(out), "--run-dir", str(run),
                                      "--envs", "a,b,c", "--train-envs", "a,c", "--steps", "1"])  # fmt: skip
    bench.main()
    (rl_cmd,) = [c for c in ran if c[:2] == ["hybridmoe", "rl"]]
    assert "envs.ratios={a: 0.5000, c: 0.5000}" in rl_cmd
    evals = [c[c.index("--envs") + 1] for c in ran if c[:3] == ["hybridmoe", "eval", "envs"]]
    assert evals == ["a,b,c", "a,b,c"]  # before and after: b too, though not trained on
    assert json.loads((out / "rl-gain.json").read_text())["settings"]["train_envs"] == "a,c"


def test_train_envs_must_be_evaluated(tmp_path):
    p = subprocess.run([sys.executable, SCRIPT, "--init", "x", "--out", str(tmp_path), "--envs", "a,b",
                        "--train-envs", "a,z"], capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 2 and "every environment trained on must be evaluated too" in p.stderr
