"""Structured output: the JSON object a JSON schema describes, with given values (the `json_schema` domain).

Reward as the domain's: 0 when the reply is not JSON or breaks the schema, 0.5 when it fits the schema with another
value, 1 when it is the expected object. Components: `valid` (fits the schema) and `exact` (the expected object)."""

from __future__ import annotations

from .base import Episode, Reward
from .domain import DomainEnv


class StructuredEnv(DomainEnv):
    name = "structured"
    domain_names = ("json_schema",)
    max_tool_calls = 0

    def verify(self, episode: Episode, answer: str) -> Reward:
        reward = float(self.domain(episode).verify(episode.task, answer))
        return Reward(reward, {"valid": float(reward >= 0.5), "exact": float(reward == 1.0)})
