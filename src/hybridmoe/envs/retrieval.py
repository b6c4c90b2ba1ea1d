"""Retrieval: a `search(query)` tool over a local BM25 index of the task's hidden document collection (the
`retrieval` domain); the answer is checked against the one document that holds it.

`reset` builds the index once per episode (kept in `episode.state`); every search runs on it and is recorded.
Reward: the answer's (1 or 0, exact numbers, names without the other candidates). Components: `answer` (the same)
and `searched` (1 when the model made at least one search)."""

from __future__ import annotations

from ..tasks.retrieval import BM25Index, search
from .base import Episode, Reward
from .domain import DomainEnv


class RetrievalEnv(DomainEnv):
    name = "retrieval"
    domain_names = ("retrieval",)
    max_tool_calls = 4

    def reset(self, seed: int, difficulty: int = 1) -> Episode:
        episode = super().reset(seed, difficulty)
        episode.state["index"] = BM25Index(episode.task.metadata["documents"])
        episode.state["queries"] = []
        return episode

    def call_tool(self, episode: Episode, name: str, arguments: dict) -> str:
        if name != "search":
            return f"error: unknown tool {name!r}; the only tool is search"
        query = (arguments or {}).get("query")
        episode.state["queries"].append(query)
        return search(episode.task.metadata["documents"], query, episode.state["index"])

    def verify(self, episode: Episode, answer: str) -> Reward:
        correct = float(self.domain(episode).verify(episode.task, answer))
        return Reward(correct, {"answer": correct, "searched": float(bool(episode.state.get("queries")))})
