"""Turning documents into token shards (format `hybridmoe-tokens-v1`), in parallel, atomically and resumably.

On disk, in the output directory:
- `shard-NNNNN.bin`: little-endian token ids, `uint16` when vocab_size <= 65536 else `uint32`; every document's
  tokens are followed by `eod_token_id` (the tokenizer's eos). No bos is added.
- `shard-NNNNN.idx`: little-endian `uint64`, documents + 1 values: the token offset where each document starts in
  the .bin, then the shard's token count.
- `shard-NNNNN.bad.jsonl` (only when its inputs held bad records): one JSON object per bad record (see
  sources.BadRecord) plus "piece", the index of the input piece it came from; lines are counted from the start of
  that piece (a worker reading the second part of a file does not know how many lines the first part holds).
- `shard-NNNNN.json`: the shard's manifest entry, its bad-record counts, the number of records read from each piece
  and the fingerprint of its inputs; it is written after the other three, so it marks a finished shard that a rerun
  with the same inputs can reuse.
- `bad_records.jsonl`: every bad record of every shard (reused ones too), with its file and line in the whole file
  (or Parquet row), reason, detail and excerpt.
- `manifest.json`: written last; format, dtype, vocab_size, eod_token_id, tokenizer, field, sources, documents,
  tokens, bad_records (per reason, over all shards) and one entry per shard (name, documents, tokens, sources,
  sha256 of .bin and .idx). A shard whose inputs held no usable document is left out of the list.

No record stops the run (see sources.py); when more than `max_bad_fraction` of the records are bad, everything is
still written and then `prepare` raises TooManyBadRecords (the CLI exits non-zero).

Inputs are cut into work units deterministically (sorted files, big JSON-lines/Parquet files split into parts,
parts packed greedily up to shard_size_bytes of input); unit i becomes shard i. Literal special-token strings in
raw text (a "</s>" in a web page) are tokenized as plain text, so a document can never forge an end-of-document.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import multiprocessing
import os
import re
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field

import numpy as np

from ..utils import atomic_write, atomic_write_text
from .sources import (
    BAD_RECORDS_FILE,
    BadRecord,
    BadRecordLog,
    bad_records_summary,
    check_bad_fraction,
    check_max_bad_fraction,
    expand_inputs,
    iter_documents,
    merge_counts,
    split_file,
)
from .tokenizer import load_tokenizer, tokenizer_fingerprint, vocab_size_of

FORMAT = "hybridmoe-tokens-v1"
MANIFEST = "manifest.json"
_SHARD_FILE = re.compile(r"^shard-\d{5}\.(bin|idx|json|bad\.jsonl)$")
_TMP_FILE = re.compile(r"^\.(shard-\d{5}\.(bin|idx|json|bad\.jsonl)|manifest\.json|bad_records\.jsonl)\..*\.tmp$")
_BATCH_DOCS = 512
_BATCH_CHARS = 4 * 2**20


@dataclass(frozen=True)
class Piece:
    """A whole file (span None) or part of one (see sources.split_file), with its size in input bytes."""

    path: str
    span: tuple[int, int] | None
    nbytes: int


@dataclass(frozen=True)
class _Job:
    name: str
    pieces: tuple[Piece, ...]
    field: str
    output_dir: str
    dtype: str
    eod_token_id: int
    fingerprint: dict


@dataclass
class PrepareReport:
    """What prepare did: the manifest it wrote, and how many shards it wrote anew or reused from an earlier run."""

    manifest_path: str
    manifest: dict
    shards_written: int
    shards_reused: int
    empty_units: list[str] = field(default_factory=list)
    bad_records_path: str = ""
    bad_examples: dict[str, list[dict]] = field(default_factory=dict)  # the first few of each reason
    max_bad_fraction: float = 0.01

    def summary(self) -> str:
        m = self.manifest
        records = m["documents"] + sum(m["bad_records"].values())
        lines = [
            f"{self.manifest_path}: {m['documents']:,} documents, {m['tokens']:,} tokens ({m['dtype']}) "
            f"in {len(m['shards'])} shards ({self.shards_written} written, {self.shards_reused} reused)",
            bad_records_summary(
                m["bad_records"], self.bad_examples, records, self.bad_records_path, self.max_bad_fraction
            ),
        ]
        if self.empty_units:
            lines.append(f"  no usable documents, left out of the manifest: {', '.join(self.empty_units)}")
        return "\n".join(lines)


def plan_units(files: list[str], shard_size_bytes: int) -> list[tuple[Piece, ...]]:
    """Group files (in the given order) into units of at most ~shard_size_bytes of input, splitting big files."""
    if shard_size_bytes <= 0:
        raise ValueError(f"shard_size_bytes must be positive, got {shard_size_bytes}")
    units, current, size = [], [], 0
    for path in files:
        for span, nbytes in split_file(path, shard_size_bytes):
            if current and size + nbytes > shard_size_bytes:
                units.append(tuple(current))
                current, size = [], 0
            current.append(Piece(path, span, nbytes))
            size += nbytes
    if current:
        units.append(tuple(current))
    return units


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def prepare(
    inputs: Iterable[str | os.PathLike],
    tokenizer: str | os.PathLike,
    output_dir: str | os.PathLike,
    field: str = "text",
    workers: int = 2,
    shard_size_bytes: int = 64 * 2**20,
    progress: bool = True,
    *,
    extensions: Iterable[str] | None = None,
    max_bad_fraction: float = 0.01,
) -> PrepareReport:
    """Tokenize the documents of `inputs` with the tokenizer directory `tokenizer` into shards in `output_dir`.

    Bad records are skipped and listed in `output_dir/bad_records.jsonl`; when more than `max_bad_fraction` of all
    records are bad, the shards and manifest are still written, then TooManyBadRecords (a ValueError carrying the
    report) is raised.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    check_max_bad_fraction(max_bad_fraction)
    output_dir = os.path.abspath(output_dir)
    tokenizer_path = os.path.abspath(tokenizer)
    files = [f for f in expand_inputs(inputs, extensions) if not f.startswith(output_dir + os.sep)]
    if not files:
        raise ValueError(f"no input files outside the output directory {output_dir}")
    tok = load_tokenizer(tokenizer_path)
    vocab_size = vocab_size_of(tok)
    dtype = token_dtype(vocab_size)
    jobs = _plan_jobs(files, tok, dtype, output_dir, field, shard_size_bytes)

    os.makedirs(output_dir, exist_ok=True)
    _remove_leftovers(output_dir, {job.name for job in jobs})
    records = {job.name: _finished_shard(job) for job in jobs}
    todo = [job for job in jobs if records[job.name] is None]
    for job in todo:
        _remove_if_exists(os.path.join(output_dir, f"{job.name}.json"))
        _remove_if_exists(os.path.join(output_dir, f"{job.name}.bad.jsonl"))
    for record in _run(todo, tok, tokenizer_path, workers, progress):
        records[record["entry"]["name"]] = record

    manifest = _manifest(jobs, records, files, tokenizer_path, field, vocab_size, dtype, tok.eos_token_id)
    bad_path = os.path.join(output_dir, BAD_RECORDS_FILE)
    with BadRecordLog() as log:
        for entry in _bad_records(jobs, records):
            log.add(entry)
        log.save(bad_path)
    bad = sum(manifest["bad_records"].values())
    if manifest["documents"] == 0:
        raise ValueError(
            f"no documents in {len(files)} input files ({bad:,} bad records: {manifest['bad_records']}, listed in "
            f"{bad_path}); check the inputs and that field {field!r} names the text"
        )
    manifest_path = os.path.join(output_dir, MANIFEST)
    atomic_write_text(manifest_path, json.dumps(manifest, indent=1) + "\n")
    empty = [job.name for job in jobs if records[job.name]["entry"]["documents"] == 0]
    report = PrepareReport(
        manifest_path, manifest, len(todo), len(jobs) - len(todo), empty, bad_path, log.examples, max_bad_fraction
    )
    check_bad_fraction(bad, manifest["documents"] + bad, max_bad_fraction, bad_path, report)
    return report


