"""benchmarks/bench_recovery.py: recovery per task count and seed from finished posttrain runs whose own evaluations
have enough tasks (no model: the evaluations are written here), from the SFT model and from the RL student, and which
of a run's evaluations it may read instead of evaluating again."""

import importlib.util
import json
import os
import sys

import pytest

from hybridmoe.eval.tasks import TaskEvalSettings
from hybridmoe.posttrain import PostPlan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_recovery.py")


def load():
    spec = importlib.util.spec_from_file_location("bench_recovery", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def settings(samples: int, **change) -> dict:
    """What posttrain's evaluation records: greedy, reasoning on, its difficulty and tokens per turn."""
    plan = PostPlan()
    s = {**vars(TaskEvalSettings()), "samples": samples, "difficulty": plan.task_difficulty, "reasoning": "on"}
    return {**s, "max_new_tokens": plan.task_max_new_tokens, "overlap_seeds": 2000, **change}


def write_eval(run, slug, rewards: dict[str, list[float]], samples=None, not_evaluated=0, checkpoint=None,
               **change) -> dict:  # fmt: skip
    """run/eval/slug/tasks.json with one record per reward (task seeds in order), and its posttrain.json entry."""
    path = os.path.join(run, "eval", slug)
    os.makedirs(path, exist_ok=True)
    records = [{"domain": d, "seed": i, "sample": 0, "reasoning": "on", "reward": r}
               for d, rs in rewards.items() for i, r in enumerate(rs)]  # fmt: skip
    n = samples or max(len(rs) for rs in rewards.values())
    run_info = {"checkpoint": checkpoint or f"{slug}/checkpoints/step-1", "domains": list(rewards),
                "not_evaluated": not_evaluated, "settings": settings(n, **change)}  # fmt: skip
    with open(os.path.join(path, "tasks.json"), "w") as fh:
        json.dump({"run": run_info, "records": records}, fh)
    return {"checkpoint": checkpoint or os.path.join(str(run), slug, "checkpoints", "step-1"),
            "domains": list(rewards), "path": f"eval/{slug}", "not_evaluated": not_evaluated}  # fmt: skip


def make_run(run, mopd: list[float]):
    """A finished 2-domain posttrain run of 4 tasks per domain: the teacher of `a` gains (0.25 -> 1.0 from the SFT
    model, 0.5 -> 1.0 from the RL student); the teacher of `b` does not."""
    evaluations = {
        "SFT": write_eval(run, "sft", {"a": [0, 0, 0, 1], "b": [1, 1, 0, 0]}, checkpoint="/sft/checkpoints/step-9"),
        "teacher ga": write_eval(run, "teacher-ga", {"a": [1, 1, 1, 1]}),
        "teacher gb": write_eval(run, "teacher-gb", {"b": [1, 0, 0, 0]}),
        "RL student": write_eval(run, "rl-student", {"a": [1, 0, 0, 1], "b": [1, 1, 0, 0]}),
        "MOPD student": write_eval(run, "mopd", {"a": mopd, "b": [1, 1, 0, 0]}),
    }
    domains = {"a": {"group": "ga"}, "b": {"group": "gb"}}
    with open(os.path.join(run, "posttrain.json"), "w") as fh:
        json.dump({"evaluations": evaluations, "domains": domains, "plan": {"seed": int(run.name[-1])}}, fh)


def test_recovery_from_the_runs_own_evaluations(tmp_path, monkeypatch):
    runs = [tmp_path / "run0", tmp_path / "run1"]
    for run in runs:
        run.mkdir()
    make_run(runs[0], mopd=[1, 1, 0, 1])  # first 2 tasks: 1.0; all 4: 0.75
    make_run(runs[1], mopd=[1, 0, 1, 1])  # first 2 tasks: 0.5; all 4: 0.75
    bench = load()
    monkeypatch.setattr(bench, "evaluate", lambda *a, **k: pytest.fail("evaluated a model the runs had evaluated"))
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["bench_recovery.py", *map(str, runs), "--samples", "2,4", "--out", str(out)])
    assert bench.main() == 0
    result = json.loads((out / "recovery.json").read_text())
    assert result["seeds"] == [0, 1] and result["counts"] == [2, 4]
    rows = {(r["samples"], r["domain"]): r for r in result["rows"]}
    assert set(rows) == {(2, "a"), (2, "b"), (4, "a"), (4, "b")}
    two, four = rows[2, "a"], rows[4, "a"]
    # 2 tasks: SFT 0, teacher 1, RL student 0.5, MOPD 1.0 / 0.5
    assert (two["sft"], two["teacher"], two["rl_student"], two["mopd"]) == (0.0, 1.0, 0.5, [1.0, 0.5])
    assert two["recovery"] == [1.0, 0.5] and two["recovery_mean"] == 0.75
    assert two["recovery_from_rl"] == [1.0, 0.0] and two["recovery_from_rl_mean"] == 0.5
    # 4 tasks: SFT 0.25, teacher 1, RL student 0.5, MOPD 0.75 both
    assert four["recovery"] == [pytest.approx(2 / 3)] * 2 and four["recovery_from_rl"] == [0.5, 0.5]
    assert four["teacher_gain"] == 0.75 and four["teacher_gain_se"] == pytest.approx(0.25)  # diffs 1, 1, 1, 0
    # b's teacher lost: no recovery, said so in the table
    assert rows[4, "b"]["recovery"] == [None, None] and rows[4, "b"]["recovery_from_rl_mean"] is None
    # the means' intervals, over resampled tasks: from the SFT model they hold the mean; from the RL student the
    # seeds gain back one each of the two tasks the teacher gains on, so their mean is 50% on every draw; the teacher's
    # lead is gone in the draws of only task 4 from the SFT model ((1/4)^4), of only tasks 1 and 4 from the RL student
    ci = four["recovery_mean_ci"]
    assert ci["low"] < four["recovery_mean"] < ci["high"]
    ci_rl = four["recovery_from_rl_mean_ci"]
    assert ci_rl["low"] == pytest.approx(0.5) and ci_rl["high"] == pytest.approx(0.5)
    assert four["recovery_mean_ci"]["undefined"] == pytest.approx((1 / 4) ** 4, abs=0.01)
    assert four["recovery_from_rl_mean_ci"]["undefined"] == pytest.approx(1 / 16, abs=0.015)
    table = (out / "recovery.md").read_text()
    ci = four["recovery_from_rl_mean_ci"]
    lead = f"teacher's lead gone in {100 * ci['undefined']:.2g}% of resamples"
    row = (f"| 4 | a | 25.0% | 100.0% | +75.0 ± 25.0 | 50.0% | 75.0% / 75.0% | 67% / 67% | 67% ("
           f"{100 * four['recovery_mean_ci']['low']:.0f} to {100 * four['recovery_mean_ci']['high']:.0f}; teacher's "
           f"lead gone in {100 * four['recovery_mean_ci']['undefined']:.2g}% of resamples) | 50% / 50% | 50% ("
           f"{100 * ci['low']:.0f} to {100 * ci['high']:.0f}; {lead}) |")  # fmt: skip
    assert row in table
    assert "n/a (teacher did not gain)" in table
    assert (out / "recovery.png").exists()


