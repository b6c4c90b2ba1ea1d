"""Supervised fine-tuning data: chat conversations -> token ids with an assistant-only loss mask -> packed samples.

Faithful to the SFT recipe of NVIDIA's Nemotron 3 Nano and Super technical reports (2025): the loss covers the
assistant's tokens only; a conversation with reasoning becomes one sample per user turn; a share of the samples
has its reasoning stripped or truncated to a budget (reasoning control); and samples are packed first-fit into
fixed-length sequences with per-token conversation ids, so nothing attends across (or carries Mamba state
across) conversations.

- Input (`data`): a path (a file, or a folder of them) or a {path: weight} blend. Files are JSON lines
  (`.jsonl`, `.json`: one conversation a line, `{"messages": [...], "tools": [...]}` in OpenAI's chat format, any
  other keys ignored; a bare list of messages is accepted too) or Parquet (one conversation a row: a `messages`
  column of lists of structs or of JSON strings, and an optional `tools` column, likewise), read with pyarrow.
  Messages may carry `reasoning_content`, `tool_calls` and `tool` results (`hybridmoe.data.messages`); an assistant
  message with `"weight": 0` (OpenAI's fine-tuning format) stays in the conversation but is not a loss target.
- Bad conversations: never silently dropped, never fatal one at a time. Each is a bad record (REASONS) with its
  file and line (or 0-based Parquet row), counted in the report and listed in `bad_records_path`, as in
  `hybridmoe prepare`; when more than `max_bad_fraction` of the conversations are bad, TooManyBadRecords.
- Blends: the weights are shares of the conversations drawn. As many conversations are drawn as all datasets hold
  together; a dataset whose share is more than it holds is repeated whole and topped up with a random subset,
  one whose share is less gives a random subset (both deterministic by `seed`).
- Samples per user turn: a history's reasoning is dropped when the chat template renders it, so a conversation is
  cut after every user turn whose answer carries reasoning that a later turn would drop: sample k is the
  conversation through the k-th user turn's answer, rendered as the template renders it at that point, with the
  loss on that turn's assistant messages only. A conversation with all its reasoning in the last turn (or none)
  stays one sample with the loss on every assistant message.
- Rendering and masks: the tokenizer's own chat template (`apply_chat_template`, with `tools=`). An assistant
  message's tokens are found from the template itself: the sample is rendered once up to the message with the
  generation prompt and once through it, and the tokens between are the message's. The generation prompt is the
  template's default one; where that is not how the turn starts and the template has an `enable_thinking` switch
  (Nemotron's `<think></think>` for an answer without reasoning), the switch is set to whether the message has
  reasoning. So the prompt (`<|im_start|>assistant\\n<think>\\n` or `...<think></think>`) is never a target.
- Reasoning control: among the samples whose answer has reasoning, `reasoning_off_fraction` of them are rendered
  with it stripped (an empty `<think></think>` after a reasoning-off prompt) and `reasoning_truncate_fraction`
  with it cut to its first `reasoning_truncate_tokens` tokens, then `</think>` and the answer: what a generation
  stopped by a reasoning budget looks like. The samples are chosen by `seed`; the report counts them.
- Packing: first-fit decreasing into samples of `seq_len` tokens; each sample carries `document_ids` (0, 1, ...
  per conversation, the next id for the padding at the end), `position_ids` restarting at 0 in every conversation
  (what transformers reads, without a cache, to keep packed sequences apart in attention) and `labels` (-100 off
  the assistant's tokens, on padding and on every conversation's first token, which would otherwise be predicted
  from the previous conversation). The report gives the share of padding.
- A sample longer than `seq_len` is an error naming it, unless `drop_long` is set: then it is a bad record.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .messages import MessageError, split_reasoning, template_messages
from .sources import (
    BadRecord,
    BadRecordLog,
    TooManyBadRecords,
    _excerpt,
    _parquet_file,
    check_max_bad_fraction,
    expand_inputs,
    where,
)

IGNORE_INDEX = -100
# invalid_utf8, invalid_json: a line (or a Parquet JSON string) that does not decode or parse; not_a_conversation:
# no non-empty `messages` list; bad_message, unknown_role, bad_tool_call, bad_tools: what hybridmoe.data.messages
# refuses; no_assistant: nothing to learn from; too_long: a sample longer than seq_len (with drop_long);
# not_renderable: the chat template fails on it, or renders its prefixes differently from the whole; error: any
# other exception raised while reading the record.
REASONS = (
    "invalid_utf8", "invalid_json", "not_a_conversation", "bad_message", "unknown_role", "bad_tool_call",
    "bad_tools", "no_assistant", "too_long", "not_renderable", "error",
)  # fmt: skip
CONVERSATION_EXTENSIONS = (".jsonl", ".json", ".parquet")
_PARQUET_BATCH_ROWS = 1024


@dataclass
class Record:
    """One conversation as read: checked messages and tools, and where it is (JSON lines: 1-based line; Parquet:
    0-based row)."""

    messages: list[dict]
    tools: list[dict] | None
    file: str
    line: int | None = None
    row: int | None = None

    @property
    def where(self) -> str:
        return where({"file": self.file, "line": self.line, "row": self.row})


@dataclass
class Conversation:
    input_ids: list[int]
    assistant_mask: list[bool]  # True where the token is part of an assistant message (a loss target)
    line: int = 0  # 1-based line of the source file (Parquet: the row)
    where: str = ""  # file:line, and which user turn when the conversation was split


@dataclass
class PackReport:
    conversations: int = 0  # packed sequences: conversations, or their per-user-turn samples
    samples: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    padding: int = 0
    dropped_long: list[int] = field(default_factory=list)  # source lines

    @property
    def padding_share(self) -> float:
        return self.padding / max(1, self.tokens + self.padding)

    def summary(self) -> str:
        s = (
            f"{self.conversations} conversations -> {self.samples} packed samples, {self.tokens} tokens "
            f"({self.loss_tokens} assistant), {1 - self.padding_share:.1%} filled"
        )
        if self.dropped_long:
            s += f"; dropped {len(self.dropped_long)} longer than seq_len (lines {self.dropped_long[:5]}...)"
        return s


@dataclass
class SFTReport(PackReport):
    """What load_sft_samples did: PackReport's packing figures, plus the conversations read and drawn per dataset,
    the reasoning-control counts and the bad records per reason (all listed in `bad_records_path` when given)."""

    records: int = 0  # conversations read, bad ones included
    datasets: list[dict] = field(default_factory=list)  # path, weight, conversations, bad, drawn, samples
    reasoning_samples: int = 0  # samples whose answer has reasoning: the candidates of reasoning control
    reasoning_off: int = 0
    reasoning_truncated: int = 0
    bad_records: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    bad_examples: dict[str, list[dict]] = field(default_factory=dict)
    bad_records_path: str = ""
    max_bad_fraction: float = 0.01
    bad_conversations: int = 0  # the bad conversations that count against max_bad_fraction

    @property
    def bad(self) -> int:
        return sum(self.bad_records.values())

    def summary(self) -> str:
        lines = [
            f"{self.records} conversations read -> {self.conversations} samples (one per user turn where reasoning "
            f"would be dropped) -> {self.samples} packed sequences, {self.tokens} tokens ({self.loss_tokens} "
            f"assistant), {self.padding_share:.2%} padding"
        ]
        for d in self.datasets:
            lines.append(
                f"  {d['path']}: weight {d['weight']:g}, {d['conversations']} conversations ({d['bad']} bad), "
                f"{d['drawn']} drawn -> {d['samples']} samples"
            )
        if self.reasoning_samples:
            lines.append(
                f"  reasoning control: of {self.reasoning_samples} samples with reasoning, {self.reasoning_off} "
                f"reasoning off, {self.reasoning_truncated} truncated"
            )
        if not self.bad:
            lines.append("  bad records: none")
            return "\n".join(lines)
        listed = f"all of them in {self.bad_records_path}" if self.bad_records_path else "not written to a file"
        lines.append(
            f"  bad records: {self.bad}; {self.bad_conversations} of {self.records} conversations "
            f"({self.bad_conversations / max(1, self.records):.2%}) count against max_bad_fraction "
            f"{self.max_bad_fraction:.2%} (too_long, asked for with drop_long, does not); {listed}"
        )
        for reason in REASONS:
            if self.bad_records.get(reason):
                shown = self.bad_examples.get(reason, [])
                lines.append(f"    {reason}: {self.bad_records[reason]}")
                lines += [f"      {where(e)}: {e.get('detail', '')}" for e in shown]
                if self.bad_records[reason] > len(shown):
                    lines.append(f"      ... and {self.bad_records[reason] - len(shown)} more")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- reading


def conversation_files(path: str | os.PathLike) -> list[str]:
    """The conversation files a path names: the file itself, or a folder's JSON-lines and Parquet files."""
    if os.path.isfile(path) and os.path.splitext(path)[1].lower() not in CONVERSATION_EXTENSIONS:
        raise ValueError(f"{path}: conversations are read from {', '.join(CONVERSATION_EXTENSIONS)} files")
    files = [f for f in expand_inputs([path]) if os.path.splitext(f)[1].lower() in CONVERSATION_EXTENSIONS]
    if not files:
        raise ValueError(f"{path}: no conversation files ({', '.join(CONVERSATION_EXTENSIONS)}) in it")
    return files


