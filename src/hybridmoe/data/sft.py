"""Supervised fine-tuning data: chat conversations -> token ids with an assistant-only loss mask -> packed samples.

Faithful to the SFT recipe of `../shared/reference/posttraining.md`: the loss covers assistant tokens only, and
conversations are packed first-fit into fixed-length samples with per-token conversation ids, so nothing attends
across (or carries Mamba state across) conversations.

- Input: JSONL, one conversation per line, `{"messages": [{"role": ..., "content": ...}, ...]}` (OpenAI / Hugging
  Face chat format; a bare list of messages per line is accepted too). Roles: system, user, assistant, tool.
- Rendering: the tokenizer's own chat template (`apply_chat_template`). Which tokens are the assistant's is found
  from the template itself, without special markers: the conversation is rendered once up to each assistant
  message (with the generation prompt) and once through it; the tokens between are that message's. A template
  that rewrites earlier turns when later ones are added (so the prefixes disagree) gets a clear error.
- Packing: first-fit decreasing into samples of `seq_len` tokens; each sample carries `document_ids` (0, 1, ...
  per conversation, the next id for the padding at the end), `position_ids` restarting at 0 in every conversation
  (what transformers reads, without a cache, to keep packed sequences apart in attention) and `labels` (-100 off
  the assistant's tokens, on padding and on every conversation's first token, which would otherwise be predicted
  from the previous conversation).
- Nothing is dropped silently: a conversation longer than `seq_len` is an error naming it, unless `drop_long` is
  set, in which case the count is reported.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field

import torch

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Conversation:
    input_ids: list[int]
    assistant_mask: list[bool]  # True where the token is part of an assistant message (a loss target)
    line: int  # 1-based line of the source file


@dataclass
class PackReport:
    conversations: int = 0
    samples: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    padding: int = 0
    dropped_long: list[int] = field(default_factory=list)  # source lines

    def summary(self) -> str:
        fill = self.tokens / max(1, self.tokens + self.padding)
        s = (
            f"{self.conversations} conversations -> {self.samples} packed samples, {self.tokens} tokens "
            f"({self.loss_tokens} assistant), {fill:.1%} filled"
        )
        if self.dropped_long:
            s += f"; dropped {len(self.dropped_long)} longer than seq_len (lines {self.dropped_long[:5]}...)"
        return s


def read_conversations(path: str | os.PathLike) -> list[tuple[int, list[dict]]]:
    """(line number, messages) of every non-empty line of a JSONL file; a clear error for a malformed line."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            messages = record.get("messages") if isinstance(record, dict) else record
            if not isinstance(messages, list) or not messages:
                raise ValueError(f'{where}: expected {{"messages": [{{"role": ..., "content": ...}}, ...]}}')
            for i, m in enumerate(messages):
                if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content", ""), str):
                    raise ValueError(
                        f"{where}: message {i} must be {{'role': one of {ROLES}, 'content': str}}, got {str(m)[:80]}"
                    )
            if not any(m["role"] == "assistant" for m in messages):
                raise ValueError(f"{where}: no assistant message, so nothing to learn from this conversation")
            out.append((n, messages))
    if not out:
        raise ValueError(f"{path}: no conversations")
    return out


def tokenize_conversation(tokenizer, messages: list[dict], line: int = 0) -> Conversation:
    """Render with the tokenizer's chat template; mark the tokens of every assistant message."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"{getattr(tokenizer, 'name_or_path', 'the tokenizer')} has no chat template; fine-tuning on messages "
            "needs one (set tokenizer.chat_template or use an instruct model's tokenizer)"
        )

    def render(msgs, prompt=False) -> list[int]:
        out = tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=prompt)
        if hasattr(out, "keys"):  # transformers 5 may return a BatchEncoding
            out = out["input_ids"]
        return list(out)

    ids = render(messages)
    mask = [False] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(render(messages[:i], prompt=True)) if i else 0
        through = render(messages[: i + 1])
        end = len(through)
        if through != ids[:end] or start > end:
            raise ValueError(
                f"line {line}: the chat template renders the conversation's prefixes differently from the whole "
                "conversation, so the assistant's tokens cannot be located; use a template whose turns do not "
                "change when later turns are added"
            )
        for j in range(start, end):
            mask[j] = True
    return Conversation(ids, mask, line)


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
                    f"line {c.line}: the conversation has {len(c.input_ids)} tokens, more than seq_len={seq_len}; "
                    "raise seq_len or pass drop_long (--drop-long) to leave such conversations out"
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


def load_sft_samples(path, tokenizer, seq_len: int, drop_long: bool = False, seed: int = 0):
    """read_conversations -> tokenize_conversation -> pack."""
    convs = [tokenize_conversation(tokenizer, msgs, line) for line, msgs in read_conversations(path)]
    return pack(convs, seq_len, drop_long=drop_long, seed=seed)
