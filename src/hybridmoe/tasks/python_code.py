"""Small Python functions checked against hidden tests, which run only in the sandbox (`hybridmoe.envs.sandbox`).

Difficulty 1: one expression (`x * 3 + 7`, the same for each element of a list, or a string between two others);
2: a condition or a filtered sum or count; 3: a loop (running sums, removing repeats, digit sums). Each task holds
five hidden tests `_check(f(args), expected)` whose expected values come from a reference written here in Python
(the model's code never runs in this process). Reward 1 only if every test passes in the sandbox, else 0. The
answer may be the code alone or the first fenced code block of the reply.
"""

from __future__ import annotations

import operator
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from ..envs.sandbox import run_python
from .base import Domain, Task
from .common import assistant, made_up_word, user

_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
_FENCE_RE = re.compile(r"```[ \t]*(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


@dataclass
class Spec:
    signature: str  # "f(x)"
    returns: str  # what the function returns, in words: "x * 3 + 7"
    reasoning: str
    body: str  # the reference solution's body
    reference: Callable  # the same function, for the expected values
    inputs: Callable[[random.Random], tuple]  # one random argument tuple


def _expression(rng: random.Random) -> tuple[str, Callable[[int], int]]:
    """'x op a op b' with Python's precedence, and its value as a function of x."""
    op1, op2, a, b = rng.choice("+-*"), rng.choice("+-*"), rng.randint(2, 99), rng.randint(2, 99)
    if op2 == "*" and op1 != "*":
        return f"x {op1} {a} * {b}", lambda x: _OPS[op1](x, a * b)
    return f"x {op1} {a} {op2} {b}", lambda x: _OPS[op2](_OPS[op1](x, a), b)


def _ints(rng: random.Random) -> tuple:
    return (rng.randint(-50, 50),)


def _int_list(rng: random.Random) -> tuple:
    return ([rng.randint(-20, 60) for _ in range(rng.randint(0, 6))],)


def _word(rng: random.Random) -> tuple:
    return (made_up_word(rng, rng.randint(1, 4)),)


def level1(rng: random.Random) -> Spec:
    kind = rng.randrange(3)
    if kind == 0:
        text, fn = _expression(rng)
        return Spec("f(x)", text, f"Return {text}.", f"return {text}", fn, _ints)
    if kind == 1:
        text, fn = _expression(rng)
        return Spec(
            "transform(xs)", f"a list with {text} for each x in xs", f"A list comprehension over xs with {text}.",
            f"return [{text} for x in xs]", lambda xs: [fn(x) for x in xs], _int_list,
        )  # fmt: skip
    before, after = made_up_word(rng, rng.randint(1, 3)), made_up_word(rng, rng.randint(1, 3))
    return Spec(
        "wrap(s)", f"s with '{before}' added before it and '{after}' after it",
        f"Join '{before}', s and '{after}'.", f'return "{before}" + s + "{after}"',
        lambda s: before + s + after, _word,
    )  # fmt: skip


def level2(rng: random.Random) -> Spec:
    kind = rng.randrange(3)
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    if kind == 0:
        return Spec(
            "f(x)", f"x * {a} if x is even, otherwise x + {b}", f"Check x % 2 == 0: multiply by {a}, else add {b}.",
            f"return x * {a} if x % 2 == 0 else x + {b}", lambda x: x * a if x % 2 == 0 else x + b, _ints,
        )  # fmt: skip
    if kind == 1:
        return Spec(
            "total(xs)", f"the sum of x * {b} over the numbers x in xs that are greater than {a}",
            f"Sum x * {b} for x in xs if x > {a}.", f"return sum(x * {b} for x in xs if x > {a})",
            lambda xs: sum(x * b for x in xs if x > a), _int_list,
        )  # fmt: skip
    letter = rng.choice("aeiou")
    return Spec(
        "count(s)", f"the number of times '{letter}' appears in s, times {a}, plus {b}",
        f"s.count('{letter}') * {a} + {b}.", f'return s.count("{letter}") * {a} + {b}',
        lambda s: s.count(letter) * a + b, _word,
    )  # fmt: skip


def level3(rng: random.Random) -> Spec:
    kind = rng.randrange(3)
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    if kind == 0:

        def running(xs: list[int]) -> list[int]:
            out, total = [], 0
            for x in xs:
                total += x
                out.append(total * a + b)
            return out

        body = "out, total = [], 0\n    for x in xs:\n        total += x\n"
        body += f"        out.append(total * {a} + {b})\n    return out"
        return Spec(
            "running(xs)", f"the running sums of xs, each multiplied by {a} plus {b}",
            f"Keep a running total; append total * {a} + {b} after each element.", body, running, _int_list,
        )  # fmt: skip
    if kind == 1:
        return Spec(
            "unique(xs)", f"xs without repeated numbers (keeping the first of each), each times {a} plus {b}",
            f"dict.fromkeys keeps the first of each in order; then x * {a} + {b}.",
            f"return [x * {a} + {b} for x in dict.fromkeys(xs)]", lambda xs: [x * a + b for x in dict.fromkeys(xs)],
            lambda r: ([r.randint(0, 5) for _ in range(r.randint(0, 8))],),
        )  # fmt: skip
    return Spec(
        "digits(n)", f"the sum of the decimal digits of the non-negative integer n, times {a}, plus {b}",
        f"Sum int(d) over str(n), then * {a} + {b}.", f"return sum(int(d) for d in str(n)) * {a} + {b}",
        lambda n: sum(int(d) for d in str(n)) * a + b, lambda r: (r.randint(0, 10 ** r.randint(1, 6)),),
    )  # fmt: skip


def extract_code(completion: str) -> str:
    """The first fenced code block of the reply, or the whole reply when it has none."""
    match = _FENCE_RE.search(completion)
    return match.group(1) if match else completion


class PythonCode(Domain):
    name = "python"
    description = "write a small Python function; hidden tests run in the sandbox"
    timeout_s = 5.0  # per verification, wall clock (the tests themselves take milliseconds)

    def _generate(self, rng: random.Random, difficulty: int, seed: int) -> Task:
        spec = (level1, level2, level3)[difficulty - 1](rng)
        name = spec.signature.split("(")[0]
        tests = []
        for _ in range(5):
            args = spec.inputs(rng)
            call = f"{name}({', '.join(map(repr, args))})"
            tests.append(f"_check({call}, {spec.reference(*args)!r})")
        code = f"def {spec.signature}:\n    {spec.body}\n"
        question = f"Write a Python function {spec.signature} that returns {spec.returns}."
        return Task(
            domain=self.name, seed=seed, difficulty=difficulty, messages=[user(question)],
            answer={"entry_point": name, "tests": "\n".join(tests) + "\n"},
            solution=[assistant(f"```python\n{code}```", spec.reasoning)],
        )  # fmt: skip

    def verify(self, task: Task, completion: str) -> float:
        code = extract_code(completion)
        if not code.strip():
            return 0.0
        return 1.0 if run_python(code, task.answer["tests"], timeout_s=self.timeout_s).passed else 0.0
