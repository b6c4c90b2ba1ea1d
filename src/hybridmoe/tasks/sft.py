"""SFT data from the task domains: `Task.to_sft()` records, one JSON conversation per line.

The lines interleave the domains round-robin (a prefix of the file holds every domain in the same proportions) and
each domain takes the same seeds of the split; the file is written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random

from ..utils import atomic_write
from .base import split_seeds


def write_sft_jsonl(
    path: str | os.PathLike,
    domains: dict[str, int],
    split: str = "train",
    difficulty: int = 1,
    offset: int = 0,
    recovery_share: float = 0.0,
) -> dict:
    """Write `domains[name]` SFT conversations of each domain at `difficulty`, from the seeds of `split` after
    `offset` (the seed offset inside the split, as in `split_seeds`). recovery_share: of the tasks of a domain with
    recovery demonstrations (`Terminal.recovery`), the share (drawn by seed) written as one where it applies.
    Returns what was written."""
    from . import get_domain

    if not 0.0 <= recovery_share <= 1.0:
        raise ValueError(f"recovery_share={recovery_share} must be in [0, 1]")
    if not domains:
        raise ValueError("no domains given; name at least one, e.g. {'arithmetic': 100}")
    for name, n in domains.items():
        get_domain(name)  # an unknown name is an error before anything is written
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"the count for domain {name!r} must be a whole number >= 0, got {n!r}")
    seeds = {name: split_seeds(split, n, offset) for name, n in domains.items()}
    recoveries = {name: 0 for name in domains if hasattr(get_domain(name), "recovery")}

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            for i in range(max(domains.values())):
                for name, domain_seeds in seeds.items():
                    if i < len(domain_seeds):
                        domain = get_domain(name)
                        task = domain.generate(domain_seeds[i], difficulty)
                        if name in recoveries and random.Random(f"recovery-{task.seed}").random() < recovery_share:
                            demo = domain.recovery(task)
                            if demo is not None:
                                task = dataclasses.replace(task, solution=demo)
                                recoveries[name] += 1
                        f.write(json.dumps(task.to_sft(), ensure_ascii=False) + "\n")

    atomic_write(path, write)
    return {"path": os.fspath(path), "records": sum(domains.values()), "per_domain": dict(domains), "split": split,
            "difficulty": difficulty, "offset": offset,
            "recovery_demonstrations": {k: v for k, v in recoveries.items() if v}}  # fmt: skip
