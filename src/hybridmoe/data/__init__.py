"""Pretraining data: raw documents (sources), the tokenizer (tokenizer), and token shards (prepare)."""

from .prepare import FORMAT, prepare
from .sources import REASONS, BadRecord, expand_inputs, iter_documents
from .tokenizer import load_tokenizer, train_tokenizer

__all__ = [
    "FORMAT",
    "REASONS",
    "BadRecord",
    "expand_inputs",
    "iter_documents",
    "load_tokenizer",
    "prepare",
    "train_tokenizer",
]
