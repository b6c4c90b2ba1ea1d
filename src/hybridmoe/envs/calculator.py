"""Calculator tool use, over several turns (the `calculator` domain): the model calls `calculator`, reads the real
output, and answers (difficulty 3 needs two calls in turn, the second on the first one's result).

Reward = (1 - ARGUMENT_WEIGHT) x answer + ARGUMENT_WEIGHT x arguments, with components
- `answer`: the final answer is the exact number (1 or 0; answering right without the tool still counts here);
- `arguments`: the share of the expected calls the model made, in order, with an expression of the same exact value
  as the reference's (so `3 * 12` matches `12 * 3`), out of max(expected calls, calls made): extra or failed calls
  lower it. Expressions are evaluated by the tool's own `ast` whitelist, never `eval`.
"""

from __future__ import annotations

import json

from ..tasks.calculator import evaluate
from .base import Episode, Reward
from .domain import DomainEnv

ARGUMENT_WEIGHT = 0.25


def _value(expression):
    try:
        return evaluate(expression)
    except ValueError:
        return None


class CalculatorEnv(DomainEnv):
    name = "calculator"
    domain_names = ("calculator",)
    max_tool_calls = 4

    def call_tool(self, episode: Episode, name: str, arguments: dict) -> str:
        if name == "calculator":
            episode.state.setdefault("expressions", []).append((arguments or {}).get("expression"))
        return super().call_tool(episode, name, arguments)

    def verify(self, episode: Episode, answer: str) -> Reward:
        correct = float(self.domain(episode).verify(episode.task, answer))
        expected = [json.loads(call["function"]["arguments"])["expression"]
                    for m in episode.task.solution for call in m.get("tool_calls") or []]  # fmt: skip
        made = episode.state.get("expressions", [])
        matched = sum(
            i < len(made) and (got := _value(made[i])) is not None and got == _value(want)
            for i, want in enumerate(expected)
        )
        arguments = matched / max(len(expected), len(made), 1)
        total = (1 - ARGUMENT_WEIGHT) * correct + ARGUMENT_WEIGHT * arguments
        return Reward(total, {"answer": correct, "arguments": arguments})
