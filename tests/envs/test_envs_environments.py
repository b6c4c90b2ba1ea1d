"""Each environment's reset / call_tool / verify on hand-made answers: right, wrong and malformed."""

from __future__ import annotations

import json

import pytest

from hybridmoe.envs import Environment, Reward, make_envs
from hybridmoe.envs.domain import DomainEnv
from hybridmoe.tasks import split_seeds

SEEDS = list(split_seeds("heldout", 6))
MALFORMED = ["", "I don't know.", "```\n{not json", "<tool_call>\n{}\n</tool_call>", "\\boxed{}", "NaN" * 50]


def solution(episode) -> str:
    return episode.task.solution[-1]["content"]


@pytest.fixture(scope="module")
def envs():
    return make_envs()


def test_every_environment_resets_deterministically_and_scores_its_reference(envs):
    for name, env in envs.items():
        assert isinstance(env, Environment) and env.name == name
        for seed in SEEDS[:3]:
            a, b = env.reset(seed, 1), env.reset(seed, 1)
            assert a.env == name and a.task.to_dict() == b.task.to_dict() and a.messages == a.task.messages
            a.messages.append({"role": "assistant", "content": "x"})  # the loop's appends never touch the task
            assert a.task.messages[-1]["role"] == "user"
            reward = env.verify(b, solution(b))
            assert isinstance(reward, Reward) and 0.0 <= reward.total <= 1.0
            if name not in ("calculator", "terminal"):  # their references also need the tool calls made
                assert reward.total == 1.0, (name, seed)
            for text in MALFORMED:
                assert 0.0 <= env.verify(b, text).total < 1.0, (name, text)


def test_math_covers_three_domains_checked_as_numbers(envs):
    env = envs["math"]
    domains = {env.reset(s).task.domain for s in SEEDS}
    assert domains == {"arithmetic", "word_problems", "unit_conversion"}
    episode = next(e for e in (env.reset(s, 3) for s in SEEDS) if "/" in e.task.answer)
    p, q = map(int, episode.task.answer.split("/"))
    assert env.verify(episode, f"\\boxed{{{2 * p}/{2 * q}}}") == Reward(1.0, {"correct": 1.0})
    assert env.verify(episode, f"{p}/{q + 1}") == Reward(0.0, {"correct": 0.0})
    assert env.verify(episode, f"{p}/{q} or {p + 1}/{q}") == Reward(0.0, {"correct": 0.0})  # no single answer


def test_code_runs_hidden_tests_in_the_sandbox(envs):
    env = envs["code"]
    episode = env.reset(SEEDS[0])
    name = episode.task.answer["entry_point"]
    assert env.verify(episode, solution(episode)) == Reward(1.0, {"has_code": 1.0, "passed": 1.0})
    assert env.verify(episode, f"```python\ndef {name}(*a):\n    return 0\n```") == Reward(
        0.0, {"has_code": 1.0, "passed": 0.0})  # fmt: skip
    assert env.verify(episode, "```python\n```") == Reward(0.0, {"has_code": 0.0, "passed": 0.0})


def test_calculator_compares_answer_and_call_arguments(envs):
    env = envs["calculator"]
    episode = env.reset(SEEDS[0], 3)  # two calls
    expected = [json.loads(c["function"]["arguments"])["expression"]
                for m in episode.task.solution for c in m.get("tool_calls") or []]  # fmt: skip
    assert len(expected) == 2
    assert env.verify(episode, solution(episode)) == Reward(0.75, {"answer": 1.0, "arguments": 0.0})  # no calls
    first = env.call_tool(episode, "calculator", {"expression": expected[0]})
    a, op, b = expected[0].split()
    commuted = f"{b} {op} {a}" if op in "+*" else expected[0]
    episode2 = env.reset(SEEDS[0], 3)
    assert env.call_tool(episode2, "calculator", {"expression": commuted}) == first  # the same value
    assert env.call_tool(episode2, "calculator", {"expression": expected[1]})
    assert env.verify(episode2, solution(episode2)) == Reward(1.0, {"answer": 1.0, "arguments": 1.0})
    env.call_tool(episode2, "calculator", {"expression": "1 + 1"})  # an extra call lowers the arguments' score
    assert env.verify(episode2, solution(episode2)).components["arguments"] == pytest.approx(2 / 3)
    assert env.verify(episode, "12").components["answer"] == 0.0
    # bad calls are answered with an error text, never an exception, and count as calls that match nothing
    episode3 = env.reset(SEEDS[1], 1)
    assert env.call_tool(episode3, "calculator", {"expression": "__import__('os')"}).startswith("error:")
    assert env.call_tool(episode3, "calculator", {"x": 1}).startswith("error:")
    assert env.call_tool(episode3, "abacus", {}).startswith("error: unknown tool")
    assert env.verify(episode3, solution(episode3)) == Reward(0.75, {"answer": 1.0, "arguments": 0.0})


def test_retrieval_searches_its_own_index(envs):
    env = envs["retrieval"]
    episode = env.reset(SEEDS[0], 2)
    query = json.loads(episode.task.solution[0]["tool_calls"][0]["function"]["arguments"])["query"]
    assert env.call_tool(episode, "search", {"query": query}) == episode.task.solution[1]["content"]
    assert env.call_tool(episode, "lookup", {"query": query}).startswith("error: unknown tool")
    assert env.call_tool(episode, "search", {"query": ""}).startswith("error:")
    assert env.verify(episode, solution(episode)) == Reward(1.0, {"answer": 1.0, "searched": 1.0})
    fresh = env.reset(SEEDS[0], 2)
    assert env.verify(fresh, solution(fresh)) == Reward(1.0, {"answer": 1.0, "searched": 0.0})
    assert env.verify(fresh, "no idea").total == 0.0


def test_structured_and_instructions_partial_credit(envs):
    env = envs["structured"]
    episode = env.reset(SEEDS[0])
    expected = dict(episode.task.answer["expected"])
    assert env.verify(episode, f"```json\n{json.dumps(expected)}\n```") == Reward(1.0, {"valid": 1.0, "exact": 1.0})
    key = next(k for k, v in expected.items() if isinstance(v, (str, int)) and not isinstance(v, bool))
    changed = expected[key] + (1 if isinstance(expected[key], int) else "x")
    assert env.verify(episode, json.dumps(expected | {key: changed})) == Reward(
        0.5, {"valid": 1.0, "exact": 0.0})  # fmt: skip
    assert env.verify(episode, "{'single': 'quotes'}") == Reward(0.0, {"valid": 0.0, "exact": 0.0})
    env = envs["instructions"]
    episode = env.reset(SEEDS[0], 3)
    text = solution(episode)
    assert env.verify(episode, text) == Reward(1.0, {"topic": 1.0, "rules": 1.0})
    off_topic = env.verify(episode, text.replace(episode.task.answer["topic"], "things"))
    assert off_topic.total == 0.0 and off_topic.components["topic"] == 0.0 and off_topic.components["rules"] > 0


def test_domain_env_wraps_any_domain_and_rejects_tools_it_lacks():
    env = DomainEnv("arithmetic")
    assert env.name == "arithmetic" and env.max_difficulty == 3
    episode = env.reset(SEEDS[0])
    assert env.call_tool(episode, "calculator", {}).startswith("error: this task offers no tools")
    with pytest.raises(ValueError, match="difficulty 4 is outside"):
        env.reset(SEEDS[0], 4)
    with pytest.raises(ValueError, match="unknown task domain"):
        DomainEnv("nope")