def iter_records(path: str | os.PathLike) -> Iterator[Record | BadRecord]:
    """Each conversation of one file (blank JSON lines are skipped): a Record, or a BadRecord saying what is
    wrong. Problems with the whole file (unreadable, not Parquet, no `messages` column) raise ValueError."""
    path = os.fspath(path)
    if path.lower().endswith(".parquet"):
        yield from _parquet_records(path)
    else:
        yield from _jsonl_records(path)


def _jsonl_records(path: str) -> Iterator[Record | BadRecord]:
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror})") from e
    with fh:
        for n, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            excerpt = _excerpt(raw)
            try:
                try:
                    obj = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as e:
                    yield BadRecord("invalid_utf8", path, n, None, f"{e.reason} at byte {e.start}", excerpt)
                    continue
                except RecursionError:
                    yield BadRecord("invalid_json", path, n, None, "not valid JSON (nested too deep)", excerpt)
                    continue
                except ValueError as e:
                    yield BadRecord("invalid_json", path, n, None, f"not valid JSON ({str(e)[:160]})", excerpt)
                    continue
                yield _record(obj, path, n, None, excerpt)
            except Exception as e:  # whatever one record raises, the next line is still read
                yield BadRecord("error", path, n, None, f"{type(e).__name__}: {e}"[:200], excerpt)


