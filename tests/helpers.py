"""Helpers shared by the tests: tiny prepared token directories written directly in the `hybridmoe prepare` format."""

import hashlib
import json
from pathlib import Path

import numpy as np

from hybridmoe.data.loader import FORMAT

EOD = 0
VOCAB = 1 << 20


def write_prepared(path, docs, shard_docs=None, dtype="uint32", eod=EOD, vocab=None, tokenizer="test-tok"):
    """Write `docs` (token lists without eod) as a prepared directory; shard_docs: documents per shard."""
    vocab = vocab or (1 << 16 if dtype == "uint16" else VOCAB)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shard_docs = shard_docs or [len(docs)]
    assert sum(shard_docs) == len(docs)
    shards, start = [], 0
    for s, n in enumerate(shard_docs):
        pieces = [np.asarray([*doc, eod]) for doc in docs[start : start + n]]
        tokens = np.concatenate(pieces or [np.empty(0)]).astype(f"<u{2 if dtype == 'uint16' else 4}")
        idx = np.concatenate([[0], np.cumsum([len(p) for p in pieces])]).astype("<u8")
        name = f"shard-{s:05d}"
        (path / f"{name}.bin").write_bytes(tokens.tobytes())
        (path / f"{name}.idx").write_bytes(idx.tobytes())
        sha = {ext: hashlib.sha256((path / f"{name}.{ext}").read_bytes()).hexdigest() for ext in ("bin", "idx")}
        shards.append({"name": name, "documents": n, "tokens": len(tokens), "sources": ["synthetic"], "sha256": sha})
        start += n
    manifest = {
        "format": FORMAT,
        "dtype": dtype,
        "vocab_size": vocab,
        "eod_token_id": eod,
        "tokenizer": tokenizer,
        "field": "text",
        "sources": ["synthetic"],
        "documents": len(docs),
        "tokens": sum(s["tokens"] for s in shards),
        "bad_records": {},
        "shards": shards,
    }
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path
