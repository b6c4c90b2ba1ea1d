"""The interface of a verifiable task domain: a seeded generator of tasks, each carrying what its verifier needs.

A `Domain` makes a `Task` from a seed and a difficulty (the same seed always gives the same task) and scores a
model's answer to it with `verify(task, completion) -> reward in [0, 1]`. The same tasks serve three stages:

- SFT data: `Task.to_sft()` is the prompt plus a reference solution with a worked reasoning trace
  (`reasoning_content`) and the final answer, an OpenAI-format conversation (`hybridmoe.data.sft` reads it);
- evaluation (`hybridmoe eval tasks`): the prompt is rendered with the chat template, the model answers, and
  `verify` scores the answer (for tool domains, after the tool loop: `Domain.run_tool` gives the tool's output);
- RL with verifiable rewards (the environments of the next stage wrap domains).

Splits are seed ranges that never overlap: training data uses seeds in `SPLITS["train"]`, evaluation in
`SPLITS["heldout"]`. Generators draw every random choice from `random.Random(f"{domain}:{seed}:{difficulty}")`, so a
task depends on nothing but its domain, seed and difficulty.

What `verify` receives: the text of the model's final assistant turn with the reasoning removed (the `content` of
the parsed answer, as the chat parser returns it), never raw model output to execute in this process. A domain
that runs model-written code does so only through `hybridmoe.envs.sandbox` (a separate, resource-limited
process).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

# Seed ranges of the splits; half-open [start, stop). Never overlapping, so no held-out task is ever trained on by
# seed (a small task space can still repeat a prompt: `hybridmoe eval tasks` reports the overlap it finds).
SPLITS: dict[str, tuple[int, int]] = {"train": (0, 1_000_000_000), "heldout": (1_000_000_000, 2_000_000_000)}


def split_of(seed: int) -> str:
    for name, (start, stop) in SPLITS.items():
        if start <= seed < stop:
            return name
    raise ValueError(f"seed {seed} is in no split; use a seed in {SPLITS}")


def split_seeds(split: str, n: int, offset: int = 0) -> range:
    """The first `n` seeds of `split` after `offset` (offset lets a run take a fresh slice of the same split)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {sorted(SPLITS)}")
    start, stop = SPLITS[split]
    if n < 0 or offset < 0 or start + offset + n > stop:
        raise ValueError(f"{n} seeds from offset {offset} do not fit in split {split!r} {SPLITS[split]}")
    return range(start + offset, start + offset + n)


@dataclass
class Task:
    domain: str
    seed: int
    difficulty: int
    messages: list[dict]  # the prompt: OpenAI-format messages, ending where the assistant is to answer
    answer: Any  # what verify() compares with (JSON-serializable)
    solution: list[dict]  # the reference continuation: assistant turn(s) with reasoning_content (and tool turns)
    tools: list[dict] | None = None  # OpenAI tool definitions offered to the model
    metadata: dict = field(default_factory=dict)

    @property
    def split(self) -> str:
        return split_of(self.seed)

    def to_sft(self) -> dict:
        """One SFT record: `{"messages": prompt + solution, "tools": ..., "domain": ..., "seed": ...}`."""
        messages = [dict(m) for m in self.messages + self.solution]
        record = {"messages": messages, "domain": self.domain, "seed": self.seed}
        if self.tools:
            record["tools"] = self.tools
        return record

    def to_dict(self) -> dict:
        return {
            "domain": self.domain,
            "seed": self.seed,
            "difficulty": self.difficulty,
            "messages": self.messages,
            "answer": self.answer,
            "solution": self.solution,
            "tools": self.tools,
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Task:
        return cls(**d)


class Domain:
    """A family of procedurally generated tasks. Subclasses set `name` and `description` and implement
    `_generate(rng, difficulty, seed)` and `verify`; tool domains also implement `run_tool`."""

    name: str = ""
    description: str = ""
    max_difficulty: int = 3

    def generate(self, seed: int, difficulty: int = 1) -> Task:
        if not 1 <= difficulty <= self.max_difficulty:
            raise ValueError(f"{self.name}: difficulty {difficulty} is outside 1..{self.max_difficulty}")
        split_of(seed)  # a seed outside every split is an error
        rng = random.Random(f"{self.name}:{seed}:{difficulty}")
        return self._generate(rng, difficulty, seed)

    def _generate(self, rng: random.Random, difficulty: int, seed: int) -> Task:
        raise NotImplementedError

    def verify(self, task: Task, completion: str) -> float:
        """The reward in [0, 1] of `completion` (the final answer's text, reasoning removed) for `task`."""
        raise NotImplementedError

    def run_tool(self, task: Task, name: str, arguments: dict) -> str:
        """The output of tool `name` called with `arguments` (tool domains only); a bad call returns an error
        message for the model to read, it never raises."""
        raise ValueError(f"domain {self.name!r} has no tools")