def _parquet_records(path: str) -> Iterator[Record | BadRecord]:
    pf = _parquet_file(path)
    names = pf.schema_arrow.names
    if "messages" not in names:
        raise ValueError(
            f"{path}: no column 'messages' (columns: {', '.join(names)}); SFT Parquet files hold one conversation "
            "a row in a `messages` column (a list of message structs, or a JSON string), and optionally `tools`"
        )
    columns = ["messages"] + (["tools"] if "tools" in names else [])
    row = 0
    for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns):
        try:
            rows = batch.to_pylist()
        except Exception:  # one bad value (e.g. a string that is not UTF-8): go row by row
            rows = None
        for i in range(batch.num_rows):
            try:
                value = rows[i] if rows is not None else batch.slice(i, 1).to_pylist()[0]
                value["messages"] = _parquet_json(value["messages"])
                value["tools"] = _parquet_json(value.get("tools"))
                if isinstance(value["messages"], list):  # a struct has every field: absent ones are null
                    value["messages"] = [_without_nulls(m) for m in value["messages"]]
                yield _record(value, path, None, row, _excerpt(repr(value.get("messages"))))
            except _BadJSON as e:
                yield BadRecord("invalid_json", path, None, row, str(e), "")
            except UnicodeDecodeError as e:
                yield BadRecord("invalid_utf8", path, None, row, f"{e.reason} at byte {e.start}", "")
            except Exception as e:  # whatever one row raises, the next one is still read
                yield BadRecord("error", path, None, row, f"{type(e).__name__}: {e}"[:200], "")
            row += 1


class _BadJSON(ValueError):
    pass


def _parquet_json(value):
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except (ValueError, RecursionError) as e:
        raise _BadJSON(f"not valid JSON ({str(e)[:160]})") from None


def _without_nulls(message):
    return {k: v for k, v in message.items() if v is not None} if isinstance(message, dict) else message


