"""Instruction following: write about a topic under checkable format rules (the `instructions` domain, after
IFEval, arXiv 2311.07911: bullets, length, case, keywords, ending).

Reward as the domain's: 0 unless the reply mentions the topic, otherwise the share of the rules it follows.
Components: `topic` (the reply mentions it) and `rules` (the share of rules followed, whatever the topic)."""

from __future__ import annotations

from ..tasks.instructions import _has_word, follows
from .base import Episode, Reward
from .domain import DomainEnv


class InstructionsEnv(DomainEnv):
    name = "instructions"
    domain_names = ("instructions",)
    max_tool_calls = 0

    def verify(self, episode: Episode, answer: str) -> Reward:
        reward = float(self.domain(episode).verify(episode.task, answer))
        rules = episode.task.answer["rules"]
        return Reward(reward, {
            "topic": float(_has_word(answer, episode.task.answer["topic"])),
            "rules": sum(follows(answer, rule) for rule in rules) / len(rules),
        })  # fmt: skip
