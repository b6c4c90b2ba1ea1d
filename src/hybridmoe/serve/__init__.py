"""Serving: the continuous-batching engine (token ids only), sampling, and MTP speculative decoding."""

from .engine import AdmissionError, CompletionOutput, Engine, LLMEngine, Request, RequestOutput, SlotPool
from .sampling import SamplingParams, TokenLogprob

__all__ = [
    "AdmissionError",
    "CompletionOutput",
    "Engine",
    "LLMEngine",
    "Request",
    "RequestOutput",
    "SamplingParams",
    "SlotPool",
    "TokenLogprob",
]
