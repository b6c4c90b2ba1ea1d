"""Reading raw documents: which files an input names, and the documents (or bad records) each file holds.

File kinds, by extension:
- text (`.txt`, `.md`, `.py`, and any extension passed in `extensions`): the whole file is ONE document;
- JSON lines (`.jsonl`, `.json`): one document per line, the string under `field` of the line's JSON object;
- Parquet (`.parquet`): one document per row, the string in column `field`, read in record batches (pyarrow).

A record that cannot become a document is never dropped silently: it is yielded as a `BadRecord` whose reason is
one of `REASONS`, with its file and line (or Parquet row), what is wrong and the start of the record. No exception
from one record ends the reading: a JSON line nested 1M deep, an integer of 5000 digits, bytes that are not UTF-8 or
a value of the wrong type is a bad record, and the lines after it are read. Problems with a whole file (unreadable,
not Parquet, no such column) raise ValueError instead. `BadRecordLog` keeps every bad record of a run (counts, the
first few per reason for a summary, all of them for `bad_records.jsonl`) and `check_bad_fraction` fails a run that
has too many.

Big JSON-lines and Parquet files can be read in parts (`split_file` + the `span` argument of `iter_documents`) so
that one file can feed several shards: JSON lines by line-aligned byte ranges, Parquet by row-group ranges.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from decimal import Decimal

import numpy as np

from ..utils import atomic_write

TEXT_EXTENSIONS = (".txt", ".md", ".py")
JSONL_EXTENSIONS = (".jsonl", ".json")
PARQUET_EXTENSIONS = (".parquet",)
SUPPORTED_EXTENSIONS = TEXT_EXTENSIONS + JSONL_EXTENSIONS + PARQUET_EXTENSIONS

# invalid_utf8: bytes that do not decode (or a JSON string with lone surrogates); invalid_json: a line that does
# not parse; too_deep: arrays/objects nested deeper than MAX_JSON_DEPTH; missing_field: not an object, no such key,
# or a null value; not_a_string: the value is not a string; empty: the text is empty or whitespace only; error: any
# other exception raised while reading the record (its type and message are the detail).
REASONS = ("invalid_utf8", "invalid_json", "too_deep", "missing_field", "not_a_string", "empty", "error")
BAD_RECORDS_FILE = "bad_records.jsonl"
SUMMARY_EXAMPLES = 20  # bad records printed per reason; the file holds all of them

# Python's JSON parser recurses once per nesting level, so a line nested 1M deep overflows the C stack (a segfault)
# whenever the recursion limit has been raised; lines nested deeper than this are refused before parsing.
MAX_JSON_DEPTH = 512
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_EXCERPT_CHARS = 80
_CONTROL_ESCAPES = {c: f"\\x{c:02x}" for c in [*range(32), 127]} | {9: "\\t", 10: "\\n", 13: "\\r"}
_PARQUET_BATCH_ROWS = 1024


@dataclass(frozen=True)
class BadRecord:
    """A record that is not a usable document. `reason` is one of REASONS; `file` and `line` (1-based: text and JSON
    lines) or `row` (0-based: Parquet) say where it is; `detail` says what is wrong; `excerpt` is its start."""

    reason: str
    file: str
    line: int | None = None
    row: int | None = None
    detail: str = ""
    excerpt: str = ""

    @property
    def where(self) -> str:
        return where(self.to_dict())

    def to_dict(self) -> dict:
        """The JSON object of one line of bad_records.jsonl (`line` or `row`, whichever applies)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def where(entry: dict) -> str:
    """`file:line`, `file row N` or `file`, of a BadRecord.to_dict() entry."""
    if entry.get("row") is not None:
        return f"{entry['file']} row {entry['row']}"
    return f"{entry['file']}:{entry['line']}" if entry.get("line") is not None else entry["file"]


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
    path: str | os.PathLike, field: str = "text", span: tuple[int, int] | None = None, first_line: int = 1
) -> Iterator[str | BadRecord]:
    """Yield each record of one file: its document text (str) or a BadRecord saying why it has none.

    Files that are neither JSON lines nor Parquet are read as text (expand_inputs decides which files are allowed).
    `span` reads part of a file, as returned by `split_file`: a [start, stop) byte range of whole lines for JSON
    lines, a [start, stop) range of row groups for Parquet. JSON lines yield exactly one record per line, numbered
    from `first_line` (the line number where `span` starts, when the caller knows it; Parquet rows are numbered in
    the whole file). Whole-file problems raise ValueError.
    """
    path = os.fspath(path)
    kind = _kind(path)
    if kind == "jsonl":
        yield from _iter_jsonl(path, field, span, first_line)
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


