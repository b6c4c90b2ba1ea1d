"""The speedrun end to end at toy scale: the `debug` preset on a few standard-library files, a 45-second budget;
and on a machine slower than at calibration (a fake clock), where every stage stops at its deadline."""

import json
import os
import re
import signal

import httpx
import pytest
import torch
import transformers
from test_server import MODEL, make_serving
from test_session import SlowClock

from hybridmoe import speedrun as speedrun_mod
from hybridmoe.modeling import HybridMoEForCausalLM
from hybridmoe.serve.server import ServerThread
from hybridmoe.speedrun import Plan, eval_reserve_s, rl_step_estimate, speedrun, stdlib_sources
from hybridmoe.tasks import DOMAINS
from hybridmoe.train import session as loop_mod

TOY = {"preset": "debug", "vocab_size": 512, "seq_len": 64, "batch_size": 4, "long_seq_len": 256,
       "short_batch_size": 4, "max_files": 40, "sft_seq_len": 512, "sft_per_domain": 6, "task_samples": 2,
       "task_max_new_tokens": 8, "rl_group_size": 2, "rl_prompts_per_step": 3, "rl_max_new_tokens": 8,
       "rl_step_s": 1.0, "validation_reserve_s": 2.0, "sft_replan_at": 5}  # fmt: skip


def test_stdlib_sources_split_modules_from_tests():
    modules, tests = stdlib_sources()
    assert len(modules) > 100 and len(tests) > 50
    assert all(f.endswith(".py") and "-packages" not in f for f in modules + tests)
    assert any(f.endswith(os.sep + "os.py") for f in modules)
    assert not set(modules) & set(tests)
    few_modules, few_tests = stdlib_sources(max_files=30)
    assert 0 < len(few_modules) + len(few_tests) <= 30


def test_speedrun_runs_every_stage_and_reports(tmp_path, monkeypatch):
    # the peak measurement takes 15 s on 2 cores and only scales the MFU figure: its time goes to training instead
    monkeypatch.setattr(speedrun_mod, "measure_matmul_peak", lambda **kw: {"float32": 100.0})
    plan = Plan(minutes=0.75, eval_reserve_s=10, **TOY)
    report = speedrun(out_dir=str(tmp_path / "run"), plan=plan)
    run = tmp_path / "run"
    with open(report) as fh:
        text = fh.read()
    for heading in ("# hybridmoe speedrun", "## Validation", "## Tasks", "## Loss", "## The chat model's answers"):
        assert heading in text
    assert (run / "loss.png").stat().st_size > 10_000 and (run / "tasks.png").stat().st_size > 10_000
    assert (run / "rl-rewards.png").stat().st_size > 10_000 and "## RL rewards" in text
    # SFT's step count was fitted to its own pace at its re-plan step (the calibration's plan may not fit); the row
    # reports the re-planned count. How many of them fit depends on the machine's load, so it is not asserted here
    # (tests/train/test_sft.py checks the re-plan itself with a fake clock).
    sft_row = next(r for r in json.loads((run / "stages.json").read_text()) if r["stage"] == "sft")
    assert f"re-planned to {sft_row['planned']} at step" in sft_row["note"], sft_row
    assert 0 < sft_row["ran"] <= sft_row["planned"], sft_row
    # On a machine slower than at calibration (a busy one), the evaluations that no longer fit before the deadline
    # are left out and named in the report; the final model and the random init are always validated (first), and
    # the final model's tasks evaluated (first of the tasks).
    found = re.search(r"^Not evaluated \(no time left\): (.*)\.$", text, re.M)
    left_out = found.group(1).split(", ") if found else []
    evals = json.loads((run / "evals.json").read_text())
    stages = ["initial (random init)", "after phase 1", "after phase 2", "after long context", "after SFT", "after RL"]
    assert [e["stage"] for e in evals] == [s for s in stages if s not in left_out], left_out
    assert evals[0]["stage"] == stages[0] and evals[-1]["stage"] == stages[-1]
    assert evals[-1]["val_loss_short"] < evals[0]["val_loss_short"] - 0.5
    # Every domain evaluated before and after SFT and after RL, reasoning on and off.
    for label in ("before-SFT", "after-SFT", "after-RL"):
        if f"tasks {label.replace('-', ' ')}" in left_out:
            assert label != "after-RL" and not (run / "tasks" / label).exists()
            continue
        result = json.loads((run / "tasks" / label / "tasks.json").read_text())
        assert {(r["domain"], r["reasoning"]) for r in result["summary"]} == {
            (d, m) for d in DOMAINS for m in ("on", "off")
        }
    sft_log = [json.loads(line) for line in (run / "sft" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in sft_log if "loss" in r]
    assert steps and all(k in steps[0] for k in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "loss_tokens"))
    assert steps[-1]["loss"] < steps[0]["loss"]
    rl_log = [json.loads(line) for line in (run / "rl" / "log.jsonl").read_text().splitlines()]
    rl_steps = [r for r in rl_log if "loss" in r]
    assert rl_steps and all(f"reward_{name}" in rl_steps[0] for name in plan.rl_envs)
    assert rl_steps[0]["trajectories"] == plan.rl_group_size * plan.rl_prompts_per_step
    # The final checkpoint is a self-contained Hugging Face directory: transformers loads model and tokenizer, and
    # the tokenizer renders the chat format (reasoning on by default).
    final = evals[-1]["checkpoint"]
    tok = transformers.AutoTokenizer.from_pretrained(final)
    hf = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    ids = torch.tensor([tok.encode("def f(x):\n    return x")])
    assert torch.isfinite(hf(ids).logits).all()
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n")
    # ... and the server answers with it in the chat format.
    server = ServerThread(make_serving(final, max_model_len=1024))
    try:
        reply = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
            "model": MODEL, "messages": [{"role": "user", "content": "What is 2 + 3?"}], "max_tokens": 24,
        })  # fmt: skip
    finally:
        server.stop(grace_s=1)
    assert reply.status_code == 200, reply.text
    message = reply.json()["choices"][0]["message"]
    assert set(message) >= {"content", "reasoning_content"}
    for stage in ("pretrain", "long-context"):
        records = [json.loads(line) for line in (run / stage / "log.jsonl").read_text().splitlines()]
        assert any("val_loss" in r for r in records) and any("loss" in r for r in records)


