"""Training and loading the tokenizer: byte-level BPE with Hugging Face `tokenizers`, saved as a transformers
tokenizer directory.

Faithful to GPT-2's byte-level BPE (ByteLevel pre-tokenizer and decoder; the trainer starts from all 256 byte
symbols, so every byte sequence is encodable and decoding restores text exactly; no normalizer, so nothing is
rewritten). Special tokens: `<s>` (bos), `</s>` (eos, also the end-of-document separator of the token shards),
`<pad>`, and the chat tokens of CHAT_TOKENS, each one id that is never split. The chat template is ChatML.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from ..utils import atomic_write
from .sources import (
    BAD_RECORDS_FILE,
    BadRecordLog,
    bad_records_summary,
    check_bad_fraction,
    check_max_bad_fraction,
    empty_counts,
    expand_inputs,
    iter_documents,
)

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
CHAT_TOKENS = (
    "<|im_start|>",
    "<|im_end|>",
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
)
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN) + CHAT_TOKENS

# ChatML: each message is `<|im_start|>{role}\n{content}<|im_end|>\n`; the generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_BYTE_ALPHABET_SIZE = 256


@dataclass
class TokenizerReport:
    """What train_tokenizer did: where it saved, the vocabulary size, documents used and bad records per reason
    (all of them listed in `bad_records_path`, the first few of each reason in `bad_examples`)."""

    path: str
    vocab_size: int
    documents: int
    bad_records: dict[str, int] = field(default_factory=empty_counts)
    bad_records_path: str = ""
    bad_examples: dict[str, list[dict]] = field(default_factory=dict)
    max_bad_fraction: float = 0.01

    def summary(self) -> str:
        records = self.documents + sum(self.bad_records.values())
        bad = bad_records_summary(
            self.bad_records, self.bad_examples, records, self.bad_records_path, self.max_bad_fraction
        )
        return f"{self.path}: vocab {self.vocab_size}, trained on {self.documents:,} documents\n{bad}"


def _documents(files: list[str], field: str, report: TokenizerReport, log: BadRecordLog) -> Iterator[str]:
    for path in files:
        for text in log.documents(iter_documents(path, field)):
            report.documents += 1
            yield text


def train_tokenizer(
    inputs: Iterable[str | os.PathLike],
    output_dir: str | os.PathLike,
    vocab_size: int = 8192,
    field: str = "text",
    min_frequency: int = 2,
    show_progress: bool = True,
    *,
    extensions: Iterable[str] | None = None,
    max_bad_fraction: float = 0.01,
) -> TokenizerReport:
    """Train a byte-level BPE tokenizer on the documents of `inputs` and save it as a transformers directory.

    Documents are streamed (the trainer keeps word counts, not text), so inputs may be larger than memory. Bad
    records are skipped and listed in `output_dir/bad_records.jsonl`; when more than `max_bad_fraction` of all
    records are bad, the tokenizer is still saved, then TooManyBadRecords (a ValueError carrying the report) is
    raised.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    minimum = _BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size {vocab_size} is too small: byte-level BPE needs at least {minimum}")
    check_max_bad_fraction(max_bad_fraction)
    files = expand_inputs(inputs, extensions)
    path = os.path.abspath(output_dir)
    bad_path = os.path.join(path, BAD_RECORDS_FILE)
    report = TokenizerReport(path, 0, 0, bad_records_path=bad_path, max_bad_fraction=max_bad_fraction)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    with BadRecordLog() as log:
        tok.train_from_iterator(_documents(files, field, report, log), trainer=trainer)
        log.save(report.bad_records_path)
    report.bad_records, report.bad_examples = log.counts, log.examples
    bad = log.total
    if report.documents == 0:
        raise ValueError(
            f"no documents to train on in {files} ({bad:,} bad records: {report.bad_records}, listed in "
            f"{report.bad_records_path})"
        )

    _save_atomically(_hf_tokenizer(tok), output_dir)
    report.vocab_size = tok.get_vocab_size()
    check_bad_fraction(bad, report.documents + bad, max_bad_fraction, report.bad_records_path, report)
    return report


def _hf_tokenizer(tok):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        # transformers 5 name of `additional_special_tokens` (which it still accepts and converts).
        extra_special_tokens=list(CHAT_TOKENS),
        chat_template=CHAT_TEMPLATE,
        # Decoding must give back the exact text; the default clean-up rewrites " ." as ".".
        clean_up_tokenization_spaces=False,
    )


def _save_atomically(hf_tokenizer, output_dir: str | os.PathLike) -> None:
    """save_pretrained into a scratch folder, then move each file into place with an atomic write."""
    os.makedirs(output_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".save-") as scratch:
        hf_tokenizer.save_pretrained(scratch)
        for name in sorted(os.listdir(scratch)):
            src = os.path.join(scratch, name)
            atomic_write(os.path.join(output_dir, name), functools.partial(shutil.copyfile, src))


def load_tokenizer(path: str | os.PathLike):
    """Load a Hugging Face tokenizer directory (ours or any other) and check it has the eos token we need."""
    from transformers import AutoTokenizer

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(
            f"tokenizer {path}: not a directory; pass a directory saved by `hybridmoe tokenizer train` "
            "or by a transformers tokenizer's save_pretrained"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"tokenizer {path}: cannot load it with transformers.AutoTokenizer ({e})") from e
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"tokenizer {path} has no eos token, which marks the end of each document; set one with "
            '`tokenizer.eos_token = "..."; tokenizer.save_pretrained(path)` or add "eos_token" to '
            "tokenizer_config.json"
        )
    return tokenizer


def vocab_size_of(tokenizer) -> int:
    """One more than the largest token id (added tokens included)."""
    return max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides the token ids: the full fast-tokenizer definition, else the vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    text += f"\neos={tokenizer.eos_token_id}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
