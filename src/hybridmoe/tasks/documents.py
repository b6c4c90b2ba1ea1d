"""Answering from given documents: short documents about made-up towns, and a question one of them answers.

Every document describes one town with the same kinds of facts (residents, mayor, river, year founded), so the
answer must be found by the town's name. Difficulty 1: two documents of two facts; 2: three or four documents of
three facts; 3: four documents, and the question compares two towns (which has more residents, how many years
apart they were founded). The trace quotes the sentence(s) used. Numbers are compared exactly; names must be the
answer, or a sentence holding it and none of the other candidates from the documents.
"""

from __future__ import annotations

import random

from .base import Domain, Task
from .common import NAMES, SURNAMES, assistant, made_up_name, user, value_reward

# fact kind -> (sentence, question); {T} is the town, {v} the value
FACTS = {
    "residents": ("{T} has {v} residents.", "How many residents does {T} have?"),
    "mayor": ("The mayor of {T} is {v}.", "Who is the mayor of {T}?"),
    "river": ("{T} lies on the {v} River.", "Which river does {T} lie on?"),
    "founded": ("{T} was founded in {v}.", "In which year was {T} founded?"),
}
NUMERIC = {"residents", "founded"}
LEVELS = {1: (2, 2, 2), 2: (3, 4, 3), 3: (4, 4, 4)}  # fewest and most documents, facts per document


def _value(rng: random.Random, kind: str) -> str:
    if kind == "residents":
        return str(rng.randint(1000, 99999))
    if kind == "founded":
        return str(rng.randint(1500, 1999))
    if kind == "mayor":
        return f"{rng.choice(NAMES)} {rng.choice(SURNAMES)}"
    return made_up_name(rng, rng.randint(2, 3))


class Documents(Domain):
    name = "documents"
    description = "answer a question from the given documents about made-up towns"

    def _generate(self, rng: random.Random, difficulty: int, seed: int) -> Task:
        fewest, most, n_facts = LEVELS[difficulty]
        n_docs, towns = rng.randint(fewest, most), []
        while len(towns) < n_docs:
            town = made_up_name(rng, rng.randint(2, 3))
            if town not in towns:
                towns.append(town)
        kinds = rng.sample(list(FACTS), n_facts)
        facts = {t: {k: _value(rng, k) for k in kinds} for t in towns}
        docs = [" ".join(FACTS[k][0].format(T=t, v=facts[t][k]) for k in kinds) for t in towns]
        prompt = "\n".join(f"Document {i + 1}: {d}" for i, d in enumerate(docs))

        def quote(town: str, kind: str) -> str:
            return f"Document {towns.index(town) + 1}: {FACTS[kind][0].format(T=town, v=facts[town][kind])}"

        if difficulty < 3:
            town, kind = rng.choice(towns), rng.choice(kinds)
            question = FACTS[kind][1].format(T=town)
            answer, trace = facts[town][kind], quote(town, kind)
            distractors = [facts[t][kind] for t in towns if t != town]
            numeric = kind in NUMERIC
        else:
            a, b = rng.sample(towns, 2)
            if rng.random() < 0.5:
                question = f"Which town has more residents, {a} or {b}?"
                answer = max((a, b), key=lambda t: int(facts[t]["residents"]))
                trace = f"{quote(a, 'residents')} {quote(b, 'residents')} So {answer} has more."
                distractors, numeric = [t for t in towns if t != answer], False
            else:
                question = f"How many years apart were {a} and {b} founded?"
                years = int(facts[a]["founded"]), int(facts[b]["founded"])
                answer = str(abs(years[0] - years[1]))
                trace = f"{quote(a, 'founded')} {quote(b, 'founded')} {max(years)} - {min(years)} = {answer}."
                distractors, numeric = [], True
        return Task(
            domain=self.name, seed=seed, difficulty=difficulty, messages=[user(f"{prompt}\n\nQuestion: {question}")],
            answer={"value": answer, "numeric": numeric, "distractors": distractors},
            solution=[assistant(answer, trace)],
        )  # fmt: skip

    def verify(self, task: Task, completion: str) -> float:
        return value_reward(task.answer, completion)
