"""Evaluation: RULER's task generators (exact token lengths, answers present and scorable), its scoring, the
resumable runner and CLI, and perplexity against a direct computation with the model.

The checkpoint is the `debug` preset with random weights and a 1024-token BPE tokenizer trained on a few standard
library files, saved together as a Hugging Face directory.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter

import numpy as np
import pytest
import torch

from hybridmoe import HybridMoEConfig, HybridMoEForCausalLM
from hybridmoe.cli import main
from hybridmoe.data.prepare import prepare
from hybridmoe.data.tokenizer import load_tokenizer, train_tokenizer
from hybridmoe.eval.haystack import Prose
from hybridmoe.eval.perplexity import evaluate_perplexity, token_bytes
from hybridmoe.eval.ruler import (
    CACHE_NAME,
    TASKS,
    PromptBuilder,
    make_sample,
    parse_lengths,
    postprocess,
    run_ruler,
    string_match_all,
    string_match_part,
    zipf_counts,
)
from hybridmoe.speedrun import stdlib_sources

VOCAB = 1024


@pytest.fixture(scope="module")
def files():
    modules, _ = stdlib_sources(max_files=60)
    return modules[:20]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, files):
    path = tmp_path_factory.mktemp("ckpt")
    train_tokenizer(files, path, vocab_size=VOCAB, show_progress=False)
    torch.manual_seed(0)
    config = HybridMoEConfig.from_preset("debug", num_nextn_predict_layers=0, vocab_size=VOCAB)
    HybridMoEForCausalLM(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def builder(checkpoint):
    return PromptBuilder(load_tokenizer(checkpoint), Prose)


def _oracle(builder, tasks, lengths, samples, seed=0):
    """A generate_fn that answers every prompt correctly (looked up by its ids)."""
    table = {}
    for n in lengths:
        for t in tasks:
            for i in range(samples):
                s = make_sample(builder, t, n, i, seed)
                table[tuple(s.input_ids)] = ", ".join(s.answers)
    return lambda ids, max_new: builder.tokenizer(table[tuple(ids)], add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------------------ scoring
def test_scoring_all_part_and_case():
    refs = ["1234567", "AbC-def"]
    assert string_match_all("the numbers are 1234567 and abc-DEF.", refs) == 1.0
    assert string_match_all("only 1234567", refs) == 0.5
    assert string_match_all("nothing", refs) == 0.0
    assert string_match_part("ABC-def it is", refs) == 1.0
    assert string_match_part("1234567", refs) == 1.0
    assert string_match_part("no", refs) == 0.0
    assert postprocess("\x00 answer\x07 \n") == "answer"
    assert string_match_all("12345\x0067", ["1234567"]) == 0.0  # control characters split words, as in RULER


def test_lengths_and_zipf():
    assert parse_lengths("4k,8K,4096,1m") == [4096, 8192, 1024**2]
    for bad in ("4q", "0", "", "k", "4k;8k"):
        with pytest.raises(ValueError, match="--lengths"):
            parse_lengths(bad)
    counts = zipf_counts(1000)
    assert sum(counts) == 1000 and counts == sorted(counts, reverse=True) and counts[0] > 4 * counts[1] * 0.9


# ------------------------------------------------------------------------------------------------ generators
@pytest.mark.parametrize("length", [1024, 2048])
def test_every_task_hits_the_length_with_its_answers_in_the_prompt(builder, length):
    tok = builder.tokenizer
    for name, task in TASKS.items():
        for index in range(2):
            s = make_sample(builder, name, length, index)
            assert len(s.input_ids) + s.max_new_tokens == length, name
            text = tok.decode(s.input_ids)
            assert s.answers and all(a in text for a in s.answers), (name, s.answers)
            perfect = ", ".join(s.answers)
            assert {"all": string_match_all, "part": string_match_part}[task.metric](perfect, s.answers) == 1.0
            _check_structure(name, text, s.answers)
        assert make_sample(builder, name, length, 0).input_ids == make_sample(builder, name, length, 0).input_ids
        assert make_sample(builder, name, length, 0).input_ids != make_sample(builder, name, length, 1).input_ids


def _check_structure(name: str, text: str, answers: list[str]) -> None:
    """Each answer is where the task says it is, so the question is answerable from the prompt alone."""
    body = text[: text.rindex("\nQuestion:")]
    if name.startswith("niah"):
        for a in answers:
            assert re.search(rf"One of the special magic \w+ for [\w-]+ is: {re.escape(a)}\.", body), a
        if name == "niah_single_1":
            assert "The grass is green." in body
    elif name == "vt":
        assert re.search(rf"VAR {answers[0]} = \d+\.", body)
        for prev, var in zip(answers, answers[1:]):
            assert f"VAR {var} = VAR {prev}." in body
        assert body.index(answers[0]) < body.index(f"VAR {answers[-1]} =")
    elif name == "cwe":
        counts = Counter(re.findall(r" \d+\. ([a-z]+)", body))
        top = {w for w, _ in counts.most_common(len(answers))}
        assert top == set(answers)
        assert min(counts[a] for a in answers) > max(c for w, c in counts.items() if w not in answers)
    elif name == "fwe":
        counts = Counter(body.split("\n", 1)[1].split())
        ranked = counts.most_common(4)
        assert [w for w, _ in ranked[:3]] == answers and ranked[2][1] > ranked[3][1]
    else:  # qa: the answer is in a document
        assert re.search(r"Document \d+: [^\n]*" + re.escape(answers[0]), body)


def test_long_lengths_use_rulers_full_settings(builder):
    s = make_sample(builder, "cwe", 4096, 0)
    counts = Counter(re.findall(r" \d+\. ([a-z]+)", builder.tokenizer.decode(s.input_ids)))
    assert [counts[a] for a in s.answers] == [30] * 10
    assert len(s.input_ids) == 4096 - 120


def test_errors_for_short_lengths_and_short_haystacks(builder, checkpoint, tmp_path):
    with pytest.raises(ValueError, match="does not fit in 200 tokens.*longer --lengths"):
        make_sample(builder, "niah_single_1", 200, 0)
    small = tmp_path / "small.txt"
    small.write_text("This is the only paragraph of prose that the haystack has. It is far too short for a prompt.\n")
    short = PromptBuilder(builder.tokenizer, Prose([str(small)]))
    for task in ("niah_single_2", "cwe"):
        with pytest.raises(ValueError, match="haystack source .* too little .* --haystack"):
            make_sample(short, task, 1024, 0)
    assert make_sample(short, "niah_single_1", 1024, 0)  # noise haystacks need no prose


# ------------------------------------------------------------------------------------------------ runner
def test_oracle_scores_100_and_wrong_answers_0(builder, checkpoint, tmp_path):
    tasks = list(TASKS)
    oracle = _oracle(builder, tasks, [1024], samples=2)
    good = run_ruler(checkpoint, "1k", samples=2, out_dir=str(tmp_path / "good"), generate_fn=oracle, progress=False)
    assert all(good["scores"][t][1024] == 100.0 for t in tasks), good["scores"]
    bad = run_ruler(checkpoint, "1k", samples=2, out_dir=str(tmp_path / "bad"), generate_fn=lambda ids, n: [],
                    progress=False)  # fmt: skip
    assert all(bad["scores"][t][1024] == 0.0 for t in tasks) and bad["average"][1024] == 0.0


def test_resume_skips_finished_items(builder, checkpoint, tmp_path):
    out = str(tmp_path / "run")
    tasks = ["niah_single_1", "vt", "qa_1"]
    oracle = _oracle(builder, tasks, [512], samples=3)
    calls = []

    def counting(ids, n):
        calls.append(tuple(ids))
        return oracle(ids, n)

    run_ruler(checkpoint, "512", tasks=tasks, samples=2, out_dir=out, generate_fn=counting, progress=False)
    assert len(calls) == 6
    with open(tmp_path / "run" / CACHE_NAME, "a") as fh:
        fh.write('{"task": "vt", "len')  # a run killed mid-write leaves a torn line
    calls.clear()
    report = run_ruler(checkpoint, "512", tasks=tasks, samples=3, out_dir=out, generate_fn=counting, progress=False)
    assert len(calls) == 3 and len(set(calls)) == 3  # only the third sample of each task
    assert report["average"][512] == 100.0
    calls.clear()
    run_ruler(checkpoint, "512", tasks=tasks, samples=3, out_dir=out, generate_fn=counting, progress=False)
    assert not calls
    lines = (tmp_path / "run" / CACHE_NAME).read_text().splitlines()
    assert sum(1 for line in lines if line.startswith('{"task"') and line.endswith("}")) == 9
    with pytest.raises(ValueError, match="different evaluation.*seed"):
        run_ruler(checkpoint, "512", tasks=tasks, samples=1, out_dir=out, seed=1, generate_fn=counting)


def test_cli_ruler_end_to_end(checkpoint, tmp_path, capsys):
    out = tmp_path / "ruler"
    rc = main(["eval", "ruler", checkpoint, "--lengths", "512,1k", "--samples", "1", "--tasks",
               "niah_single_1,vt,fwe,qa_2", "--out", str(out)])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "niah_single_1" in printed and "average" in printed and "1024" in printed
    report = json.loads((out / "ruler.json").read_text())
    assert report["lengths"] == [512, 1024] and set(report["scores"]) == {"niah_single_1", "vt", "fwe", "qa_2"}
    assert all(0 <= v <= 100 for cells in report["scores"].values() for v in cells.values())
    assert "| length |" in (out / "ruler.md").read_text()
    assert (out / "ruler.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / "ruler.png").stat().st_size > 5000
    records = [json.loads(line) for line in (out / CACHE_NAME).read_text().splitlines()]
    assert len(records) == 8 and all(r["prompt_tokens"] < r["length"] for r in records)


def test_cli_errors(checkpoint, tmp_path, capsys):
    assert main(["eval", "ruler", checkpoint, "--lengths", "4x", "--out", str(tmp_path / "a")]) == 2
    assert "--lengths: '4x' is not a length" in capsys.readouterr().err
    assert main(["eval", "ruler", str(tmp_path / "nope"), "--lengths", "4k"]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main(["eval", "ruler", checkpoint, "--lengths", "4k", "--tasks", "niah", "--out", str(tmp_path)]) == 2
    assert "unknown task" in capsys.readouterr().err
    assert main(["eval", "ruler", checkpoint, "--lengths", "128", "--out", str(tmp_path / "b")]) == 2
    assert "does not fit in 128 tokens" in capsys.readouterr().err
    small = tmp_path / "small.txt"
    small.write_text("Just one paragraph of prose here, which is not nearly enough for a haystack.\n")
    args = ["--lengths", "2k", "--tasks", "niah_single_2", "--haystack", str(small), "--out", str(tmp_path / "c")]
    assert main(["eval", "ruler", checkpoint, *args]) == 2
    assert "too little for this prompt length" in capsys.readouterr().err
    assert main(["eval", "ppl", str(tmp_path / "nope"), str(small)]) == 2
    assert "no such directory" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ perplexity
def _direct_nll(model, tokens: list[int], seq_len: int) -> tuple[float, int]:
    """Summed NLL of every token but each window's first, from full logits."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(tokens), seq_len):
            window = torch.tensor([tokens[start : start + seq_len]])
            if window.shape[1] < 2:
                continue
            logp = model(window).logits[0, :-1].double().log_softmax(-1)
            total -= float(logp.gather(1, window[0, 1:, None]).sum())
            count += window.shape[1] - 1
    return total, count