class BadRecordLog:
    """Every bad record of a run: counts per reason, the first `keep` per reason (for the summary), and all of them
    as JSON lines in a temporary spill file (a corpus can hold millions) until `save` writes them out."""

    def __init__(self, keep: int = SUMMARY_EXAMPLES):
        self.counts = empty_counts()
        self.examples: dict[str, list[dict]] = {reason: [] for reason in REASONS}
        self.keep = keep
        self._spill = tempfile.TemporaryFile("w+", encoding="utf-8")  # noqa: SIM115 - closed by __exit__

    def __enter__(self) -> BadRecordLog:
        return self

    def __exit__(self, *exc) -> None:
        self._spill.close()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, entry: dict) -> None:
        """Log one bad record as a dict (BadRecord.to_dict(), possibly with extra keys)."""
        reason = entry["reason"]
        self.counts[reason] += 1
        if len(self.examples[reason]) < self.keep:
            self.examples[reason].append(entry)
        # ensure_ascii: a file name can hold surrogate escapes (os.fsdecode of undecodable bytes).
        self._spill.write(json.dumps(entry) + "\n")

    def documents(self, records: Iterable[str | BadRecord]) -> Iterator[str]:
        """Pass documents through and log each BadRecord."""
        for record in records:
            if isinstance(record, BadRecord):
                self.add(record.to_dict())
            else:
                yield record

    def save(self, path: str | os.PathLike) -> None:
        """Write every logged record as one JSON line to `path`, atomically (an empty file when there are none)."""
        self._spill.flush()
        self._spill.seek(0)

        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as fh:
                shutil.copyfileobj(self._spill, fh)

        atomic_write(path, write)
        self._spill.seek(0, os.SEEK_END)


def bad_records_summary(
    counts: dict[str, int], examples: dict[str, list[dict]], records: int, path: str, max_bad_fraction: float
) -> str:
    """Summary lines: how many of `records` were bad, the first examples of each reason, where the full list is."""
    bad = sum(counts.values())
    if not bad:
        return "  bad records: none"
    lines = [
        f"  bad records: {bad:,} of {records:,} ({bad / max(records, 1):.2%}, limit {max_bad_fraction:.2%}); "
        f"all of them in {path}"
    ]
    for reason in REASONS:
        if not counts.get(reason):
            continue
        shown = examples.get(reason, [])
        lines.append(f"    {reason}: {counts[reason]:,}")
        lines.extend(f"      {where(e)}: {e.get('detail', '')}: {e.get('excerpt', '')}" for e in shown)
        if counts[reason] > len(shown):
            lines.append(f"      ... and {counts[reason] - len(shown):,} more")
    return "\n".join(lines)


class TooManyBadRecords(ValueError):
    """More bad records than max_bad_fraction allows. The run's outputs were written; `report` describes them."""

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


def check_max_bad_fraction(max_bad_fraction: float) -> None:
    if not isinstance(max_bad_fraction, (int, float)) or not 0.0 <= max_bad_fraction <= 1.0:
        raise ValueError(f"max_bad_fraction (--max-bad-fraction) must be in [0, 1], got {max_bad_fraction!r}")


def check_bad_fraction(bad: int, records: int, max_bad_fraction: float, path: str, report=None) -> None:
    """Raise TooManyBadRecords when bad / records is above max_bad_fraction."""
    if records and bad / records > max_bad_fraction:
        raise TooManyBadRecords(
            f"{bad:,} of {records:,} records are bad ({bad / records:.2%}), above --max-bad-fraction "
            f"{max_bad_fraction:g} ({max_bad_fraction:.2%}); the output was written anyway and every bad record is "
            f"listed in {path}: fix or remove those records, or raise --max-bad-fraction (max_bad_fraction)",
            report,
        )


def _excerpt(data: bytes | str) -> str:
    """The first characters of a record on one line (undecodable bytes and control characters as backslash escapes),
    for a person to recognize it."""
    if isinstance(data, bytes):
        data = data[: 4 * _EXCERPT_CHARS + 4].decode("utf-8", "backslashreplace")
    text = data[: _EXCERPT_CHARS + 1].rstrip("\r\n").translate(_CONTROL_ESCAPES)
    return text if len(text) <= _EXCERPT_CHARS else text[:_EXCERPT_CHARS] + "..."


def _check_text(text: str, bad) -> str | BadRecord:
    if not text.strip():
        return bad("empty", "empty or whitespace only")
    try:
        # JSON escapes can produce lone surrogates, which no tokenizer can encode.
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return bad("invalid_utf8", f"lone surrogate at character {e.start}")
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
    except UnicodeDecodeError as e:  # where: the line holding the first byte that does not decode
        line_start = data.rfind(b"\n", 0, e.start) + 1
        detail = f"{e.reason} at byte {e.start}"
        return BadRecord(
            "invalid_utf8", path, data.count(b"\n", 0, e.start) + 1, None, detail, _excerpt(data[line_start:])
        )
    return _check_text(text, lambda reason, detail: BadRecord(reason, path, 1, None, detail, _excerpt(text)))


