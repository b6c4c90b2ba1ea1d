"""Serving: the continuous-batching engine (token ids only), sampling, MTP speculative decoding, and the chat layer.

The HTTP server (`hybridmoe.serve.server`, FastAPI) is imported only where it is used."""

from .chat import (
    ChatDelta,
    ChatOutputParser,
    ChatPrompt,
    IncrementalDetokenizer,
    ReasoningBudget,
    ToolCall,
    parse_chat_output,
    render_chat,
)
from .engine import AdmissionError, CompletionOutput, Engine, LLMEngine, Request, RequestOutput, SlotPool
from .sampling import SamplingParams, TokenLogprob

__all__ = [
    "AdmissionError",
    "ChatDelta",
    "ChatOutputParser",
    "ChatPrompt",
    "CompletionOutput",
    "Engine",
    "IncrementalDetokenizer",
    "LLMEngine",
    "ReasoningBudget",
    "Request",
    "RequestOutput",
    "SamplingParams",
    "SlotPool",
    "TokenLogprob",
    "ToolCall",
    "parse_chat_output",
    "render_chat",
]
