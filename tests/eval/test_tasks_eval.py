"""Task evaluation (`hybridmoe.eval.tasks`, `hybridmoe eval tasks`) with toy domains defined here: batched greedy
completions equal decoding each prompt alone, the pass@k estimator, the reasoning budget, the tool loop, failures
that stay with their sample, the report files and the CLI.

The model is the `debug` preset with random weights (`test_server.make_checkpoint`); where an answer must be a
certain text (tool calls, right and wrong answers), `ScriptedEngine` forces it with a logits processor chosen from
the rendered prompt.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time

import pytest
import torch
from test_server import Force, make_checkpoint

from hybridmoe import HybridMoEForCausalLM
from hybridmoe.cli import main
from hybridmoe.data.tokenizer import load_tokenizer
from hybridmoe.eval import tasks as tasks_eval
from hybridmoe.eval.tasks import TaskEvalResult, evaluate_tasks, pass_at_k, plot_comparison, write_task_report
from hybridmoe.serve import Engine
from hybridmoe.serve.chat import render_chat
from hybridmoe.serve.load import stop_token_ids
from hybridmoe.tasks import DOMAINS, Domain, Task


class ToyAdd(Domain):
    name, description = "toy_add", "a + b, answered with the number"

    def _generate(self, rng, difficulty, seed):
        a, b = rng.randint(0, 10**difficulty), rng.randint(0, 9)
        prompt = [{"role": "user", "content": f"What is {a} + {b}?"}]
        return Task(self.name, seed, difficulty, prompt, a + b, [{"role": "assistant", "content": str(a + b)}])

    def verify(self, task, completion):
        return float(completion.strip() == str(task.answer))


class ToyCoin(ToyAdd):
    """Two possible prompts: held-out tasks repeat, and each also comes from the training seeds."""

    name = "toy_coin"

    def _generate(self, rng, difficulty, seed):
        a = rng.randint(0, 1)
        return Task(self.name, seed, difficulty, [{"role": "user", "content": f"What is {a} + 1?"}], a + 1, [])


ADD_TOOL = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "a + b",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}


class ToyCalc(ToyAdd):
    """The answer must come from the `add` tool, whose output is marked so a script can find it in a prompt."""

    name = "toy_calc"

    def __init__(self):
        self.calls = []

    def _generate(self, rng, difficulty, seed):
        task = super()._generate(rng, difficulty, seed)
        return dataclasses.replace(task, domain=self.name, tools=[ADD_TOOL])

    def run_tool(self, task, name, arguments):
        self.calls.append((task.seed, name, arguments))
        if name != "add":
            return f"error: unknown tool {name}"
        return f"RESULT={arguments['a'] + arguments['b']}"


class ScriptedEngine(Engine):
    """An Engine whose requests write `script(prompt_text, params)` (text; None: the model's own output), then the
    turn end; `explode(n)` makes the n-th request's sampling raise."""

    def __init__(self, model, tokenizer, script=None, explode=None, **kw):
        super().__init__(model, eos_token_id=stop_token_ids(tokenizer), detokenize=tokenizer, **kw)
        self.tok, self.script, self.explode, self.n = tokenizer, script, explode, 0

    def add_request(self, prompt_token_ids, params=None, request_id=None):
        text = self.tok.decode(prompt_token_ids)
        processors = list(params.logits_processors)
        answer = self.script(text, params) if self.script else None
        if answer is not None:
            thinking = text.rfind("<think>") > text.rfind("</think>")
            ids = self.tok(("</think>" if thinking else "") + answer, add_special_tokens=False)["input_ids"]
            processors.insert(0, Force(ids + [self.tok.convert_tokens_to_ids("<|im_end|>")], []))
        if self.explode and self.explode(self.n):
            processors.append(_raise)
        self.n += 1
        params = dataclasses.replace(params, logits_processors=processors)
        return super().add_request(prompt_token_ids, params, request_id)


def _raise(ids, logits):
    raise RuntimeError("boom")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def model_tok(checkpoint):
    return HybridMoEForCausalLM.from_pretrained(checkpoint), load_tokenizer(checkpoint)


def scripted(model_tok, script=None, explode=None, max_num_seqs=4):
    model, tok = model_tok
    return ScriptedEngine(model, tok, script, explode, max_num_seqs=max_num_seqs, max_model_len=1024, prefill_chunk=256)


QUIET = dict(progress=False, overlap_seeds=0)


def test_batched_greedy_equals_each_prompt_alone(model_tok):
    model, tok = model_tok
    result = evaluate_tasks(model, tok, [ToyAdd()], samples=5, max_new_tokens=10, max_num_seqs=3, max_model_len=256,
                            **QUIET)  # fmt: skip
    assert len(result.records) == 10 and {r["reasoning"] for r in result.records} == {"on", "off"}
    stops = stop_token_ids(tok)
    for r in result.records:
        task = ToyAdd().generate(r["seed"])
        prompt = render_chat(tok, task.messages, reasoning=r["reasoning"] == "on")
        assert prompt.text == r["prompt"]
        out = model.generate(torch.tensor([prompt.token_ids]), max_new_tokens=10, eos_token_id=stops)
        ids = out[0, len(prompt.token_ids) :].tolist()
        ids = ids[:-1] if ids[-1] in stops else ids
        assert r["completion"] == tok.decode(ids, skip_special_tokens=False)
        assert r["generated_tokens"] == len(ids) and not r["failed"]


def test_a_deadline_leaves_unfinished_answers_out(model_tok, monkeypatch):
    model, tok = model_tok
    kw = dict(samples=4, max_new_tokens=10, max_num_seqs=2, max_model_len=256, **QUIET)
    full = evaluate_tasks(model, tok, [ToyAdd()], **kw)
    assert full.run["not_evaluated"] == 0 and len(full.records) == 8
    # A deadline already past: every answer is cut, none counted as wrong, the engine left empty.
    none = evaluate_tasks(model, tok, [ToyAdd()], deadline=time.monotonic() - 1, **kw)
    assert none.run["not_evaluated"] == 8 and none.records == [] and none.accuracy("toy_add") is None
    # A deadline after a few engine steps: the finished answers are kept unchanged, the rest left out.
    steps = iter(range(1000))
    clock = {"now": 0.0}
    monkeypatch.setattr(tasks_eval, "_now", lambda: clock["now"])
    real_step = Engine.step

    def step(self):
        clock["now"] = float(next(steps))
        return real_step(self)

    monkeypatch.setattr(Engine, "step", step)
    part = evaluate_tasks(model, tok, [ToyAdd()], deadline=12.0, **kw)
    kept = {(r["seed"], r["reasoning"]): r for r in part.records}
    assert 0 < len(kept) < 8 and part.run["not_evaluated"] == 8 - len(kept)
    for r in full.records:
        if (r["seed"], r["reasoning"]) in kept:
            assert kept[(r["seed"], r["reasoning"])]["completion"] == r["completion"]
    # the engine takes the tasks in order across modes: the first task was answered in both
    assert {(1_000_000_000, "on"), (1_000_000_000, "off")} <= set(kept)


def test_pass_at_k_estimator():
    # 1 - C(n - c, k) / C(n, k), by hand
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)
    assert pass_at_k(5, 2, 1) == pytest.approx(2 / 5)
    assert pass_at_k(4, 1, 3) == pytest.approx(1 - 1 / 4)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(3, 2, 2) == 1.0  # n - c < k: some correct sample is drawn
    with pytest.raises(ValueError, match="c <= n"):
        pass_at_k(3, 4, 1)


