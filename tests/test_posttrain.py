"""`hybridmoe posttrain` on a `debug` model with the repository's recipes cut to two steps per stage and a few tasks:
end to end with the report and charts, an interrupted MOPD stage resumed from its checkpoint, a third run that
reruns nothing; the recovery arithmetic on hand numbers; the recipes' domain groups and the checks on bad input."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time

import pytest
from test_distill import save_model
from test_finetune import tokenizer_dir  # noqa: F401 (fixture)

from hybridmoe import posttrain as posttrain_mod
from hybridmoe import speedrun as speedrun_mod
from hybridmoe.posttrain import (
    PostPlan,
    accuracy_table,
    budget_domains,
    clear_gain,
    load_recipes,
    paired_se,
    posttrain,
    recovery,
    recovery_summary,
)

TOY = ("train.steps=2", "rl.group_size=2", "rl.prompts_per_step=8", "rl.max_new_tokens=6", "rl.max_num_seqs=16",
       "envs.pool=8", "rl.micro_batch_size=4", "train.peak_gflops=100", "train.progress=false",
       "train.save_every=1")  # fmt: skip


def toy_plan(sft: str) -> PostPlan:
    # every stage runs its recipe's 2 steps (10 minutes: no deadline cuts one)
    return PostPlan(minutes=10, init_from=sft, overrides=TOY, task_samples=2, task_max_new_tokens=6, overlap_seeds=0,
                    eval_max_num_seqs=8, budgets=(0, 2, None), budget_samples=2)  # fmt: skip


def test_recovery_on_hand_numbers():
    assert recovery(0.10, 0.30, 0.35) == pytest.approx(0.8)  # 0.20 of a 0.25 gain
    assert recovery(0.10, 0.05, 0.30) == pytest.approx(-0.25)  # the student lost
    assert recovery(0.10, 0.50, 0.30) == pytest.approx(2.0)  # the student passed the teacher
    assert recovery(0.20, 0.25, 0.20) is None  # the teacher did not gain
    assert recovery(0.20, 0.25, 0.10) is None  # ... or lost
    assert recovery(None, 0.25, 0.30) is None and recovery(0.1, None, 0.3) is None


class Result:
    def __init__(self, acc: dict[str, float], records: list[dict] | None = None):
        self.acc, self.records = acc, records or []

    def accuracy(self, domain, reasoning="on"):
        assert reasoning == "on"
        return self.acc.get(domain)


def test_accuracy_table_recovery_per_domain():
    domains = {"arithmetic": "math", "calculator": "tools", "json_schema": "instructions", "orphan": None}
    results = {
        "SFT": Result({"arithmetic": 0.2, "calculator": 0.5, "json_schema": 0.4, "orphan": 0.1}),
        "teacher math": Result({"arithmetic": 0.6}),
        "teacher tools": Result({"calculator": 0.4}),  # did not gain
        "teacher instructions": Result({"json_schema": 0.6}),
        "RL student": Result({"arithmetic": 0.3, "calculator": 0.5, "json_schema": 0.5, "orphan": 0.1}),
        "MOPD student": Result({"arithmetic": 0.5, "calculator": 0.6, "json_schema": 0.35, "orphan": 0.2}),
    }
    rows = accuracy_table(domains, results)
    assert rows["arithmetic"]["recovery"] == pytest.approx(0.75)  # (0.5 - 0.2) / (0.6 - 0.2)
    assert rows["arithmetic"]["recovery_from_rl"] == pytest.approx(2 / 3)  # (0.5 - 0.3) / (0.6 - 0.3)
    assert rows["calculator"]["recovery"] is None and rows["calculator"]["teacher"] == 0.4
    assert rows["json_schema"]["recovery"] == pytest.approx(-0.25)  # (0.35 - 0.4) / (0.6 - 0.4)
    assert rows["orphan"]["teacher"] is None and rows["orphan"]["recovery"] is None
    assert rows["arithmetic"]["rl_continued"] is None  # not evaluated


def test_the_recovery_summary_counts_both_measures():
    def row(sft, teacher, rl, mopd, se=0.01):
        return {"sft": sft, "teacher": teacher, "rl_student": rl, "mopd": mopd, "teacher_gain_se": se,
                "recovery": recovery(sft, mopd, teacher), "recovery_from_rl": recovery(rl, mopd, teacher)}  # fmt: skip

    rows = {
        "calculator": row(0.685, 0.877, 0.840, 0.867),  # 95% from SFT, 73% from the RL student
        "terminal": row(0.589, 0.676, 0.548, 0.664),  # 86%, 91%
        "retrieval": row(0.572, 0.661, 0.585, 0.665),  # 104%, 105%
        "instructions": row(0.50, 0.52, 0.45, 0.52, se=0.02),  # gained, not clearly: 100%
        "arithmetic": row(0.50, 0.60, 0.65, 0.60),  # clear gain, teacher below the RL student: 100% from SFT only
        "json_schema": row(0.90, 0.89, 0.90, 0.90),  # the teacher did not gain
    }
    text = recovery_summary(rows)
    assert text.startswith("Teachers gained on 5 of 6 domains, clearly on 4 (calculator, terminal, retrieval, "
                           "arithmetic).")  # fmt: skip
    assert "over the SFT model on 5 of the 5 (4 of the 4 clear gains)" in text
    assert "over the RL student on 2 of the 3 clear gains where the teacher is also above the RL student" in text


def records(domain: str, rewards: list[float]) -> list[dict]:
    return [{"domain": domain, "seed": i, "sample": 0, "reasoning": "on", "reward": r} for i, r in enumerate(rewards)]


def test_the_teachers_gain_has_a_paired_standard_error():
    sft = Result({"calculator": 0.5}, records("calculator", [0, 0, 1, 1]))
    teacher = Result({"calculator": 0.75}, records("calculator", [1, 0, 1, 1]))  # differences 1, 0, 0, 0
    assert paired_se(sft, teacher, "calculator") == pytest.approx(0.25)  # std 0.5 / sqrt(4)
    other = Result({"calculator": 0.75}, records("calculator", [1, 1, 1, 0]))  # same accuracy, differences 1 1 0 -1
    assert paired_se(sft, other, "calculator") == pytest.approx(math.sqrt(11 / 12) / 2)
    assert paired_se(sft, Result({}, records("math", [1, 1])), "calculator") is None  # no shared tasks
    rows = accuracy_table({"calculator": "tools"}, {"SFT": sft, "teacher tools": teacher})
    assert rows["calculator"]["teacher_gain_se"] == pytest.approx(0.25) and not clear_gain(rows["calculator"])
    many = Result({"calculator": 0.9}, records("calculator", [1, 1, 1, 1] * 25))  # 0.5 -> 1.0 over 100 tasks
    rows = accuracy_table({"calculator": "tools"}, {"SFT": Result({"calculator": 0.5}, records("calculator",
                          [0, 0, 1, 1] * 25)), "teacher tools": many})  # fmt: skip
    assert clear_gain(rows["calculator"])  # 0.4 > 2 * 0.05


def test_recipe_groups_and_domains():
    recipes = load_recipes(PostPlan())
    assert sorted(recipes.teachers) == ["instructions", "math", "search", "tools"]
    assert recipes.domains() == {
        "arithmetic": "math", "word_problems": "math", "unit_conversion": "math", "calculator": "tools",
        "json_schema": "instructions", "instructions": "instructions", "retrieval": "search",
    }  # fmt: skip


def test_the_budget_sweep_domains():
    domains = load_recipes(PostPlan()).domains()
    assert budget_domains(PostPlan(), domains) == ["calculator", "retrieval"]
    assert budget_domains(PostPlan(), {"arithmetic": "math", "retrieval": None, "json_schema": None}) == [
        "retrieval", "arithmetic"]  # fmt: skip
    assert budget_domains(PostPlan(budget_domains=("word_problems",)), domains) == ["word_problems"]
    assert budget_domains(PostPlan(budgets=()), domains) == []  # no sweep
    for bad in (("strings",), ("calculator", "calculator"), ()):  # checked before any training starts
        with pytest.raises(ValueError, match="environments cover.*listed once"):
            budget_domains(PostPlan(budget_domains=bad), domains)
    with pytest.raises(ValueError, match="twice"):
        budget_domains(PostPlan(budgets=(4, 4)), domains)
    with pytest.raises(ValueError, match="budget_samples"):
        budget_domains(PostPlan(budget_samples=0), domains)


def test_the_three_teacher_recipe_set_is_the_tiny_recipes_on_three_environments():
    """benchmarks/recipes/three-teachers (issue 15's recovery measurement): one teacher per environment, each the
    student's recipe on its environment (the terminal and search teachers with a larger batch), the student and MOPD
    the tiny recipes but for their environments (and MOPD's twice as many steps)."""
    root = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "recipes", "three-teachers")
    recipes, tiny = load_recipes(PostPlan(recipes=root)), load_recipes(PostPlan())
    assert recipes.domains() == {"calculator": "tools", "terminal": "terminal", "retrieval": "search"}

    def rest(recipe, drop=()):
        d = recipe.to_dict()
        del d["envs"]["ratios"], d["train"]["out_dir"]
        for section, key in drop:
            del d[section][key]
        return d

    assert rest(recipes.student) == rest(tiny.student)
    assert rest(recipes.mopd, [("train", "steps")]) == rest(tiny.mopd, [("train", "steps")])
    assert recipes.mopd.train.steps == 2 * tiny.mopd.train.steps
    assert recipes.mopd.envs.ratios == recipes.student.envs.ratios
    for group, teacher in recipes.teachers.items():
        assert teacher.envs.ratios == {e: recipes.student.envs.ratios[e] for e in teacher.envs.ratios}, group
        drop = [("rl", "prompts_per_step")] if group in ("terminal", "search") else []
        assert rest(teacher, drop) == rest(recipes.student, drop), group
    for group in ("terminal", "search"):
        assert recipes.teachers[group].rl.prompts_per_step == 2 * recipes.student.rl.prompts_per_step


def test_bad_input_is_refused(tmp_path):
    with pytest.raises(ValueError, match="tiny-rl.yaml.*--recipes"):
        load_recipes(PostPlan(recipes=str(tmp_path)))
    with pytest.raises(ValueError, match="unknown key"):
        load_recipes(PostPlan(overrides=("rl.no_such_key=1",)))
    # keys posttrain sets per stage are refused, not silently replaced
    for override, hint in (
        ("train.seed=1", "--seed"),
        ("model.init_from=x", "--init-from"),
        ("train.out_dir=y", "--out"),
    ):
        with pytest.raises(ValueError, match=f"posttrain sets {override.split('=')[0]}.*{hint}"):
            load_recipes(PostPlan(overrides=(override,)))
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"init_from": "/somewhere/else", "size": "tiny"}))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="same\n?.*--init-from"):
        posttrain(str(out), PostPlan(init_from=str(model)))
    # a starting model that is not there is refused before the run directory is made
    with pytest.raises(ValueError, match="neither a model directory nor a run"):
        posttrain(str(tmp_path / "new"), PostPlan(init_from=str(tmp_path / "missing")))
    assert not (tmp_path / "new").exists()


