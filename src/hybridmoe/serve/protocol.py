"""The OpenAI wire format: request models, the error body, server-sent events, and what a request may hold.

Request fields and their meanings follow OpenAI's API reference (https://platform.openai.com/docs/api-reference/chat
and /completions) with vLLM's extensions where users expect them (`top_k`, `stop_token_ids`, `ignore_eos`,
`chat_template_kwargs`, `reasoning_budget`, `max_tokens: 0` with `echo`, `return_token_ids`, `logprobs_mode` (vLLM's
engine option, per request here), the `/tokenize` and `/detokenize` bodies). Fields we do not use (`user`,
`metadata`, ...) are accepted and ignored.

Bodies are read by `parse_body`, never by a framework's implicit parser, so that every malformed body is a 400 with
OpenAI's error JSON: invalid UTF-8 or JSON, `NaN`/`Infinity` literals (not JSON), numbers with thousands of digits,
nesting deeper than `MAX_JSON_DEPTH`, lone UTF-16 surrogates (`"\\ud800"`: a string no tokenizer can encode), and
schema errors, each naming the field. `Limits` holds the sizes a server accepts (the flags of `hybridmoe serve`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_JSON_DEPTH = 64  # OpenAI request bodies nest at most ~8 deep (a tool's JSON schema goes deeper, rarely past 20)
MAX_INT = 2**31 - 1  # the largest count (max_tokens, reasoning_budget, seed, ...) a request may give


@dataclass
class Limits:
    """What one request may hold; the server answers anything beyond with a 400/413/503 that names the limit.

    max_body_bytes: HTTP body size (413). max_prompt_chars: characters of a prompt (or of all chat messages) before
    tokenizing. max_prompts: prompts of one /v1/completions batch, and choices of one request (prompts times n).
    max_stop: stop strings (OpenAI: 4). max_queue: requests waiting for an engine slot (503 with Retry-After beyond).
    request_timeout_s: the longest a request may run before it ends with a 504 (None: no limit). header_timeout_s /
    body_timeout_s: the longest a client may take to send the request head / body before the connection is closed
    (408 for the body); an idle kept-alive connection is closed after header_timeout_s (at least 5 s).
    max_connections: open HTTP connections (uvicorn answers 503 beyond)."""

    max_body_bytes: int = 8 * 2**20
    max_prompt_chars: int = 1_000_000
    max_prompts: int = 64
    max_stop: int = 4
    max_queue: int = 256
    request_timeout_s: float | None = 600.0
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 512

    def __post_init__(self):
        for name, value in vars(self).items():
            if value is not None and not value > 0:
                raise ValueError(f"server limit {name} must be > 0, got {value}")


# ---------------------------------------------------------------------------------------------- requests


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingFields(_Body):
    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=MAX_INT)  # not in OpenAI's API; vLLM's extension
    n: int = Field(1, ge=1, le=MAX_INT)  # choices per prompt; the server's limit is Limits.max_prompts
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # torch.Generator.manual_seed's range
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop_token_ids: list[int] | None = Field(None, max_length=64)  # vLLM's: token ids that also end the request
    ignore_eos: bool = False  # vLLM's: the model's end tokens do not end the request (stop_token_ids still do)
    # vLLM's engine option, here per request: the returned logprobs are the model's ("raw_logprobs") or those of the
    # distribution sampled from, after temperature, top-k and top-p ("processed_logprobs", what an RL trainer needs)
    logprobs_mode: Literal["raw_logprobs", "processed_logprobs"] = "raw_logprobs"


class ChatTemplateKwargs(_Body):
    """vLLM's `chat_template_kwargs`: the reasoning switch and budget (other keys are ignored)."""

    enable_thinking: bool = True
    reasoning_budget: int | None = Field(None, ge=0, le=MAX_INT)


