"""Bad command lines get one line naming what is wrong, exit code 2 and no traceback, before any work starts:
numbers out of range (argparse's own error), recipes that are missing or not YAML, data that is not there."""

from __future__ import annotations

import pytest

from hybridmoe import posttrain, speedrun
from hybridmoe.cli import main


@pytest.fixture(autouse=True)
def no_long_runs(monkeypatch):
    """Were a check to let a bad number through, the command would start an hour-long run inside the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the command got past its argument checks")

    monkeypatch.setattr(speedrun, "speedrun", refuse)
    monkeypatch.setattr(posttrain, "posttrain", refuse)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["speedrun", "--minutes", "-1"], "argument --minutes: -1 is out of range: give a number > 0"),
        (["posttrain", "--minutes", "0"], "argument --minutes: 0 is out of range: give a number > 0"),
        (["posttrain", "--samples", "0"], "argument --samples: 0 is out of range: give a number >= 1"),
        (["posttrain", "--budgets", "0,x"], "argument --budgets: a reasoning budget is a number of tokens >= 0"),
        (["posttrain", "--budgets", "8,8"], "argument --budgets: a reasoning budget is listed twice"),
        (["plan", "--gpus", "0"], "argument --gpus: 0 is out of range: give a number >= 1"),
        (["plan", "--gpus", "8", "--seq", "0"], "argument --seq: 0 is out of range"),
        (["plan", "--gpus", "8", "--moe-imbalance", "0.5"], "argument --moe-imbalance: 0.5 is out of range"),
        (["prepare", "x.txt", "--tokenizer", "t", "--output", "o", "--shard-size-mb", "0"], "--shard-size-mb: 0 is"),
        (["serve", "ckpt", "--port", "70000"], "argument --port: 70000 is not a TCP port: give 0-65535"),
        (["serve", "ckpt", "--port", "http"], "argument --port: invalid port value: 'http'"),
        (["serve", "ckpt", "--grace", "-1"], "argument --grace: -1 is out of range: give a number >= 0"),
        (["generate", "ckpt", "--prompt", "hi", "--device", "tpu"], "argument --device: 'tpu' is not a torch device"),
        (["eval", "ppl", "ckpt", "x.txt", "--device", "cuda:99"], "argument --device: cuda:99: this machine has "),
        (["generate", "ckpt", "--prompt", "hi", "--speculative", "0"], "argument --speculative: 0 is out of range"),
        (["finetune", "--model", "m", "--data", "d.jsonl", "--steps", "0"], "argument --steps: 0 is out of range"),
        (["finetune", "--model", "m", "--data", "d.jsonl", "--warmup-steps", "-1"], "--warmup-steps: -1 is out of"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_numbers_out_of_range_are_refused_by_the_parser(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_recipes_and_data_that_are_not_there_or_not_yaml(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken.yaml").write_text("model: [\n")
    (tmp_path / "nodata.yaml").write_text("data: {phases: [{datasets: {/nonexistent/tokens: 1.0}}]}\n")
    # the tokenizer a speedrun would have written (a transformers hub error before)
    (tmp_path / "sft.yaml").write_text("data: {datasets: {chats.jsonl: 1.0}, tokenizer: runs/speedrun/tokenizer}\n")
    (tmp_path / "notok").mkdir()  # a directory without tokenizer files (transformers' message asked for sentencepiece)
    (tmp_path / "x.txt").write_text("text\n")
    for argv, message in (
        (["pretrain", "missing.yaml"], "error: recipe missing.yaml: no such file"),
        (["sft", "missing.yaml"], "error: recipe missing.yaml: no such file"),
        (["pretrain", "broken.yaml"], "error: recipe broken.yaml is not valid YAML: "),
        (["params", "--config", "broken.yaml"], "error: broken.yaml is not a JSON config ("),
        (["pretrain", "nodata.yaml"], "error: no prepared data directory at /nonexistent/tokens; create one with"),
        (["pretrain", "nodata.yaml", "optim.lr=-1"], "error: optim.lr=-1.0 must be > 0 and optim.min_lr="),
        (["sft", "sft.yaml"], "error: tokenizer runs/speedrun/tokenizer: not a directory; pass a directory"),
        (
            ["prepare", "x.txt", "--tokenizer", "notok", "--output", "o"],
            f"error: tokenizer {tmp_path}/notok: the directory",
        ),
        (["tasks", "write", "broken.yaml/chats.jsonl", "--per-domain", "1"], "error: [Errno 17] File exists: "),
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(message) and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "runs").exists()


def test_posttrain_flags_reach_its_plan(monkeypatch):
    plans = []
    monkeypatch.setattr(posttrain, "posttrain", lambda out_dir, plan, command: plans.append(plan))
    main(["posttrain", "--budgets", "0,16,none", "--budget-domains", "calculator, word_problems", "--samples", "50"])
    main(["posttrain", "--no-budget-sweep"])
    main(["posttrain"])
    assert plans[0].budgets == (0, 16, None) and plans[0].budget_domains == ("calculator", "word_problems")
    assert plans[0].task_samples == 50 and plans[1].budgets == () and plans[2].budgets == posttrain.PostPlan().budgets