def test_a_slow_machine_stops_at_the_deadlines_and_the_report_says_so(tmp_path, monkeypatch):
    """Every training step takes 5 s longer than the calibration measured (on a fake clock: the test itself runs
    for seconds). Without deadlines the calibrated hundreds of steps would take most of an hour."""
    clock = SlowClock(5.0)
    clock.slow_down(monkeypatch, loop_mod)
    monkeypatch.setattr(speedrun_mod, "time", clock)
    monkeypatch.setattr(speedrun_mod, "measure_matmul_peak", lambda **kw: {"float32": 100.0})  # 15 s saved
    step_ends = []
    slow_step = loop_mod.train_step

    def step_and_note_the_time(*args, **kwargs):
        out = slow_step(*args, **kwargs)
        step_ends.append(clock.monotonic())
        return out

    monkeypatch.setattr(loop_mod, "train_step", step_and_note_the_time)
    plan = Plan(minutes=1.0, eval_reserve_s=15, **TOY)
    start = clock.monotonic()
    assert speedrun(out_dir=str(tmp_path / "run"), plan=plan) == str(tmp_path / "run" / "report.md")

    # No step ended past the training stages' last deadline (the budget less the evaluation reserve): each stage
    # stopped before a step that would have (1 s of slack for the real time of a debug step).
    assert max(step_ends) <= start + 60 - 15 + 1.0
    stages = json.loads((tmp_path / "run" / "stages.json").read_text())
    assert [r["stage"] for r in stages] == ["pretrain phase 1", "pretrain phase 2", "long context", "sft", "rl"]
    assert len(step_ends) == sum(r["ran"] for r in stages)
    phase1 = stages[0]
    assert phase1["ended"].startswith("cut short by the deadline at step") and 1 <= phase1["ran"] < phase1["planned"]
    assert all(r["ran"] <= r["planned"] for r in stages)
    assert (tmp_path / "run" / "pretrain" / "checkpoints" / f"step-{phase1['ran']:07d}").is_dir()
    text = (tmp_path / "run" / "report.md").read_text()
    assert f"| pretrain phase 1 | {phase1['planned']} | {phase1['ran']} | cut short by the deadline" in text
    assert "Cut short or skipped by the deadline: pretrain phase 1" in text


def test_stages_can_be_left_out_and_bad_ones_are_refused(tmp_path, monkeypatch):
    # On the slow machine's fake clock (as above): which stages run is what counts here, not how long they train.
    clock = SlowClock(5.0)
    clock.slow_down(monkeypatch, loop_mod)
    monkeypatch.setattr(speedrun_mod, "time", clock)
    monkeypatch.setattr(speedrun_mod, "measure_matmul_peak", lambda **kw: {"float32": 100.0})
    plan = Plan(minutes=1.0, eval_reserve_s=15, **TOY)
    speedrun(out_dir=str(tmp_path / "run"), plan=plan, stages=("pretrain", "sft"))
    stages = json.loads((tmp_path / "run" / "stages.json").read_text())
    assert [r["stage"] for r in stages] == ["pretrain phase 1", "pretrain phase 2", "sft"]
    assert not (tmp_path / "run" / "long-context").exists() and not (tmp_path / "run" / "rl").exists()
    for bad in (("sft",), ("pretrain", "distill")):
        with pytest.raises(ValueError, match="pretrain included"):
            speedrun(out_dir=str(tmp_path / "bad"), plan=Plan(**TOY), stages=bad)
    with pytest.raises(ValueError, match="unknown preset 'nano'; known: .*micro"):
        speedrun(out_dir=str(tmp_path / "bad"), plan=Plan(**TOY), preset="nano")
    assert not (tmp_path / "bad").exists()


