"""Instruction-format constraints (as in IFEval, arXiv 2311.07911): write about a topic under checkable rules.

Rules: an exact number of bullet points, at most / at least N words, only lowercase / only capital letters, include
a word, avoid a word, end with a phrase. Difficulty 1: two rules; 2: three; 3: four (never two of a kind). Checks
are simple functions of the text: bullets are lines starting with "- " or "* ", words are runs of letters, digits
and apostrophes, words match whole and case-insensitively.

Reward (partial credit, documented): 0 unless the reply mentions the topic's noun; otherwise the share of the rules it
follows (IFEval's instruction-level accuracy for one prompt).
"""

from __future__ import annotations

import random
import re

from .base import Domain, Task
from .common import assistant, user

TOPICS = (
    "rivers", "trains", "gardens", "clouds", "bridges", "forests", "islands", "markets", "castles", "boats",
    "mountains", "libraries", "bicycles", "lakes", "birds", "kites", "candles", "maps", "clocks", "lamps", "farms",
    "roads", "ships", "tents", "stars", "shells", "bakeries", "museums", "harbors", "villages", "horses", "bees",
    "rockets", "trees", "windows", "songs", "gloves", "pianos", "deserts", "caves",
)  # fmt: skip
SENTENCES = (
    "{T} can be found in many places.", "Many people like {t}.", "{T} have a long history.",
    "There is a lot to learn about {t}.", "Some {t} are small and some are large.", "People often talk about {t}.",
    "{T} look different in every season.", "Children like to draw {t}.", "Old stories often mention {t}.",
    "Every town has its own {t}.",
)  # fmt: skip
ADJECTIVES = (
    "old", "small", "quiet", "busy", "bright", "dark", "tall", "tiny", "famous", "distant", "ancient", "modern",
    "hidden", "wild", "golden", "northern", "southern", "empty", "crowded", "simple",
)  # fmt: skip
KEYWORD_SENTENCE = "I think of {k} when I see {t}."
KEYWORDS = (
    "water", "light", "morning", "silver", "green", "summer", "stone", "travel", "home", "friends", "wind", "gold",
    "night", "color", "sound", "rain", "snow", "paper", "glass", "salt", "sugar", "coffee", "smoke", "dust", "fire",
    "ice", "sand", "rope", "wood", "iron", "cloth", "honey", "milk", "grass", "moon", "sun", "sea", "hills",
    "dreams", "letters",
)  # fmt: skip
AVOID = (
    "very", "really", "always", "never", "nice", "good", "beautiful", "amazing", "thing", "just", "perhaps", "maybe",
    "truly", "quite", "stuff", "awesome", "great", "basically", "actually", "literally",
)  # fmt: skip
ENDINGS = (
    "That is all.", "Thank you for reading.", "The end.", "I hope this helps.", "Nothing more to add.",
    "So it goes.", "Enough said.", "Let that sink in.", "More another day.", "Until next time.",
)  # fmt: skip
GROUPS = ("bullets", "length", "case", "include", "exclude", "end")
LEVELS = {1: 2, 2: 3, 3: 4}  # rules per task

_BULLET_RE = re.compile(r"^\s*[-*]\s+\S")
_WORD_RE = re.compile(r"[A-Za-z0-9']+")


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9']){re.escape(word)}(?![A-Za-z0-9'])", text, re.IGNORECASE) is not None


def follows(text: str, rule: list) -> bool:
    """Whether `text` follows one rule `[kind, parameter]`."""
    kind, param = rule
    if kind == "bullets":
        return sum(1 for line in text.splitlines() if _BULLET_RE.match(line)) == param
    if kind == "max_words":
        return len(_WORD_RE.findall(text)) <= param
    if kind == "min_words":
        return len(_WORD_RE.findall(text)) >= param
    if kind == "lowercase":
        return text == text.lower() and any(c.isalpha() for c in text)
    if kind == "uppercase":
        return text == text.upper() and any(c.isalpha() for c in text)
    if kind == "include":
        return _has_word(text, param)
    if kind == "exclude":
        return not _has_word(text, param)
    if kind == "end":
        return text.rstrip().endswith(param)
    raise ValueError(f"unknown rule {kind!r}")


def describe(rule: list) -> tuple[str, str]:
    """(the instruction, a short note for the reasoning trace)."""
    kind, param = rule
    return {
        "bullets": (f"Use exactly {param} bullet points (lines starting with '- ').", f"{param} bullets"),
        "max_words": (f"Use at most {param} words.", f"at most {param} words"),
        "min_words": (f"Use at least {param} words.", f"at least {param} words"),
        "lowercase": ("Use only lowercase letters.", "all lowercase"),
        "uppercase": ("Use only capital letters.", "all capitals"),
        "include": (f"Include the word '{param}'.", f"the word '{param}'"),
        "exclude": (f"Do not use the word '{param}'.", f"no '{param}'"),
        "end": (f"End with the exact phrase '{param}'.", f"end with '{param}'"),
    }[kind]


class Instructions(Domain):
    name = "instructions"
    description = "write about a topic following format rules (bullets, length, case, keywords, ending)"

    def _generate(self, rng: random.Random, difficulty: int, seed: int) -> Task:
        noun = rng.choice(TOPICS)
        topic = f"{rng.choice(ADJECTIVES)} {noun}"
        groups = rng.sample(GROUPS, LEVELS[difficulty])
        case = rng.choice(("lowercase", "uppercase")) if "case" in groups else None
        n_bullets = rng.randint(2, 6) if "bullets" in groups else None
        keyword = rng.choice(KEYWORDS) if "include" in groups else None
        lines = [s.format(t=topic, T=topic.capitalize()) for s in rng.sample(SENTENCES, n_bullets or rng.randint(1, 3))]
        if keyword:
            lines[rng.randrange(len(lines))] = KEYWORD_SENTENCE.format(k=keyword, t=topic)
        text = "\n".join(f"- {line}" for line in lines) if n_bullets else " ".join(lines)
        ending = rng.choice(ENDINGS) if "end" in groups else None
        if ending:
            text += ("\n" if n_bullets else " ") + ending
        recase = {"lowercase": str.lower, "uppercase": str.upper, None: lambda s: s}[case]
        text = recase(text)
        n_words = len(_WORD_RE.findall(text))
        rules = []
        for group in groups:
            if group == "bullets":
                rules.append(["bullets", n_bullets])
            elif group == "length":
                if rng.random() < 0.5:
                    rules.append(["max_words", n_words + rng.randint(0, 10)])
                else:
                    rules.append(["min_words", max(1, n_words - rng.randint(0, 5))])
            elif group == "case":
                rules.append([case, None])
            elif group == "include":
                rules.append(["include", keyword])
            elif group == "exclude":
                rules.append(["exclude", rng.choice(AVOID)])
            else:
                rules.append(["end", recase(ending)])
        instructions, notes = zip(*(describe(r) for r in rules))
        return Task(
            domain=self.name, seed=seed, difficulty=difficulty,
            messages=[user(f"Write about {topic}. {' '.join(instructions)}")],
            answer={"topic": noun, "rules": rules},
            solution=[assistant(text, f"I need: {'; '.join(notes)}.")],
        )  # fmt: skip

    def verify(self, task: Task, completion: str) -> float:
        if not _has_word(completion, task.answer["topic"]):
            return 0.0
        rules = task.answer["rules"]
        return sum(follows(completion, rule) for rule in rules) / len(rules)
