"""Verifiable task domains (`hybridmoe.tasks`): seeded generators whose tasks carry their own verifier.

Shared by SFT data (`Task.to_sft`, `write_sft_jsonl`), task evaluation (`hybridmoe eval tasks`) and RL. See
`base.py` for the interface; each domain lives in its own module and is listed in `DOMAINS`.
"""

from __future__ import annotations

import json

from .arithmetic import Arithmetic
from .base import SPLITS, Domain, Task, split_of, split_seeds
from .calculator import Calculator
from .documents import Documents
from .followup import Followup
from .instructions import Instructions
from .json_schema import JsonSchema
from .lists import Lists
from .python_code import PythonCode
from .retrieval import Retrieval
from .strings import Strings
from .terminal import Terminal
from .unit_conversion import UnitConversion
from .word_problems import WordProblems

DOMAINS: dict[str, Domain] = {
    d.name: d
    for d in (
        Arithmetic(),
        WordProblems(),
        UnitConversion(),
        Lists(),
        Strings(),
        PythonCode(),
        Calculator(),
        Documents(),
        JsonSchema(),
        Instructions(),
        Followup(),
        Retrieval(),
        Terminal(),
    )  # fmt: skip
}


def get_domain(name: str) -> Domain:
    if name not in DOMAINS:
        raise ValueError(f"unknown task domain {name!r}; known: {', '.join(sorted(DOMAINS)) or 'none'}")
    return DOMAINS[name]


def prompt_key(task: Task) -> str:
    """What makes two prompts the same: the messages and the tools offered."""
    return json.dumps({"messages": task.messages, "tools": task.tools}, sort_keys=True)


def prompt_overlap(domain: str, difficulty: int = 1, n_train: int = 2000, n_heldout: int = 500) -> float:
    """The share of the first `n_heldout` held-out prompts that equal one of the first `n_train` training prompts.

    Seed splits never overlap, but a small task space can still repeat a prompt; this measures how often."""
    d = get_domain(domain)
    train = {prompt_key(d.generate(s, difficulty)) for s in split_seeds("train", n_train)}
    heldout = [prompt_key(d.generate(s, difficulty)) for s in split_seeds("heldout", n_heldout)]
    return sum(key in train for key in heldout) / max(1, len(heldout))


from .sft import write_sft_jsonl  # noqa: E402  (sft uses DOMAINS)

__all__ = [
    "DOMAINS", "SPLITS", "Domain", "Task", "get_domain", "prompt_key", "prompt_overlap", "split_of", "split_seeds",
    "write_sft_jsonl",
]  # fmt: skip
