"""Verifiable task domains (`hybridmoe.tasks`): seeded generators whose tasks carry their own verifier.

Shared by SFT data (`Task.to_sft`), task evaluation (`hybridmoe eval tasks`) and RL. See `base.py` for the
interface; each domain lives in its own module and is listed in `DOMAINS`.
"""

from __future__ import annotations

from .base import SPLITS, Domain, Task, split_of, split_seeds

DOMAINS: dict[str, Domain] = {}


def get_domain(name: str) -> Domain:
    if name not in DOMAINS:
        raise ValueError(f"unknown task domain {name!r}; known: {', '.join(sorted(DOMAINS)) or 'none'}")
    return DOMAINS[name]


__all__ = ["DOMAINS", "SPLITS", "Domain", "Task", "get_domain", "split_of", "split_seeds"]