def test_a_fresh_slice_of_tasks_and_a_subset_of_domains(tmp_path, monkeypatch):
    """--offset: the runs' own evaluations (from seed 0) are not read, every model is evaluated from that seed on;
    --domains: only those domains (and only the teachers that own one)."""
    run = tmp_path / "run0"
    run.mkdir()
    make_run(run, mopd=[1, 1, 0, 1])
    bench, calls = load(), []
    fresh = {"sft": 0.0, "teacher-ga": 1.0, "rl-student": 0.5, "mopd": 0.75}  # on the fresh tasks, every task alike

    def evaluate(ckpt, domains, samples, cache, offset=0):
        calls.append((ckpt.split(os.sep)[-3], tuple(domains), samples, offset))
        reward = fresh[ckpt.split(os.sep)[-3]]
        return [{"domain": d, "seed": offset + i, "sample": 0, "reasoning": "on", "reward": reward}
                for d in domains for i in range(samples)]  # fmt: skip

    monkeypatch.setattr(bench, "evaluate", evaluate)
    out = tmp_path / "out"
    argv = ["bench_recovery.py", str(run), "--samples", "4", "--out", str(out), "--offset", "1000", "--domains", "a"]
    monkeypatch.setattr(sys, "argv", argv)
    assert bench.main() == 0
    # the SFT model's checkpoint is not in the run (its path ends in sft/checkpoints/step-9)
    assert sorted(calls) == sorted((m, ("a",), 4, 1000) for m in fresh)
    result = json.loads((out / "recovery.json").read_text())
    assert result["offset"] == 1000 and [r["domain"] for r in result["rows"]] == ["a"]
    row = result["rows"][0]
    assert row["recovery"] == [0.75] and row["recovery_from_rl"] == [0.5]
    assert "from seed 1000" in (out / "recovery.md").read_text()
    for bad in (["--domains", "c"], ["--offset", "-1"]):
        monkeypatch.setattr(sys, "argv", ["bench_recovery.py", str(run), "--out", str(out), *bad])
        with pytest.raises(SystemExit):
            bench.main()


