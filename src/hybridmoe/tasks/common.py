"""What the domains share: message builders, made-up words and names, and the answer checks.

Answer checks read the model's final answer text (reasoning removed) and never evaluate it: a number is found with a
strict regular expression and compared exactly as a `sympy.Rational` built from the validated digits (so `0.5`,
`1/2` and `2/4` are the same answer, and `0.33` is not `1/3`); a list of integers is read with a regular expression;
a short text answer is compared after normalizing case, spaces, quotes and a final full stop.
"""

from __future__ import annotations

import random
import re
from fractions import Fraction

# Message builders (OpenAI format; the reasoning trace is `reasoning_content`, as the chat template renders it).


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(content: str, reasoning: str | None = None) -> dict:
    message = {"role": "assistant", "content": content}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    return message


# Names and made-up words: made-up words keep the task spaces large and need no world knowledge.

NAMES = (
    "Ada", "Ben", "Cara", "Dan", "Eva", "Finn", "Gia", "Hugo", "Ines", "Jon", "Kira", "Leo", "Mia", "Nils", "Olga",
    "Pia", "Raul", "Sara", "Tom", "Uma", "Vera", "Will", "Yara", "Zoe", "Amir", "Bea", "Carl", "Dina", "Emil", "Fay",
    "Gus", "Hana", "Ivan", "Jade", "Kofi", "Lena", "Max", "Nora", "Omar", "Rosa",
)  # fmt: skip
SURNAMES = (
    "Quinn", "Baker", "Stone", "Hart", "Moss", "Reed", "Vale", "Frost", "Lane", "Marsh", "Penn", "Wolfe", "Cross",
    "Dunn", "Hale", "Kemp", "Lowe", "Nash", "Pike", "Rowe",
)  # fmt: skip
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def made_up_word(rng: random.Random, syllables: int = 2) -> str:
    """A pronounceable lowercase non-word of consonant-vowel syllables, e.g. 'bakemo'."""
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables))


def made_up_name(rng: random.Random, syllables: int = 2) -> str:
    return made_up_word(rng, syllables).capitalize()


# Numbers.


def fmt_number(x: int | Fraction) -> str:
    """An exact value as text: an integer, a terminating decimal, or a fraction p/q in lowest terms."""
    x = Fraction(x)
    if x.denominator == 1:
        return str(x.numerator)
    d = x.denominator
    while d % 2 == 0:
        d //= 2
    while d % 5 == 0:
        d //= 5
    if d != 1:
        return f"{x.numerator}/{x.denominator}"
    places = 0
    while (x * 10**places).denominator != 1:
        places += 1
    sign = "-" if x < 0 else ""
    digits = str(abs(x.numerator) * 10**places // x.denominator).rjust(places + 1, "0")
    return f"{sign}{digits[:-places]}.{digits[-places:]}"


_INT = r"(?:\d{1,3}(?:,\d{3})+|\d+)"  # 1234 or 1,234
_NUM = rf"[-+]?{_INT}(?:\.\d+)?(?:\s*/\s*{_INT})?"  # integer, decimal, or fraction a/b
NUMBER_RE = re.compile(rf"(?<![\w.,/]){_NUM}(?![\w/]|[.,]\d)")
_FULL_NUMBER_RE = re.compile(rf"\s*\$?({_NUM})\s*")
_BOXED_RE = re.compile(r"\\boxed\{([^{}]*)\}")
_MARKED_RE = re.compile(rf"answer\s*(?:is|:|=)\s*(?:\*\*)?\s*\$?({_NUM})(?![\w/]|[.,]\d)", re.IGNORECASE)


def parse_number(text: str):
    """The exact value (a `sympy.Rational`) of a number written as an integer, decimal or fraction, else None.

    Only text the regular expression validated reaches sympy, and `Rational` reads it as digits (no `sympify`)."""
    import sympy

    match = re.fullmatch(_FULL_NUMBER_RE, text.replace("\u2212", "-"))
    if match is None:
        return None
    try:
        return sympy.Rational(re.sub(r"[,\s]", "", match.group(1)))
    except (ValueError, TypeError, ZeroDivisionError):
        return None


def extract_number(text: str):
    """The final answer's number in `text`, or None when there is no single clear one.

    In order: the last `\\boxed{...}`; else the number after the last "answer is" / "answer:"; else the only number
    in the text. Text holding several numbers and no marker has no clear answer (listing candidates earns nothing)."""
    text = text.replace("\u2212", "-")
    boxed = _BOXED_RE.findall(text)
    if boxed:
        return parse_number(boxed[-1])
    marked = _MARKED_RE.findall(text)
    if marked:
        return parse_number(marked[-1])
    numbers = NUMBER_RE.findall(text)
    return parse_number(numbers[0]) if len(numbers) == 1 else None


def number_reward(expected: str, completion: str) -> float:
    """1.0 when the completion's number (see `extract_number`) equals `expected` exactly, else 0.0."""
    got = extract_number(completion)
    want = parse_number(expected)
    if want is None:
        raise ValueError(f"expected answer {expected!r} is not a number")
    return 1.0 if got is not None and got == want else 0.0


# Lists of integers.

_LIST_RE = re.compile(r"\[([^\[\]]*)\]")
_INT_ITEMS_RE = re.compile(r"\s*(?:-?\d+\s*(?:,\s*-?\d+\s*)*)?")


def extract_int_list(text: str) -> list[int] | None:
    """The last bracketed list in `text` when it holds only integers (`[3, -1, 7]`, `[]`), else None."""
    lists = _LIST_RE.findall(text)
    if not lists or not _INT_ITEMS_RE.fullmatch(lists[-1]):
        return None
    return [int(item) for item in lists[-1].split(",") if item.strip()]


# Short text answers.


def strip_answer(text: str) -> str:
    """The answer without surrounding spaces, one pair of quotes or backticks, and a final full stop."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"`":
        text = text[1:-1].strip()
    return text


def normalize_text(text: str) -> str:
    text = strip_answer(text).lower()
    text = re.sub(r"[^\w\s'-]", " ", text)
    return " ".join(text.split())


def text_reward(expected: str, completion: str, distractors: tuple[str, ...] | list[str] = ()) -> float:
    """1.0 when the completion is the expected text, or a sentence holding it as whole words and none of the
    `distractors` (the other candidate answers in the prompt, so naming every candidate earns nothing)."""
    got, want = normalize_text(completion), normalize_text(expected)
    if got == want:
        return 1.0

    def holds(phrase: str) -> bool:
        return re.search(rf"(?<![\w-]){re.escape(normalize_text(phrase))}(?![\w-])", got) is not None

    if holds(expected) and not any(holds(d) for d in distractors if normalize_text(d) != want):
        return 1.0
    return 0.0


def value_reward(answer: dict, completion: str) -> float:
    """The reward of an answer stored as `{"value", "numeric", "distractors"}` (documents, follow-ups): a number
    checked exactly, else the text with its distractors (`text_reward`)."""
    if answer["numeric"]:
        return number_reward(answer["value"], completion)
    return text_reward(answer["value"], completion, answer["distractors"])
