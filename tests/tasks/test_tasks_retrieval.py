"""The retrieval domain: deterministic by seed, the worked solution's search calls return the real tool output and
find the answer's document, wrong answers score 0, and BM25 ranks as computed by hand."""

import json
import math

import pytest

from hybridmoe.tasks import DOMAINS, get_domain, prompt_overlap, split_seeds
from hybridmoe.tasks.retrieval import TOP_K, BM25Index, search


def seeds(n, split="train"):
    return list(split_seeds(split, n, offset=1000))


def test_registered_deterministic_and_varied():
    d = get_domain("retrieval")
    assert DOMAINS["retrieval"] is d
    for level in (1, 2, 3):
        assert d.generate(7, level).to_dict() == d.generate(7, level).to_dict()
        assert len({json.dumps(d.generate(s, level).messages) for s in range(20)}) >= 18
    with pytest.raises(ValueError, match="difficulty"):
        d.generate(0, 4)
    assert prompt_overlap("retrieval", n_train=500, n_heldout=200) <= 0.03


@pytest.mark.parametrize("level", [1, 2, 3])
def test_solution_searches_finds_the_document_and_verifies(level):
    d = get_domain("retrieval")
    for seed in seeds(25) + seeds(3, "heldout"):
        task = d.generate(seed, level)
        docs = task.metadata["documents"]
        assert len(docs) == {1: 6, 2: 12, 3: 20}[level]
        assert not any(doc in task.messages[0]["content"] for doc in docs)  # the documents are hidden
        calls = task.solution[0]["tool_calls"]
        assert len(calls) == (2 if level == 3 else 1)
        for call, result in zip(calls, task.solution[1 : 1 + len(calls)]):
            query = json.loads(call["function"]["arguments"])["query"]
            assert result["content"] == d.run_tool(task, "search", {"query": query})
            town = query.rsplit(" ", 1)[0]
            top = result["content"].splitlines()[0]
            assert top.split(": ", 1)[1].startswith(town + " ") or f" {town} " in top  # the town's own document first
        answer = task.solution[-1]
        assert answer["role"] == "assistant" and answer["reasoning_content"]
        assert d.verify(task, answer["content"]) == 1.0
        assert d.verify(task, f"The answer is {answer['content']}.") == 1.0


def test_wrong_and_malformed_answers_score_zero():
    d = get_domain("retrieval")
    for seed in seeds(20):
        task = d.generate(seed, 1)
        for wrong in ["", "I don't know.", "[1, 2]", *task.answer["distractors"][:3],
                      " or ".join([task.answer["value"], *task.answer["distractors"]])]:  # fmt: skip
            assert d.verify(task, wrong) == 0.0, (wrong, task.answer)


def test_search_tool_errors_are_text():
    d = get_domain("retrieval")
    task = d.generate(seeds(1)[0])
    assert d.run_tool(task, "grep", {"query": "x"}).startswith("error: unknown tool 'grep'")
    assert d.run_tool(task, "search", {}).startswith("error: call search with")
    assert d.run_tool(task, "search", {"query": 3}).startswith("error:")
    assert d.run_tool(task, "search", {"query": "x" * 1000}).startswith("error: the query is longer")
    assert d.run_tool(task, "search", {"query": "zzzz qqqq"}).startswith("no document matches")


def test_bm25_by_hand():
    docs = ["apple banana apple", "banana cherry", "cherry date elder fig"]
    index = BM25Index(docs)
    n, avg, k1, b = 3, 3.0, 1.5, 0.75
    idf_apple = math.log(1 + (n - 1 + 0.5) / (1 + 0.5))
    idf_banana = math.log(1 + (n - 2 + 0.5) / (2 + 0.5))
    norm0 = k1 * (1 - b + b * 3 / avg)
    want0 = idf_apple * 2 * (k1 + 1) / (2 + norm0) + idf_banana * 1 * (k1 + 1) / (1 + norm0)
    norm1 = k1 * (1 - b + b * 2 / avg)
    want1 = idf_banana * 1 * (k1 + 1) / (1 + norm1)
    got = index.scores("Apple, banana!")
    assert got[0] == pytest.approx(want0) and got[1] == pytest.approx(want1) and got[2] == 0.0
    assert index.search("apple banana") == [0, 1]  # zero scores are not results
    assert search(docs, "cherry") == "Document 2: banana cherry\nDocument 3: cherry date elder fig"
    assert len(BM25Index([f"w{i} common" for i in range(10)]).search("common")) == TOP_K
