"""An environment over task domains (`hybridmoe.tasks`): the task is the domain's, tool calls go to its
`run_tool`, and `verify` is its reward.

`DomainEnv(*domains)` serves one domain, or several (math: arithmetic, word problems, unit conversion), in which
case the seed picks the domain (`domains[seed % len(domains)]`) and the task is that domain's task of the same seed,
so a seed still names one task. Subclasses add reward components and per-episode state (a search index, the calls
made). `DomainEnv` also wraps any `Domain` object for evaluation (`hybridmoe eval tasks`).
"""

from __future__ import annotations

import copy

from ..tasks import Domain, get_domain
from .base import Environment, Episode, Reward


class DomainEnv(Environment):
    name = ""
    domain_names: tuple[str, ...] = ()  # registered domains a subclass serves (by name in hybridmoe.tasks.DOMAINS)

    def __init__(self, *domains: Domain | str, name: str | None = None):
        given = domains or self.domain_names
        if not given:
            raise ValueError(f"{type(self).__name__} needs at least one task domain")
        self.domains = [d if isinstance(d, Domain) else get_domain(d) for d in given]
        self.by_name = {d.name: d for d in self.domains}
        self.name = name or self.name or self.domains[0].name

    @property
    def max_difficulty(self) -> int:
        return min(d.max_difficulty for d in self.domains)

    def domain(self, episode: Episode) -> Domain:
        return self.by_name[episode.task.domain]

    def reset(self, seed: int, difficulty: int = 1) -> Episode:
        task = self.domains[seed % len(self.domains)].generate(seed, difficulty)
        return Episode(self.name, task, copy.deepcopy(task.messages), copy.deepcopy(task.tools))

    def call_tool(self, episode: Episode, name: str, arguments: dict) -> str:
        if not episode.tools:
            return f"error: this task offers no tools, so {name!r} cannot be called; answer directly"
        return str(self.domain(episode).run_tool(episode.task, name, arguments))

    def verify(self, episode: Episode, answer: str) -> Reward:
        return Reward(float(self.domain(episode).verify(episode.task, answer)))
