"""The data pipeline's first stages on tiny generated corpora: reading sources (and counting bad records), training
and loading the tokenizer, and writing token shards in the hybridmoe-tokens-v1 format (integrity, dtype choice,
resumability, determinism across worker counts, the CLI)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from hybridmoe.cli import main
from hybridmoe.data.loader import TokenDataset
from hybridmoe.data.prepare import FORMAT, plan_units, prepare, token_dtype
from hybridmoe.data.sources import (
    BadRecord,
    TooManyBadRecords,
    empty_counts,
    expand_inputs,
    iter_documents,
    split_file,
)
from hybridmoe.data.tokenizer import CHAT_TOKENS, SPECIAL_TOKENS, load_tokenizer, token_id, train_tokenizer

ROUND_TRIP_TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "  leading and trailing spaces  \n\n\ttabs\r\nand CRLF\n",
    "héllo wörld — naïve café, 日本語のテキスト, Ελληνικά, emoji 🙂🚀, zero\u200bwidth",
    'def f(x):\n    return {"a": [x, x ** 2]}  # comment\n\nclass A:\n\tpass\n',
    "control \x00\x01\x7f and lone combining \u0301",
    "literal specials as text: <s> </s> <pad> <|im_start|> <think>",
    " . , ' ll n't  ",
]


def _corpus_docs(n: int = 40) -> list[str]:
    words = ["alpha", "beta", "gamma", "delta", "über", "naïve", "日本", "def", "return", "x = 1"]
    return [" ".join(words[(i * 7 + j) % len(words)] for j in range(5 + i % 11)) + f" #{i}" for i in range(n)]


def _write_jsonl(path, records) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    _write_jsonl(root / "train.jsonl", [{"text": t} for t in _corpus_docs(200) + ROUND_TRIP_TEXTS])
    (root / "code.py").write_text(ROUND_TRIP_TEXTS[3] * 5)
    report = train_tokenizer([root], root / "out", vocab_size=400, min_frequency=1, show_progress=False)
    assert report.documents == 200 + len(ROUND_TRIP_TEXTS) + 1
    assert report.vocab_size == 400
    return str(root / "out")


def _wordlevel_tokenizer(path, vocab_size: int, eos: str | None = "</s>") -> None:
    """An 'existing' HF tokenizer (not ours): word-level, whitespace-split, with ids up to vocab_size - 1."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size - 2)}
    vocab.update({"<unk>": vocab_size - 2, "</s>": vocab_size - 1})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kwargs = {"eos_token": eos} if eos else {}
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **kwargs).save_pretrained(path)


def _read_shards(out_dir) -> tuple[dict, list[np.ndarray]]:
    """manifest and every document's token ids (eod included), in shard order, checking the manifest as it goes."""
    with open(os.path.join(out_dir, "manifest.json")) as fh:
        manifest = json.load(fh)
    assert manifest["format"] == FORMAT
    docs = []
    for shard in manifest["shards"]:
        base = os.path.join(out_dir, shard["name"])
        with open(base + ".bin", "rb") as fb, open(base + ".idx", "rb") as fi:
            raw_bin, raw_idx = fb.read(), fi.read()
        assert hashlib.sha256(raw_bin).hexdigest() == shard["sha256"]["bin"]
        assert hashlib.sha256(raw_idx).hexdigest() == shard["sha256"]["idx"]
        tokens = np.frombuffer(raw_bin, dtype=np.dtype(manifest["dtype"]).newbyteorder("<"))
        idx = np.frombuffer(raw_idx, dtype="<u8")
        assert len(idx) == shard["documents"] + 1 and idx[0] == 0 and idx[-1] == len(tokens) == shard["tokens"]
        for a, b in zip(idx[:-1], idx[1:]):
            doc = tokens[a:b]
            assert len(doc) >= 2 and doc[-1] == manifest["eod_token_id"]
            assert manifest["eod_token_id"] not in doc[:-1]
            docs.append(doc)
    assert manifest["documents"] == len(docs) == sum(s["documents"] for s in manifest["shards"])
    assert manifest["tokens"] == sum(s["tokens"] for s in manifest["shards"])
    return manifest, docs