def _record(obj, path: str, line: int | None, row: int | None, excerpt: str) -> Record | BadRecord:
    def bad(reason: str, detail: str) -> BadRecord:
        return BadRecord(reason, path, line, row, detail, excerpt)

    messages, tools = (obj.get("messages"), obj.get("tools")) if isinstance(obj, dict) else (obj, None)
    if not isinstance(messages, list) or not messages:
        return bad("not_a_conversation", 'expected {"messages": [{"role": ..., "content": ...}, ...]}')
    try:
        messages, tools = template_messages(messages, tools)
    except MessageError as e:
        return bad(e.reason, str(e))
    if not any(learned(m) for m in messages):
        return bad("no_assistant", "no assistant message (of weight 1), so nothing to learn from this conversation")
    return Record(messages, tools or None, path, line, row)


def read_conversations(path: str | os.PathLike) -> list[tuple[int, list[dict]]]:
    """(line, messages) of every conversation of one file, with a ValueError naming the first bad one
    (load_sft_samples counts bad conversations instead)."""
    out = []
    for record in iter_records(path):
        if isinstance(record, BadRecord):
            raise ValueError(f"{record.where}: {record.detail}")
        out.append((record.line if record.line is not None else record.row, record.messages))
    if not out:
        raise ValueError(f"{path}: no conversations")
    return out


# ---------------------------------------------------------------------------------------------- samples


def learned(message: dict) -> bool:
    """An assistant message that is a loss target (not `"weight": 0`)."""
    return message["role"] == "assistant" and message.get("weight", 1) != 0


def has_reasoning(message: dict) -> bool:
    return message["role"] == "assistant" and bool(split_reasoning(message)[0])


def user_turn_samples(messages: list[dict]) -> list[tuple[int, list[int]]]:
    """(end, learn) of each sample of a conversation: the sample is messages[:end] and its loss is on the assistant
    messages `learn`. Cut after every user turn whose answer has reasoning that a later user turn would drop from
    the history (module docstring); a piece without an assistant message (a last unanswered user turn) is none."""
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    out, start, turn = [], 0, 0
    for end in [*users[1:], len(messages)]:
        if end == len(messages) or any(has_reasoning(m) for m in messages[turn:end]):
            learn = [i for i in range(start, end) if learned(messages[i])]
            if learn:
                out.append((end, learn))
            start = end
        turn = end
    return out


def without_reasoning(messages: list[dict], learn: list[int], tokenizer=None, keep_tokens: int = 0) -> list[dict]:
    """`messages` with the reasoning of the messages `learn` removed, or (with a tokenizer) cut to its first
    `keep_tokens` tokens."""
    out = list(messages)
    for i in learn:
        reasoning, answer = split_reasoning(messages[i])
        if tokenizer is not None and reasoning:
            ids = tokenizer(reasoning, add_special_tokens=False)["input_ids"]
            if len(ids) > keep_tokens:
                reasoning = tokenizer.decode(ids[:keep_tokens]).rstrip("\ufffd")
        else:
            reasoning = ""
        message = {k: v for k, v in messages[i].items() if k not in ("reasoning", "thinking")}
        out[i] = message | {"reasoning_content": reasoning, "content": answer}
    return out


def tokenize_conversation(
    tokenizer, messages: list[dict], line: int = 0, *, tools: list[dict] | None = None, learn=None, where: str = ""
) -> Conversation:
    """Render with the tokenizer's chat template; mark the tokens of the assistant messages `learn` (default: all
    of them). See the module docstring for how the tokens are found."""
    template = getattr(tokenizer, "chat_template", None)
    if template is None:
        raise ValueError(
            f"{getattr(tokenizer, 'name_or_path', 'the tokenizer')} has no chat template; fine-tuning on messages "
            "needs one (set tokenizer.chat_template or use an instruct model's tokenizer)"
        )
    switch = "enable_thinking" in (json.dumps(template) if isinstance(template, dict) else template)

    def render(msgs, prompt=False, **kwargs) -> list[int]:
        out = tokenizer.apply_chat_template(msgs, tools=tools, tokenize=True, add_generation_prompt=prompt, **kwargs)
        if hasattr(out, "keys"):  # transformers 5 may return a BatchEncoding
            out = out["input_ids"]
        return list(out)

    ids = render(messages)
    mask = [False] * len(ids)
    if learn is None:
        learn = [i for i, m in enumerate(messages) if learned(m)]
    for i in learn:
        start = 0
        if i:
            prompt = render(messages[:i], prompt=True)
            if ids[: len(prompt)] != prompt and switch:
                other = render(messages[:i], prompt=True, enable_thinking=has_reasoning(messages[i]))
                prompt = other if ids[: len(other)] == other else prompt
            start = len(prompt)
        through = render(messages[: i + 1])
        end = len(through)
        if through != ids[:end] or start > end:
            raise ValueError(
                f"{where or f'line {line}'}: the chat template renders the conversation's prefixes differently from "
                "the whole conversation, so the assistant's tokens cannot be located; use a template whose turns do "
                "not change when later turns are added"
            )
        for j in range(start, end):
            mask[j] = True
    return Conversation(ids, mask, line, where)