def test_sampled_pass_at_k_aggregates_per_task(model_tok):
    # A request answers right when its (derived) seed is even: a mix of right and wrong samples per task.
    def script(text, params):
        a, b = map(int, re.findall(r"What is (\d+) \+ (\d+)", text)[-1])
        return str(a + b + params.seed % 2)

    result = evaluate_tasks(scripted(model_tok, script), model_tok[1], [ToyAdd()], samples=6, temperature=1.0,
                            pass_k=4, reasoning="off", max_new_tokens=8, **QUIET)  # fmt: skip
    row = result.row("toy_add", "off")
    assert row["samples"] == 24 and row["tasks"] == 6
    by_task = {}
    for r in result.records:
        by_task.setdefault(r["seed"], []).append(r["reward"])
    assert 0 < sum(sum(v) for v in by_task.values()) < 24  # the seeds differ across samples
    for k in range(1, 5):
        expected = sum(pass_at_k(4, int(sum(v)), k) for v in by_task.values()) / 6
        assert row["pass_at"][k] == pytest.approx(expected)
    assert row["accuracy"] == pytest.approx(row["pass_at"][1])  # rewards are 0 or 1 here
    assert "pass@4 %" in result.table()


def test_sampling_does_not_depend_on_batching(model_tok):
    model, tok = model_tok
    kw = dict(samples=3, temperature=1.0, pass_k=2, reasoning="off", max_new_tokens=6, max_model_len=128, **QUIET)
    one = evaluate_tasks(model, tok, [ToyAdd()], max_num_seqs=1, **kw)
    many = evaluate_tasks(model, tok, [ToyAdd()], max_num_seqs=6, **kw)
    assert [r["completion"] for r in one.records] == [r["completion"] for r in many.records]
    assert one.records[0]["completion"] != one.records[1]["completion"]  # two samples of one task differ


