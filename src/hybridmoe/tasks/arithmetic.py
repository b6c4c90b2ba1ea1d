"""Multi-step arithmetic: evaluate an expression of whole numbers, one operation per reasoning step.

Difficulty 1: three numbers up to 20 with + - *; 2: four numbers up to 50; 3: five numbers up to 99 with division
(the answer may be a fraction). The trace evaluates the expression tree innermost first ("4 * 2 = 8. 3 + 8 = 11.");
the answer is checked as an exact number (`common.number_reward`).
"""

from __future__ import annotations

import operator
import random
from dataclasses import dataclass
from fractions import Fraction

from .base import Domain, Task
from .common import assistant, fmt_number, number_reward, user

OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
LEVELS = {1: (3, 20, "+-*"), 2: (4, 50, "+-*"), 3: (5, 99, "+-*/")}  # numbers, largest number, operators


@dataclass
class Node:
    value: Fraction
    op: str | None = None  # None for a number
    left: Node | None = None
    right: Node | None = None


def random_expression(rng: random.Random, n_numbers: int, largest: int, ops: str) -> Node:
    """A random expression tree over `n_numbers` whole numbers in 1..largest; no division by zero."""
    if n_numbers == 1:
        return Node(Fraction(rng.randint(1, largest)))
    k = rng.randint(1, n_numbers - 1)
    left, right = random_expression(rng, k, largest, ops), random_expression(rng, n_numbers - k, largest, ops)
    op = rng.choice(ops)
    if op == "/" and right.value == 0:
        op = rng.choice("+-*")
    return Node(OPS[op](left.value, right.value), op, left, right)


def render(node: Node) -> str:
    """Infix text with the parentheses precedence needs; a right operand of equal precedence is always bracketed,
    so the text reads in the order the trace computes it."""
    if node.op is None:
        return fmt_number(node.value)
    parts = []
    for child, is_right in ((node.left, False), (node.right, True)):
        text = render(child)
        if child.op is not None and (
            PRECEDENCE[child.op] < PRECEDENCE[node.op] or (is_right and PRECEDENCE[child.op] == PRECEDENCE[node.op])
        ):
            text = f"({text})"
        parts.append(text)
    return f"{parts[0]} {node.op} {parts[1]}"


def steps(node: Node) -> list[str]:
    """One "a op b = c." step per operation, innermost first."""
    if node.op is None:
        return []
    left, right = fmt_number(node.left.value), fmt_number(node.right.value)
    left = f"({left})" if "/" in left else left
    right = f"({right})" if "/" in right or right.startswith("-") else right
    own = f"{left} {node.op} {right} = {fmt_number(node.value)}."
    return steps(node.left) + steps(node.right) + [own]


class Arithmetic(Domain):
    name = "arithmetic"
    description = "evaluate an arithmetic expression step by step (exact number)"

    def _generate(self, rng: random.Random, difficulty: int, seed: int) -> Task:
        tree = random_expression(rng, *LEVELS[difficulty])
        question = f"What is {render(tree)}?"
        if difficulty == 3:
            question += " Give the exact value."
        answer = fmt_number(tree.value)
        return Task(
            domain=self.name, seed=seed, difficulty=difficulty, messages=[user(question)], answer=answer,
            solution=[assistant(answer, " ".join(steps(tree)))],
        )  # fmt: skip

    def verify(self, task: Task, completion: str) -> float:
        return number_reward(task.answer, completion)
