"""Every task domain: deterministic by seed, splits apart, reference solutions verify to 1, wrong answers to 0."""

import json
import random
import re

import pytest

from hybridmoe.tasks import DOMAINS, SPLITS, get_domain, prompt_overlap, split_of, split_seeds

EXPECTED = {
    "arithmetic", "word_problems", "unit_conversion", "lists", "strings", "python", "calculator", "documents",
    "json_schema", "instructions", "followup", "terminal",
}  # fmt: skip
SLOW = {"python", "terminal"}  # verify (python) or the tools (terminal) run in the sandbox: a subprocess each
PARTIAL_CREDIT = {"json_schema", "instructions"}  # documented in their modules
LEVELS = (1, 2, 3)


def seeds(n: int, split: str = "train") -> list[int]:
    return list(split_seeds(split, n, offset=1000))


def final_answer(task) -> str:
    return task.solution[-1]["content"]


def test_registry_holds_every_domain():
    assert set(DOMAINS) >= EXPECTED
    for name, domain in DOMAINS.items():
        assert domain.name == name and domain.description
    with pytest.raises(ValueError, match="unknown task domain"):
        get_domain("nope")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_same_seed_same_task_and_seeds_differ(name):
    d = get_domain(name)
    for level in LEVELS:
        assert d.generate(7, level).to_dict() == d.generate(7, level).to_dict()
        prompts = {json.dumps(d.generate(s, level).messages) for s in range(20)}
        assert len(prompts) >= 15, f"{name} level {level}: only {len(prompts)} different prompts in 20 seeds"
    with pytest.raises(ValueError, match="difficulty"):
        d.generate(0, 4)
    with pytest.raises(ValueError, match="no split"):
        d.generate(-1)


def test_split_ranges_never_overlap():
    ranges = sorted(SPLITS.values())
    for (_, stop), (start, _) in zip(ranges, ranges[1:]):
        assert stop <= start
    train, heldout = set(split_seeds("train", 500, offset=10)), set(split_seeds("heldout", 500))
    assert not train & heldout
    assert {split_of(s) for s in train} == {"train"} and {split_of(s) for s in heldout} == {"heldout"}
    with pytest.raises(ValueError, match="do not fit"):
        split_seeds("train", 10, offset=SPLITS["train"][1])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_reference_solution_verifies(name):
    d = get_domain(name)
    n = 3 if name in SLOW else 25
    for level in LEVELS:
        for seed in seeds(n) + seeds(2, "heldout"):
            task = d.generate(seed, level)
            assert task.domain == name and task.seed == seed and task.difficulty == level
            assert task.messages[-1]["role"] == "user"
            answer = task.solution[-1]
            assert answer["role"] == "assistant" and answer["content"] and answer["reasoning_content"]
            run_tool_calls(d, task)  # terminal: its verify inspects what the calls left
            assert d.verify(task, final_answer(task)) == 1.0, (name, level, seed, task.messages, answer)
            json.dumps(task.to_dict())  # JSON-serializable
            record = task.to_sft()
            assert record["messages"] == task.messages + task.solution and record["domain"] == name


def run_tool_calls(d, task) -> dict[str, str]:
    """Run the solution's tool calls through the domain's tool; their outputs by call id."""
    return {
        call["id"]: d.run_tool(task, call["function"]["name"], json.loads(call["function"]["arguments"]))
        for m in task.solution
        for call in m.get("tool_calls") or []
    }


def test_level_one_traces_are_short():
    for name in EXPECTED - {"python", "instructions", "json_schema"}:
        d = get_domain(name)
        for seed in seeds(20):
            trace = " ".join(m.get("reasoning_content", "") for m in d.generate(seed, 1).solution)
            assert 1 <= len(trace.split()) <= 45, (name, trace)


def test_tool_results_are_the_real_tool_output():
    for name, d in DOMAINS.items():
        for level in LEVELS:
            for seed in seeds(2 if name in SLOW else 10):
                task = d.generate(seed, level)
                calls = run_tool_calls(d, task)
                for m in task.solution:
                    if m["role"] == "tool":
                        assert m["content"] == calls.pop(m["tool_call_id"]), (name, task.solution)
                assert not calls, f"{name}: a tool call without its result"
                assert bool(task.tools) == (name in ("calculator", "retrieval", "terminal"))