def test_reasoning_budget_forces_end_of_thinking(model_tok):
    model, tok = model_tok
    kw = dict(samples=4, max_new_tokens=12, max_model_len=128, **QUIET)
    free = evaluate_tasks(model, tok, [ToyAdd()], **kw)
    budget = evaluate_tasks(model, tok, [ToyAdd()], reasoning_budget=3, **kw)
    on = [r for r in budget.records if r["reasoning"] == "on"]
    assert all(r["prompt_reasoning"] and r["reasoning_tokens"] <= 3 for r in on)
    assert all(r["max_turn_reasoning_tokens"] == r["reasoning_tokens"] for r in on + free.records)  # one turn each
    long_free = [r for r in free.records if r["reasoning"] == "on" and r["reasoning_tokens"] > 3]
    assert long_free  # the random model thinks past the budget when not stopped...
    for r in long_free:  # ...and with the budget, </think> comes right after 3 thinking tokens
        b = next(x for x in on if x["seed"] == r["seed"])
        assert b["reasoning_tokens"] == 3 and "</think>" in b["completion"]
    off = [r for r in budget.records if r["reasoning"] == "off"]
    assert all(not r["prompt_reasoning"] and r["reasoning_tokens"] == 0 for r in off)
    assert budget.row("toy_add", "on")["mean_reasoning_tokens"] <= 3


def _call(a, b):
    return f'<tool_call>\n{{"name": "add", "arguments": {{"a": {a}, "b": {b}}}}}\n</tool_call>'


def test_tool_loop_calls_the_tool_and_continues(model_tok):
    def script(text, params):
        results = re.findall(r"RESULT=(\d+)", text)
        if results:
            return results[-1]  # the answer, read from the tool's output in the prompt
        return _call(*re.findall(r"What is (\d+) \+ (\d+)", text)[-1])

    domain = ToyCalc()
    result = evaluate_tasks(scripted(model_tok, script), model_tok[1], [domain], samples=3, max_new_tokens=40,
                            **QUIET)  # fmt: skip
    assert len(domain.calls) == 6  # one per task and reasoning mode
    for r in result.records:
        task = domain.generate(r["seed"])
        assert r["reward"] == 1.0 and r["tool_calls"] == 1 and r["tool_rounds"] == 1 and not r["failed"]
        assistant, tool, final = r["turns"]
        call = assistant["tool_calls"][0]
        assert call["function"]["name"] == "add"
        assert sum(json.loads(call["function"]["arguments"]).values()) == task.answer
        assert tool == {"role": "tool", "tool_call_id": call["id"], "name": "add", "content": f"RESULT={task.answer}"}
        assert final == {"role": "assistant", "content": str(task.answer)}
        assert r["generated_tokens"] > len(model_tok[1](str(task.answer))["input_ids"])  # both turns are counted
    assert result.row("toy_calc", "on")["mean_tool_calls"] == 1.0


def test_bad_tool_calls_get_an_error_message_and_rounds_are_capped(model_tok):
    domain = ToyCalc()
    engine = scripted(model_tok, lambda text, params: '<tool_call>\n{"name": "add", "arguments": "a=2"}\n</tool_call>')
    result = evaluate_tasks(engine, model_tok[1], [domain], samples=2, reasoning="off", max_tool_rounds=2,
                            max_new_tokens=40, **QUIET)  # fmt: skip
    assert domain.calls == []  # never reached the tool
    for r in result.records:
        assert r["tool_rounds"] == 2 and r["tool_calls"] == 3 and r["reward"] == 0.0 and not r["failed"]
        tools = [m for m in r["turns"] if m["role"] == "tool"]
        assert len(tools) == 2 and all(m["content"].startswith("error: the arguments of add") for m in tools)
        assert r["turns"][-1]["tool_calls"]  # the last answer's call is kept in the record, not run