def test_ppl_matches_direct_nll_and_prepared_data(checkpoint, files, tmp_path, capsys):
    tok = load_tokenizer(checkpoint)
    model = HybridMoEForCausalLM.from_pretrained(checkpoint).eval()
    docs = files[:3]
    stream = []
    for f in docs:
        with open(f, encoding="utf-8") as fh:
            stream += tok(fh.read(), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    max_tokens, seq_len = 700, 96
    stream = stream[:max_tokens]
    nll, count = _direct_nll(model, stream, seq_len)

    r = evaluate_perplexity(checkpoint, docs, seq_len=seq_len, max_tokens=max_tokens, batch_size=3, model=model,
                            out=str(tmp_path / "ppl.json"), progress=False)  # fmt: skip
    assert r["target_tokens"] == count == max_tokens - math.ceil(max_tokens / seq_len)
    assert r["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert json.loads((tmp_path / "ppl.json").read_text())["perplexity"] == r["perplexity"]
    # Bits per byte: the UTF-8 bytes of the target tokens (each window's first token is not a target).
    nbytes = token_bytes(tok)
    windows = [stream[s : s + seq_len] for s in range(0, len(stream), seq_len)]
    assert r["target_bytes"] == sum(len(tok.decode(w[1:], skip_special_tokens=True).encode()) for w in windows)
    assert r["target_bytes"] == sum(int(nbytes[w[1:]].sum()) for w in map(np.asarray, windows))
    assert r["bits_per_byte"] == pytest.approx(nll / math.log(2) / r["target_bytes"], rel=1e-4)

    # The same documents prepared as token shards give the same tokens, hence the same perplexity (via the CLI).
    prepared = tmp_path / "prepared"
    prepare(docs, checkpoint, prepared, workers=1, progress=False)
    out = tmp_path / "ppl-prepared.json"
    rc = main(["eval", "ppl", checkpoint, str(prepared), "--seq-len", str(seq_len), "--max-tokens", str(max_tokens),
               "--out", str(out)])  # fmt: skip
    assert rc == 0 and "perplexity" in capsys.readouterr().out
    assert json.loads(out.read_text())["perplexity"] == pytest.approx(r["perplexity"], rel=1e-5)
