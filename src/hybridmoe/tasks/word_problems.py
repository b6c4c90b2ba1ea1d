"""Word problems: a person's count of things changes in one to three steps; how many are there at the end?

Difficulty 1: one change (buys, finds, gives away, ...); 2: two changes, one of them packs of several things;
3: three changes and a last step that shares the things equally. The trace writes one equation per sentence
("Ada starts with 7. 7 + 5 = 12."); the answer is checked as an exact number.
"""

from __future__ import annotations

import random

from .base import Domain, Task
from .common import NAMES, assistant, number_reward, user

ITEMS = (
    "apples", "marbles", "stickers", "coins", "books", "pencils", "cards", "shells", "stamps", "cookies", "balloons",
    "beads", "eggs", "toys", "rocks", "buttons", "pens", "plums", "cups", "ribbons",
)  # fmt: skip
ADD = ("{N} buys {n} more.", "{N} finds {n} more.", "{O} gives {N} {n} more.", "{N} picks up {n} more.")
SUBTRACT = ("{N} gives {n} to {O}.", "{N} loses {n}.", "{N} sells {n}.", "{N} uses {n}.")
PACKS = "{N} buys {k} packs with {m} {items} in each."  # adds k * m


def _step(rng: random.Random, count: int, kinds: str, ctx: dict) -> tuple[str, str, int]:
    """One change to `count`: (sentence, trace, new count)."""
    kind = rng.choice(kinds) if count > 1 else rng.choice(kinds.replace("-", "") or "+")
    if kind == "+":
        n = rng.randint(1, 20)
        return rng.choice(ADD).format(n=n, **ctx), f"{count} + {n} = {count + n}.", count + n
    if kind == "-":
        n = rng.randint(1, count - 1)
        return rng.choice(SUBTRACT).format(n=n, **ctx), f"{count} - {n} = {count - n}.", count - n
    k, m = rng.randint(2, 6), rng.randint(2, 12)
    trace = f"{k} * {m} = {k * m}. {count} + {k * m} = {count + k * m}."
    return PACKS.format(k=k, m=m, **ctx), trace, count + k * m


class WordProblems(Domain):
    name = "word_problems"
    description = "a count changes in short sentences; compute the final count"

    def _generate(self, rng: random.Random, difficulty: int, seed: int) -> Task:
        name, other = rng.sample(NAMES, 2)
        items = rng.choice(ITEMS)
        ctx = {"O": other, "N": name, "items": items}
        count = rng.randint(2, 30)
        sentences, traces = [f"{name} has {count} {items}."], [f"{name} starts with {count}."]
        kinds = "+-" if difficulty == 1 else "+-*"
        for _ in range(difficulty):
            sentence, trace, count = _step(rng, count, kinds, ctx)
            sentences.append(sentence)
            traces.append(trace)
        question = f"How many {items} does {name} have now?"
        if difficulty == 3:
            people = rng.choice([d for d in range(2, 7) if count % d == 0] or [1])
            if people == 1:  # a prime count: add one to make it shareable
                sentences.append(rng.choice(ADD).format(n=1, **ctx))
                traces.append(f"{count} + 1 = {count + 1}.")
                count += 1
                people = rng.choice([d for d in range(2, 7) if count % d == 0])
            question = f"{name} shares them equally among {people} friends. How many {items} does each friend get?"
            traces.append(f"{count} / {people} = {count // people}.")
            count //= people
        sentences.append(question)
        answer = str(count)
        return Task(
            domain=self.name, seed=seed, difficulty=difficulty, messages=[user(" ".join(sentences))], answer=answer,
            solution=[assistant(answer, " ".join(traces))],
        )  # fmt: skip

    def verify(self, task: Task, completion: str) -> float:
        return number_reward(task.answer, completion)