def test_ctrl_c_stops_the_whole_run_not_just_the_stage(tmp_path, monkeypatch):
    """A SIGTERM (or the first Ctrl-C) ends the running stage at a checkpoint; the speedrun must then stop too.
    Before, pretraining stopped and long context started: an interrupted run went on to its next stage."""
    clock = SlowClock(5.0)
    clock.slow_down(monkeypatch, loop_mod)
    monkeypatch.setattr(speedrun_mod, "time", clock)
    monkeypatch.setattr(speedrun_mod, "measure_matmul_peak", lambda **kw: {"float32": 100.0})
    real_step = loop_mod.train_step

    def step_then_terminate(*args, **kwargs):
        out = real_step(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # the session's handler asks the loop to stop after this step
        return out

    monkeypatch.setattr(loop_mod, "train_step", step_then_terminate)
    with pytest.raises(KeyboardInterrupt, match="speedrun interrupted at step 1 of .*pretrain"):
        speedrun(out_dir=str(tmp_path / "run"), plan=Plan(minutes=1.0, eval_reserve_s=15, **TOY))
    assert (tmp_path / "run" / "pretrain" / "checkpoints" / "step-0000001").is_dir()
    assert not (tmp_path / "run" / "long-context").exists() and not (tmp_path / "run" / "report.md").exists()


def test_sft_is_calibrated_on_packed_rows_with_the_loss_on_a_share_of_the_tokens(monkeypatch):
    # An SFT step runs the LM head on its assistant tokens only and keeps packed conversations apart; planned at
    # pretraining's pace, SFT ended minutes early. The calibration must time such a step.
    seen = []

    def spy(self, input_ids, labels=None, document_ids=None, **kwargs):
        seen.append((labels, document_ids))
        return original(self, input_ids, labels=labels, document_ids=document_ids, **kwargs)

    original = HybridMoEForCausalLM.forward
    monkeypatch.setattr(HybridMoEForCausalLM, "forward", spy)
    recipe = speedrun_mod._recipe(Plan(**TOY), None, {"modules": "m", "tests": "t"}, "unused", steps=1)
    assert speedrun_mod._calibrate(recipe, 4, 256, doc_len=64, loss_share=0.25) > 0
    assert len(seen) == 2  # one untimed step, one timed
    labels, docs = seen[-1]
    assert 0.18 < (labels != -100).float().mean().item() < 0.32  # about 0.25 of the 1024 tokens
    assert docs.shape == (4, 256) and docs[0].tolist() == [i // 64 for i in range(256)]
    speedrun_mod._calibrate(recipe, 4, 64)
    labels, docs = seen[-1]
    assert bool((labels != -100).all()) and docs is None


def test_the_calibration_is_the_median_of_its_timed_steps(monkeypatch):
    # With more than one timed step (benchmarks/bench_calibration.py compares), one slow or fast step does not decide.
    recipe = speedrun_mod._recipe(Plan(**TOY), None, {"modules": "m", "tests": "t"}, "unused", steps=1)
    clock = iter([0.0, 10.0, 10.0, 10.2, 10.2, 19.2, 19.2, 19.5])  # steps of 10 (untimed), 0.2, 9.0 and 0.3 s
    monkeypatch.setattr(speedrun_mod.time, "perf_counter", lambda: next(clock))
    assert speedrun_mod._calibrate(recipe, 2, 32, timed=3) == pytest.approx(0.3 * 1.15)


def test_the_evaluation_reserve_and_rl_steps_follow_the_model_not_one_guess():
    # What the evaluation and an RL step took in 30-minute runs here, against the calibrated / measured pretraining
    # step: tiny 176 s at 1.92 s, RL 5.5 s at 1.6 s; micro 89 s at 0.66 s, RL 2.1 s at 0.594 s.
    for step_s, took in ((1.92, 176), (0.66, 89)):
        assert took < eval_reserve_s(step_s) < 1.6 * took
    assert eval_reserve_s(0.66) < eval_reserve_s(1.92) <= 270
    for pre_s, rl_s in ((1.6, 5.5), (0.594, 2.07)):
        assert abs(rl_step_estimate(pre_s) - rl_s) / rl_s < 0.05
    assert Plan().eval_reserve_s is None and Plan().rl_step_s is None  # derived at run time unless given