def _iter_jsonl(path: str, field: str, span: tuple[int, int] | None, first_line: int) -> Iterator[str | BadRecord]:
    start, stop = span if span is not None else (0, None)
    with _open_binary(path) as fh:
        fh.seek(start)
        pos, line = start, first_line
        for raw in fh:
            if stop is not None and pos >= stop:
                break
            try:
                record = _json_record(raw, field, path, line)
            except Exception as e:  # whatever one record raises, the next line is still read
                record = BadRecord("error", path, line, None, f"{type(e).__name__}: {e}"[:200], _excerpt(raw))
            yield record
            pos += len(raw)
            line += 1


def _parse_int(digits: str) -> int | Decimal:
    """JSON integers longer than int() accepts (sys.get_int_max_str_digits, 4300) become Decimals: a record with a
    5000-digit id is a good document, and a 5000-digit text field is `not_a_string` like any number."""
    try:
        return int(digits)
    except ValueError:
        return Decimal(digits)


_JSON = json.JSONDecoder(parse_int=_parse_int)


def _nesting_depth(raw: bytes) -> int:
    """How deep arrays and objects nest in a JSON line (brackets inside strings do not count; the bytes of a multi-byte
    UTF-8 character are never `"` or `\\`), or 0 when it holds too few brackets to nest deeper than MAX_JSON_DEPTH."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:
        return 0
    outside = np.frombuffer(_JSON_STRING.sub(b'""', raw), dtype=np.uint8)
    step = np.isin(outside, (ord("["), ord("{"))).astype(np.int64) - np.isin(outside, (ord("]"), ord("}")))
    return int(np.cumsum(step).max(initial=0))


def _json_record(raw: bytes, field: str, path: str, line: int) -> str | BadRecord:
    def bad(reason: str, detail: str) -> BadRecord:
        return BadRecord(reason, path, line, None, detail, _excerpt(raw))

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return bad("invalid_utf8", f"{e.reason} at byte {e.start} of the line")
    if not text.strip():
        return bad("empty", "blank line")
    depth = _nesting_depth(raw)
    if depth > MAX_JSON_DEPTH:
        return bad("too_deep", f"arrays/objects nested {depth} deep (at most {MAX_JSON_DEPTH})")
    try:
        obj = _JSON.decode(text)
    except RecursionError:  # the stack was already deep: the same as too deep
        return bad("too_deep", f"arrays/objects nested too deep for Python's JSON parser (at most {MAX_JSON_DEPTH})")
    except ValueError as e:  # JSONDecodeError, and any other value the parser refuses
        return bad("invalid_json", str(e)[:200])
    if not isinstance(obj, dict):
        return bad("missing_field", f"a JSON {type(obj).__name__}, not an object with {field!r}")
    return _field_value(obj.get(field), field, bad)


def _field_value(value, field: str, bad) -> str | BadRecord:
    if value is None:
        return bad("missing_field", f"no {field!r}, or null")
    if not isinstance(value, str):
        return bad("not_a_string", f"{field!r} is a {type(value).__name__}, not a string")
    return _check_text(value, bad)


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
    batches = pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, row_groups=groups, columns=[field])
    while True:
        try:
            batch = next(batches, None)
        except Exception as e:  # pyarrow.ArrowInvalid, OSError: a damaged page is a problem of the file
            raise ValueError(f"{path}: cannot read from row {row} on ({e}); check it is a complete Parquet file") from e
        if batch is None:
            return
        column = batch.column(0)
        try:
            values = column.to_pylist()
        except Exception:  # one bad value (e.g. a string that is not UTF-8): go row by row
            values = None
        for i in range(len(column)):
            yield _parquet_record(column, values, i, field, path, row)
            row += 1


def _parquet_record(column, values, i: int, field: str, path: str, row: int) -> str | BadRecord:
    try:
        value = values[i] if values is not None else column[i].as_py()
    except UnicodeDecodeError as e:
        return BadRecord("invalid_utf8", path, None, row, f"{e.reason} at byte {e.start}", _excerpt(e.object))
    except Exception as e:  # whatever one value raises, the next row is still read
        return BadRecord("error", path, None, row, f"{type(e).__name__}: {e}"[:200])
    return _field_value(
        value, field, lambda reason, detail: BadRecord(reason, path, None, row, detail, _excerpt(repr(value)))
    )


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
