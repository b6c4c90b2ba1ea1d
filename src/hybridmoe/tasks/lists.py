"""List manipulation: sort, reverse, filter, take, add, remove repeats, then maybe a largest/smallest/sum/count.

Difficulty 1: one operation on 4-5 numbers; 2: two operations on 5-7 numbers; 3: three on 6-9. The trace writes
the list after each operation (a running value for sums and extremes). The answer is a list `[3, 5, 9]`, compared
element by element, or a number, compared exactly.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from .base import Domain, Task
from .common import assistant, extract_int_list, number_reward, user


def _items(xs: list[int]) -> str:
    return ", ".join(map(str, xs)) if xs else "nothing"


@dataclass
class Op:
    clause: str  # imperative, e.g. "sort it from smallest to largest"
    apply: Callable[[list[int]], list[int] | int]
    trace: Callable[[list[int]], str]


def _running(xs: list[int], pick: Callable[[int, int], int], what: str) -> str:
    best, seen = xs[0], [xs[0]]
    for x in xs[1:]:
        best = pick(best, x)
        seen.append(best)
    return f"{what} so far: {_items(seen)}."


def _sum_trace(xs: list[int]) -> str:
    total, parts = xs[0], []
    for x in xs[1:]:
        parts.append(f"{total} + {x} = {total + x}.")
        total += x
    return " ".join(parts) or f"The only number is {total}."


def _keep(xs: list[int], keep: Callable[[int], bool], why: str) -> str:
    return f"{why}: {_items([x for x in xs if keep(x)])}."


def list_ops(rng: random.Random) -> list[Op]:
    """The list-to-list operations, with their random parameters drawn now."""
    t, k, add = rng.randint(10, 90), rng.randint(2, 4), rng.randint(2, 20)

    def dedupe(xs: list[int]) -> list[int]:
        return list(dict.fromkeys(xs))

    return [
        Op("sort it from smallest to largest", sorted, lambda xs: f"From smallest to largest: {_items(sorted(xs))}."),
        Op("sort it from largest to smallest", lambda xs: sorted(xs, reverse=True),
           lambda xs: f"From largest to smallest: {_items(sorted(xs, reverse=True))}."),
        Op("reverse it", lambda xs: xs[::-1], lambda xs: f"From the end: {_items(xs[::-1])}."),
        Op("keep only the even numbers", lambda xs: [x for x in xs if x % 2 == 0],
           lambda xs: _keep(xs, lambda x: x % 2 == 0, "Even")),
        Op("keep only the odd numbers", lambda xs: [x for x in xs if x % 2 == 1],
           lambda xs: _keep(xs, lambda x: x % 2 == 1, "Odd")),
        Op(f"keep only the numbers greater than {t}", lambda xs: [x for x in xs if x > t],
           lambda xs: _keep(xs, lambda x: x > t, f"Greater than {t}")),
        Op(f"take the first {k} numbers", lambda xs: xs[:k], lambda xs: f"The first {k}: {_items(xs[:k])}."),
        Op(f"add {add} to each number", lambda xs: [x + add for x in xs],
           lambda xs: f"Adding {add}: {_items([x + add for x in xs])}."),
        Op("remove repeated numbers, keeping the first of each", dedupe,
           lambda xs: f"Without repeats: {_items(dedupe(xs))}."),
    ]  # fmt: skip


FINAL_OPS = [
    Op("give the largest number", max, lambda xs: _running(xs, max, "Largest")),
    Op("give the smallest number", min, lambda xs: _running(xs, min, "Smallest")),
    Op("give the sum", sum, _sum_trace),
    Op("give how many numbers there are", len, lambda xs: f"Counting: {_items(list(range(1, len(xs) + 1)))}."),
]
LEVELS = {1: (1, 4, 5), 2: (2, 5, 7), 3: (3, 6, 9)}  # operations, shortest and longest list


class Lists(Domain):
    name = "lists"
    description = "apply list operations (sort, filter, take, ...) and give the list or a number"

    def _generate(self, rng: random.Random, difficulty: int, seed: int) -> Task:
        n_ops, shortest, longest = LEVELS[difficulty]
        while True:  # redraw until no operation meets an empty list
            start = [rng.randint(1, 99) for _ in range(rng.randint(shortest, longest))]
            ops = [rng.choice(list_ops(rng)) for _ in range(n_ops - 1)]
            ops.append(rng.choice(list_ops(rng) + FINAL_OPS))
            value, traces = start, []
            for op in ops:
                traces.append(op.trace(value))
                value = op.apply(value)
                if value == []:
                    break
            else:
                break
        clauses = ", then ".join(op.clause for op in ops)
        question = f"Take the list {start}. {clauses[0].upper()}{clauses[1:]}."
        answer = str(value)
        return Task(
            domain=self.name, seed=seed, difficulty=difficulty, messages=[user(question)], answer=value,
            solution=[assistant(answer, " ".join(traces))],
        )  # fmt: skip

    def verify(self, task: Task, completion: str) -> float:
        if isinstance(task.answer, list):
            return 1.0 if extract_int_list(completion) == task.answer else 0.0
        return number_reward(str(task.answer), completion)
