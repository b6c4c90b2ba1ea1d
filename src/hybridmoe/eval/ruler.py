"""RULER (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context Language Models?",
NVIDIA/RULER): the 13 synthetic long-context tasks, their scoring, and a resumable runner.

Tasks (as the paper and NVIDIA/RULER's `scripts/synthetic.yaml` and `scripts/data/synthetic/` define them; the
prompt wording is ours):
- niah_single_1/2/3: one needle "One of the special magic {numbers} for {key} is: {value}." in a haystack of
  repeated noise sentences / prose / prose; the value a 7-digit number / number / UUID.
- niah_multikey_1: four needles with different keys in prose, one asked for. niah_multikey_2 and _3: one needle
  in a haystack made only of distractor needles (word keys -> numbers; UUID keys -> UUIDs).
- niah_multivalue: four values for one key; niah_multiquery: four keys, all asked for.
- vt: variable tracking, one chain `VAR A = 12345`, then four hops `VAR B = VAR A` ... in noise; answer: all five.
- cwe: common words extraction: a numbered word list, 10 words 30 times each and the others 3 times; answer the 10.
  Below 4K tokens, where 300 repetitions do not fit, our choice is 6 and 1. Words are the distinct lowercase words of
  the prose source.
- fwe: frequent words extraction: coded words with Zipf (alpha 2) frequencies; answer the 3 most frequent.
- qa_1 / qa_2: answer a question from a gold document hidden among distractor documents. RULER uses SQuAD
  (single hop) and HotpotQA (multi hop); nothing can be downloaded here, so both are SYNTHETIC STAND-INS: documents
  about made-up towns and people written from our own templates, qa_1 asking one fact of one town, qa_2 a bridge
  question over two documents ("In which town was the founder of X born?").

Prompt lengths: a prompt plus the task's generation budget (RULER's tokens_to_generate) is exactly the requested
length in tokens of the checkpoint's tokenizer. Prompts are assembled as token ids, piece by piece (instructions,
haystack units, needles, question), each piece encoded on its own at a whitespace boundary, so the token count of
a prompt is the sum of its pieces'. Haystacks of noise or prose take exactly the tokens left over (the last unit
cut at a token); list-shaped contexts (cwe, fwe, qa) grow by whole items to the largest count that fits
(binary search, as RULER does) and the few tokens left are filled with the cut-off start of one more item. A
length too short for a task's fixed parts, or a prose source too short for its haystack, is an error: nothing is
truncated or repeated silently. The default prose (the standard library's docstrings, ~1 MB) covers prompts up to
roughly 128K-256K tokens depending on the tokenizer; longer ones need more prose via --haystack.

Scoring (RULER's): string_match_all (niah, vt, cwe, fwe) = the fraction of references found in the prediction,
case-insensitive; string_match_part (qa) = 1 if any reference is found; task scores are means x 100.

Decoding is greedy through a `GenerateFn` (prompt ids, max new tokens -> new ids): `model.generate` by default;
the serving engine can be plugged in the same way. Results are cached one JSON line per (task, length, sample),
appended as each finishes, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import count
from typing import NamedTuple

from ..data.sources import expand_inputs
from .haystack import (
    NOISE,
    HaystackTooShort,
    Prose,
    coded_word,
    key_words,
    made_up_name,
    number_value,
    uuid_value,
)

CACHE_NAME = "results.jsonl"
RUN_NAME = "run.json"
FORMAT = "hybridmoe-ruler-v1"

# (prompt ids, max new tokens) -> generated ids (the prompt not included).
GenerateFn = Callable[[list[int], int], list[int]]


@dataclass(frozen=True)
class Sample:
    """One prompt: `input_ids` holds exactly `length - max_new_tokens` tokens; `answers` are the references."""

    task: str
    length: int
    index: int
    input_ids: list[int]
    answers: list[str]
    max_new_tokens: int


# ------------------------------------------------------------------------------------------------ scoring
def postprocess(prediction: str) -> str:
    """Control characters become newlines, then surrounding whitespace goes (as RULER's evaluator does)."""
    return re.sub(r"[\x00-\x1f]", "\n", prediction).strip()


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """Fraction of the references that occur in the prediction, case-insensitive."""
    pred = postprocess(prediction).lower()
    return sum(ref.lower() in pred for ref in references) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """1.0 if any reference occurs in the prediction, case-insensitive, else 0.0."""
    pred = postprocess(prediction).lower()
    return float(any(ref.lower() in pred for ref in references))


METRICS = {"all": string_match_all, "part": string_match_part}


# ------------------------------------------------------------------------------------------------ prompt assembly
class PromptBuilder:
    """Encodes prompt pieces with the checkpoint's tokenizer (each piece on its own, cached) and holds the prose."""

    def __init__(self, tokenizer, prose: Prose | Callable[[], Prose]):
        self.tokenizer = tokenizer
        self._prose = prose
        self._cache: dict[str, list[int]] = {}
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            self._encode_batch = lambda texts: [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
        else:
            self._encode_batch = lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]
        # Tokens the tokenizer puts before every text (a bos), counted in the length like any others.
        with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        self.prefix = with_special[: with_special.index(plain[0])] if plain and plain[0] in with_special else []

    @property
    def prose(self) -> Prose:
        if not isinstance(self._prose, Prose):
            self._prose = self._prose()  # read lazily: only tasks with prose haystacks need it
        return self._prose

    def encode(self, pieces: Sequence[str]) -> list[list[int]]:
        """Token ids of each piece (encoded separately; the concatenation is the prompt)."""
        if len(self._cache) > 1_000_000:
            self._cache.clear()
        missing = list({p for p in pieces if p not in self._cache})
        if missing:
            self._cache.update(zip(missing, self._encode_batch(missing)))
        return [self._cache[p] for p in pieces]

    def size(self, pieces: Sequence[str]) -> int:
        return len(self.prefix) + sum(len(ids) for ids in self.encode(pieces))

    def take(self, units: Iterator[str], n_tokens: int, batch: int = 64) -> list[list[int]]:
        """Whole units from `units` (each a piece) until exactly n_tokens, the last one cut at a token."""
        out, total = [], 0
        while total < n_tokens:
            chunk = [u for _, u in zip(range(batch), units)]
            if not chunk:
                raise ValueError("the haystack ran out of units")  # generated haystacks are endless
            for ids in self.encode(chunk):
                if total >= n_tokens:
                    break
                if ids:
                    out.append(ids[: n_tokens - total])
                    total += len(out[-1])
        return out


def _join(prefix: list[int], parts: Iterable[list[int]]) -> list[int]:
    out = list(prefix)
    for ids in parts:
        out.extend(ids)
    return out


class PromptTooShort(ValueError):
    pass


def _too_short(needed: int, budget: int) -> PromptTooShort:
    return PromptTooShort(f"the fixed parts of its prompt take {needed} tokens, {needed - budget} more than fit")


def _place(units: list[list[int]], items: list[list[int]], rng: random.Random) -> list[list[int]]:
    """Insert `items`, in order, at unit boundaries at depths spread evenly over the haystack (one per stratum of
    equal width, at a random point of it)."""
    k, n = len(items), len(units)
    spots = [min(n, int((j + rng.random()) / k * (n + 1))) for j in range(k)]
    out, last = [], 0
    for spot, item in zip(spots, items):
        out.extend(units[last:spot])
        out.append(item)
        last = spot
    out.extend(units[last:])
    return out


def _fill_context(b: PromptBuilder, budget, head: str, items: list[str], tail: str, units, rng) -> list[int]:
    """head + haystack units with `items` spread through them + tail, exactly `budget` tokens long."""
    head_ids, tail_ids = b.encode([head, tail])
    item_ids = b.encode(items)
    fixed = len(b.prefix) + len(head_ids) + len(tail_ids) + sum(map(len, item_ids))
    if fixed > budget:
        raise _too_short(fixed, budget)
    haystack = b.take(units, budget - fixed)
    return _join(b.prefix, [head_ids, *_place(haystack, item_ids, rng), tail_ids])


class _Rendering(NamedTuple):
    """A list-shaped context of some number of items: the prompt pieces, where padding goes, and the answers."""

    pieces: list[str]
    pad_at: int  # padding is inserted before pieces[pad_at]
    pad_text: str  # its first tokens fill what is left of the budget: fewer than one more item's tokens
    answers: list[str]


def _fit_count(b: PromptBuilder, budget: int, render: Callable[[int], _Rendering]) -> tuple[list[int], list[str], int]:
    """The rendering of the largest item count n that fits in `budget` tokens, padded to exactly `budget`: its ids,
    answers and n."""

    def size(n: int) -> int | None:
        try:
            return b.size(render(n).pieces)
        except HaystackTooShort:
            return None

    smallest = size(0)
    if smallest is None:
        render(0)  # raises the source's own error
    if smallest > budget:
        raise _too_short(smallest, budget)
    lo, hi = 0, 1
    while (s := size(hi)) is not None and s <= budget:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        s = size(mid)
        lo, hi = (mid, hi) if s is not None and s <= budget else (lo, mid)
    if size(lo + 1) is None:
        render(lo + 1)  # the source ran out before the budget did: raise its error
    r = render(lo)
    ids = b.encode(r.pieces)
    gap = budget - len(b.prefix) - sum(map(len, ids))
    pad = b.encode([r.pad_text])[0]
    if len(pad) < gap:
        raise ValueError(f"padding text of {len(pad)} tokens cannot fill a gap of {gap}")  # a bug, not a user error
    return _join(b.prefix, [*ids[: r.pad_at], pad[:gap], *ids[r.pad_at :]]), r.answers, lo


def _distinct(rng: random.Random, make: Callable[[random.Random], str], n: int, avoid=()) -> list[str]:
    seen, out = set(avoid), []
    while len(out) < n:
        value = make(rng)
        if value not in seen:
            seen.add(value)
            out.append(value)
    return out


def _listing(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


# ------------------------------------------------------------------------------------------------ needle tasks
def _noise_units() -> Iterator[str]:
    sentences = [" " + s for s in re.split(r"(?<=\.) ", NOISE.strip())]
    return (sentences[i % len(sentences)] for i in count())


def _prose_units(prose: Prose) -> Iterator[str]:
    return (" " + prose.sentence(i) for i in count())


def _needle(kind: str, key: str, value: str) -> str:
    return f" One of the special magic {kind} for {key} is: {value}."


def _niah(haystack: str, keys: str = "words", values: str = "numbers", n_keys=1, n_values=1, n_queries=1):
    new_key = key_words if keys == "words" else uuid_value
    new_value = number_value if values == "numbers" else uuid_value
    kind = "numbers" if values == "numbers" else "uuids"

    def build(b: PromptBuilder, rng: random.Random, budget: int) -> tuple[list[int], list[str]]:
        key_list = _distinct(rng, new_key, n_keys)
        value_lists = [_distinct(rng, new_value, n_values) for _ in key_list]
        needles = [_needle(kind, k, v) for k, vs in zip(key_list, value_lists) for v in vs]
        rng.shuffle(needles)
        asked = rng.sample(range(n_keys), n_queries)
        query = _listing([key_list[i] for i in asked])
        answers = [v for i in asked for v in value_lists[i]]
        if haystack == "noise":
            units = _noise_units()
        elif haystack == "prose":
            units = _prose_units(b.prose)
        else:  # distractor needles with other keys
            units = (_needle(kind, new_key(rng), new_value(rng)) for _ in count())
            units = (u for u in units if not any(f" {k} " in u for k in key_list))
        head = (
            f"A long text follows. Hidden in it are some special magic {kind}; remember them, because you will be "
            "asked about them afterwards.\n"
        )
        tail = (
            f"\nQuestion: list every special magic {kind[:-1]} given for {query} in the text above.\n"
            f"Answer: The special magic {kind} for {query} mentioned in the text are:"
        )
        return _fill_context(b, budget, head, needles, tail, units, rng), answers

    return build


def _variable_tracking(hops: int = 4):
    def build(b: PromptBuilder, rng: random.Random, budget: int) -> tuple[list[int], list[str]]:
        names = _distinct(rng, lambda r: "".join(r.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)), hops + 1)
        value = str(rng.randrange(10_000, 100_000))
        chain = [f" VAR {names[0]} = {value}."] + [f" VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, hops + 1)]
        head = "The text below hides a chain of variable assignments. Keep track of every variable in it.\n"
        tail = (
            f"\nQuestion: which variables hold the value {value}, assigned directly or through other variables?\n"
            f"Answer: Following the assignments in the text above, the variables that hold the value {value} are:"
        )
        return _fill_context(b, budget, head, chain, tail, _noise_units(), rng), names

    return build


# ------------------------------------------------------------------------------------------------ list tasks
def _common_words(n_common: int = 10):
    def build(b: PromptBuilder, rng: random.Random, budget: int) -> tuple[list[int], list[str]]:
        seed = rng.random()
        # RULER's frequencies need 300 repetitions of the common words: below 4K tokens use fewer (6 and 1).
        freq_common, freq_rare = (30, 3) if budget >= 4096 - 120 else (6, 1)
        head = (
            "Below is a numbered list of words. Some words appear in it many more times than the others.\n"
            "Here is the list:"
        )
        tail = (
            f"\nQuestion: which {n_common} words appear most often in the list above?\n"
            f"Answer: The {n_common} most common words in the list are:"
        )

        def render(n: int) -> _Rendering:
            # The common words are the same for every n and the rare ones grow by one word per step, so the
            # prompt's size grows with n (the binary search relies on it).
            r = random.Random(seed)
            common = r.sample(b.prose.distinct_words(100), n_common)
            others = [w for w in b.prose.distinct_words(100 + n + 16) if w not in common]
            rare, spare = others[:n], others[n : n + 16]
            items = common * freq_common + rare * freq_rare
            r.shuffle(items)
            # Number and word as separate pieces (split where the tokenizer splits anyway), so that each is
            # encoded once however the list is shuffled.
            pieces = [head, *(p for i, w in enumerate(items) for p in (f" {i + 1}.", f" {w}")), tail]
            pad = "".join(f" {len(items) + 1 + i}. {w}" for i, w in enumerate(spare))  # each spare word once
            return _Rendering(pieces, len(pieces) - 1, pad, common)

        ids, answers, _ = _fit_count(b, budget, render)
        return ids, answers

    return build


def zipf_counts(total: int, alpha: float = 2.0) -> list[int]:
    """Counts of words of rank 1, 2, ... summing to `total`, proportional to rank**-alpha (largest remainder)."""
    weights = [r**-alpha for r in range(1, total + 1)]
    norm = sum(weights)
    exact = [total * w / norm for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(total), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return [c for c in counts if c]


def _frequent_words(alpha: float = 2.0, top: int = 3):
    def build(b: PromptBuilder, rng: random.Random, budget: int) -> tuple[list[int], list[str]]:
        seed = rng.random()
        head = "Read the coded text below and keep count of how often each coded word appears.\n"
        tail = (
            f"\nQuestion: which {top} coded words appear most often in the coded text above?\n"
            f"Answer: The {top} most frequent coded words are:"
        )

        def render(n: int) -> _Rendering:
            r = random.Random(seed)
            counts = zipf_counts(n, alpha) if n else []
            words = _distinct(r, coded_word, len(counts) + 8)
            items = [w for w, c in zip(words, counts) for _ in range(c)]
            r.shuffle(items)
            pad = "".join(f" {w}" for w in words[-8:])  # unused words, each once
            return _Rendering([head] + [f" {w}" for w in items] + [tail], len(items) + 1, pad, words[:top])

        ids, answers, n = _fit_count(b, budget, render)
        counts = zipf_counts(n, alpha)
        runner_up = counts[top] if len(counts) > top else 0
        if len(counts) < top or counts[top - 1] <= max(runner_up, 1):
            raise PromptTooShort(f"too few words for a clear top {top} (counts {counts[: top + 1]})")
        return ids, answers

    return build


# ------------------------------------------------------------------------------------------------ synthetic QA
_PRODUCT_LIST = (
    "copper kettles, wool blankets, glass beads, cherry wine, salted fish, linen rope, clay pipes, honey cakes, "
    "silver bells, paper lanterns, tin whistles, cedar boxes, goat cheese, river pearls, oak barrels, dyed silk"
)
_PROFESSION_LIST = (
    "a shipwright, a cartographer, a glassblower, a beekeeper, an astronomer, a stonemason, a weaver, a physician, "
    "a bookbinder, a clockmaker, a botanist, a surveyor, a brewer, a violin maker, a lighthouse keeper"
)
_PRODUCTS, _PROFESSIONS = _PRODUCT_LIST.split(", "), _PROFESSION_LIST.split(", ")


def _town_document(town: str, facts: dict) -> str:
    return (
        f"{town} is a small town in the province of {facts['province']}. It was founded in {facts['year']} by "
        f"{facts['founder']}, and it is known across the region for its {facts['product']}. The river that runs "
        f"through {town} is called the {facts['river']}, and the town holds its market every {facts['day']}."
    )


def _person_document(person: str, facts: dict) -> str:
    return (
        f"{person} was {facts['profession']} who was born in the town of {facts['birthplace']} in {facts['born']}. "
        f"Later in life {person.split()[0]} moved to {facts['home']}, where people still remember the "
        f"{facts['product']} sold from the family workshop."
    )


def _random_town(rng: random.Random, name: str, founder: str) -> dict:
    return {
        "province": made_up_name(rng, 3),
        "year": str(rng.randrange(1200, 1900)),
        "founder": founder,
        "product": rng.choice(_PRODUCTS),
        "river": made_up_name(rng, 3),
        "day": rng.choice(("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")),
    }


def _random_person(rng: random.Random, birthplace: str) -> dict:
    return {
        "profession": rng.choice(_PROFESSIONS),
        "birthplace": birthplace,
        "born": str(rng.randrange(1200, 1900)),
        "home": made_up_name(rng, 3),
        "product": rng.choice(_PRODUCTS),
    }


def _qa(hops: int):
    def build(b: PromptBuilder, rng: random.Random, budget: int) -> tuple[list[int], list[str]]:
        seed = rng.random()
        names = _distinct(rng, lambda r: made_up_name(r, 3), 2)
        town, birthplace = names
        founder = f"{made_up_name(rng, 2)} {made_up_name(rng, 3)}"
        gold_town = _random_town(rng, town, founder)
        if hops == 1:
            field = rng.choice(("year", "founder", "product", "river", "province"))
            answer = gold_town[field]
            question = {
                "year": f"In which year was {town} founded?",
                "founder": f"Who founded {town}?",
                "product": f"What is {town} known for?",
                "river": f"What is the river that runs through {town} called?",
                "province": f"In which province is {town}?",
            }[field]
            gold = [_town_document(town, gold_town)]
        else:
            person = _random_person(rng, birthplace)
            field = rng.choice(("birthplace", "profession", "born"))
            answer = person[field].removeprefix("a ").removeprefix("an ")
            question = {
                "birthplace": f"In which town was the founder of {town} born?",
                "profession": f"What was the profession of the founder of {town}?",
                "born": f"In which year was the founder of {town} born?",
            }[field]
            gold = [_town_document(town, gold_town), _person_document(founder, person)]
        head = "Answer the question using the documents below. Reply with the answer only.\n"
        tail = f"\nQuestion: {question}\nAnswer:"

        def distractor(r: random.Random, taken: set) -> str:
            name = _distinct(r, lambda x: made_up_name(x, 3), 1, avoid=taken)[0]
            taken.add(name)
            other = f"{made_up_name(r, 2)} {made_up_name(r, 3)}"
            if hops == 2 and r.random() < 0.5:  # people too, so that the bridge has to be followed
                return _person_document(other, _random_person(r, name))
            facts = _random_town(r, name, other)
            while any(facts[k] == gold_town.get(k) for k in ("year", "product", "river", "province")):
                facts = _random_town(r, name, other)
            return _town_document(name, facts)

        def render(n: int) -> tuple[list[str], int, str]:
            r = random.Random(seed)
            taken = {town, birthplace, *founder.split()}
            docs = [distractor(r, taken) for _ in range(n)]
            for g in gold:
                docs.insert(r.randrange(len(docs) + 1), g)
            pieces = [head] + [f"\nDocument {i + 1}: {d}" for i, d in enumerate(docs)] + [tail]
            pad = "".join(f"\nDocument {len(docs) + 1 + i}: {distractor(r, taken)}" for i in range(2))
            return _Rendering(pieces, len(pieces) - 1, pad, [answer])

        return _fit_count(b, budget, render)[:2]

    return build


# ------------------------------------------------------------------------------------------------ the task table
@dataclass(frozen=True)
class Task:
    name: str
    metric: str  # "all" (string_match_all) or "part" (string_match_part)
    max_new_tokens: int  # RULER's tokens_to_generate
    build: Callable[[PromptBuilder, random.Random, int], tuple[list[int], list[str]]]


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("niah_single_1", "all", 128, _niah("noise")),
        Task("niah_single_2", "all", 128, _niah("prose")),
        Task("niah_single_3", "all", 128, _niah("prose", values="uuids")),
        Task("niah_multikey_1", "all", 128, _niah("prose", n_keys=4)),
        Task("niah_multikey_2", "all", 128, _niah("needles")),
        Task("niah_multikey_3", "all", 128, _niah("needles", keys="uuids", values="uuids")),
        Task("niah_multivalue", "all", 128, _niah("prose", n_values=4)),
        Task("niah_multiquery", "all", 128, _niah("prose", n_keys=4, n_queries=4)),
        Task("vt", "all", 30, _variable_tracking()),
        Task("cwe", "all", 120, _common_words()),
        Task("fwe", "all", 50, _frequent_words()),
        Task("qa_1", "part", 32, _qa(hops=1)),
        Task("qa_2", "part", 32, _qa(hops=2)),
    )
}


def parse_lengths(spec: str | Iterable[str | int]) -> list[int]:
    """ "4k,8k,128k,1m" or "4096,8192" -> sorted distinct token counts (k = 1024, m = 1024**2)."""
    parts = [p.strip() for p in spec.split(",")] if isinstance(spec, str) else [str(p).strip() for p in spec]
    out = set()
    for part in parts:
        m = re.fullmatch(r"(\d+)([kKmM]?)", part)
        if not m or int(m.group(1)) <= 0:
            raise ValueError(f"--lengths: {part!r} is not a length; write token counts like 4k,8k,128k or 4096")
        out.add(int(m.group(1)) * {"": 1, "k": 1024, "m": 1024**2}[m.group(2).lower()])
    if not out:
        raise ValueError("--lengths: give at least one length, e.g. 4k,8k")
    return sorted(out)


def parse_tasks(spec: str | Iterable[str] | None) -> list[str]:
    if spec is None:
        return list(TASKS)
    names = [n.strip() for n in spec.split(",")] if isinstance(spec, str) else list(spec)
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        raise ValueError(f"--tasks: unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    return list(dict.fromkeys(names))


def sample_seed(seed: int, task: str, length: int, index: int) -> str:
    """Each sample has its own seed, so a sample is the same whatever else is run (and when resumed)."""
    return f"{seed}:{task}:{length}:{index}"


def make_sample(builder: PromptBuilder, task: str, length: int, index: int, seed: int = 0) -> Sample:
    """Sample `index` of `task` at `length` tokens (prompt + generation budget)."""
    spec = TASKS[task]
    rng = random.Random(sample_seed(seed, task, length, index))
    try:
        ids, answers = spec.build(builder, rng, length - spec.max_new_tokens)
    except PromptTooShort as e:
        raise ValueError(
            f"{task} does not fit in {length} tokens ({spec.max_new_tokens} of them kept for the answer): {e}; "
            "use longer --lengths"
        ) from e
    assert len(ids) == length - spec.max_new_tokens, (task, length, len(ids))
    return Sample(task, length, index, ids, answers, spec.max_new_tokens)


# ------------------------------------------------------------------------------------------------ running
def model_generate_fn(model, eos_token_ids: Iterable[int]) -> GenerateFn:
    """Greedy decoding with `model.generate`; stops at any of eos_token_ids."""
    import torch

    eos = sorted(set(eos_token_ids))
    device = next(model.parameters()).device

    def generate(prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        ids = torch.tensor([prompt_ids], device=device)
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos)
        new = out[0, len(prompt_ids) :].tolist()
        stop = next((i for i, t in enumerate(new) if t in eos), len(new))
        return new[:stop]

    return generate


def _read_cache(path: str) -> dict[tuple[str, int, int], dict]:
    """Finished items; a torn last line (a run killed mid-write) is ignored."""
    done = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    r = json.loads(line)
                    done[(r["task"], r["length"], r["index"])] = r
                except (json.JSONDecodeError, KeyError):
                    continue
    return done


def _append(path: str, record: dict) -> None:
    """One whole line per write (O_APPEND), fsynced, so a crash leaves at most one torn line at the end."""
    data = (json.dumps(record) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if os.fstat(fd).st_size and _last_byte(path) != b"\n":
            data = b"\n" + data  # close a torn line left by an interrupted run
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _last_byte(path: str) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1)


def _check_run(out_dir: str, identity: dict) -> None:
    """Cached results may only be reused by the same evaluation (checkpoint, tokenizer, seed, haystack)."""
    from ..utils import atomic_write_text

    path = os.path.join(out_dir, RUN_NAME)
    if os.path.exists(path):
        with open(path) as fh:
            old = json.load(fh)
        changed = [k for k in identity if old.get(k) != identity[k]]
        if changed:
            raise ValueError(
                f"{out_dir} holds RULER results of a different evaluation ({', '.join(changed)} differ: "
                f"{ {k: old.get(k) for k in changed} } vs { {k: identity[k] for k in changed} }); "
                "pass another --out, or delete the folder to start over"
            )
    else:
        atomic_write_text(path, json.dumps(identity, indent=1) + "\n")


def _fingerprint_files(files: Sequence[str]) -> str:
    h = hashlib.sha256()
    for f in files:
        st = os.stat(f)
        h.update(f"{f}\0{st.st_size}\0{int(st.st_mtime)}\n".encode())
    return h.hexdigest()[:16]


def run_ruler(
    checkpoint: str,
    lengths: str | Iterable[str | int],
    tasks: str | Iterable[str] | None = None,
    samples: int = 50,
    out_dir: str | None = None,
    seed: int = 0,
    haystack: Sequence[str] | None = None,
    generate_fn: GenerateFn | None = None,
    tokenizer: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    progress: bool = True,
) -> dict:
    """Evaluate `checkpoint` on RULER; returns the report (also written to out_dir as ruler.json / .md / .png).

    haystack: files of English prose for the prose haystacks (default: the standard library's docstrings).
    generate_fn: greedy decoding of a prompt (default: the checkpoint's model.generate).
    """
    from ..data.tokenizer import load_tokenizer, tokenizer_fingerprint
    from .report import write_ruler_report

    lengths = parse_lengths(lengths)
    task_names = parse_tasks(tasks)
    if samples < 1:
        raise ValueError(f"--samples must be >= 1, got {samples}")
    checkpoint = os.path.abspath(checkpoint)
    if not os.path.isdir(checkpoint):
        raise ValueError(f"checkpoint {checkpoint}: no such directory; pass a Hugging Face model directory")
    tok_dir = tokenizer or checkpoint
    if not any(os.path.exists(os.path.join(tok_dir, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        raise ValueError(f"{tok_dir} has no tokenizer files; pass the tokenizer directory with --tokenizer")
    tok = load_tokenizer(tok_dir)
    prose_files = expand_inputs(list(haystack)) if haystack else None
    builder = PromptBuilder(tok, lambda: Prose(prose_files))
    out_dir = os.path.abspath(out_dir or os.path.join("eval", f"ruler-{os.path.basename(checkpoint)}"))
    os.makedirs(out_dir, exist_ok=True)
    identity = {
        "format": FORMAT,
        "checkpoint": checkpoint,
        "tokenizer": tokenizer_fingerprint(tok),
        "seed": seed,
        "haystack": f"stdlib-{platform.python_version()}" if prose_files is None else _fingerprint_files(prose_files),
    }
    _check_run(out_dir, identity)
    cache_path = os.path.join(out_dir, CACHE_NAME)
    done = _read_cache(cache_path)
    todo = [(t, n, i) for n in lengths for t in task_names for i in range(samples) if (t, n, i) not in done]

    # Every (task, length) must fit before any time is spent generating: build the first sample of each now.
    first = {}
    for t, n in dict.fromkeys((t, n) for t, n, _ in todo):
        first[(t, n)] = make_sample(builder, t, n, 0, seed)
    if todo and generate_fn is None:
        generate_fn = _load_generate_fn(checkpoint, tok_dir, device, dtype)
    print(f"RULER: {len(task_names)} tasks x {len(lengths)} lengths x {samples} samples; "
          f"{len(done)} cached results in {cache_path}, {len(todo)} to run", flush=True)  # fmt: skip
    if {"qa_1", "qa_2"} & set(task_names):
        print("note: qa_1 and qa_2 are synthetic stand-ins for RULER's SQuAD and HotpotQA tasks (no downloads)")

    from tqdm import tqdm

    for t, n, i in tqdm(todo, desc="ruler", unit="sample", disable=not progress or None):
        s = first.pop((t, n)) if i == 0 and (t, n) in first else make_sample(builder, t, n, i, seed)
        t0 = time.perf_counter()
        new_ids = generate_fn(s.input_ids, s.max_new_tokens)
        prediction = tok.decode(new_ids, skip_special_tokens=True)
        record = {
            "task": t,
            "length": n,
            "index": i,
            "score": METRICS[TASKS[t].metric](prediction, s.answers),
            "prediction": prediction,
            "answers": s.answers,
            "prompt_tokens": len(s.input_ids),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        _append(cache_path, record)
        done[(t, n, i)] = record

    scores = {
        t: {n: 100.0 * sum(done[(t, n, i)]["score"] for i in range(samples)) / samples for n in lengths}
        for t in task_names
    }
    report = {
        "checkpoint": checkpoint,
        "samples": samples,
        "seed": seed,
        "lengths": lengths,
        "tasks": task_names,
        "scores": scores,
        "average": {n: sum(scores[t][n] for t in task_names) / len(task_names) for n in lengths},
        "haystack": identity["haystack"],
    }
    report["files"] = write_ruler_report(report, out_dir)
    return report


def _load_generate_fn(checkpoint: str, tok_dir: str, device: str | None, dtype: str | None) -> GenerateFn:
    from ..serve.load import load_model, stop_token_ids

    model, tok = load_model(checkpoint, tok_dir, device, dtype)
    where = next(model.parameters())
    print(f"model {checkpoint} on {where.device} ({where.dtype}); greedy decoding with model.generate", flush=True)
    return model_generate_fn(model, stop_token_ids(tok))
