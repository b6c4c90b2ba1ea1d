"""Perplexity and bits per byte of a checkpoint on a corpus.

Data is either raw documents (text / JSON lines / Parquet files or directories, read with `data/sources.py`; each
document is tokenized with the checkpoint's tokenizer and followed by eos, exactly as `hybridmoe prepare` writes
them) or a directory prepared by `hybridmoe prepare` (its manifest must name the checkpoint's tokenizer).

The token stream, documents in order, is cut into consecutive windows of `seq_len` tokens (the last may be
shorter); within each window every token but the first is a target, as in the trainer's validation (no document
masking: Nemotron 3 pretrains on plain eos-separated sequences). The loss is computed in chunks over the vocabulary
(`return_logits=False`), so long windows never hold (T, V) logits.

    perplexity    = exp(total NLL / target tokens)
    bits per byte = total NLL / ln 2 / UTF-8 bytes of the target tokens

Bytes per token are exact for byte-level BPE tokenizers (ours: a token's string has one character per byte);
other tokenizers get the byte length of each token decoded on its own. Special tokens count zero bytes.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from collections.abc import Iterator

import numpy as np
import torch

from ..data.loader import MANIFEST_NAME, TokenDataset
from ..data.sources import count_bad, empty_counts, expand_inputs, iter_documents
from ..data.tokenizer import load_tokenizer, tokenizer_fingerprint, vocab_size_of


def token_bytes(tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for (0 for special tokens)."""
    size = vocab_size_of(tokenizer)
    special = set(tokenizer.all_special_ids)
    pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    byte_level = backend is not None and type(backend.decoder).__name__ == "ByteLevel"
    out = np.zeros(size, dtype=np.int64)
    for i, piece in enumerate(pieces):
        if i in special or piece is None:
            continue
        out[i] = len(piece) if byte_level else len(tokenizer.decode([i]).encode("utf-8"))
    return out


def _document_tokens(
    data: list[str], tokenizer, field: str, split: str, bad: dict, verify: bool = True
) -> Iterator[np.ndarray]:
    """Each document's token ids, its final eos included."""
    prepared = [d for d in data if os.path.isfile(os.path.join(d, MANIFEST_NAME))]
    if prepared and len(data) > 1:
        raise ValueError(f"{prepared[0]} is a prepared token directory: pass it alone, not with other data")
    if prepared:
        ds = TokenDataset(data[0], val_fraction=0.01 if split != "all" else 0.0, verify=verify)
        _check_prepared_tokenizer(ds, tokenizer)
        indices = range(ds.num_documents) if split == "all" else ds.documents(split)
        for i in indices:
            yield np.asarray(ds.document(int(i)), dtype=np.int64)
        return
    if split != "all":
        raise ValueError("--split applies to prepared token directories; raw documents are read whole")
    eos = tokenizer.eos_token_id
    for path in expand_inputs(data):
        for text in count_bad(iter_documents(path, field), bad):
            yield np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"] + [eos], dtype=np.int64)


def _check_prepared_tokenizer(ds: TokenDataset, tokenizer) -> None:
    """The shards' ids must mean what the checkpoint's tokenizer says (the manifest names the tokenizer directory)."""
    problem = None
    if ds.eod_token_id != tokenizer.eos_token_id or ds.vocab_size > vocab_size_of(tokenizer):
        problem = f"eod {ds.eod_token_id} and vocabulary {ds.vocab_size} vs eos {tokenizer.eos_token_id} and " \
                  f"vocabulary {vocab_size_of(tokenizer)}"  # fmt: skip
    elif ds.tokenizer and os.path.isdir(ds.tokenizer):
        theirs = tokenizer_fingerprint(load_tokenizer(ds.tokenizer))
        if theirs != tokenizer_fingerprint(tokenizer):
            problem = f"{ds.tokenizer} is not the checkpoint's tokenizer"
    if problem:
        raise ValueError(
            f"{ds.path} was prepared with another tokenizer than the checkpoint's ({problem}); re-run "
            "`hybridmoe prepare` with the checkpoint's tokenizer"
        )


