"""Math: exact-number answers to arithmetic expressions, word problems and unit conversions (the `arithmetic`,
`word_problems` and `unit_conversion` domains; the seed picks one). Answers are compared as exact rationals with
sympy (`hybridmoe.tasks.common.number_reward`: the boxed number, else the one after "answer is", else the only
number). Reward 1 or 0; the component `correct` says the same."""

from __future__ import annotations

from .base import Episode, Reward
from .domain import DomainEnv


class MathEnv(DomainEnv):
    name = "math"
    domain_names = ("arithmetic", "word_problems", "unit_conversion")
    max_tool_calls = 0

    def verify(self, episode: Episode, answer: str) -> Reward:
        correct = float(self.domain(episode).verify(episode.task, answer))
        return Reward(correct, {"correct": correct})
