"""Environment evaluation (`hybridmoe.eval.envs`, `hybridmoe eval envs`): scores through the agent loop, the report
files and the CLI, on the `debug` preset with random weights; right answers are forced by `ScriptedEngine`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from test_server import make_checkpoint
from test_tasks_eval import ScriptedEngine

from hybridmoe import HybridMoEForCausalLM
from hybridmoe.cli import main
from hybridmoe.data.tokenizer import load_tokenizer
from hybridmoe.envs import make_envs
from hybridmoe.eval.envs import EnvEvalResult, evaluate_envs, write_env_report


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def model_tok(checkpoint):
    return HybridMoEForCausalLM.from_pretrained(checkpoint), load_tokenizer(checkpoint)


def test_scores_reports_and_greedy_determinism(model_tok, tmp_path):
    model, tok = model_tok
    math_env = make_envs("math")["math"]
    answers = {math_env.reset(s).task.messages[0]["content"]: math_env.reset(s).task.answer
               for s in range(1_000_000_000, 1_000_000_003)}  # fmt: skip

    def script(text, params):  # math: right on even-length questions, wrong otherwise; calculator: tool round
        if "Use the calculator" in text:
            results = re.findall(r"<tool_response>\n(.*?)\n</tool_response>", text, re.S)
            expression = re.search(r"compute (.*?)\.", text).group(1)
            call = f'<tool_call>\n{{"name": "calculator", "arguments": {{"expression": "{expression}"}}}}\n</tool_call>'
            return results[-1] if results else call
        q = re.findall(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", text, re.S)[0]
        return answers[q] if len(q) % 2 == 0 else "no idea"

    engine = ScriptedEngine(model, tok, script, max_num_seqs=4, max_model_len=1024, prefill_chunk=256)
    result = evaluate_envs(engine, tok, "math,calculator", samples=3, max_new_tokens=64, checkpoint="ckpt")
    assert [(r["env"], r["reasoning"]) for r in result.summary] == [
        ("math", "on"), ("calculator", "on"), ("math", "off"), ("calculator", "off")]  # fmt: skip
    right = sum(len(q) % 2 == 0 for q in answers) / 3
    for mode in ("on", "off"):
        assert result.accuracy("math", mode) == pytest.approx(right)
        row = result.row("calculator", mode)
        assert row["accuracy"] == 1.0 and row["components"] == {"answer": 1.0, "arguments": 1.0}
        assert row["mean_tool_calls"] == 1.0 and row["failed"] == 0
    files = write_env_report(result, str(tmp_path / "out"))
    data = json.loads((tmp_path / "out" / "envs.json").read_text())
    assert len(data["records"]) == 12 and EnvEvalResult.from_dict(data).table() == result.table()
    assert result.table(markdown=True) in (tmp_path / "out" / "envs.md").read_text()
    assert Path(files["png"]).read_bytes()[:4] == b"\x89PNG"
    # the model's own greedy answers: the same twice
    kw = dict(samples=2, max_new_tokens=6, reasoning="off", max_model_len=256)
    a, b = (evaluate_envs(model, tok, ["structured"], **kw) for _ in range(2))
    assert [r["completion"] for r in a.records] == [r["completion"] for r in b.records]
    with pytest.raises(ValueError, match="difficulty 4 is outside 1..3 for environment 'math'"):
        evaluate_envs(model, tok, "math", difficulty=4)


def test_cli(checkpoint, tmp_path, capsys):
    out = tmp_path / "envs"
    args = ["eval", "envs", checkpoint, "--envs", "math,instructions", "--samples", "2", "--max-new-tokens", "4",
            "--max-model-len", "256", "--max-num-seqs", "4", "--reasoning", "off", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "instructions" in printed and "wrote" in printed
    data = json.loads((out / "envs.json").read_text())
    assert len(data["records"]) == 4 and all(r["seed"] >= 1_000_000_000 for r in data["records"])
    # --split train --offset 1000000: the RL stage's own prompt pools (envs.offset)
    assert main(args + ["--split", "train", "--offset", "1000000", "--samples", "1"]) == 0
    data = json.loads((out / "envs.json").read_text())
    assert [r["seed"] for r in data["records"]] == [1_000_000, 1_000_000]
    assert main(args[:3] + ["--envs", "math,nope"]) == 2
    assert "unknown environment 'nope'" in capsys.readouterr().err