def _windows(docs: Iterator[np.ndarray], seq_len: int, max_tokens: int | None) -> Iterator[np.ndarray]:
    """Consecutive windows of seq_len tokens over the concatenated documents, at most max_tokens in all."""
    buf, filled, total = np.empty(seq_len, dtype=np.int64), 0, 0
    for tokens in docs:
        if max_tokens is not None:
            tokens = tokens[: max_tokens - total]
        total += len(tokens)
        pos = 0
        while pos < len(tokens):
            take = min(seq_len - filled, len(tokens) - pos)
            buf[filled : filled + take] = tokens[pos : pos + take]
            filled, pos = filled + take, pos + take
            if filled == seq_len:
                yield buf.copy()
                filled = 0
        if max_tokens is not None and total >= max_tokens:
            break
    if filled > 1:  # a one-token window has no target
        yield buf[:filled].copy()


@torch.no_grad()
def window_nll(model, windows_BT: torch.Tensor) -> float:
    """Summed next-token NLL (nats) of a batch of windows: every token but each window's first is a target."""
    out = model(windows_BT, labels=windows_BT, return_logits=False)
    return float(out.lm_loss) * windows_BT.shape[0] * (windows_BT.shape[1] - 1)


def evaluate_perplexity(
    checkpoint: str,
    data: str | list[str],
    seq_len: int = 2048,
    max_tokens: int | None = None,
    batch_size: int = 1,
    field: str = "text",
    split: str = "all",
    out: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    model=None,
    progress: bool = True,
    verify: bool = True,
) -> dict:
    """Perplexity (and bits per byte) of `checkpoint` on `data`; the result is also written to `out` as JSON.

    model: an already loaded model to use instead of loading the checkpoint's (its tokenizer is still read there).
    verify: check a prepared directory's shards against their sha256 (data.loader.verify_shards).
    """
    from tqdm import tqdm

    from ..utils import atomic_write_text

    if seq_len < 2:
        raise ValueError(f"--seq-len must be >= 2, got {seq_len}")
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"--max-tokens must be >= 2, got {max_tokens}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if split not in ("all", "train", "val"):
        raise ValueError(f"--split must be all, train or val, got {split!r}")
    checkpoint = os.path.abspath(checkpoint)
    if not os.path.isdir(checkpoint):
        raise ValueError(f"checkpoint {checkpoint}: no such directory; pass a Hugging Face model directory")
    data = [data] if isinstance(data, str) else list(data)
    tokenizer = load_tokenizer(checkpoint)
    if model is None:
        from ..serve.load import load_model

        model, _ = load_model(checkpoint, device=device, dtype=dtype)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()

    nbytes = token_bytes(tokenizer)
    bad = empty_counts()
    nll = 0.0
    targets = target_bytes = windows = 0
    t0 = time.perf_counter()
    stream = _windows(_document_tokens(data, tokenizer, field, split, bad, verify), seq_len, max_tokens)
    bar = tqdm(desc="ppl", unit="tok", unit_scale=True, total=max_tokens, disable=not progress or None)
    try:
        batch: list[np.ndarray] = []
        for window in itertools.chain(stream, [None]):  # None flushes the last batch
            if window is not None and (not batch or len(window) == len(batch[0])) and len(batch) < batch_size:
                batch.append(window)
                continue
            if batch:
                ids = torch.from_numpy(np.stack(batch)).to(device)
                nll += window_nll(model, ids)
                targets += ids.shape[0] * (ids.shape[1] - 1)
                target_bytes += int(nbytes[np.stack(batch)[:, 1:]].sum())
                windows += len(batch)
                bar.update(ids.numel())
            batch = [window] if window is not None else []
    finally:
        bar.close()
        model.train(was_training)
    if targets == 0:
        raise ValueError(f"no tokens to evaluate in {data} (bad records: {bad}); give documents with text in them")
    result = {
        "checkpoint": checkpoint,
        "data": [os.path.abspath(d) for d in data],
        "seq_len": seq_len,
        "windows": windows,
        "target_tokens": targets,
        "target_bytes": target_bytes,
        "loss": nll / targets,
        "perplexity": math.exp(nll / targets),
        "bits_per_byte": nll / math.log(2) / target_bytes if target_bytes else None,
        "bad_records": bad,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    out = out or os.path.join("eval", f"ppl-{os.path.basename(checkpoint)}-{_name(data)}-{seq_len}.json")
    atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    result["out"] = os.path.abspath(out)
    return result


def _name(data: list[str]) -> str:
    base = os.path.basename(os.path.normpath(data[0]))
    return os.path.splitext(base)[0] + (f"+{len(data) - 1}" if len(data) > 1 else "")
