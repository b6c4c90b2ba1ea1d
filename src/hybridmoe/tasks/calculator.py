"""Calculator tool calls: the model calls a `calculator` tool, reads its real output, and answers with it.

The solution is a tool conversation in the OpenAI format: an assistant turn with a `tool_calls` entry, a `tool`
message holding what `run_tool` returns for that call, then the assistant's final answer. Difficulty 1: the
expression is given ("Use the calculator to compute 384 * 27."); 2: a one-sentence word problem the model turns into
an expression; 3: two calls, the second on the first one's result. The final answer is checked as an exact number
(answering right without the tool is also right: verify sees only the final text).

The tool evaluates arithmetic without `eval`: the expression is parsed with `ast` and only numbers, + - * /,
parentheses and unary minus are allowed (no names, attributes, calls or powers), with caps on the expression's
length and on the size of every intermediate value.
"""

from __future__ import annotations

import ast
import json
import operator
import random
import warnings
from fractions import Fraction

from .base import Domain, Task
from .common import NAMES, assistant, fmt_number, number_reward, user

MAX_EXPRESSION_CHARS = 200
MAX_VALUE = 10**30  # bound on every value's magnitude and denominator: no huge numbers from long products
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
# Python's parser warns (on stderr) about model-written oddities such as `2and 3` before they are
# refused below; parsed under this filename those warnings are silenced, whatever thread parses (a global filter that
# matches only this filename, unlike `warnings.catch_warnings`, which is not thread-safe).
_FILENAME = "<calculator expression>"
warnings.filterwarnings("ignore", category=SyntaxWarning, module=_FILENAME)

TOOL = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression with numbers, + - * / and parentheses.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "for example (12 + 7) * 3"}},
            "required": ["expression"],
        },
    },
}


def evaluate(expression: str) -> Fraction:
    """The exact value of an arithmetic expression; ValueError saying what is not allowed."""
    if not isinstance(expression, str):
        raise ValueError("the expression must be a string")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), filename=_FILENAME, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise ValueError(f"cannot parse {expression!r}: use numbers, + - * / and parentheses") from e
    return _evaluate(tree.body)


def _evaluate(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        try:
            value = Fraction(repr(node.value))  # the decimal as written: 0.1 is 1/10
        except ValueError as e:
            raise ValueError(f"{node.value!r} is not a finite number") from e
    elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        value = _UNARY[type(node.op)](_evaluate(node.operand))
    elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Div) and right == 0:
            raise ValueError("division by zero")
        value = _BINARY[type(node.op)](left, right)
    else:
        what = type(node.op).__name__ if isinstance(node, (ast.BinOp, ast.UnaryOp)) else type(node).__name__
        raise ValueError(f"{what} is not allowed: use numbers, + - * / and parentheses")
    if abs(value) > MAX_VALUE or value.denominator > MAX_VALUE:
        raise ValueError(f"a value is larger than {MAX_VALUE:.0e}")
    return value


def format_result(value: Fraction) -> str:
    """Whole numbers and terminating decimals exactly; other fractions as a 12-digit decimal."""
    text = fmt_number(value)
    return f"{float(value):.12g}" if "/" in text else text


def calculator(expression) -> str:
    """The tool's output: the value, or "error: ..." for the model to read."""
    try:
        return format_result(evaluate(expression))
    except ValueError as e:
        return f"error: {e}"


def _word_problem(rng: random.Random) -> tuple[str, str]:
    name = rng.choice(NAMES)
    a, b, c = rng.randint(12, 99), rng.randint(12, 99), rng.randint(1, 99)
    kind = rng.randrange(4)
    if kind == 0:
        return f"A box holds {a} eggs. How many eggs are in {b} boxes and {c} loose eggs?", f"{a} * {b} + {c}"
    if kind == 1:
        question = f"{name} earns {a} coins a day for {b} days, then spends {c}. How many coins are left?"
        return question, f"{a} * {b} - {c}"
    if kind == 2:
        return f"A train goes {a} km every hour. How far does it go in {b} hours?", f"{a} * {b}"
    total = a * b
    return f"{b} friends share {total} coins equally. How many coins does each friend get?", f"{total} / {b}"


class Calculator(Domain):
    name = "calculator"
    description = "call the calculator tool, read its output, answer with it"

    def _generate(self, rng: random.Random, difficulty: int, seed: int) -> Task:
        if difficulty == 1:
            a, b = rng.randint(10, 999), rng.randint(10, 999)
            expression = f"{a} {rng.choice('+-*')} {b}"
            question, plan = f"Use the calculator to compute {expression}.", [lambda _: expression]
        elif difficulty == 2:
            question, expression = _word_problem(rng)
            question, plan = f"{question} Use the calculator.", [lambda _: expression]
        else:  # two calls, the second on the first one's result
            a, b, c = rng.randint(10, 999), rng.randint(10, 999), rng.randint(2, 99)
            first = f"{a} {rng.choice('+-*')} {b}"
            steps = [(f"multiply it by {c}", "*"), (f"add {c} to it", "+"), (f"subtract {c} from it", "-")]
            then, op = rng.choice(steps)
            question = f"Use the calculator to compute {first}, then {then}."
            plan = [lambda _: first, lambda result: f"{result} {op} {c}"]
        solution, result = [], None
        for i, step in enumerate(plan):
            expression = step(result)
            call = {
                "id": f"call_{i + 1}", "type": "function",
                "function": {"name": "calculator", "arguments": json.dumps({"expression": expression})},
            }  # fmt: skip
            reasoning = f"I will use the calculator for {expression}."
            if i > 0:
                reasoning = f"The calculator gave {result}. Next: {expression}."
            solution.append(assistant("", reasoning) | {"tool_calls": [call]})
            result = calculator(expression)
            solution.append({"role": "tool", "tool_call_id": call["id"], "name": "calculator", "content": result})
        solution.append(assistant(result, f"The calculator gave {result}."))
        return Task(
            domain=self.name, seed=seed, difficulty=difficulty, messages=[user(question)], answer=result,
            solution=solution, tools=[TOOL],
        )  # fmt: skip

    def verify(self, task: Task, completion: str) -> float:
        return number_reward(task.answer, completion)

    def run_tool(self, task: Task, name: str, arguments: dict) -> str:
        if name != "calculator":
            return f"error: unknown tool {name!r}; the only tool is calculator"
        if not isinstance(arguments, dict) or not isinstance(arguments.get("expression"), str):
            return 'error: call calculator with {"expression": "<numbers, + - * / and parentheses>"}'
        return calculator(arguments["expression"])