def test_posttrain_end_to_end_resumes_and_reruns_nothing(tmp_path, tokenizer_dir, monkeypatch):  # noqa: F811
    sft = save_model(tmp_path / "sft", tokenizer_dir, seed=0)
    real_evaluate = posttrain_mod._evaluate
    out = tmp_path / "run"
    real_rl, real_distill = speedrun_mod.train_rl, speedrun_mod.train_distill

    def killed_after_one_step(recipe, **kw):  # MOPD is stopped by a signal after its first step's checkpoint
        summary = real_distill(recipe, stop_after=1, **kw)
        return summary | {"stopped": "signal", "interrupted": True}

    monkeypatch.setattr(speedrun_mod, "train_distill", killed_after_one_step)
    with pytest.raises(KeyboardInterrupt, match="mopd interrupted at step 1"):
        posttrain(str(out), toy_plan(sft))
    done = {n for n in os.listdir(out) if (out / n / "stage.json").exists()}
    assert done == {"teacher-math", "teacher-tools", "teacher-instructions", "teacher-search", "rl-student"}
    assert (out / "mopd" / "checkpoints" / "step-0000001").is_dir()

    # The second run: the finished stages are not run again, MOPD resumes at step 1, the rest runs.
    calls = []
    monkeypatch.setattr(speedrun_mod, "train_rl", lambda r, **kw: calls.append(r.train.out_dir) or real_rl(r, **kw))
    monkeypatch.setattr(speedrun_mod, "train_distill", real_distill)
    report = posttrain(str(out), toy_plan(sft), command="hybridmoe posttrain (test)")
    assert calls == [str(out / "rl-continued")]
    mopd = json.loads((out / "mopd" / "stage.json").read_text())
    assert mopd["start_step"] == 1 and mopd["resumed_from"].endswith("step-0000001") and mopd["step"] == 2
    assert mopd["init_from"] == json.loads((out / "rl-student" / "stage.json").read_text())["checkpoint"]
    cont = json.loads((out / "rl-continued" / "stage.json").read_text())
    assert cont["start_step"] == 2 and cont["step"] >= 4 and cont["sampled_tokens"] > 0

    # The report: every stage, the accuracy table of every domain, recovery, the charts and posttrain.json.
    with open(report) as fh:
        text = fh.read()
    for name in ("teacher-math", "teacher-tools", "teacher-instructions", "teacher-search", "rl-student", "mopd",
                 "rl-continued"):  # fmt: skip
        assert f"| {name} |" in text
    record = json.loads((out / "posttrain.json").read_text())
    assert list(record["domains"]) == ["arithmetic", "word_problems", "unit_conversion", "calculator", "json_schema",
                                       "instructions", "retrieval"]  # fmt: skip
    for d, row in record["domains"].items():
        assert f"| {d} | {row['group']} |" in text
        assert all(row[k] is not None for k in ("sft", "teacher", "rl_student", "mopd", "rl_continued"))
        if row["teacher"] <= row["sft"]:
            assert row["recovery"] is None
    if any(r["recovery"] is None for r in record["domains"].values()):
        assert "n/a: teacher did not gain" in text
    teacher_eval = json.loads((out / "eval" / "teacher-tools" / "tasks.json").read_text())
    assert teacher_eval["run"]["domains"] == ["calculator"]  # a teacher on its own domains only
    assert record["comparison"]["mopd_sampled_tokens"] == mopd["sampled_tokens"] > 0
    assert (out / "posttrain.png").stat().st_size > 10_000 and (out / "mopd-vs-rl.png").stat().st_size > 10_000

    # The MOPD student against the reasoning budget on calculator and retrieval: the table, the chart, the record.
    sweep = record["reasoning_budget"]
    assert sweep["checkpoint"] == "mopd/checkpoints/step-0000002" and sweep["not_evaluated"] == 0
    assert list(sweep["curves"]) == ["calculator", "retrieval"] and sweep["settings"]["samples"] == 2
    for d, curve in sweep["curves"].items():
        assert [c["budget"] for c in curve] == [0, 2, None] and all(c["tasks"] == 2 for c in curve)
        assert all(c["max_turn_reasoning_tokens"] <= c["budget"] for c in curve[:2])  # the budget holds
        assert sweep["reasoning_off"][d]["max_reasoning_tokens"] == 0
    assert "## The MOPD student against the reasoning budget" in text and "| reasoning off | " in text
    assert "| none | " in text and (out / "reasoning-budget.png").stat().st_size > 10_000

    # A sweep interrupted after its first pass: the next run keeps that pass and runs the three others.
    saved = out / "eval" / "reasoning-budget" / "budget.json"
    full = json.loads(saved.read_text())
    saved.write_text(json.dumps(full | {"passes": full["passes"][:1]}))
    from hybridmoe.eval import budget as budget_mod

    passes, real_eval = [], budget_mod.evaluate_tasks
    monkeypatch.setattr(budget_mod, "evaluate_tasks", lambda *a, **kw: passes.append(
        (kw["reasoning_budget"], kw["reasoning"])) or real_eval(*a, **kw))  # fmt: skip
    monkeypatch.setattr(posttrain_mod, "_evaluate", lambda *a, **kw: pytest.fail("evaluated again"))
    posttrain(str(out), toy_plan(sft))
    assert passes == [(2, "on"), (None, "on"), (None, "off")]
    assert json.loads((out / "posttrain.json").read_text())["reasoning_budget"]["curves"] == sweep["curves"]

    # A third run reruns nothing: no training, no evaluation, the same table.
    def refuse(*a, **kw):
        raise AssertionError("ran again")

    for name in ("train_rl", "train_distill"):
        monkeypatch.setattr(speedrun_mod, name, refuse)
    monkeypatch.setattr(posttrain_mod, "_evaluate", refuse)
    monkeypatch.setattr(posttrain_mod, "_sweep", refuse)
    posttrain(str(out), toy_plan(sft))
    assert json.loads((out / "posttrain.json").read_text())["domains"] == record["domains"]

    # A fourth with another number of tasks evaluates every model again, and trains nothing (the sweep has its own).
    evaluated = []
    monkeypatch.setattr(posttrain_mod, "_evaluate", lambda *a, **kw: evaluated.append(a[3]) or real_evaluate(*a, **kw))
    posttrain(str(out), dataclasses.replace(toy_plan(sft), task_samples=3))
    models = sorted(set(os.listdir(out / "eval")) - {"reasoning-budget"})
    assert sorted(os.path.basename(p) for p in evaluated) == models and len(evaluated) == 8
    for slug in models:
        assert json.loads((out / "eval" / slug / "tasks.json").read_text())["run"]["settings"]["samples"] == 3

    # The run folder moved elsewhere: a fifth run there trains nothing, evaluates nothing, reports the same.
    fourth = json.loads((out / "posttrain.json").read_text())["domains"]
    assert json.loads((out / "mopd" / "stage.json").read_text())["checkpoint"] == "mopd/checkpoints/step-0000002"
    moved = tmp_path / "moved"
    shutil.move(out, moved)
    monkeypatch.setattr(posttrain_mod, "_evaluate", refuse)
    posttrain(str(moved), dataclasses.replace(toy_plan(sft), task_samples=3))
    assert json.loads((moved / "posttrain.json").read_text())["domains"] == fourth


def test_without_an_sft_model_the_speedrun_base_runs_once(tmp_path, monkeypatch):
    calls = []

    def fake_speedrun(out_dir, plan, minutes, stages):
        calls.append((minutes, stages))
        if len(calls) > 1:  # a base run that left no SFT model
            return
        os.makedirs(os.path.join(out_dir, "sft", "checkpoints", "step-0000003"))

    monkeypatch.setattr(speedrun_mod, "speedrun", fake_speedrun)
    plan = PostPlan(minutes=60)
    ckpt = posttrain_mod._base(str(tmp_path), plan, until=time.monotonic() + 1800)
    assert ckpt == str(tmp_path / "base" / "sft" / "checkpoints" / "step-0000003")
    assert calls[0][1] == ("pretrain", "long-context", "sft") and 29 < calls[0][0] <= 30
    assert posttrain_mod._base(str(tmp_path), plan, until=time.monotonic() + 1800) == ckpt and len(calls) == 1
    with pytest.raises(RuntimeError, match="no SFT model"):
        posttrain_mod._base(str(tmp_path / "other"), plan, until=time.monotonic() + 60)