@pytest.mark.parametrize(
    "samples, change, not_evaluated, usable",
    [
        (4, {}, 0, True),
        (8, {}, 0, True),  # more tasks than asked: the first 4 are the same tasks
        (2, {}, 0, False),  # fewer
        (4, {"max_new_tokens": 512}, 0, False),  # other settings: other answers
        (4, {"reasoning": "both"}, 0, False),
        (4, {"offset": 100}, 0, False),  # other tasks
        (4, {}, 1, False),  # cut at its deadline
    ],
)
def test_a_runs_evaluation_is_read_only_at_the_settings_and_count_asked(tmp_path, samples, change, not_evaluated,
                                                                         usable):  # fmt: skip
    entry = write_eval(tmp_path, "sft", {"a": [1] * samples}, samples=samples, not_evaluated=not_evaluated, **change)
    records = load().run_records(str(tmp_path), entry, ["a"], 4)
    assert (records is not None) == usable
    assert load().run_records(str(tmp_path), entry, ["a"], 4, offset=100) is None or change == {"offset": 100}
    assert load().run_records(str(tmp_path), entry, ["a", "other"], 4) is None  # a domain it did not evaluate
    other = {**entry, "checkpoint": str(tmp_path / "sft" / "checkpoints" / "step-2")}
    assert load().run_records(str(tmp_path), other, ["a"], 4) is None  # an evaluation of another checkpoint


def test_the_interval_of_the_mean_recovery():
    interval = load().recovery_interval
    tasks = [(i, 0) for i in range(40)]
    before = {t: float(i % 2) for i, t in enumerate(tasks)}  # 0.5
    teacher = {t: 1.0 for t in tasks}  # 1.0: it gains on every other task
    # a student equal to the teacher recovers all of the gain on every draw of tasks, one equal to `before` none
    assert interval(before, teacher, [dict(teacher)]) == pytest.approx({"low": 1, "high": 1, "undefined": 0,
                                                                       "resamples": 2000})  # fmt: skip
    assert interval(before, teacher, [dict(before)])["high"] == 0
    # a student that gets half of the gained tasks back: about 50%, and the interval narrows with 10x the tasks
    half = {t: 1.0 if v or i % 4 == 0 else 0.0 for i, (t, v) in enumerate(before.items())}
    small = interval(before, teacher, [half])
    assert small["low"] < 0.5 < small["high"]
    many = [(i, 0) for i in range(400)]
    big = interval({t: before[(t[0] % 40, 0)] for t in many}, {t: 1.0 for t in many},
                   [{t: half[(t[0] % 40, 0)] for t in many}])  # fmt: skip
    assert small["low"] < big["low"] < 0.5 < big["high"] < small["high"]
    # the mean over seeds: two students at 0% and 100% average 50% on every draw
    both = interval(before, teacher, [dict(before), dict(teacher)])
    assert both["low"] == pytest.approx(0.5) and both["high"] == pytest.approx(0.5)
    # the same tasks for every model, else no interval
    assert interval(before, teacher, [{t: 1.0 for t in tasks[:-1]}]) is None
    # a teacher that never gains: none
    assert interval(before, dict(before), [dict(before)]) is None
