"""Answering with a search tool: a seeded collection of short documents about made-up towns that the model cannot
see, a `search(query)` tool over it, and a question one document answers.

Every document describes one town with the same kinds of facts as the `documents` domain (residents, mayor, river,
year founded), but the documents are not in the prompt: the model must search for the town. Difficulty 1: 6
documents of two facts; 2: 12 documents of three facts; 3: 20 documents of four facts, and the question compares
two towns (two searches). The solution searches for the town and the fact, reads the result (the real tool output)
and answers quoting the document. Numbers are compared exactly; names must be the answer, or a sentence holding it
and none of the other towns' values of that kind.

The index is Okapi BM25 (Robertson and Zaragoza, "The Probabilistic Relevance Framework: BM25 and Beyond", 2009;
k1 = 1.5, b = 0.75, and Lucene's non-negative idf log(1 + (N - df + 0.5) / (df + 0.5))) over lowercase words,
built from the task's documents; `search` returns the best `TOP_K` documents with a positive score.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter

from .base import Domain, Task
from .common import assistant, made_up_name, user, value_reward
from .documents import FACTS, NUMERIC, _value

TOP_K = 3
MAX_QUERY_CHARS = 300
LEVELS = {1: (6, 2), 2: (12, 3), 3: (20, 4)}  # documents, facts per document
_WORD_RE = re.compile(r"[a-z0-9]+")

TOOL = {
    "type": "function",
    "function": {
        "name": "search",
        "description": f"Search the document collection; returns the {TOP_K} best matching documents.",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string", "description": "words to look for, e.g. a town's name"}},
            "required": ["query"],
        },
    },
}


def words(text: str) -> list[str]:
    return _WORD_RE.findall(text.lower())


class BM25Index:
    """Okapi BM25 over a small list of documents (module docstring)."""

    def __init__(self, documents: list[str], k1: float = 1.5, b: float = 0.75):
        self.documents, self.k1, self.b = list(documents), k1, b
        self.counts = [Counter(words(d)) for d in self.documents]
        self.lengths = [sum(c.values()) for c in self.counts]
        self.avg_length = sum(self.lengths) / max(1, len(self.lengths))
        df = Counter(w for c in self.counts for w in c)
        n = len(self.documents)
        self.idf = {w: math.log(1 + (n - k + 0.5) / (k + 0.5)) for w, k in df.items()}

    def scores(self, query: str) -> list[float]:
        terms = set(words(query))
        out = []
        for counts, length in zip(self.counts, self.lengths):
            norm = self.k1 * (1 - self.b + self.b * length / max(self.avg_length, 1e-9))
            out.append(sum(self.idf[t] * counts[t] * (self.k1 + 1) / (counts[t] + norm) for t in terms if t in counts))
        return out

    def search(self, query: str, k: int = TOP_K) -> list[int]:
        """Indices of the best `k` documents with a positive score, best first (ties: the earlier document)."""
        scores = self.scores(query)
        ranked = sorted((i for i, s in enumerate(scores) if s > 0), key=lambda i: (-scores[i], i))
        return ranked[:k]


def format_results(documents: list[str], hits: list[int]) -> str:
    if not hits:
        return "no document matches the query; try other words, such as the town's name"
    return "\n".join(f"Document {i + 1}: {documents[i]}" for i in hits)


def search(documents: list[str], query, index: BM25Index | None = None) -> str:
    """The tool's output for `query`, or "error: ..." for the model to read."""
    if not isinstance(query, str) or not query.strip():
        return 'error: call search with {"query": "<words to look for>"}'
    if len(query) > MAX_QUERY_CHARS:
        return f"error: the query is longer than {MAX_QUERY_CHARS} characters"
    index = index or BM25Index(documents)
    return format_results(documents, index.search(query))


class Retrieval(Domain):
    name = "retrieval"
    description = "search a hidden document collection with a tool, answer from the document found"

    def _generate(self, rng: random.Random, difficulty: int, seed: int) -> Task:
        n_docs, n_facts = LEVELS[difficulty]
        towns: list[str] = []
        while len(towns) < n_docs:
            town = made_up_name(rng, rng.randint(2, 3))
            if town not in towns:
                towns.append(town)
        kinds = rng.sample(list(FACTS), n_facts)
        facts = {}
        for t in towns:
            facts[t] = {}
            for k in kinds:
                value = _value(rng, k)
                while value in towns:  # a river named like a town would make that town's search ambiguous
                    value = _value(rng, k)
                facts[t][k] = value
        documents = [" ".join(FACTS[k][0].format(T=t, v=facts[t][k]) for k in kinds) for t in towns]

        if difficulty < 3:
            town, kind = rng.choice(towns), rng.choice(kinds)
            question, queries = FACTS[kind][1].format(T=town), [f"{town} {kind}"]
            answer, numeric = facts[town][kind], kind in NUMERIC
            distractors = [facts[t][kind] for t in towns if t != town]
        else:
            a, b = rng.sample(towns, 2)
            kind = rng.choice([k for k in kinds if k in NUMERIC])
            queries = [f"{a} {kind}", f"{b} {kind}"]
            values = int(facts[a][kind]), int(facts[b][kind])
            if kind == "residents":
                question = f"Which town has more residents, {a} or {b}?"
                answer = a if values[0] >= values[1] else b
                distractors, numeric = [t for t in towns if t != answer], False
                if values[0] == values[1]:
                    question = f"How many residents do {a} and {b} have together?"
                    answer, distractors, numeric = str(sum(values)), [], True
            else:
                question = f"How many years apart were {a} and {b} founded?"
                answer, distractors, numeric = str(abs(values[0] - values[1])), [], True

        prompt = (
            f"You can search a collection of {n_docs} documents about towns with the search tool; you cannot see "
            f"them otherwise.\n\nQuestion: {question}"
        )
        calls = [
            {"id": f"call_{i + 1}", "type": "function",
             "function": {"name": "search", "arguments": json.dumps({"query": q})}}
            for i, q in enumerate(queries)
        ]  # fmt: skip
        index = BM25Index(documents)
        results = [search(documents, q, index) for q in queries]
        quotes = [FACTS[kind][0].format(T=q.rsplit(" ", 1)[0], v=facts[q.rsplit(" ", 1)[0]][kind]) for q in queries]
        trace = " ".join(quotes)
        if difficulty == 3:
            trace += f" So the answer is {answer}."
        plan = "I will search for " + " and for ".join(repr(q) for q in queries) + "."
        solution = [assistant("", plan) | {"tool_calls": calls}]
        solution += [{"role": "tool", "tool_call_id": c["id"], "name": "search", "content": r}
                     for c, r in zip(calls, results)]  # fmt: skip
        solution.append(assistant(answer, trace))
        return Task(
            domain=self.name, seed=seed, difficulty=difficulty, messages=[user(prompt)],
            answer={"value": answer, "numeric": numeric, "distractors": distractors}, solution=solution,
            tools=[TOOL], metadata={"documents": documents},
        )  # fmt: skip

    def verify(self, task: Task, completion: str) -> float:
        return value_reward(task.answer, completion)

    def run_tool(self, task: Task, name: str, arguments: dict) -> str:
        if name != "search":
            return f"error: unknown tool {name!r}; the only tool is search"
        if not isinstance(arguments, dict):
            return 'error: call search with {"query": "<words to look for>"}'
        return search(task.metadata["documents"], arguments.get("query"))
