"""Reading raw documents: which files an input names, and the documents (or bad records) each file holds.

File kinds, by extension:
- text (`.txt`, `.md`, `.py`, and any extension passed in `extensions`): the whole file is ONE document;
- JSON lines (`.jsonl`, `.json`): one document per line, the string under `field` of the line's JSON object;
- Parquet (`.parquet`): one document per row, the string in column `field`, read in record batches (pyarrow).

A record that cannot become a document is never dropped silently: it is yielded as a `BadRecord` whose reason is
one of `REASONS`. Problems with a whole file (unreadable, not Parquet, no such column) raise ValueError instead.

Big JSON-lines and Parquet files can be read in parts (`split_file` + the `span` argument of `iter_documents`) so
that one file can feed several shards: JSON lines by line-aligned byte ranges, Parquet by row-group ranges.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

TEXT_EXTENSIONS = (".txt", ".md", ".py")
JSONL_EXTENSIONS = (".jsonl", ".json")
PARQUET_EXTENSIONS = (".parquet",)
SUPPORTED_EXTENSIONS = TEXT_EXTENSIONS + JSONL_EXTENSIONS + PARQUET_EXTENSIONS

# invalid_utf8: bytes that do not decode (or a JSON string with lone surrogates); invalid_json: a line that does
# not parse; missing_field: not an object, no such key, or a null value; not_a_string: the value is not a string;
# empty: the text is empty or whitespace only.
REASONS = ("invalid_utf8", "invalid_json", "missing_field", "not_a_string", "empty")

_PARQUET_BATCH_ROWS = 1024


@dataclass(frozen=True)
class BadRecord:
    """A record that is not a usable document: `reason` is one of REASONS, `where` is file and line or row."""

    reason: str
    where: str


def empty_counts() -> dict[str, int]:
    """Bad-record counts with every reason present (zeros included), in REASONS order."""
    return {reason: 0 for reason in REASONS}


def merge_counts(*counts: dict[str, int]) -> dict[str, int]:
    total = Counter(empty_counts())
    for c in counts:
        total.update(c)
    return {reason: total[reason] for reason in REASONS}


def _kind(path: str, extensions: tuple[str, ...] = ()) -> str | None:
    ext = os.path.splitext(path)[1].lower()
    if ext in JSONL_EXTENSIONS:
        return "jsonl"
    if ext in PARQUET_EXTENSIONS:
        return "parquet"
    if ext in TEXT_EXTENSIONS or ext in extensions:
        return "text"
    return None


def _normalize_extensions(extensions: Iterable[str] | None) -> tuple[str, ...]:
    if not extensions:
        return ()
    return tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)


def expand_inputs(paths: Iterable[str | os.PathLike], extensions: Iterable[str] | None = None) -> list[str]:
    """Files and directories -> the sorted, de-duplicated list of absolute file paths they name.

    Directories are walked recursively (hidden files and folders skipped) and contribute the files whose extension
    is supported; `extensions` (e.g. [".rst", ".tex"]) adds extensions read as plain text, one document per file.
    A file named explicitly must have a supported extension too, so that a typo does not train on a binary.
    """
    extra = _normalize_extensions(extensions)
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found = set()
    for given in paths:
        path = os.path.abspath(os.fspath(given))
        if os.path.isdir(path):
            found.update(_walk(path, extra))
        elif os.path.isfile(path):
            if _kind(path, extra) is None:
                raise ValueError(
                    f"{given}: unsupported file type; supported: {', '.join(SUPPORTED_EXTENSIONS)} "
                    "(plain-text files with another extension can be allowed with `extensions`)"
                )
            found.add(path)
        else:
            raise ValueError(f"{given}: no such file or directory")
    if not found:
        raise ValueError(
            f"no input files found in {[os.fspath(p) for p in paths]}; "
            f"supported extensions: {', '.join(SUPPORTED_EXTENSIONS + extra)}"
        )
    return sorted(found)


def _walk(directory: str, extensions: tuple[str, ...]) -> Iterator[str]:
    for root, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith(".") and _kind(name, extensions) is not None:
                yield os.path.join(root, name)


def iter_documents(
    path: str | os.PathLike, field: str = "text", span: tuple[int, int] | None = None
) -> Iterator[str | BadRecord]:
    """Yield each record of one file: its document text (str) or a BadRecord saying why it has none.

    Files that are neither JSON lines nor Parquet are read as text (expand_inputs decides which files are allowed).
    `span` reads part of a file, as returned by `split_file`: a [start, stop) byte range of whole lines for JSON
    lines, a [start, stop) range of row groups for Parquet. Whole-file problems raise ValueError.
    """
    path = os.fspath(path)
    kind = _kind(path)
    if kind == "jsonl":
        yield from _iter_jsonl(path, field, span)
    elif kind == "parquet":
        yield from _iter_parquet(path, field, span)
    elif span is not None:
        raise ValueError(f"{path}: a text file is one document and cannot be read in parts")
    else:
        yield _text_document(path)


def count_bad(records: Iterable[str | BadRecord], counts: dict[str, int]) -> Iterator[str]:
    """Pass documents through and add each BadRecord to `counts` (reason -> count)."""
    for record in records:
        if isinstance(record, BadRecord):
            counts[record.reason] = counts.get(record.reason, 0) + 1
        else:
            yield record


def _check_text(text: str, where: str) -> str | BadRecord:
    if not text.strip():
        return BadRecord("empty", where)
    try:
        # JSON escapes can produce lone surrogates, which no tokenizer can encode.
        text.encode("utf-8")
    except UnicodeEncodeError:
        return BadRecord("invalid_utf8", where)
    return text


def _open_binary(path: str):
    try:
        return open(path, "rb")
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror}); check that the file exists and is readable") from e


def _text_document(path: str) -> str | BadRecord:
    with _open_binary(path) as fh:
        data = fh.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return BadRecord("invalid_utf8", path)
    return _check_text(text, path)


def _iter_jsonl(path: str, field: str, span: tuple[int, int] | None) -> Iterator[str | BadRecord]:
    start, stop = span if span is not None else (0, None)
    with _open_binary(path) as fh:
        fh.seek(start)
        pos = start
        for raw in fh:
            if stop is not None and pos >= stop:
                break
            yield _json_record(raw, field, f"{path}@byte{pos}")
            pos += len(raw)


def _json_record(raw: bytes, field: str, where: str) -> str | BadRecord:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return BadRecord("invalid_utf8", where)
    if not line.strip():
        return BadRecord("empty", where)
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return BadRecord("invalid_json", where)
    return _field_value(obj.get(field) if isinstance(obj, dict) else None, where)


def _field_value(value, where: str) -> str | BadRecord:
    if value is None:
        return BadRecord("missing_field", where)
    if not isinstance(value, str):
        return BadRecord("not_a_string", where)
    return _check_text(value, where)


def _parquet_file(path: str):
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - pyarrow is a dependency
        raise ValueError(f"{path}: reading Parquet needs pyarrow (pip install 'pyarrow>=14')") from e
    try:
        return pq.ParquetFile(path)
    except Exception as e:  # OSError, pyarrow.ArrowInvalid and friends
        raise ValueError(f"{path}: cannot read as Parquet ({e}); check the file is a complete Parquet file") from e


def _iter_parquet(path: str, field: str, span: tuple[int, int] | None) -> Iterator[str | BadRecord]:
    pf = _parquet_file(path)
    names = pf.schema_arrow.names
    if field not in names:
        raise ValueError(
            f"{path}: no column {field!r} (columns: {', '.join(names)}); pass the text column as `field` (--field)"
        )
    groups = list(range(*span)) if span is not None else list(range(pf.num_row_groups))
    if not groups:
        return
    row = sum(pf.metadata.row_group(i).num_rows for i in range(groups[0]))
    for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, row_groups=groups, columns=[field]):
        for value in batch.column(0).to_pylist():
            yield _field_value(value, f"{path}:row{row}")
            row += 1


def split_file(path: str | os.PathLike, target_bytes: int) -> list[tuple[tuple[int, int] | None, int]]:
    """Cut one file into parts of about `target_bytes` each: a list of (span, bytes) for `iter_documents`.

    JSON lines split at line starts; Parquet splits between row groups (a file with one row group stays whole);
    text files are one document and never split. A file that fits in one part gives [(None, size)].
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    kind = _kind(path)
    if size <= target_bytes or kind not in ("jsonl", "parquet"):
        return [(None, size)]
    if kind == "jsonl":
        return _split_jsonl(path, size, target_bytes)
    return _split_parquet(path, size, target_bytes)


