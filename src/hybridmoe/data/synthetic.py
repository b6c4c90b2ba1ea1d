"""Synthetic long-range retrieval documents for the long-context stage.

The Nemotron 3 long-context recipes mix a little synthetic retrieval data into the long-document data (Nano: 1%
"synthetic retrieval", Nemotron 3 Nano technical report, NVIDIA, 2025, long-context extension): documents whose end
can only be predicted by looking far back. Each document here is filler text with a few `key = value` facts planted
at random depths and, at the end, the facts asked for again in a different order; the answers are only in the
context.

Written as JSON lines (`{"text": ...}`) so that `hybridmoe prepare` tokenizes them like any other source.
"""

from __future__ import annotations

import json
import os
import random

from ..utils import atomic_write

_WORDS = [
    "amber",
    "basil",
    "cedar",
    "delta",
    "ember",
    "flint",
    "garnet",
    "harbor",
    "indigo",
    "juniper",
    "kestrel",
    "lumen",
    "maple",
    "nickel",
    "onyx",
    "pepper",
    "quartz",
    "raven",
    "sable",
    "tundra",
    "umber",
    "violet",
    "willow",
    "xenon",
    "yarrow",
    "zephyr",
]


def retrieval_document(rng: random.Random, filler: list[str], target_chars: int, facts: int = 4) -> str:
    """Filler of about `target_chars` characters with `facts` planted key/value lines, then the questions."""
    keys = rng.sample(_WORDS, facts)
    values = {k: f"{rng.randrange(10**6):06d}" for k in keys}
    depths = sorted(rng.random() * 0.8 for _ in keys)  # facts sit in the first 80% of the document
    parts, size, planted = [], 0, 0
    while size < target_chars:
        while planted < facts and size >= depths[planted] * target_chars:
            line = f"\n# fact: the code for {keys[planted]} is {values[keys[planted]]}\n"
            parts.append(line)
            size += len(line)
            planted += 1
        piece = rng.choice(filler)
        start = rng.randrange(max(1, len(piece) - 2000))
        chunk = piece[start : start + 2000]
        parts.append(chunk)
        size += len(chunk)
    for k in keys[planted:]:  # a tiny target: plant whatever did not fit
        parts.append(f"\n# fact: the code for {k} is {values[k]}\n")
    questions = "".join(f"# question: the code for {k} is {values[k]}\n" for k in rng.sample(keys, len(keys)))
    return "".join(parts) + "\n" + questions


def write_retrieval_jsonl(path: str | os.PathLike, filler: list[str], documents: int, target_chars: int, seed=0):
    """Write `documents` retrieval documents of about `target_chars` characters each as JSON lines."""
    if not filler or not any(filler):
        raise ValueError("write_retrieval_jsonl needs some filler text")
    rng = random.Random(seed)
    filler = [f for f in filler if f]

    def write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            for _ in range(documents):
                fh.write(json.dumps({"text": retrieval_document(rng, filler, target_chars)}) + "\n")

    atomic_write(path, write)