def pack(conversations: list[Conversation], seq_len: int, drop_long: bool = False, seed: int = 0):
    """First-fit decreasing packing into samples of seq_len tokens. Returns (samples, report); each sample is a
    dict of int64 tensors (seq_len,): input_ids, labels, position_ids, document_ids. Sample order is shuffled
    with `seed` (so long and short conversations mix across batches)."""
    report = PackReport(conversations=len(conversations))
    fits = []
    for c in conversations:
        if len(c.input_ids) > seq_len:
            if not drop_long:
                raise ValueError(
                    f"{c.where or f'line {c.line}'}: the conversation has {len(c.input_ids)} tokens, more than "
                    f"seq_len={seq_len}; raise seq_len or pass drop_long (--drop-long) to leave such conversations out"
                )
            report.dropped_long.append(c.line)
            continue
        fits.append(c)
    bins: list[list[Conversation]] = []
    free: list[int] = []
    for c in sorted(fits, key=lambda c: -len(c.input_ids)):
        n = len(c.input_ids)
        for b, room in enumerate(free):
            if n <= room:
                bins[b].append(c)
                free[b] -= n
                break
        else:
            bins.append([c])
            free.append(seq_len - n)
    random.Random(seed).shuffle(bins)
    samples = []
    for convs in bins:
        ids, labels, pos, docs = [], [], [], []
        for d, c in enumerate(convs):
            ids += c.input_ids
            lab = [t if m else IGNORE_INDEX for t, m in zip(c.input_ids, c.assistant_mask)]
            lab[0] = IGNORE_INDEX  # never predicted from the previous conversation
            labels += lab
            pos += list(range(len(c.input_ids)))
            docs += [d] * len(c.input_ids)
            report.tokens += len(c.input_ids)
            report.loss_tokens += sum(x != IGNORE_INDEX for x in lab)
        pad = seq_len - len(ids)
        report.padding += pad
        ids += [0] * pad
        labels += [IGNORE_INDEX] * pad
        pos += list(range(pad))  # padding is its own "conversation" for attention
        docs += [len(convs)] * pad
        samples.append(
            {
                "input_ids": torch.tensor(ids),
                "labels": torch.tensor(labels),
                "position_ids": torch.tensor(pos),
                "document_ids": torch.tensor(docs),
            }
        )
    report.samples = len(samples)
    return samples, report


# ---------------------------------------------------------------------------------------------- the whole pipeline


class _BadLog(BadRecordLog):
    """BadRecordLog with SFT's reasons; a conversation is counted once, whatever number of its samples are bad.
    `conversations`: the bad ones that count against max_bad_fraction; samples left out as too long (drop_long:
    asked for) are listed but do not count."""

    def __init__(self):
        super().__init__()
        self.counts = dict.fromkeys(REASONS, 0)
        self.examples = {reason: [] for reason in REASONS}
        self.conversations: set[tuple] = set()

    def add(self, entry: dict) -> None:
        super().add(entry)
        if entry["reason"] != "too_long":
            self.conversations.add((entry["file"], entry.get("line"), entry.get("row")))