def _listed_bad_records(directory) -> list[dict]:
    """The entries of bad_records.jsonl in a prepare or tokenizer output directory."""
    with open(os.path.join(directory, "bad_records.jsonl"), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


# --- sources ---


def test_expand_inputs_walks_directories_sorted(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".hidden").mkdir()
    for name in ["b/z.txt", "a.md", "b/c.jsonl", "skip.bin", ".hidden/x.txt", "notes.rst"]:
        (tmp_path / name).write_text("x")
    files = expand_inputs([tmp_path, tmp_path / "a.md"])
    assert files == sorted(str(tmp_path / n) for n in ["a.md", "b/c.jsonl", "b/z.txt"])
    assert str(tmp_path / "notes.rst") in expand_inputs([tmp_path], extensions=["rst"])
    with pytest.raises(ValueError, match="unsupported file type"):
        expand_inputs([tmp_path / "skip.bin"])
    with pytest.raises(ValueError, match="no such file"):
        expand_inputs([tmp_path / "missing.txt"])


def test_bad_records_are_reported_by_reason(tmp_path):
    lines = [
        b'{"text": "good one"}',
        b'{"text": "bad \xff\xfe bytes"}',
        b'{"text": "unterminated',
        b'{"content": "wrong field"}',
        b'{"text": null}',
        b'{"text": 42}',
        b'{"text": ["a"]}',
        b'{"text": "   \\n\\t "}',
        b'{"text": "lone \\ud800 surrogate"}',
        b"",
        b'{"text": "good two"}',
    ]
    (tmp_path / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    records = list(iter_documents(tmp_path / "a.jsonl"))
    assert [r for r in records if isinstance(r, str)] == ["good one", "good two"]
    bad = [(r.line, r.reason) for r in records if isinstance(r, BadRecord)]
    reasons = ["invalid_utf8", "invalid_json", "missing_field", "missing_field", "not_a_string", "not_a_string"]
    assert bad == list(zip(range(2, 11), reasons + ["empty", "invalid_utf8", "empty"]))
    first = records[1]
    assert first.file == str(tmp_path / "a.jsonl") and first.where == f"{first.file}:2"
    assert first.excerpt == '{"text": "bad \\xff\\xfe bytes"}' and "byte 14" in first.detail
    (tmp_path / "b.txt").write_bytes(b"fine\ncaf\xe9 in latin-1\nmore\n")
    (tmp_path / "c.txt").write_text(" \n ")
    [b] = iter_documents(tmp_path / "b.txt")
    assert (b.reason, b.file, b.line) == ("invalid_utf8", str(tmp_path / "b.txt"), 2)
    assert b.excerpt == "caf\\xe9 in latin-1\\nmore"  # from the start of its line, on one line
    assert [(r.reason, r.line) for r in iter_documents(tmp_path / "c.txt")] == [("empty", 1)]


def test_jsonl_parts_cover_the_file_exactly(tmp_path):
    path = tmp_path / "big.jsonl"
    _write_jsonl(path, [{"text": t} for t in _corpus_docs(30)])
    whole = list(iter_documents(path))
    for target in [1, 7, 50, 200, 10_000]:
        parts = split_file(path, target)
        assert sum(n for _, n in parts) == os.path.getsize(path)
        assert [d for span, _ in parts for d in iter_documents(path, span=span)] == whole


# --- tokenizer ---


def test_tokenizer_round_trips_and_keeps_special_tokens(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    for text in ROUND_TRIP_TEXTS + ["", "never seen: Ω≈ç√∫ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \U0010ffff"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    for special in SPECIAL_TOKENS:
        ids = tok(f"a{special}b", add_special_tokens=False)["input_ids"]
        assert (
            tok.convert_tokens_to_ids(special) in ids and len(tok(special, add_special_tokens=False)["input_ids"]) == 1
        )
        assert tok.decode(ids) == f"a{special}b"
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert set(CHAT_TOKENS) <= set(tok.all_special_tokens)
    assert tok("hi")["input_ids"] == tok("hi", add_special_tokens=False)["input_ids"]  # no bos added
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rendered = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered == (  # the Nemotron 3 chat format; reasoning on by default
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n"
    )


def test_token_id_finds_a_token_without_the_vocabulary_dict(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = tok.get_vocab()
    for token in [*CHAT_TOKENS, "<think>", "</s>", next(t for t in vocab if t not in SPECIAL_TOKENS)]:
        assert token_id(tok, token) == vocab[token]
    assert token_id(tok, "<not-a-token>") is None
    tok.add_special_tokens({"unk_token": "<unk>"})  # a tokenizer with an unknown token maps misses to it
    assert tok.convert_tokens_to_ids("<not-a-token>") == tok.unk_token_id
    assert token_id(tok, "<not-a-token>") is None and token_id(tok, "<unk>") == tok.unk_token_id


def test_load_tokenizer_requires_eos(tmp_path, tokenizer_dir):
    assert load_tokenizer(tokenizer_dir).eos_token == "</s>"
    _wordlevel_tokenizer(tmp_path / "no_eos", 10, eos=None)
    with pytest.raises(ValueError, match="no eos token"):
        load_tokenizer(tmp_path / "no_eos")
    with pytest.raises(ValueError, match="not a directory"):
        load_tokenizer(tmp_path / "missing")


# --- prepare ---


def _mixed_inputs(root, bad: bool = False) -> list[str]:
    """Documents in the order prepare reads them: files sorted, lines/rows in order. bad: a bad record in a.jsonl
    (line 3), an empty d.jsonl line (line 6) and an empty e.md."""
    docs = _corpus_docs(30)
    root.mkdir(exist_ok=True)
    _write_jsonl(root / "a.jsonl", [{"text": t} for t in docs[:20]])
    (root / "b.txt").write_text(ROUND_TRIP_TEXTS[2])
    (root / "c.py").write_text(ROUND_TRIP_TEXTS[3])
    _write_jsonl(root / "d.jsonl", [{"text": t} for t in docs[20:]])
    if bad:
        lines = (root / "a.jsonl").read_text().splitlines(keepends=True)
        (root / "a.jsonl").write_text("".join(lines[:2] + ['{"text": [1, 2]}\n'] + lines[2:]))
        lines = (root / "d.jsonl").read_text().splitlines(keepends=True)
        (root / "d.jsonl").write_text("".join(lines[:5] + ["\n"] + lines[5:]))
        (root / "e.md").write_text("")
    return docs[:20] + ROUND_TRIP_TEXTS[2:4] + docs[20:]


def test_shards_decode_to_the_source_documents(tmp_path, tokenizer_dir):
    expected = _mixed_inputs(tmp_path / "in")
    report = prepare(
        [tmp_path / "in"], tokenizer_dir, tmp_path / "out", workers=1, shard_size_bytes=400, progress=False
    )
    manifest, docs = _read_shards(tmp_path / "out")
    assert len(manifest["shards"]) > 3 and report.shards_written == len(manifest["shards"])
    assert manifest["dtype"] == "uint16" and manifest["vocab_size"] == 400
    assert manifest["documents"] == len(expected) and sum(manifest["bad_records"].values()) == 0
    assert manifest["sources"] == expand_inputs([tmp_path / "in"])
    assert [s["name"] for s in manifest["shards"]] == [f"shard-{i:05d}" for i in range(len(manifest["shards"]))]
    tok = load_tokenizer(tokenizer_dir)
    assert [tok.decode(d[:-1].tolist()) for d in docs] == expected


def test_literal_special_tokens_in_text_cannot_forge_end_of_document(tmp_path, tokenizer_dir):
    text = "before </s> after <|im_start|>user"
    _write_jsonl(tmp_path / "a.jsonl", [{"text": text}])
    prepare([tmp_path / "a.jsonl"], tokenizer_dir, tmp_path / "out", workers=1, progress=False)
    _, docs = _read_shards(tmp_path / "out")  # asserts eod appears only at the end
    assert load_tokenizer(tokenizer_dir).decode(docs[0][:-1].tolist()) == text


def test_token_dtype_and_an_existing_tokenizer_with_a_large_vocab(tmp_path):
    assert token_dtype(65536) == "uint16" and token_dtype(65537) == "uint32"
    _wordlevel_tokenizer(tmp_path / "big_tok", 70_000)
    docs = ["w1 w2 w69997", "w65536 w0", "w3"]
    _write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in docs])
    prepare([tmp_path / "a.jsonl"], tmp_path / "big_tok", tmp_path / "out", workers=1, progress=False)
    manifest, shard_docs = _read_shards(tmp_path / "out")
    assert manifest["dtype"] == "uint32" and manifest["vocab_size"] == 70_000 and manifest["eod_token_id"] == 69_999
    expected = [[int(w[1:]) for w in d.split()] + [69_999] for d in docs]
    assert [d.tolist() for d in shard_docs] == expected


def test_prepare_counts_bad_records_and_keeps_the_good(tmp_path, tokenizer_dir):
    lines = [b'{"text": "keep me"}', b"\xff\xfe", b"{not json", b'{"x": 1}', b'{"text": 5}', b'{"text": " "}']
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "in" / "b.txt").write_bytes(b"\xc3\x28")
    (tmp_path / "in" / "c.md").write_text("keep me too")
    out = tmp_path / "out"
    # 6 bad records of 8: above the default max_bad_fraction (1%), so it fails, but only after writing everything.
    with pytest.raises(TooManyBadRecords, match=r"6 of 8 records are bad \(75\.00%\), above --max-bad-fraction 0\.01"):
        prepare([tmp_path / "in"], tokenizer_dir, out, workers=1, progress=False)
    manifest, docs = _read_shards(out)
    expect = {"invalid_utf8": 2, "invalid_json": 1, "missing_field": 1, "not_a_string": 1, "empty": 1}
    assert manifest["bad_records"] == {**empty_counts(), **expect}
    tok = load_tokenizer(tokenizer_dir)
    assert [tok.decode(d[:-1].tolist()) for d in docs] == ["keep me", "keep me too"]
    bad = _listed_bad_records(out)
    a, b = str(tmp_path / "in" / "a.jsonl"), str(tmp_path / "in" / "b.txt")
    assert [(e["file"], e["line"], e["reason"]) for e in bad] == [
        (a, 2, "invalid_utf8"), (a, 3, "invalid_json"), (a, 4, "missing_field"), (a, 5, "not_a_string"),
        (a, 6, "empty"), (b, 1, "invalid_utf8"),
    ]  # fmt: skip
    assert all(e["detail"] and e["excerpt"] for e in bad)

    report = prepare([tmp_path / "in"], tokenizer_dir, out, workers=1, progress=False, max_bad_fraction=0.75)
    assert report.manifest == manifest and report.shards_reused == len(manifest["shards"])
    summary = report.summary()
    assert "6 of 8 (75.00%, limit 75.00%)" in summary and str(out / "bad_records.jsonl") in summary
    assert f"{a}:3: Expecting property name" in summary and f"{b}:1: invalid" in summary
    with pytest.raises(ValueError, match=r"max_bad_fraction \(--max-bad-fraction\) must be in \[0, 1\]"):
        prepare([tmp_path / "in"], tokenizer_dir, out, workers=1, progress=False, max_bad_fraction=1.5)

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.jsonl").write_bytes(b"\n".join(lines[1:]) + b"\n")
    with pytest.raises(ValueError, match="no documents"):
        prepare([tmp_path / "bad"], tokenizer_dir, tmp_path / "out2", workers=1, progress=False)
    assert not (tmp_path / "out2" / "manifest.json").exists()


def test_parquet_input_split_by_row_groups(tmp_path, tokenizer_dir):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    docs = _corpus_docs(40)
    # Row 20 holds bytes that are not UTF-8 in a string column (pyarrow writes them unchecked; reading them raises).
    raw = pa.array([t.encode() for t in docs[:20]] + [b"\xff\xfe"] + [t.encode() for t in docs[20:]] + [None, b"  "])
    body = pa.Array.from_buffers(pa.string(), len(raw), raw.buffers())
    pq.write_table(pa.table({"id": list(range(43)), "body": body}), tmp_path / "a.parquet", row_group_size=8)
    size = os.path.getsize(tmp_path / "a.parquet")
    assert len(split_file(tmp_path / "a.parquet", size // 3)) > 1
    report = prepare(
        [tmp_path], tokenizer_dir, tmp_path / "out", field="body", workers=1, shard_size_bytes=size // 3,
        progress=False, max_bad_fraction=0.1,
    )  # fmt: skip
    manifest, shard_docs = _read_shards(tmp_path / "out")
    assert len(manifest["shards"]) > 1 and manifest["field"] == "body"
    tok = load_tokenizer(tokenizer_dir)
    assert [tok.decode(d[:-1].tolist()) for d in shard_docs] == docs
    bad = _listed_bad_records(tmp_path / "out")
    assert [(e["row"], e["reason"]) for e in bad] == [(20, "invalid_utf8"), (41, "missing_field"), (42, "empty")]
    assert bad[0]["excerpt"] == "\\xff\\xfe" and "line" not in bad[0]
    assert f"{tmp_path / 'a.parquet'} row 20: invalid start byte" in report.summary()
    with pytest.raises(ValueError, match="no column 'text'.*--field"):
        prepare([tmp_path / "a.parquet"], tokenizer_dir, tmp_path / "out3", workers=1, progress=False)


def _shard_mtimes(out_dir) -> dict[str, int]:
    return {n: os.stat(os.path.join(out_dir, n)).st_mtime_ns for n in os.listdir(out_dir) if n.startswith("shard-")}


def test_rerun_reuses_finished_shards_and_redoes_damaged_ones(tmp_path, tokenizer_dir):
    _mixed_inputs(tmp_path / "in")
    out = tmp_path / "out"

    def run():
        return prepare([tmp_path / "in"], tokenizer_dir, out, workers=1, shard_size_bytes=400, progress=False)

    first = run()
    n = len(first.manifest["shards"])
    before = _shard_mtimes(out)
    again = run()
    assert (again.shards_written, again.shards_reused) == (0, n)
    assert _shard_mtimes(out) == before and again.manifest == first.manifest

    os.unlink(out / "shard-00000.bin")
    with open(out / "shard-00001.idx", "r+b") as fh:
        fh.truncate(8)
    (out / "shard-00002.json").write_text("{ half written")
    (out / ".shard-00003.bin.abc.tmp").write_bytes(b"leftover of a killed run")
    redo = run()
    assert (redo.shards_written, redo.shards_reused) == (3, n - 3)
    after = _shard_mtimes(out)
    assert all(after[k] == before[k] for k in before if k[:11] not in ("shard-00000", "shard-00001", "shard-00002"))
    assert redo.manifest == first.manifest
    assert not any(name.endswith(".tmp") for name in os.listdir(out))
    _read_shards(out)

    with open(tmp_path / "in" / "d.jsonl", "a") as fh:  # a changed input redoes only its shards
        fh.write(json.dumps({"text": "one more"}) + "\n")
    changed = run()
    assert 0 < changed.shards_written < n and changed.manifest["documents"] == first.manifest["documents"] + 1

    # A shard damaged after the fact fails the loader's checksum; deleting it and re-running rebuilds it.
    damaged = bytearray((out / "shard-00000.bin").read_bytes())
    damaged[0] ^= 1
    (out / "shard-00000.bin").write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match=r"corrupt or changed.*shard-00000\.bin"):
        TokenDataset(out)
    os.unlink(out / "shard-00000.bin")
    assert run().shards_written == 1
    assert TokenDataset(out).num_documents == changed.manifest["documents"]


def test_worker_count_does_not_change_the_shards(tmp_path, tokenizer_dir):
    _mixed_inputs(tmp_path / "in", bad=True)
    units = plan_units(expand_inputs([tmp_path / "in"]), 600)
    assert len(units) >= 3
    outputs = {}
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        prepare([tmp_path / "in"], tokenizer_dir, out, workers=workers, shard_size_bytes=600, progress=False,
                max_bad_fraction=0.1)  # fmt: skip
        outputs[workers] = {n: (out / n).read_bytes() for n in sorted(os.listdir(out)) if n != "manifest.json"}
    assert outputs[1] == outputs[2]
    # The bad records came back from the worker processes with their place in each file.
    bad = [(os.path.basename(e["file"]), e["line"], e["reason"]) for e in _listed_bad_records(tmp_path / "out2")]
    assert bad == [("a.jsonl", 3, "not_a_string"), ("d.jsonl", 6, "empty"), ("e.md", 1, "empty")]


def test_cli_trains_a_tokenizer_and_prepares_shards(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    _write_jsonl(tmp_path / "in" / "a.jsonl", [{"content": t} for t in _corpus_docs(30)])
    tok_dir, out = str(tmp_path / "tok"), str(tmp_path / "out")
    args = [
        "tokenizer",
        "train",
        str(tmp_path / "in"),
        "--output",
        tok_dir,
        "--vocab-size",
        "300",
        "--field",
        "content",
    ]
    assert main(args + ["--min-frequency", "1"]) == 0
    assert "trained on 30 documents" in capsys.readouterr().out
    args = ["prepare", str(tmp_path / "in"), "--tokenizer", tok_dir, "--output", out, "--field", "content"]
    assert main(args + ["--workers", "1", "--shard-size-mb", "0.001"]) == 0
    assert "30 documents" in capsys.readouterr().out
    manifest, _ = _read_shards(out)
    assert len(manifest["shards"]) > 1 and manifest["vocab_size"] == 300
    assert main(["prepare", str(tmp_path / "in"), "--tokenizer", tok_dir, "--output", out]) == 2  # field "text"
    assert "no documents" in capsys.readouterr().err


def test_cli_max_bad_fraction_fails_the_run_after_writing_everything(tmp_path, capsys):
    lines = [json.dumps({"text": t}) for t in _corpus_docs(30)]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text("\n".join(lines[:10] + ["{x", '{"text": 1}'] + lines[10:]) + "\n")
    a, tok_dir, out = str(tmp_path / "in" / "a.jsonl"), str(tmp_path / "tok"), str(tmp_path / "out")
    message = "2 of 32 records are bad (6.25%), above --max-bad-fraction 0.01 (1.00%)"
    train = ["tokenizer", "train", str(tmp_path / "in"), "--output", tok_dir, "--vocab-size", "300"]
    assert main(train) == 2
    captured = capsys.readouterr()
    assert message in captured.err and os.path.join(tok_dir, "bad_records.jsonl") in captured.err
    assert f"{a}:11: Expecting property name" in captured.out and f"{a}:12: 'text' is a int" in captured.out
    assert load_tokenizer(tok_dir).eos_token == "</s>"  # saved all the same
    assert main(train + ["--max-bad-fraction", "0.0625"]) == 0  # at the limit is within it

    prepare_args = ["prepare", str(tmp_path / "in"), "--tokenizer", tok_dir, "--output", out, "--workers", "1"]
    assert main(prepare_args) == 2
    captured = capsys.readouterr()
    assert message in captured.err and os.path.join(out, "bad_records.jsonl") in captured.err
    assert f"{a}:11: Expecting property name" in captured.out
    manifest, _ = _read_shards(out)
    assert manifest["documents"] == 30
    assert [(e["line"], e["reason"]) for e in _listed_bad_records(out)] == [(11, "invalid_json"), (12, "not_a_string")]
    assert main(prepare_args + ["--max-bad-fraction", "0.1"]) == 0


# --- one record never stops a run ---

_HUGE_INT = "1" * 5000  # Python's int() refuses more than 4300 digits (sys.get_int_max_str_digits)


def _deep(depth: int) -> str:
    return '{"text": ' + "[" * depth + "]" * depth + "}"


# (bad line, whether its text survives as a document, reason when it does not)
ONE_BAD_LINE = {
    "huge_int_elsewhere": ('{"id": ' + _HUGE_INT + ', "text": "big id, good text"}', True, None),
    "huge_int_as_text": ('{"text": ' + _HUGE_INT + "}", False, "not_a_string"),
    "deep_200k": (_deep(200_000), False, "too_deep"),
    "deep_1m": (_deep(1_000_000), False, "too_deep"),
}


@pytest.mark.parametrize("case", sorted(ONE_BAD_LINE))
def test_one_bad_record_never_stops_tokenizer_train_or_prepare(tmp_path, capsys, case):
    line, kept, reason = ONE_BAD_LINE[case]
    good = [json.dumps({"text": t}) for t in _corpus_docs(150)]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text("\n".join(good[:100] + [line] + good[100:]) + "\n")
    tok_dir, out = str(tmp_path / "tok"), str(tmp_path / "out")
    assert main(["tokenizer", "train", str(tmp_path / "in"), "--output", tok_dir, "--vocab-size", "300"]) == 0
    assert main(["prepare", str(tmp_path / "in"), "--tokenizer", tok_dir, "--output", out, "--workers", "1"]) == 0
    manifest, docs = _read_shards(out)
    assert manifest["documents"] == 150 + kept
    if kept:
        assert load_tokenizer(tok_dir).decode(docs[100][:-1].tolist()) == "big id, good text"
    a = str(tmp_path / "in" / "a.jsonl")
    for where in (tok_dir, out):
        bad = _listed_bad_records(where)
        assert [(b["file"], b["line"], b["reason"]) for b in bad] == ([] if kept else [(a, 101, reason)])
    if not kept:
        assert f"    {reason}: 1\n      {a}:101: " in capsys.readouterr().out


def test_deep_nesting_cannot_crash_the_process_even_with_a_raised_recursion_limit(tmp_path):
    # Python's JSON parser recurses per level: with the recursion limit raised, 1M levels overflow the C stack.
    (tmp_path / "deep.jsonl").write_text(_deep(1_000_000) + "\n" + '{"text": "after"}\n')
    code = (
        "import sys; sys.setrecursionlimit(10**8); from hybridmoe.data.sources import iter_documents; "
        "print([getattr(r, 'reason', r) for r in iter_documents(sys.argv[1])])"
    )
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "deep.jsonl")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "['too_deep', 'after']"


def test_bad_records_keep_their_line_across_parts_and_reruns(tmp_path, tokenizer_dir):
    lines = [json.dumps({"text": t}) for t in _corpus_docs(60)]
    bad_at = {7: "{oops", 23: '{"text": 5}', 41: '{"text": "x", "y": ' + "[" * 2000 + "]" * 2000 + "}", 59: " "}
    for line_no, bad in sorted(bad_at.items()):
        lines.insert(line_no - 1, bad)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"

    def run():
        return prepare([tmp_path / "in"], tokenizer_dir, out, workers=1, shard_size_bytes=700, progress=False,
                       max_bad_fraction=0.1)  # fmt: skip

    first = run()
    assert len(split_file(tmp_path / "in" / "a.jsonl", 700)) >= 4  # the bad lines are read by different shards
    listed = (out / "bad_records.jsonl").read_text()
    bad = _listed_bad_records(out)
    assert [(e["line"], e["reason"]) for e in bad] == list(
        zip(bad_at, ["invalid_json", "not_a_string", "too_deep", "empty"])
    )
    assert all(e["file"] == str(tmp_path / "in" / "a.jsonl") for e in bad)
    assert first.manifest["documents"] == 60

    os.unlink(out / "shard-00001.json")  # one shard redone, the others reused: the same list
    again = run()
    assert again.shards_written == 1 and again.shards_reused == len(first.manifest["shards"]) - 1
    assert (out / "bad_records.jsonl").read_text() == listed
    assert again.summary() == first.summary().replace(f"({len(first.manifest['shards'])} written, 0 reused)",
                                                      f"(1 written, {again.shards_reused} reused)")  # fmt: skip
