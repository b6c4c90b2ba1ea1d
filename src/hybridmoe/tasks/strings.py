"""String manipulation on made-up words: reverse, change case, replace or count a letter, measure; then sentences.

Difficulty 1: one operation on a word of 4-6 letters; 2: one operation on a sentence of 3-5 words (reverse the
word order, capitalize, join with dashes, longest word, count words); 3: two operations in a row on a word of 6-10
letters. The trace spells the word letter by letter before working on it. A text answer must match exactly (case
included) after surrounding spaces, quotes and backticks are removed; a count is compared as a number.
"""

from __future__ import annotations

import random

from .base import Domain, Task
from .common import assistant, made_up_word, number_reward, strip_answer, user


def _spell(word: str) -> str:
    return " ".join(word)


WORD_OPS = ("reverse", "upper", "replace", "count", "length", "double")


def word_op(rng: random.Random, word: str, kinds: tuple[str, ...] = WORD_OPS) -> tuple[str, str, str]:
    """(instruction, trace, result) of one operation on `word`; the instruction names the word as `{w}`."""
    kind = rng.choice(kinds)
    letters = f"Letters: {_spell(word)}."
    if kind == "reverse":
        out = word[::-1]
        return "Reverse the letters of {w}.", f"{letters} Backwards: {_spell(out)}.", out
    if kind == "upper":
        out = word.upper()
        return "Write {w} in capital letters.", f"{letters} In capitals: {_spell(out)}.", out
    if kind == "double":
        out = "".join(c + c for c in word)
        return "Write every letter of {w} twice.", f"{letters} Doubled: {_spell(out)}.", out
    old = rng.choice(word)
    if kind == "replace":
        new = rng.choice([c for c in "abdegikmnoprstuvz" if c != old])
        out = word.replace(old, new)
        return f"Replace every '{old}' in {{w}} with '{new}'.", f"{letters} Replaced: {_spell(out)}.", out
    if kind == "count":
        positions = [str(i + 1) for i, c in enumerate(word) if c == old]
        trace = f"{letters} '{old}' is at positions {', '.join(positions)}, so {len(positions)} times."
        return f"How many times does '{old}' appear in {{w}}?", trace, str(len(positions))
    trace = f"{letters} Counting them: {', '.join(str(i + 1) for i in range(len(word)))}."
    return "How many letters does {w} have?", trace, str(len(word))


def sentence_op(rng: random.Random, words: list[str]) -> tuple[str, str, str]:
    kind = rng.choice(("reverse", "capitalize", "join", "longest", "count"))
    listed = f"Words: {', '.join(words)}."
    if kind == "reverse":
        out = " ".join(words[::-1])
        return "Write the words of {w} in reverse order.", f"{listed} From the last: {', '.join(words[::-1])}.", out
    if kind == "capitalize":
        out = " ".join(w.capitalize() for w in words)
        return "Capitalize the first letter of every word in {w}.", f"{listed} Capitalized: {out}.", out
    if kind == "join":
        out = "-".join(words)
        return "Join the words of {w} with dashes instead of spaces.", f"{listed} Joined: {out}.", out
    if kind == "longest":
        out = max(words, key=len)  # the first of the longest
        lengths = ", ".join(f"{w} {len(w)}" for w in words)
        return "Which word of {w} is the longest? If several are, give the first.", f"Lengths: {lengths}.", out
    trace = f"{listed} Counting them: {', '.join(str(i + 1) for i in range(len(words)))}."
    return "How many words are in {w}?", trace, str(len(words))


class Strings(Domain):
    name = "strings"
    description = "transform or measure a made-up word or sentence (exact text or count)"

    def _generate(self, rng: random.Random, difficulty: int, seed: int) -> Task:
        if difficulty == 1:
            word = made_up_word(rng, rng.randint(2, 3))[: rng.randint(4, 6)]
            instruction, trace, answer = word_op(rng, word)
            question = instruction.format(w=f"'{word}'")
        elif difficulty == 2:
            words = [made_up_word(rng, rng.randint(1, 3)) for _ in range(rng.randint(3, 5))]
            sentence = " ".join(words)
            instruction, trace, answer = sentence_op(rng, words)
            question = instruction.format(w=f"'{sentence}'")
        else:
            word = made_up_word(rng, 5)[: rng.randint(6, 10)]
            first, trace1, middle = word_op(rng, word, ("reverse", "replace", "double"))  # a lower-case word
            second, trace2, answer = word_op(rng, middle)
            question = f"{first.format(w=repr(word))} Then: {second.format(w='the result')}"
            trace = f"{trace1} {trace2}"
        return Task(
            domain=self.name, seed=seed, difficulty=difficulty, messages=[user(question)], answer=answer,
            solution=[assistant(answer, trace)],
        )  # fmt: skip

    def verify(self, task: Task, completion: str) -> float:
        if task.answer.isdigit():
            return number_reward(task.answer, completion)
        return 1.0 if strip_answer(completion) == task.answer else 0.0
