"""The calculator tool: exact arithmetic from an `ast` whitelist, never eval."""

import importlib
import warnings
from fractions import Fraction

import pytest

import hybridmoe.tasks.calculator as calculator_module
from hybridmoe.tasks import get_domain
from hybridmoe.tasks.calculator import calculator, evaluate


def test_arithmetic_is_exact():
    assert evaluate("(12 + 7) * 3") == 57
    assert evaluate("-(3 + 4) * 2 / 4") == Fraction(-7, 2)
    assert evaluate("0.1 + 0.2") == Fraction(3, 10)
    assert calculator("1 / 4") == "0.25"
    assert calculator("1 / 3") == "0.333333333333"
    assert calculator("6 / 3") == "2"


@pytest.mark.parametrize(
    "expression, reason",
    [
        ("x + 1", "Name"), ("__import__('os').system('true')", "Call"), ("(1).real", "Attribute"),
        ("abs(-1)", "Call"), ("2 ** 1000000", "Pow"), ("10 ** 10 ** 10", "Pow"), ("7 % 2", "Mod"),
        ("7 // 2", "FloorDiv"), ("[1, 2]", "List"), ("'a' * 3", "not allowed"), ("True + 1", "not allowed"),
        ("1 if 1 else 2", "IfExp"), ("lambda: 1", "Lambda"), ("1 / 0", "division by zero"), ("9" * 40, "larger than"),
        ("1" + " * 999999999" * 8, "larger than"), ("1e400", "not a finite number"), ("1 +", "cannot parse"),
        ("((1)", "cannot parse"), ("1" * 300, "longer than"),
    ],
)  # fmt: skip
def test_refuses_everything_but_numbers_and_four_operators(expression, reason):
    with pytest.raises(ValueError, match=reason):
        evaluate(expression)
    assert calculator(expression).startswith("error:")


def test_parser_warnings_on_model_text_stay_off_the_console():
    # `2and 3` makes Python's parser warn (SyntaxWarning: invalid decimal literal) before it is refused; a model
    # writes such text now and then, and RL runs printed the warning among their progress bars
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # everything shown, as outside a test runner...
        module = importlib.reload(calculator_module)  # ...but the filter the module installs on import
        with pytest.raises(ValueError, match="BoolOp is not allowed"):
            module.evaluate("2and 3")
        warnings.warn_explicit("another text's warning", SyntaxWarning, "<unknown>", 1)  # others still show
    assert [str(w.message) for w in caught] == ["another text's warning"]


def test_run_tool_answers_bad_calls_with_an_error_message():
    d = get_domain("calculator")
    task = d.generate(0)
    assert d.run_tool(task, "calculator", {"expression": "2 * 21"}) == "42"
    assert d.run_tool(task, "python", {"expression": "1"}).startswith("error: unknown tool")
    for arguments in ({}, {"expr": "1"}, {"expression": 5}, None, "1 + 1"):
        assert d.run_tool(task, "calculator", arguments).startswith("error:")