def test_failed_generation_scores_zero_and_the_run_goes_on(model_tok):
    result = evaluate_tasks(scripted(model_tok, explode=lambda n: n % 3 == 0), model_tok[1], [ToyAdd()], samples=3,
                            max_new_tokens=4, **QUIET)  # fmt: skip
    failed = [r for r in result.records if r["failed"]]
    assert len(failed) == 2  # requests 0 and 3 of 6
    assert all(r["finish_reason"] == "error" and "boom" in r["error"] and r["reward"] == 0.0 for r in failed)
    assert all(r["finish_reason"] in ("stop", "length") for r in result.records if not r["failed"])
    assert sum(row["failed"] for row in result.summary) == 2
    assert "boom" in result.markdown()


def test_errors_before_generation(model_tok, monkeypatch):
    monkeypatch.setitem(DOMAINS, "toy_add", ToyAdd())
    model, tok = model_tok
    with pytest.raises(ValueError, match="unknown task domain 'nope'; known: .*toy_add"):
        evaluate_tasks(model, tok, "toy_add,nope", **QUIET)
    with pytest.raises(ValueError, match="needs sampling"):
        evaluate_tasks(model, tok, [ToyAdd()], pass_k=2, **QUIET)
    with pytest.raises(ValueError, match="outside 1..3 for domain 'toy_add'"):
        evaluate_tasks(model, tok, [ToyAdd()], difficulty=4, **QUIET)


def test_report_files_overlap_and_comparison(model_tok, tmp_path):
    result = evaluate_tasks(scripted(model_tok, lambda text, params: "2"), model_tok[1], [ToyAdd(), ToyCoin()],
                            samples=4, max_new_tokens=4, progress=False, overlap_seeds=20)  # fmt: skip
    coin = result.domains["toy_coin"]
    assert coin["unique_prompts"] <= 2 and coin["train_overlap"] == 4
    assert result.domains["toy_add"]["unique_prompts"] == 4
    files = write_task_report(result, str(tmp_path / "out"))
    assert sorted(files.values()) == [str(tmp_path / "out" / f"tasks.{e}") for e in ("json", "md", "png")]
    data = json.loads((tmp_path / "out" / "tasks.json").read_text())
    assert len(data["records"]) == 16 and {"prompt", "completion", "reward", "seed"} <= set(data["records"][0])
    assert TaskEvalResult.from_dict(data).table() == result.table()
    md = (tmp_path / "out" / "tasks.md").read_text()
    assert result.table(markdown=True) in md and "toy_coin: 4 of 4" in md
    assert (tmp_path / "out" / "tasks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # "2" is right for 1 + 1 only: toy_coin scores the share of such tasks, toy_add (a >= 0, b >= 0) rarely
    assert (
        result.accuracy("toy_coin", "on")
        == sum(r["answer"] == 2 for r in data["records"] if r["domain"] == "toy_coin" and r["reasoning"] == "on") / 4
    )
    plot_comparison({"before": result, "after": result}, str(tmp_path / "cmp.png"))
    assert (tmp_path / "cmp.png").read_bytes()[:4] == b"\x89PNG"


def test_cli(checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(DOMAINS, "toy_add", ToyAdd())
    out = tmp_path / "tasks"
    args = ["eval", "tasks", checkpoint, "--domains", "toy_add", "--samples", "2", "--max-new-tokens", "3",
            "--max-model-len", "128", "--max-num-seqs", "4", "--overlap-seeds", "5", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "toy_add" in printed and "wrote" in printed
    data = json.loads((out / "tasks.json").read_text())
    assert len(data["records"]) == 4 and data["run"]["settings"]["split"] == "heldout"
    assert all(r["seed"] >= 1_000_000_000 for r in data["records"])  # the held-out split
    assert main(args[:3] + ["--domains", "toy_add,nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown task domain 'nope'" in err and "toy_add" in err
