"""Text that RULER prompts are made of, all produced locally (nothing is downloaded).

- `NOISE`: RULER's repeated-noise haystack sentence (niah_single_1, vt).
- `Prose`: the "essay" haystack. RULER uses Paul Graham essays; we use English prose found on this machine: the
  docstrings of the Python standard library (every Python has them; about 1 MB of prose paragraphs, some 250K
  tokens), or the documents of files the user names (text / JSON lines / Parquet, read with `data/sources.py`).
  Prose is read lazily, one file at a time, and gives sentences (for haystacks) and distinct lowercase words of all
  the text read (for common-words extraction). It never repeats itself: when a prompt needs more prose than the
  source holds, it raises `HaystackTooShort`.
- word lists for needle keys (adjective-noun pairs, written for this file), coded words (fwe) and made-up names
  (the synthetic QA documents), drawn from a `random.Random`, so that every sample is reproducible from its seed.
"""

from __future__ import annotations

import ast
import os
import random
import re
import string
import uuid
from collections.abc import Iterable, Iterator

from ..data.sources import count_bad, empty_counts, expand_inputs, iter_documents

# RULER's noise haystack: these five sentences repeated.
NOISE = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

_ADJECTIVES = (
    "amber ancient bitter brave bright calm clever cold crimson curious damp dark eager early electric empty fancy "
    "fierce fragile frozen gentle giant golden grumpy hidden hollow honest humble icy jolly lazy little lively lonely "
    "loud lucky mellow misty modern muddy narrow noisy odd old pale polite proud quick quiet rapid rough royal rusty "
    "sandy scarlet shiny silent silver sleepy slow smooth snowy solid sour spicy steady stormy strange sunny swift "
    "tall tame tender thirsty tiny velvet vivid wandering warm wild windy wise wooden young zealous"
)
_NOUNS = (
    "anchor apple arrow badger basket beacon bicycle blanket bridge buffalo cabin camel candle canyon castle cedar "
    "cherry cloud comet compass cottage crane crystal dolphin dragon drum eagle engine falcon feather fiddle forest "
    "fountain garden glacier goblet harbor hammer helmet island jacket kettle ladder lantern lemon lighthouse lizard "
    "meadow mirror monkey mountain needle oasis orchard otter owl paddle parrot pebble pepper piano pillow planet "
    "pumpkin quilt rabbit river rocket saddle sailor scarf shovel spider squirrel statue temple thunder tiger tower "
    "trumpet tulip turtle umbrella valley violin walrus whistle window wizard yacht zebra"
)
ADJECTIVES, NOUNS = tuple(_ADJECTIVES.split()), tuple(_NOUNS.split())

_CONSONANTS = "bcdfghjklmnprstvwz"
_VOWELS = "aeiou"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_WORD = re.compile(r"\b[a-z]{4,12}\b")
# Paragraphs of docstrings that are code, tables or markup rather than prose.
_NOT_PROSE = re.compile(r">>>|\.\.\. |[{}\[\]=|<>\\]|\b(?:def|self|return)\b")


class HaystackTooShort(ValueError):
    """The prose source ran out before a prompt was filled."""


def key_words(rng: random.Random) -> str:
    """An adjective-noun key such as "grumpy-otter"."""
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def number_value(rng: random.Random) -> str:
    """A 7-digit number (RULER's numeric needle value)."""
    return str(rng.randrange(1_000_000, 10_000_000))


def uuid_value(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def coded_word(rng: random.Random, length: int = 5) -> str:
    """A random lowercase string, RULER's "coded word" of frequent-words extraction."""
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(length))


def made_up_name(rng: random.Random, syllables: int = 3) -> str:
    """A capitalized pronounceable name that is no real word, e.g. "Velomari"."""
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables)).capitalize()


def stdlib_prose_files() -> list[str]:
    """The Python standard library's sources (modules, then tests), sorted: the default prose source."""
    from ..speedrun import stdlib_sources

    modules, tests = stdlib_sources()
    return modules + tests


def docstring_paragraphs(source: str) -> Iterator[str]:
    """The prose paragraphs of the docstrings of a Python source (module, classes, functions), whitespace-collapsed."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                yield from prose_paragraphs(doc)


def prose_paragraphs(text: str) -> Iterator[str]:
    """Blank-line separated paragraphs that read as prose (no code, tables or lists), whitespace-collapsed and with
    reStructuredText emphasis marks removed."""
    for para in re.split(r"\n\s*\n", text):
        lines = para.splitlines()
        if _NOT_PROSE.search(para) or any(line.startswith(("    ", "\t", "-", "#", "*")) for line in lines):
            continue
        flat = " ".join(para.replace("`", "").replace("*", "").split())
        if len(flat.split()) >= 6 and flat[-1:] in ".!?":
            yield flat


class Prose:
    """Sentences and distinct words of English prose, read lazily from files (default: stdlib docstrings).

    `.py` files contribute the prose of their docstrings, other files the prose paragraphs of their documents.
    """

    def __init__(self, files: Iterable[str] | None = None, field: str = "text"):
        self.files = expand_inputs(list(files)) if files is not None else stdlib_prose_files()
        self.field = field
        self.sentences: list[str] = []
        self.words: list[str] = []
        self._seen_words: set[str] = set()
        self._bad = empty_counts()
        self._pending = self._paragraphs()

    def describe(self) -> str:
        return f"{len(self.files)} files from {os.path.commonpath(self.files)}" if self.files else "no files"

    def _paragraphs(self) -> Iterator[tuple[str, str]]:
        """(paragraph, text it came from) pairs; a file or document without prose still yields its text once."""
        for path in self.files:
            if path.endswith(".py"):
                with open(path, encoding="utf-8", errors="replace") as fh:
                    source = fh.read()
                yield from self._with_text(docstring_paragraphs(source), source)
            else:
                for doc in count_bad(iter_documents(path, self.field), self._bad):
                    yield from self._with_text(prose_paragraphs(doc), doc)

    @staticmethod
    def _with_text(paragraphs: Iterator[str], text: str) -> Iterator[tuple[str, str]]:
        first = True
        for para in paragraphs:
            yield para, text if first else ""
            first = False
        if first:
            yield "", text

    def _read_more(self) -> bool:
        """Read one more paragraph; False when the source is exhausted."""
        item = next(self._pending, None)
        if item is None:
            return False
        para, text = item
        self.sentences.extend(s for s in _SENTENCE_END.split(para) if len(s.split()) >= 4)
        # Words come from all of the text (comments and code of .py files too), for lists of distinct words.
        for word in _WORD.findall(text):
            if word not in self._seen_words:
                self._seen_words.add(word)
                self.words.append(word)
        return True

    def sentence(self, i: int) -> str:
        """Sentence i of the source (0-based); HaystackTooShort past the end."""
        while i >= len(self.sentences):
            if not self._read_more():
                raise HaystackTooShort(self._too_short(f"{len(self.sentences)} sentences"))
        return self.sentences[i]

    def distinct_words(self, n: int) -> list[str]:
        """The first n distinct words of the source; HaystackTooShort if it has fewer."""
        while len(self.words) < n:
            if not self._read_more():
                raise HaystackTooShort(self._too_short(f"{len(self.words)} distinct words, {n} are needed"))
        return self.words[:n]

    def _too_short(self, has: str) -> str:
        return (
            f"the haystack source ({self.describe()}) holds only {has} of prose, too little for this prompt length; "
            "pass more or longer English documents with --haystack, or use shorter --lengths "
            "(RULER haystacks are never repeated to fill a prompt)"
        )