def _split_jsonl(path: str, size: int, target_bytes: int) -> list[tuple[tuple[int, int] | None, int]]:
    bounds = [0]
    with _open_binary(path) as fh:
        while bounds[-1] + target_bytes < size:
            # The next line start at or after bounds[-1] + target_bytes: read to the end of the line holding the
            # byte just before it.
            fh.seek(bounds[-1] + target_bytes - 1)
            fh.readline()
            if fh.tell() >= size:
                break
            bounds.append(fh.tell())
    bounds.append(size)
    return [((a, b), b - a) for a, b in zip(bounds[:-1], bounds[1:])]


def _split_parquet(path: str, size: int, target_bytes: int) -> list[tuple[tuple[int, int] | None, int]]:
    meta = _parquet_file(path).metadata
    if meta.num_row_groups <= 1:
        return [(None, size)]
    group_bytes = [
        sum(meta.row_group(g).column(c).total_compressed_size for c in range(meta.num_columns))
        for g in range(meta.num_row_groups)
    ]
    parts, start, acc = [], 0, 0
    for g, nbytes in enumerate(group_bytes):
        if g > start and acc + nbytes > target_bytes:
            parts.append(((start, g), acc))
            start, acc = g, 0
        acc += nbytes
    parts.append(((start, len(group_bytes)), acc))
    return parts
