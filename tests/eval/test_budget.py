"""The reasoning-budget sweep (`hybridmoe.eval.budget`) on the toy domain of test_tasks_eval with the random `debug`
model (which thinks past small budgets when not stopped): every point's largest turn of thinking is within its
budget, the unbudgeted point is a plain evaluation, a sweep resumes from the complete passes of an earlier one, a
deadline cuts passes and says so, and bad budgets are refused."""

from __future__ import annotations

import time

import pytest
from test_tasks_eval import QUIET, ToyAdd, checkpoint, model_tok  # noqa: F401 (fixtures)

from hybridmoe.eval import budget as budget_mod
from hybridmoe.eval.budget import OFF, budget_table, parse_budgets, plot_budget, sweep_reasoning_budget
from hybridmoe.eval.tasks import evaluate_tasks

KW = dict(max_new_tokens=12, max_model_len=128, max_num_seqs=4, **QUIET)


def test_parse_budgets():
    assert parse_budgets("0, 4,NONE") == [0, 4, None]
    for bad, says in (("-1", "number of tokens"), ("four", "number of tokens"), ("4,4", "twice"), ("", "tokens")):
        with pytest.raises(ValueError, match=says):
            parse_budgets(bad)


def test_the_budget_holds_at_every_point_and_none_is_a_plain_evaluation(model_tok, tmp_path):  # noqa: F811
    model, tok = model_tok
    sweep = sweep_reasoning_budget(model, tok, [ToyAdd()], 4, [0, 3, None], **KW)
    curve = sweep["curves"]["toy_add"]
    assert [c["budget"] for c in curve] == [0, 3, None]
    assert [(p["budget"], p["reasoning"]) for p in sweep["passes"]] == [(0, "on"), (3, "on"), (None, "on"),
                                                                        (OFF, "off")]  # fmt: skip
    assert curve[0]["max_turn_reasoning_tokens"] == 0 and curve[1]["max_turn_reasoning_tokens"] <= 3
    assert curve[2]["max_turn_reasoning_tokens"] > 3  # unbudgeted, the random model thinks on
    plain = evaluate_tasks(model, tok, [ToyAdd()], 4, reasoning="both", **KW)
    for mode, p in (("on", curve[2]), ("off", sweep["reasoning_off"]["toy_add"])):
        row = plain.row("toy_add", mode)
        assert (p["accuracy"], p["mean_reasoning_tokens"], p["tasks"]) == (
            row["accuracy"],
            row["mean_reasoning_tokens"],
            4,
        )
    assert sweep["reasoning_off"]["toy_add"]["max_reasoning_tokens"] == 0 and sweep["not_evaluated"] == 0

    table = budget_table(sweep)
    assert len(table) == 2 + 3 + 1 and table[2].startswith("| 0 | ") and table[4].startswith("| none | ")
    assert table[-1].startswith("| reasoning off | ")
    path = plot_budget(sweep, str(tmp_path / "budget.png"))
    assert (tmp_path / "budget.png").stat().st_size > 5_000 and path.endswith("budget.png")


def test_a_sweep_resumes_from_the_complete_passes_of_an_earlier_one(model_tok, monkeypatch):  # noqa: F811
    model, tok = model_tok
    snapshots = []
    full = sweep_reasoning_budget(model, tok, [ToyAdd()], 3, [0, 2, None], on_pass=snapshots.append, **KW)
    assert len(snapshots) == 4 and snapshots[-1] == full

    calls = []
    real = budget_mod.evaluate_tasks
    monkeypatch.setattr(budget_mod, "evaluate_tasks",
                        lambda *a, **kw: calls.append(kw["reasoning_budget"]) or real(*a, **kw))  # fmt: skip
    resumed = sweep_reasoning_budget(model, tok, [ToyAdd()], 3, [0, 2, None], previous=snapshots[1], **KW)
    assert calls == [None, None]  # the unbudgeted and reasoning-off passes ran; greedy: the same figures
    assert (resumed["curves"], resumed["reasoning_off"]) == (full["curves"], full["reasoning_off"])
    assert resumed["passes"][:2] == full["passes"][:2]  # kept as they were

    calls.clear()  # a pass cut at its deadline runs again
    cut = snapshots[1] | {"passes": [snapshots[1]["passes"][0] | {"not_evaluated": 2}, snapshots[1]["passes"][1]]}
    sweep_reasoning_budget(model, tok, [ToyAdd()], 3, [0, 2, None], previous=cut, **KW)
    assert calls == [0, None, None]
    calls.clear()  # other settings: nothing is kept
    sweep_reasoning_budget(model, tok, [ToyAdd()], 2, [0, 2, None], previous=full, **KW)
    assert calls == [0, 2, None, None]


def test_a_deadline_cuts_passes_and_says_so(model_tok, tmp_path):  # noqa: F811
    model, tok = model_tok
    sweep = sweep_reasoning_budget(model, tok, [ToyAdd()], 3, [0, None], deadline=time.monotonic() - 1, **KW)
    assert [p["not_evaluated"] for p in sweep["passes"]] == [3, 3, 3] and sweep["not_evaluated"] == 9
    assert all(p["points"]["toy_add"] is None for p in sweep["passes"])  # nothing answered is not 0% accuracy
    assert budget_table(sweep)[2:] == ["| 0 | n/a | n/a |", "| none | n/a | n/a |", "| reasoning off | n/a | n/a |"]
    plot_budget(sweep, str(tmp_path / "empty.png"))  # a chart without points is still drawn
    assert (tmp_path / "empty.png").exists()


def test_bad_input_is_refused(model_tok):  # noqa: F811
    model, tok = model_tok
    with pytest.raises(ValueError, match="twice"):
        sweep_reasoning_budget(model, tok, [ToyAdd()], 2, [4, 4], **KW)
    with pytest.raises(ValueError, match="tokens >= 0"):
        sweep_reasoning_budget(model, tok, [ToyAdd()], 2, [-2], **KW)
    with pytest.raises(ValueError, match="sets reasoning_budget itself"):
        sweep_reasoning_budget(model, tok, [ToyAdd()], 2, [4], reasoning_budget=3, **KW)