@dataclass
class _Piece:
    """One sample of a conversation before rendering: messages[:end] of `record`, the loss on `learn`."""

    record: Record
    end: int
    learn: list[int]
    turn: int  # which sample of the conversation (0-based)
    of: int  # how many samples the conversation gave

    @property
    def where(self) -> str:
        return self.record.where + (f" (sample {self.turn + 1} of {self.of})" if self.of > 1 else "")

    @property
    def reasoning(self) -> bool:
        return any(has_reasoning(self.record.messages[i]) for i in self.learn)

    def render(self, tokenizer, mode: str = "plain", keep_tokens: int = 0) -> Conversation:
        messages = self.record.messages[: self.end]
        if mode != "plain":
            messages = without_reasoning(messages, self.learn, tokenizer if mode == "truncated" else None, keep_tokens)
        line = self.record.line if self.record.line is not None else self.record.row
        return tokenize_conversation(
            tokenizer, messages, line, tools=self.record.tools, learn=self.learn, where=self.where
        )


def _blend(data) -> tuple[dict[str, float], bool]:
    if isinstance(data, (str, os.PathLike)):
        return {os.fspath(data): 1.0}, False
    if not isinstance(data, dict) or not data:
        raise ValueError(f"data must be a path or a non-empty {{path: weight}} mapping, got {data!r}")
    for path, w in data.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"weight of {path} must be a finite number >= 0, got {w!r}")
    if not any(w > 0 for w in data.values()):
        raise ValueError(f"a blend needs at least one weight > 0, got {data}")
    return {os.fspath(p): float(w) for p, w in data.items()}, True


def _draw_counts(weights: list[float], total: int) -> list[int]:
    """Conversations drawn per dataset: shares of `total` by weight, rounded by largest remainder."""
    shares = [w / sum(weights) * total for w in weights]
    counts = [math.floor(s) for s in shares]
    for d in sorted(range(len(shares)), key=lambda d: counts[d] - shares[d])[: total - sum(counts)]:
        counts[d] += 1
    return counts