class ChatCompletionRequest(_SamplingFields):
    # Messages and tools are checked by the chat layer (`chat.render_chat`), whose errors name the bad field.
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_INT)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_INT)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto"] | None = None
    reasoning_effort: str | None = None  # "none" turns reasoning off; other levels leave it on
    chat_template_kwargs: ChatTemplateKwargs | None = None
    reasoning_budget: int | None = Field(None, ge=0, le=MAX_INT)


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0, le=MAX_INT)  # 0 only with echo: score the prompt (vLLM)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    # vLLM's: each choice also carries `prompt_token_ids` and the sampled `token_ids` (the stop token included), the
    # exact tokens a trainer needs (no re-tokenized text)
    return_token_ids: bool = False


class TokenizeRequest(_Body):
    """vLLM's `/tokenize`: a text `prompt`, or chat `messages` (and `tools`) rendered with the chat template."""

    model: str | None = None
    prompt: str | None = None
    add_special_tokens: bool = False  # for `prompt`; False is how /v1/completions tokenizes a text prompt
    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: ChatTemplateKwargs | None = None
    return_token_strs: bool = False


class DetokenizeRequest(_Body):
    """vLLM's `/detokenize`: token ids to text."""

    model: str | None = None
    tokens: list[int]


class WeightUpdateRequest(_Body):
    """`POST /v1/weights`: load new weights from `path` (a directory with model.safetensors, the served model's
    tensor names and shapes) as `version` (higher than the loaded one)."""

    path: str = Field(min_length=1, max_length=4096)
    version: int = Field(ge=0, le=2**63 - 1)


# ---------------------------------------------------------------------------------------------- errors


class APIError(Exception):
    """An error the client gets as OpenAI's error body with HTTP `status` (and `headers`, e.g. Retry-After)."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param=None, code=None,
                 headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def shutting_down() -> APIError:
    return APIError(503, "the server is shutting down; retry on another server", "server_error", code="shutting_down")


class Disconnected(APIError):
    def __init__(self):
        super().__init__(499, "the client closed the connection", code="client_disconnected")  # nginx's 499


# ---------------------------------------------------------------------------------------------- parsing


def _not_json(constant: str):
    raise ValueError(f"{constant} is not valid JSON; send numbers as finite decimals")


def parse_body(raw: bytes, model: type[BaseModel]) -> BaseModel:
    """The request body `raw` as `model`, or an APIError(400) saying what is wrong and where (module docstring)."""
    try:
        obj = json.loads(raw, parse_constant=_not_json)
    except RecursionError:
        raise APIError(400, f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as e:  # JSONDecodeError, invalid UTF-8, integers past Python's digit limit, NaN
        raise APIError(400, f"We could not parse the JSON body of your request ({e})") from None
    check_json(obj)
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        where = ".".join(str(x) for x in first["loc"])
        message = f"{where}: {first['msg']}" if where else first["msg"]
        raise APIError(400, message, param=where or None) from None


def check_json(obj) -> None:
    """Raise APIError(400) if `obj` (parsed JSON) nests deeper than MAX_JSON_DEPTH or holds a lone surrogate in a
    string or key. Iterative, so any depth is safe to check."""
    stack = [(obj, 1, "")]
    while stack:
        value, depth, path = stack.pop()
        if isinstance(value, str):
            _check_text(value, path)
            continue
        if not isinstance(value, (dict, list)):
            continue
        if depth > MAX_JSON_DEPTH:
            raise APIError(400, f"{path or 'the body'} nests deeper than {MAX_JSON_DEPTH} levels", param=path or None)
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            child = f"{path}.{key}" if path else str(key)
            if isinstance(key, str):
                _check_text(key, child)
            stack.append((item, depth + 1, child))


def _check_text(text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(400, f"{path}: a lone UTF-16 surrogate ({text[e.start]!r} at character {e.start}) is not "
                            "text; send valid Unicode", param=path or None) from None  # fmt: skip


# ---------------------------------------------------------------------------------------------- responses


def sse(obj) -> str:
    """One server-sent event carrying `obj` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