def _plan_jobs(files, tok, dtype: str, output_dir: str, field: str, shard_size_bytes: int) -> list[_Job]:
    """One job per work unit; unit i writes shard i. The fingerprint says what a finished shard was made from."""
    common = {
        "format": FORMAT,
        "field": field,
        "tokenizer": tokenizer_fingerprint(tok),
        "dtype": dtype,
        "eod_token_id": tok.eos_token_id,
    }
    return [
        _Job(f"shard-{i:05d}", unit, field, output_dir, dtype, tok.eos_token_id, _unit_fingerprint(unit, common))
        for i, unit in enumerate(plan_units(files, shard_size_bytes))
    ]


def _unit_fingerprint(unit: tuple[Piece, ...], common: dict) -> dict:
    inputs = []
    for piece in unit:
        st = os.stat(piece.path)
        span = list(piece.span) if piece.span is not None else None
        inputs.append({"path": piece.path, "span": span, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return {**common, "inputs": inputs}


def _remove_if_exists(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _remove_leftovers(output_dir: str, names: set[str]) -> None:
    """Drop the old manifest (it is rewritten last, so it never describes half-redone shards), temporary files of
    an interrupted run, and shards beyond this run's units."""
    _remove_if_exists(os.path.join(output_dir, MANIFEST))
    for entry in os.listdir(output_dir):
        stale_shard = _SHARD_FILE.match(entry) and entry.split(".", 1)[0] not in names
        if stale_shard or _TMP_FILE.match(entry):
            _remove_if_exists(os.path.join(output_dir, entry))


def _finished_shard(job: _Job) -> dict | None:
    """The shard's record when an earlier run finished it from the same inputs and its files have the right sizes
    (and its list of bad records is there, when it has any)."""
    base = os.path.join(job.output_dir, job.name)
    try:
        with open(f"{base}.json") as fh:
            record = json.load(fh)
        entry = record["entry"]
        if record["fingerprint"] != job.fingerprint or len(record["records"]) != len(job.pieces):
            return None
        itemsize = np.dtype(job.dtype).itemsize
        files_ok = (
            os.path.getsize(f"{base}.bin") == entry["tokens"] * itemsize
            and os.path.getsize(f"{base}.idx") == (entry["documents"] + 1) * 8
            and (sum(record["bad_records"].values()) == 0 or os.path.isfile(f"{base}.bad.jsonl"))
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return record if files_ok else None


def _bad_records(jobs: list[_Job], records: dict[str, dict]) -> Iterator[dict]:
    """Every shard's bad records in input order, lines numbered in the whole file: a piece's lines start after
    those of the earlier pieces of its file (which are earlier in the plan, each with its record count)."""
    lines_before: dict[str, int] = {}
    for job in jobs:
        record = records[job.name]
        first = []
        for piece, n in zip(job.pieces, record["records"]):
            first.append(lines_before.get(piece.path, 0))
            lines_before[piece.path] = first[-1] + n
        if not sum(record["bad_records"].values()):
            continue
        with open(os.path.join(job.output_dir, f"{job.name}.bad.jsonl"), encoding="utf-8") as fh:
            for line in fh:
                entry = json.loads(line)
                piece = entry.pop("piece")
                if entry.get("line") is not None:
                    entry["line"] += first[piece]
                yield entry


def _run(todo: list[_Job], tok, tokenizer_path: str, workers: int, progress: bool) -> Iterator[dict]:
    """Write the shards of `todo`, yielding each record as it finishes (in any order)."""
    from tqdm.auto import tqdm

    total = sum(piece.nbytes for job in todo for piece in job.pieces)
    with tqdm(total=total, unit="B", unit_scale=True, desc="prepare", disable=not progress) as bar:
        if workers == 1 or len(todo) <= 1:
            results = (_write_shard(job, tok) for job in todo)
            yield from _tick(results, bar)
            return
        # A pool, unlike multiprocessing.Pool, fails (BrokenProcessPool) instead of hanging when a worker dies.
        pool = ProcessPoolExecutor(
            min(workers, len(todo)),
            mp_context=_worker_context(),
            initializer=_init_worker,
            initargs=(tokenizer_path,),
        )
        try:
            futures = [pool.submit(_worker_write_shard, job) for job in todo]
            yield from _tick((future.result() for future in as_completed(futures)), bar)
        finally:
            # On Ctrl-C the workers are interrupted too (and remove their temporary files); drop what has not started.
            pool.shutdown(wait=True, cancel_futures=True)


def _tick(results: Iterable[dict], bar) -> Iterator[dict]:
    for record in results:
        bar.update(record["input_bytes"])
        yield record


_WORKER_TOKENIZER = None


def _worker_context():
    """forkserver where the platform has it, else spawn: workers never inherit this process's threads (the
    tokenizers thread pool, torch), and the fork server imports this module and transformers' AutoTokenizer (seconds)
    once for all workers instead of once each."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__, "transformers.models.auto.tokenization_auto"])
        return ctx
    return multiprocessing.get_context("spawn")


def _init_worker(tokenizer_path: str) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = load_tokenizer(tokenizer_path)


def _worker_write_shard(job: _Job) -> dict:
    try:
        return _write_shard(job, _WORKER_TOKENIZER)
    except KeyboardInterrupt:
        # Ctrl-C reaches every worker. Its temporary files are gone by now; exit instead of taking the next
        # queued unit (the pool would otherwise go on with it).
        os._exit(130)


def _documents(job: _Job, log: BadRecordLog, records: list[int]) -> Iterator[str]:
    """The unit's documents; bad records go to `log` (with their piece), the records read per piece to `records`."""
    for i, piece in enumerate(job.pieces):
        n = 0
        for record in iter_documents(piece.path, job.field, piece.span):
            n += 1
            if isinstance(record, BadRecord):
                log.add({"piece": i, **record.to_dict()})
            else:
                yield record
        records.append(n)


def _batches(docs: Iterator[str]) -> Iterator[list[str]]:
    batch, chars = [], 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if len(batch) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _encode(tok, texts: list[str], eod: int, dtype: np.dtype) -> tuple[np.ndarray, list[int]]:
    """Token ids of each text followed by eod, concatenated, and the length of each document."""
    # split_special_tokens: literal "</s>" or "<|im_start|>" in raw text stays plain text.
    ids = tok(texts, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]
    lengths = [len(seq) + 1 for seq in ids]
    flat = itertools.chain.from_iterable(itertools.chain(seq, (eod,)) for seq in ids)
    return np.fromiter(flat, dtype=dtype, count=sum(lengths)), lengths


def _write_shard(job: _Job, tok) -> dict:
    """Tokenize one unit into <name>.bin and <name>.idx (and <name>.bad.jsonl), then write <name>.json; return the
    .json record."""
    with BadRecordLog(keep=0) as log:
        return _write_shard_files(job, tok, log)


def _write_shard_files(job: _Job, tok, log: BadRecordLog) -> dict:
    base = os.path.join(job.output_dir, job.name)
    dtype = np.dtype(job.dtype).newbyteorder("<")
    records: list[int] = []
    offsets = [0]
    bin_hash = hashlib.sha256()

    def write_bin(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            for batch in _batches(_documents(job, log, records)):
                tokens, lengths = _encode(tok, batch, job.eod_token_id, dtype)
                data = tokens.tobytes()
                fh.write(data)
                bin_hash.update(data)
                start = offsets[-1]
                offsets.extend(start + n for n in itertools.accumulate(lengths))

    atomic_write(f"{base}.bin", write_bin)
    idx = np.asarray(offsets, dtype="<u8").tobytes()
    atomic_write(f"{base}.idx", lambda tmp: _write_bytes(tmp, idx))
    if log.total:
        log.save(f"{base}.bad.jsonl")
    entry = {
        "name": job.name,
        "documents": len(offsets) - 1,
        "tokens": offsets[-1],
        "sources": sorted({piece.path for piece in job.pieces}),
        "sha256": {"bin": bin_hash.hexdigest(), "idx": hashlib.sha256(idx).hexdigest()},
    }
    record = {"entry": entry, "bad_records": log.counts, "records": records, "fingerprint": job.fingerprint}
    atomic_write_text(f"{base}.json", json.dumps(record, indent=1) + "\n")
    return {**record, "input_bytes": sum(piece.nbytes for piece in job.pieces)}


def _write_bytes(path: str, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)


def _manifest(jobs, records, files, tokenizer_path, field, vocab_size, dtype, eod_token_id) -> dict:
    entries = [records[job.name]["entry"] for job in jobs]
    shards = [entry for entry in entries if entry["documents"] > 0]
    return {
        "format": FORMAT,
        "dtype": dtype,
        "vocab_size": vocab_size,
        "eod_token_id": eod_token_id,
        "tokenizer": tokenizer_path,
        "field": field,
        "sources": files,
        "documents": sum(entry["documents"] for entry in shards),
        "tokens": sum(entry["tokens"] for entry in shards),
        "bad_records": merge_counts(*(records[job.name]["bad_records"] for job in jobs)),
        "shards": shards,
    }