def _draw(n: int, count: int, rng: random.Random) -> list[int]:
    """`count` indices of range(n): whole copies, topped up with a random subset (kept in file order)."""
    return list(range(n)) * (count // n) + sorted(rng.sample(range(n), count % n))


def load_sft_samples(
    data,
    tokenizer,
    seq_len: int,
    *,
    drop_long: bool = False,
    seed: int = 0,
    reasoning_off_fraction: float = 0.0,
    reasoning_truncate_fraction: float = 0.0,
    reasoning_truncate_tokens: int = 64,
    max_bad_fraction: float = 0.01,
    bad_records_path: str | os.PathLike | None = None,
) -> tuple[list[dict], SFTReport]:
    """Conversations of `data` -> packed samples (see the module docstring). Returns (samples, report); raises
    TooManyBadRecords (carrying the report) when more than `max_bad_fraction` of the conversations are bad, after
    writing them all to `bad_records_path` (when given)."""
    check_max_bad_fraction(max_bad_fraction)
    for name, value in (("reasoning_off_fraction", reasoning_off_fraction),
                        ("reasoning_truncate_fraction", reasoning_truncate_fraction)):  # fmt: skip
        if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    if reasoning_off_fraction + reasoning_truncate_fraction > 1.0:
        raise ValueError("reasoning_off_fraction + reasoning_truncate_fraction must be at most 1")
    if isinstance(reasoning_truncate_tokens, bool) or not isinstance(reasoning_truncate_tokens, int):
        raise ValueError(f"reasoning_truncate_tokens must be an integer >= 1, got {reasoning_truncate_tokens!r}")
    if reasoning_truncate_tokens < 1:
        raise ValueError(f"reasoning_truncate_tokens must be >= 1, got {reasoning_truncate_tokens}")
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    weights, blended = _blend(data)
    report = SFTReport(max_bad_fraction=max_bad_fraction, bad_records_path=os.fspath(bad_records_path or ""))

    with _BadLog() as log:
        # Read, split into samples and render each one as it is (which finds the bad and the too long ones).
        datasets = []  # per dataset: the pieces of each usable conversation, and their renderings
        for path in weights:
            if weights[path] == 0:
                continue
            before, conversations = log.total, []
            for file in conversation_files(path):
                for record in iter_records(file):
                    report.records += 1
                    if isinstance(record, BadRecord):
                        log.add(record.to_dict())
                        continue
                    pieces = _usable_pieces(record, tokenizer, seq_len, drop_long, log)
                    if pieces:
                        conversations.append(pieces)
            datasets.append((path, conversations, log.total - before))
        report.bad_records, report.bad_examples = dict(log.counts), log.examples
        if bad_records_path is not None:
            os.makedirs(os.path.dirname(os.path.abspath(bad_records_path)), exist_ok=True)
            log.save(bad_records_path)
        bad = report.bad_conversations = len(log.conversations)
    if report.records and bad / report.records > max_bad_fraction:
        listed = f"every one is listed in {bad_records_path}" if bad_records_path else "see the report"
        raise TooManyBadRecords(
            f"{bad:,} of {report.records:,} conversations are bad ({bad / report.records:.2%}), above "
            f"max_bad_fraction {max_bad_fraction:g}; {listed}. Fix or remove them, or raise max_bad_fraction\n"
            + report.summary(),
            report,
        )

    # Draw the conversations of the blend.
    total = sum(len(c) for _, c, _ in datasets)
    counts = _draw_counts([weights[p] for p, _, _ in datasets], total) if blended else [len(c) for _, c, _ in datasets]
    drawn: list[tuple[_Piece, Conversation]] = []
    for d, ((path, conversations, nbad), count) in enumerate(zip(datasets, counts)):
        if count and not conversations:
            raise ValueError(f"{path}: no usable conversations, but its weight asks for {count} of them")
        picks = _draw(len(conversations), count, random.Random(f"sft-blend:{seed}:{d}")) if blended else range(count)
        start = len(drawn)
        for i in picks:
            drawn += conversations[i]
        report.datasets.append(
            {"path": path, "weight": weights[path], "conversations": len(conversations), "bad": nbad,
             "drawn": count, "samples": len(drawn) - start}
        )  # fmt: skip
    if not drawn:
        raise ValueError(f"no usable conversations in {list(weights)}:\n{report.summary()}")

    # Reasoning control: strip or truncate the reasoning of shares of the samples that have some.
    candidates = [k for k, (piece, _) in enumerate(drawn) if piece.reasoning]
    random.Random(f"sft-reasoning:{seed}").shuffle(candidates)
    report.reasoning_samples = len(candidates)
    report.reasoning_off = round(reasoning_off_fraction * len(candidates))
    report.reasoning_truncated = min(round(reasoning_truncate_fraction * len(candidates)),
                                     len(candidates) - report.reasoning_off)  # fmt: skip
    modes = dict.fromkeys(candidates[: report.reasoning_off], "off")
    modes |= dict.fromkeys(candidates[report.reasoning_off : report.reasoning_off + report.reasoning_truncated],
                           "truncated")  # fmt: skip
    rendered = [conv for _, conv in drawn]
    for k, mode in modes.items():
        rendered[k] = drawn[k][0].render(tokenizer, mode, reasoning_truncate_tokens)

    samples, packed = pack(rendered, seq_len, drop_long=False, seed=seed)
    for name in ("conversations", "samples", "tokens", "loss_tokens", "padding"):
        setattr(report, name, getattr(packed, name))
    return samples, report


def _usable_pieces(record: Record, tokenizer, seq_len: int, drop_long: bool, log: _BadLog):
    """(piece, rendering) of each sample of a conversation that renders and fits; the others are bad records
    (a sample too long without drop_long is an error)."""
    splits = user_turn_samples(record.messages)
    out = []
    for turn, (end, learn) in enumerate(splits):
        piece = _Piece(record, end, learn, turn, len(splits))
        bad = BadRecord("error", record.file, record.line, record.row)
        try:
            conv = piece.render(tokenizer)
        except Exception as e:  # the template raised, or renders prefixes differently: this record only
            log.add(bad.to_dict() | {"reason": "not_renderable", "detail": f"{type(e).__name__}: {e}"[:300]})
            return []
        if len(conv.input_ids) > seq_len:
            if not drop_long:
                raise ValueError(
                    f"{piece.where}: the conversation has {len(conv.input_ids)} tokens, more than seq_len={seq_len}; "
                    "raise seq_len or pass drop_long (--drop-long) to leave such conversations out"
                )
            detail = f"{len(conv.input_ids)} tokens, more than seq_len={seq_len}"
            if piece.of > 1:
                detail = f"sample {turn + 1} of {piece.of}: {detail}"
            log.add(bad.to_dict() | {"reason": "too_long", "detail": detail})
            continue
        out.append((piece, conv))
    return out