WRONG = ["", "I don't know.", "42 43 44", "The answer is", "[1, 2, 3]", "{}", "\\boxed{}", "NaN"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_wrong_answers_get_nothing(name):
    d = get_domain(name)
    for level in LEVELS:
        for seed in seeds(1 if name == "python" else 10):  # python: each check is a sandboxed subprocess
            task, other = d.generate(seed, level), d.generate(seed + 1, level)
            wrong = list(WRONG)
            if final_answer(other) != final_answer(task) and other.answer != task.answer:
                wrong.append(final_answer(other))  # a well-formed answer to another task
            for completion in wrong:
                reward = d.verify(task, completion)
                assert 0.0 <= reward < 1.0, (name, completion, task.messages)
                if name not in PARTIAL_CREDIT:
                    assert reward == 0.0, (name, completion)


@pytest.mark.parametrize("name", sorted(EXPECTED - PARTIAL_CREDIT - {"python"}))
def test_rewards_are_all_or_nothing_outside_documented_partial_credit(name):
    d, rng = get_domain(name), random.Random(0)
    for seed in seeds(20):
        task = d.generate(seed, rng.choice(LEVELS))
        answer = final_answer(task)
        variants = [answer[: len(answer) // 2], answer + " 1", answer.upper(), answer[::-1], f"maybe {answer} or 7"]
        for completion in variants:
            assert d.verify(task, completion) in (0.0, 1.0)


def test_numeric_answers_are_compared_as_numbers():
    d = get_domain("arithmetic")
    task = next(t for t in (d.generate(s, 3) for s in seeds(200)) if "/" in t.answer)
    p, q = map(int, task.answer.split("/"))
    assert d.verify(task, f"{2 * p}/{2 * q}") == 1.0  # not in lowest terms: the same number
    assert d.verify(task, f"The answer is {p}/{q}.") == 1.0
    assert d.verify(task, f"\\boxed{{{p}/{q}}}") == 1.0
    assert d.verify(task, f"{p}/{q + 1}") == 0.0
    units = get_domain("unit_conversion")
    task = units.generate(seeds(1)[0], 1)
    assert units.verify(task, f"{task.answer} m") == 1.0  # a unit after the number is fine


def test_json_schema_partial_credit():
    d = get_domain("json_schema")
    task = d.generate(seeds(1)[0], 1)
    expected = dict(task.answer["expected"])
    assert d.verify(task, f"```json\n{json.dumps(expected)}\n```") == 1.0
    key = next(k for k, v in expected.items() if isinstance(v, (str, int)) and not isinstance(v, bool))
    changed = dict(expected, **{key: expected[key] + (1 if isinstance(expected[key], int) else "x")})
    assert d.verify(task, json.dumps(changed)) == 0.5  # fits the schema, wrong value
    assert d.verify(task, json.dumps(dict(expected, extra=1))) == 0.0  # breaks additionalProperties
    assert d.verify(task, json.dumps({k: v for k, v in list(expected.items())[1:]})) == 0.0  # a required key missing


def test_instructions_partial_credit_and_topic_gate():
    d = get_domain("instructions")
    for seed in seeds(20):
        task = d.generate(seed, 3)
        text, rules = final_answer(task), task.answer["rules"]
        assert d.verify(task, text) == 1.0
        if any(r[0] == "end" for r in rules):  # every ending ends with "."; "!" breaks that rule alone
            assert d.verify(task, text[:-1] + "!") == 1 - 1 / len(rules)
        off_topic = re.sub(task.answer["topic"], "things", text, flags=re.IGNORECASE)
        assert d.verify(task, off_topic) == 0.0


def test_documents_and_followup_refuse_listing_every_candidate():
    d = get_domain("documents")
    task = next(t for t in (d.generate(s, 1) for s in seeds(50)) if not t.answer["numeric"])
    candidates = [task.answer["value"], *task.answer["distractors"]]
    assert d.verify(task, " or ".join(candidates)) == 0.0
    assert d.verify(task, f"It is {task.answer['value']}.") == 1.0


def test_python_hidden_tests_reject_a_wrong_function():
    d = get_domain("python")
    task = d.generate(seeds(1)[0], 1)
    name = task.answer["entry_point"]
    assert d.verify(task, f"def {name}(*args):\n    return 0\n") == 0.0
    code = final_answer(task).removeprefix("```python\n").removesuffix("```")
    assert d.verify(task, code) == 1.0  # the code without a fence


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_heldout_prompts_rarely_repeat_training_prompts(name):
    overlap = prompt_overlap(name, difficulty=1, n_train=2000, n_heldout=300)
    assert overlap <= 0.03, f"{name}: {overlap:.1%} of held-out prompts are also training prompts"
