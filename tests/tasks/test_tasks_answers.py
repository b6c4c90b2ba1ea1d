"""Answer checks shared by the domains: numbers (sympy, exact), integer lists, short text."""

import sys

import pytest
import sympy

from hybridmoe.tasks.common import (
    extract_int_list,
    extract_number,
    fmt_number,
    number_reward,
    parse_number,
    text_reward,
)


@pytest.mark.parametrize(
    "text, value",
    [
        ("42", 42), (" -7 ", -7), ("The answer is 12.", 12), ("Answer: 3/4", sympy.Rational(3, 4)),
        ("\\boxed{2.5}", sympy.Rational(5, 2)), ("1,234", 1234), ("It is 3500 m.", 3500), ("x = 5", 5),
        ("first 3, so the answer is 9", 9), ("\u22124", -4), ("12%", 12),
    ],
)  # fmt: skip
def test_extract_number(text, value):
    assert extract_number(text) == value


@pytest.mark.parametrize("text", ["", "no number", "3 or 4", "1/0", "\\boxed{x}", "1e5 2e5", "12abc", "1.2.3"])
def test_no_clear_number(text):
    assert extract_number(text) is None


def test_numbers_compare_by_value_not_text():
    assert number_reward("1/2", "0.5") == 1.0
    assert number_reward("0.5", "2/4") == 1.0
    assert number_reward("1/3", "0.33") == 0.0
    assert number_reward("12", "12.0") == 1.0
    assert number_reward("12", "13") == 0.0
    with pytest.raises(ValueError):
        number_reward("twelve", "12")


def test_model_text_never_reaches_sympify(monkeypatch):
    def refuse(*args, **kwargs):  # sympy itself sympifies its own objects (in ==); text must never get there
        if any(isinstance(a, str) for a in args):
            raise AssertionError(f"text given to sympify: {args}")
        return real(*args, **kwargs)

    real = sympy.sympify

    for module in (sympy, sys.modules["sympy.core.sympify"], sys.modules["sympy.core.numbers"]):
        monkeypatch.setattr(module, "sympify", refuse)
    monkeypatch.setattr(sympy, "parse_expr", refuse)
    assert parse_number("__import__('os').system('true')") is None
    assert number_reward("3/4", "The answer is 3/4.") == 1.0


def test_fmt_number():
    from fractions import Fraction

    assert [fmt_number(Fraction(x)) for x in ("3", "-7/2", "1/3", "0.05", "-1/8")] == [
        "3",
        "-3.5",
        "1/3",
        "0.05",
        "-0.125",
    ]


def test_int_lists():
    assert extract_int_list("[3, -1, 7]") == [3, -1, 7]
    assert extract_int_list("The result is [1,2] then [4, 5].") == [4, 5]
    assert extract_int_list("[]") == []
    assert extract_int_list("[1, a]") is None and extract_int_list("1, 2") is None


def test_text_answers():
    assert text_reward("Ada Quinn", "ada quinn.") == 1.0
    assert text_reward("Ada Quinn", "The mayor is Ada Quinn.", ["Ben Baker"]) == 1.0
    assert text_reward("Ada Quinn", "Ada Quinn or Ben Baker", ["Ben Baker"]) == 0.0
    assert text_reward("Vima", "Vimaro") == 0.0
