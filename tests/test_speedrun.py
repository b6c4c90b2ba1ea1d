"""The speedrun end to end at toy scale: the `debug` preset on a few standard-library files, a 1-minute budget."""

import json
import os

import torch
import transformers

from hybridmoe.speedrun import Plan, speedrun, stdlib_sources


def test_stdlib_sources_split_modules_from_tests():
    modules, tests = stdlib_sources()
    assert len(modules) > 100 and len(tests) > 50
    assert all(f.endswith(".py") and "-packages" not in f for f in modules + tests)
    assert any(f.endswith(os.sep + "os.py") for f in modules)
    assert not set(modules) & set(tests)
    few_modules, few_tests = stdlib_sources(max_files=30)
    assert 0 < len(few_modules) + len(few_tests) <= 30


def test_speedrun_runs_every_stage_and_reports(tmp_path):
    plan = Plan(minutes=1.0, preset="debug", vocab_size=512, seq_len=64, batch_size=4, long_seq_len=256,
                short_batch_size=4, max_files=40, eval_reserve_s=10)  # fmt: skip
    report = speedrun(out_dir=str(tmp_path / "run"), plan=plan)
    run = tmp_path / "run"
    with open(report) as fh:
        text = fh.read()
    for heading in ("# hybridmoe speedrun", "## Validation", "## Loss", "## Samples"):
        assert heading in text
    assert (run / "loss.png").stat().st_size > 10_000
    evals = json.loads((run / "evals.json").read_text())
    assert [e["stage"] for e in evals] == ["initial (random init)", "after phase 1", "after phase 2",
                                          "after long context"]  # fmt: skip
    assert evals[-1]["val_loss_short"] < evals[0]["val_loss_short"] - 0.5
    # The final checkpoint is a self-contained Hugging Face directory: transformers loads model and tokenizer.
    final = evals[-1]["checkpoint"]
    tok = transformers.AutoTokenizer.from_pretrained(final)
    hf = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    ids = torch.tensor([tok.encode("def f(x):\n    return x")])
    assert torch.isfinite(hf(ids).logits).all()
    for stage in ("pretrain", "long-context"):
        records = [json.loads(line) for line in (run / stage / "log.jsonl").read_text().splitlines()]
        assert any("val_loss" in r for r in records) and any("loss" in r for r in records)
