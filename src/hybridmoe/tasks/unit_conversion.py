"""Unit conversion: length, mass, volume and time, with exact answers.

Difficulty 1: neighbouring metric units (km and m, kg and g, l and ml, ...) either way, so the step only moves the
decimal point; 2: any two units of a quantity, time included (km to cm, seconds to hours); 3: a mixed amount
("2 km 350 m" in m), a speed (km/h and m/s) or a temperature (Celsius and Fahrenheit). Amounts are chosen so the
answer is a whole number or a terminating decimal; the trace states the factor, then the arithmetic. The answer is
checked as an exact number (a unit after it is allowed).
"""

from __future__ import annotations

import random
from fractions import Fraction

from .base import Domain, Task
from .common import assistant, fmt_number, number_reward, user

# Each quantity's units, smallest first, with their size in the smallest unit.
QUANTITIES = {
    "length": {"mm": 1, "cm": 10, "m": 1000, "km": 1_000_000},
    "mass": {"mg": 1, "g": 1000, "kg": 1_000_000},
    "volume": {"ml": 1, "l": 1000},
    "time": {"seconds": 1, "minutes": 60, "hours": 3600, "days": 86400},
}
UNIT_SIZE = {unit: size for units in QUANTITIES.values() for unit, size in units.items()}
NEIGHBOURS = [(a, b) for units in QUANTITIES.values() for a, b in zip(list(units)[1:], list(units)[:-1])]  # big, small
METRIC_NEIGHBOURS = [(big, small) for big, small in NEIGHBOURS if big not in QUANTITIES["time"]]
SINGULAR = {"seconds": "second", "minutes": "minute", "hours": "hour", "days": "day"}


def _amount(rng: random.Random) -> Fraction:
    """An amount with up to five digits and up to two decimals, such as 42, 3.5 or 734.21."""
    return Fraction(rng.randint(1, 99999), 10 ** rng.randint(0, 2))


def _convert(rng: random.Random, src: str, dst: str) -> tuple[str, str, Fraction]:
    """(question, trace, answer) for converting an amount of `src` into `dst`."""
    big, small = (src, dst) if UNIT_SIZE[src] > UNIT_SIZE[dst] else (dst, src)
    factor = UNIT_SIZE[big] // UNIT_SIZE[small]
    fact = f"1 {SINGULAR.get(big, big)} = {factor} {small}."
    if src == big:  # both the amount given and the answer are short decimals (the factor is a whole number)
        value = _amount(rng)
        answer = value * factor
    else:
        answer = _amount(rng)
        value = answer * factor
    op = "*" if src == big else "/"
    trace = f"{fact} {fmt_number(value)} {op} {factor} = {fmt_number(answer)}."
    return f"Convert {fmt_number(value)} {src} to {dst}.", trace, answer


def _mixed(rng: random.Random) -> tuple[str, str, Fraction]:
    big, small = rng.choice(NEIGHBOURS)
    factor = UNIT_SIZE[big] // UNIT_SIZE[small]
    whole, part = rng.randint(1, 999), rng.randint(1, factor - 1)
    answer = whole * factor + part
    trace = f"{whole} {big} = {whole} * {factor} = {whole * factor} {small}. {whole * factor} + {part} = {answer}."
    return f"How many {small} is {whole} {big} {part} {small}?", trace, Fraction(answer)


def _speed(rng: random.Random) -> tuple[str, str, Fraction]:
    fact = "1 km/h = 1000 m / 3600 s = 5/18 m/s."
    if rng.random() < 0.5:  # a multiple of 1.8 km/h is a multiple of 0.5 m/s
        value = Fraction(18 * rng.randint(1, 9999), 10)
        answer, v = value * 5 / 18, fmt_number(value)
        return f"Convert {v} km/h to m/s.", f"{fact} {v} * 5 / 18 = {fmt_number(answer)}.", answer
    value = Fraction(rng.randint(1, 9999), 10)
    answer, v = value * 18 / 5, fmt_number(value)
    return f"Convert {v} m/s to km/h.", f"{fact} {v} * 18 / 5 = {fmt_number(answer)}.", answer


def _temperature(rng: random.Random) -> tuple[str, str, Fraction]:
    c = Fraction(rng.randint(-1000, 10000), 10)
    f = c * 9 / 5 + 32
    c_, f_, scaled = fmt_number(c), fmt_number(f), fmt_number(c * 9 / 5)
    if rng.random() < 0.5:
        trace = f"F = C * 9 / 5 + 32. {c_} * 9 / 5 = {scaled}. {scaled} + 32 = {f_}."
        return f"Convert {c_} degrees Celsius to degrees Fahrenheit.", trace, f
    trace = f"C = (F - 32) * 5 / 9. {f_} - 32 = {scaled}. {scaled} * 5 / 9 = {c_}."
    return f"Convert {f_} degrees Fahrenheit to degrees Celsius.", trace, c


class UnitConversion(Domain):
    name = "unit_conversion"
    description = "convert an amount between units (length, mass, volume, time, speed, temperature)"

    def _generate(self, rng: random.Random, difficulty: int, seed: int) -> Task:
        if difficulty == 1:
            big, small = rng.choice(METRIC_NEIGHBOURS)
            question, trace, answer = _convert(rng, *rng.choice([(big, small), (small, big)]))
        elif difficulty == 2:
            units = list(QUANTITIES[rng.choice(list(QUANTITIES))])
            question, trace, answer = _convert(rng, *rng.sample(units, 2))
        else:
            question, trace, answer = rng.choice((_mixed, _speed, _temperature))(rng)
        text = fmt_number(answer)
        return Task(
            domain=self.name, seed=seed, difficulty=difficulty, messages=[user(question)], answer=text,
            solution=[assistant(text, trace)],
        )  # fmt: skip

    def verify(self, task: Task, completion: str) -> float:
        return number_reward(task.answer, completion)
