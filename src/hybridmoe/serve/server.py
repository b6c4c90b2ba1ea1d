"""An OpenAI-compatible HTTP server over the engine: FastAPI routes, one engine worker thread, SSE streaming.

vLLM's split at a small size: the protocol (Pydantic request models, OpenAI's JSON shapes and error body), the
serving class (`OpenAIServing`: prompt rendering, sampling parameters, the engine worker, metrics) and the router
(`create_app`). Endpoints: `POST /v1/chat/completions` (streaming or not, tools with tool_choice "none"/"auto",
reasoning), `POST /v1/completions`, `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text format).

- Worker. `EngineWorker` owns the engine: one thread runs `engine.step()` while any request is unfinished and
  sleeps on an event otherwise. Handlers (on the asyncio loop) add requests, which the engine allows from another
  thread (its inboxes), and receive each `RequestOutput` through their own asyncio.Queue
  (`loop.call_soon_threadsafe`). If a step raises, every open request gets a 500 and /health turns 503.
- Streaming. Each output's tokens go through `IncrementalDetokenizer` (stop strings cut) and, for chat,
  `ChatOutputParser`; every non-empty delta is one SSE `data:` chunk, then a chunk with finish_reason, an optional
  usage chunk (`stream_options.include_usage`) and `data: [DONE]`. An error after the stream began is sent as
  `data: {"error": {...}}`, which the openai client raises as APIError.
- Cancellation. A client that disconnects cancels its engine request: for streams, Starlette cancels the response
  generator (its `finally` cancels); for plain responses a watcher polls `request.is_disconnected()`.
- Graceful shutdown (`GracefulServer`, used by `hybridmoe serve`): on SIGINT/SIGTERM new requests get 503, requests
  in flight get `grace_s` seconds to finish, the rest end with a clean 503 error (a JSON body, or an error event
  in their stream); then uvicorn closes. A second Ctrl-C forces the exit.
- Errors are OpenAI's body `{"error": {"message", "type", "param", "code"}}`: invalid JSON, schema or parameter
  errors and context overflow (the engine's AdmissionError, code "context_length_exceeded") are 400 (FastAPI's
  422 mapped to 400 as OpenAI does), an unknown model 404 ("model_not_found"), unknown routes 404, internal
  errors 500.

Reasoning is on unless the request says `reasoning_effort: "none"` or `chat_template_kwargs: {"enable_thinking":
false}` (vLLM's switch); `reasoning_budget: N` (or `chat_template_kwargs.reasoning_budget`) forces `</think>` after N
thinking tokens; the server's default budget applies otherwise. Requests accept only `n = 1`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import time
import uuid
from collections import Counter
from contextlib import aclosing, asynccontextmanager
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .chat import THINK_END, ChatDelta, ChatOutputParser, IncrementalDetokenizer, ReasoningBudget, render_chat
from .engine import AdmissionError, Engine, RequestOutput
from .sampling import SamplingParams, TokenLogprob

logger = logging.getLogger("hybridmoe.serve")

# ---------------------------------------------------------------------------------------------- protocol


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # fields we do not use (user, metadata, ...) are accepted and ignored


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingFields(_Body):
    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # not in OpenAI's API; vLLM's extension
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


class ChatCompletionRequest(_SamplingFields):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto"] | None = None
    reasoning_effort: str | None = None  # "none" turns reasoning off; other levels leave it on
    chat_template_kwargs: dict[str, Any] | None = None  # {"enable_thinking": bool, "reasoning_budget": int}
    reasoning_budget: int | None = Field(None, ge=0)


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


class APIError(Exception):
    """An error the client gets as OpenAI's error body with `status`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _shutting_down() -> APIError:
    return APIError(503, "the server is shutting down; retry on another server", "server_error", code="shutting_down")


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# ---------------------------------------------------------------------------------------------- engine worker


class _Disconnected(APIError):
    def __init__(self):
        super().__init__(499, "the client closed the connection", code="client_disconnected")  # nginx's 499


class EngineWorker:
    """Runs the engine's step loop in one background thread and routes each request's outputs to its queue."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.error: BaseException | None = None  # the exception that stopped the loop
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="hybridmoe-engine", daemon=True)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    @property
    def num_open(self) -> int:
        return len(self._queues)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, queue: asyncio.Queue) -> None:
        """Called on the event loop; raises the engine's AdmissionError / ValueError."""
        if not self.alive:
            raise APIError(500, f"the engine is not running ({self.error!r})", "server_error")
        self._queues[request_id] = (asyncio.get_running_loop(), queue)  # before the engine can produce outputs
        try:
            self.engine.add_request(prompt_token_ids, params, request_id)
        except BaseException:
            self._queues.pop(request_id, None)
            raise
        self._wake.set()

    def cancel(self, request_id: str) -> None:
        if self._queues.pop(request_id, None) is not None:
            self.engine.cancel(request_id)

    def abort_all(self, error: BaseException) -> None:
        """End every open request: cancel it in the engine and hand `error` to its consumer."""
        for request_id, (loop, queue) in list(self._queues.items()):
            self.cancel(request_id)
            _put(loop, queue, error)

    def _run(self) -> None:
        while not self._stop:
            if not self.engine.has_unfinished():
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except BaseException as e:  # the engine's state is unknown now: fail every request, stop stepping
                logger.exception("engine step failed; the server can no longer serve requests")
                self.error = e
                self.abort_all(APIError(500, f"the engine failed: {e!r}", "server_error"))
                return
            for out in outputs:
                entry = self._queues.pop(out.request_id, None) if out.finished else self._queues.get(out.request_id)
                if entry is not None:
                    _put(*entry, out)


def _put(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, item) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
        loop.call_soon_threadsafe(queue.put_nowait, item)


# ---------------------------------------------------------------------------------------------- metrics

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class _Histogram:
    def __init__(self, buckets=_LATENCY_BUCKETS):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        return out + [f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]


class Metrics:
    """Counters and histograms in Prometheus's text format (updated on the event loop only)."""

    def __init__(self):
        self.requests: Counter[tuple[str, int]] = Counter()  # (endpoint, HTTP status)
        self.prompt_tokens = self.generation_tokens = 0
        self.latency, self.ttft = _Histogram(), _Histogram()

    def render(self, worker: EngineWorker) -> str:
        lines = ["# HELP hybridmoe_requests_total Requests by endpoint and HTTP status.",
                 "# TYPE hybridmoe_requests_total counter"]  # fmt: skip
        for (endpoint, status), n in sorted(self.requests.items()):
            lines.append(f'hybridmoe_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
        for name, value, kind, doc in (
            ("hybridmoe_prompt_tokens_total", self.prompt_tokens, "counter", "Prompt tokens of finished requests."),
            ("hybridmoe_generation_tokens_total", self.generation_tokens, "counter", "Tokens generated."),
            ("hybridmoe_num_requests_running", worker.engine.num_running, "gauge", "Requests holding a slot."),
            ("hybridmoe_num_requests_waiting", worker.engine.num_waiting, "gauge", "Requests waiting for a slot."),
        ):
            lines += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}", f"{name} {value}"]
        for name, hist, doc in (
            ("hybridmoe_request_latency_seconds", self.latency, "Time from arrival to the last token."),
            ("hybridmoe_time_to_first_token_seconds", self.ttft, "Time from arrival to the first token."),
        ):
            lines += [f"# HELP {name} {doc}", f"# TYPE {name} histogram", *hist.lines(name)]
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- serving


class OpenAIServing:
    """What the routes call: turns OpenAI requests into engine requests and engine outputs into OpenAI responses.

    reasoning_budget: the default thinking-token budget of chat requests (None: unlimited)."""

    def __init__(self, engine: Engine, tokenizer, model_name: str, reasoning_budget: int | None = None):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.reasoning_budget = reasoning_budget
        self.worker = EngineWorker(engine)
        self.metrics = Metrics()
        self.created = int(time.time())
        self.draining = False
        self.loop: asyncio.AbstractEventLoop | None = None
        vocab = tokenizer.get_vocab()
        self.think_end_id = vocab.get(THINK_END)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.worker.start()

    def stop(self) -> None:
        self.worker.abort_all(_shutting_down())
        self.worker.stop()

    async def drain(self, grace_s: float) -> None:
        """Refuse new requests, give the open ones `grace_s` seconds, then end the rest with a clean error."""
        self.draining = True
        deadline = time.monotonic() + grace_s
        while self.worker.num_open and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.worker.num_open:
            logger.warning("shutdown: ending %d unfinished requests", self.worker.num_open)
            self.worker.abort_all(_shutting_down())

    # ------------------------------------------------------------------ checks
    def check(self, model: str) -> None:
        if self.draining:
            raise _shutting_down()
        if model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist; this server serves `{self.model_name}`",
                           param="model", code="model_not_found")  # fmt: skip

    def sampling_params(self, body: _SamplingFields, prompt_len: int, max_tokens: int | None, **kw) -> SamplingParams:
        if body.n != 1:
            raise APIError(400, f"n={body.n} is not supported; only n=1", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(body, name):
                raise APIError(400, f"{name} is not supported; leave it at 0", param=name)
        if max_tokens is None:  # as much as the context allows (at least 1, so an overflowing prompt is reported)
            max_tokens = max(1, self.engine.max_model_len - prompt_len)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        try:
            return SamplingParams(
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                top_k=body.top_k, max_tokens=max_tokens, stop=stop, seed=body.seed, **kw,
            )  # fmt: skip
        except ValueError as e:
            raise APIError(400, str(e)) from e

    # ------------------------------------------------------------------ engine requests
    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams, queue, param: str) -> None:
        try:
            self.worker.add(request_id, prompt_ids, params, queue)
        except AdmissionError as e:
            raise APIError(400, str(e), param=param, code="context_length_exceeded") from e
        except ValueError as e:
            raise APIError(400, str(e), param=param) from e

    async def outputs(self, queue: asyncio.Queue, request_ids: list[str], request: Request | None = None):
        """The outputs of `request_ids` (sharing `queue`) until all finish. With `request`, a watcher cancels them
        when the client goes away; leaving early (an error, the stream cancelled) cancels what is unfinished."""
        open_ids = set(request_ids)
        watcher = asyncio.ensure_future(self._watch(request, queue)) if request is not None else None
        try:
            while open_ids:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    open_ids.discard(item.request_id)
                yield item
        finally:
            if watcher is not None:
                watcher.cancel()
            for request_id in open_ids:
                self.worker.cancel(request_id)

    @staticmethod
    async def _watch(request: Request, queue: asyncio.Queue) -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.25)
        queue.put_nowait(_Disconnected())

    def _finish_metrics(self, out: RequestOutput, t0: float) -> None:
        self.metrics.prompt_tokens += out.num_prompt_tokens
        self.metrics.latency.observe(time.monotonic() - t0)

    def _visible_ids(self, out: RequestOutput) -> list[int]:
        """The new tokens without the stop token that ended the request (OpenAI leaves it out of the text)."""
        if out.finished and out.finish_reason == "stop" and isinstance(out.stop_reason, int) and out.new_token_ids:
            return out.new_token_ids[:-1]
        return out.new_token_ids

    def _token_logprobs(self, out: RequestOutput) -> list[TokenLogprob]:
        lps = out.new_logprobs or []
        return lps[: len(self._visible_ids(out))]

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _chat_logprob(self, lp: TokenLogprob) -> dict:
        def entry(token_id, logprob):
            text = self._token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return entry(lp.token_id, lp.logprob) | {"top_logprobs": [entry(t, v) for t, v in lp.top]}

    # ------------------------------------------------------------------ chat
    async def chat(self, body: ChatCompletionRequest, request: Request):
        t0 = time.monotonic()
        self.check(body.model)
        kwargs = body.chat_template_kwargs or {}
        reasoning = bool(kwargs.get("enable_thinking", True)) and body.reasoning_effort != "none"
        budget = body.reasoning_budget if body.reasoning_budget is not None else kwargs.get("reasoning_budget")
        budget = self.reasoning_budget if budget is None else budget
        try:
            prompt = render_chat(self.tokenizer, body.messages, body.tools, reasoning=reasoning)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from e
        processors = []
        if prompt.reasoning and budget is not None and self.think_end_id is not None:
            try:
                processors.append(ReasoningBudget(int(budget), self.think_end_id))
            except (TypeError, ValueError) as e:
                raise APIError(400, f"reasoning_budget: {e}", param="reasoning_budget") from e
        max_tokens = body.max_completion_tokens or body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = self.sampling_params(body, len(prompt.token_ids), max_tokens, logprobs=logprobs,
                                      logits_processors=processors)  # fmt: skip
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        queue: asyncio.Queue = asyncio.Queue()
        self.submit(request_id, prompt.token_ids, params, queue, param="messages")
        parse_tools = bool(body.tools) and body.tool_choice != "none"
        state = _ChatState(self, request_id, body.model, prompt.reasoning, parse_tools, params.stop)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = self._chat_stream(state, queue, include_usage, t0)
            return StreamingResponse(stream, media_type="text/event-stream")
        message, lps, last = ChatDelta(), [], None
        async with aclosing(self.outputs(queue, [request_id], request)) as outputs:
            async for out in outputs:
                if last is None:
                    self.metrics.ttft.observe(time.monotonic() - t0)
                message += state.update(out)
                lps += [self._chat_logprob(lp) for lp in self._token_logprobs(out)]
                last = out
        self._finish_metrics(last, t0)
        self.metrics.requests["/v1/chat/completions", 200] += 1
        msg = {"role": "assistant", "content": message.content or (None if message.tool_calls else ""),
               "reasoning_content": message.reasoning_content or None}  # fmt: skip
        if message.tool_calls:
            msg["tool_calls"] = [c.to_openai() for c in message.tool_calls]
        choice = {"index": 0, "message": msg, "logprobs": {"content": lps} if body.logprobs else None,
                  "finish_reason": state.finish_reason(last)}  # fmt: skip
        return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": body.model,
                "choices": [choice], "usage": _usage(last)}  # fmt: skip

    async def _chat_stream(self, state: _ChatState, queue: asyncio.Queue, include_usage: bool, t0: float):
        def chunk(delta: dict, finish_reason=None, logprobs=None) -> str:
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
            return _sse(state.header("chat.completion.chunk") | {"choices": [choice]})

        yield chunk({"role": "assistant", "content": ""})
        last = None
        try:
            async with aclosing(self.outputs(queue, [state.request_id])) as outputs:
                async for out in outputs:
                    if last is None:
                        self.metrics.ttft.observe(time.monotonic() - t0)
                    delta = state.update(out)
                    lps = [self._chat_logprob(lp) for lp in self._token_logprobs(out)] if out.new_logprobs else None
                    if delta or lps:
                        yield chunk(_delta_json(delta), logprobs={"content": lps} if lps else None)
                    last = out
            yield chunk({}, finish_reason=state.finish_reason(last))
            if include_usage:
                yield _sse(state.header("chat.completion.chunk") | {"choices": [], "usage": _usage(last)})
            self._finish_metrics(last, t0)
            self.metrics.requests["/v1/chat/completions", 200] += 1
        except APIError as e:
            self.metrics.requests["/v1/chat/completions", e.status] += 1
            yield _sse(e.body())
        yield "data: [DONE]\n\n"

    # ------------------------------------------------------------------ completions
    async def completions(self, body: CompletionRequest, request: Request):
        t0 = time.monotonic()
        self.check(body.model)
        prompts = _prompt_ids(self.tokenizer, body.prompt)
        cid = f"cmpl-{uuid.uuid4().hex}"
        queue: asyncio.Queue = asyncio.Queue()
        ids = [f"{cid}-{i}" for i in range(len(prompts))]
        states = {}
        try:
            for i, (request_id, ids_) in enumerate(zip(ids, prompts)):
                params = self.sampling_params(body, len(ids_), body.max_tokens, logprobs=body.logprobs)
                self.submit(request_id, ids_, params, queue, param="prompt")
                states[request_id] = _CompletionState(self, i, ids_, params.stop, body.echo)
        except APIError:
            for request_id in states:
                self.worker.cancel(request_id)
            raise
        header = {"id": cid, "object": "text_completion", "created": int(time.time()), "model": body.model}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._completion_stream(header, states, queue, include_usage, t0),
                                     media_type="text/event-stream")  # fmt: skip
        async with aclosing(self.outputs(queue, ids, request)) as outputs:
            async for out in outputs:
                states[out.request_id].update(out)
        for s in states.values():
            self._finish_metrics(s.last, t0)
        self.metrics.requests["/v1/completions", 200] += 1
        choices = [s.choice(s.text, body.logprobs is not None) for s in states.values()]
        return header | {"choices": choices, "usage": _usage(*(s.last for s in states.values()))}

    async def _completion_stream(self, header, states, queue, include_usage, t0):
        try:
            async with aclosing(self.outputs(queue, list(states))) as outputs:
                async for out in outputs:
                    s = states[out.request_id]
                    text = s.update(out)
                    if text or out.finished or out.new_logprobs:
                        yield _sse(header | {"choices": [s.choice(text, out.new_logprobs is not None, delta=True)]})
            if include_usage:
                yield _sse(header | {"choices": [], "usage": _usage(*(s.last for s in states.values()))})
            for s in states.values():
                self._finish_metrics(s.last, t0)
            self.metrics.requests["/v1/completions", 200] += 1
        except APIError as e:
            self.metrics.requests["/v1/completions", e.status] += 1
            yield _sse(e.body())
        yield "data: [DONE]\n\n"


class _ChatState:
    """One chat request's detokenizer and parser."""

    def __init__(self, serving: OpenAIServing, request_id, model, reasoning, parse_tools, stop):
        self.serving, self.request_id, self.model = serving, request_id, model
        self.detok = IncrementalDetokenizer(serving.tokenizer, stop=stop)
        self.parser = ChatOutputParser(reasoning, parse_tools)
        self.num_calls = 0
        self.created = int(time.time())

    def header(self, obj: str) -> dict:
        return {"id": self.request_id, "object": obj, "created": self.created, "model": self.model}

    def update(self, out: RequestOutput) -> ChatDelta:
        self.serving.metrics.generation_tokens += len(out.new_token_ids)
        text = self.detok.add(self.serving._visible_ids(out))
        if out.finished:
            text += self.detok.finish()
        delta = self.parser.feed(text)
        if out.finished:
            delta += self.parser.finish()
        self.num_calls += len(delta.tool_calls)
        return delta

    def finish_reason(self, out: RequestOutput) -> str:
        if out.finish_reason == "length":
            return "length"
        return "tool_calls" if self.num_calls else "stop"


class _CompletionState:
    def __init__(self, serving: OpenAIServing, index: int, prompt_ids: list[int], stop, echo: bool):
        self.serving, self.index = serving, index
        self.detok = IncrementalDetokenizer(serving.tokenizer, stop=stop)
        self.text = ""  # all of the choice's text so far
        self._echo = serving.tokenizer.decode(prompt_ids) if echo else ""  # sent before the first new text
        self.logprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        self.last: RequestOutput | None = None

    def update(self, out: RequestOutput) -> str:
        self.serving.metrics.generation_tokens += len(out.new_token_ids)
        self.last = out
        offset = len(self.text) + len(self._echo)
        text = self._echo + self.detok.add(self.serving._visible_ids(out))
        self._echo = ""
        if out.finished:
            text += self.detok.finish()
        self._new_lps = self.serving._token_logprobs(out)
        for lp in self._new_lps:
            token = self.serving._token_text(lp.token_id)
            self.logprobs["tokens"].append(token)
            self.logprobs["token_logprobs"].append(lp.logprob)
            self.logprobs["top_logprobs"].append({self.serving._token_text(t): v for t, v in lp.top})
            self.logprobs["text_offset"].append(offset)
            offset += len(token)
        self.text += text
        return text

    def choice(self, text: str, with_logprobs: bool, delta: bool = False) -> dict:
        logprobs = None
        if with_logprobs:
            n = len(self._new_lps) if delta else len(self.logprobs["tokens"])
            logprobs = {k: v[len(v) - n :] for k, v in self.logprobs.items()}
        finish = None
        if self.last is not None and self.last.finished:
            finish = "length" if self.last.finish_reason == "length" else "stop"
        return {"index": self.index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def _delta_json(delta: ChatDelta) -> dict:
    out = {}
    if delta.reasoning_content:
        out["reasoning_content"] = delta.reasoning_content
    if delta.content:
        out["content"] = delta.content
    if delta.tool_calls:
        out["tool_calls"] = [c.to_openai() | {"index": c.index} for c in delta.tool_calls]
    return out


def _usage(*outs: RequestOutput) -> dict:
    prompt = sum(o.num_prompt_tokens for o in outs)
    completion = sum(o.num_generated_tokens for o in outs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _prompt_ids(tokenizer, prompt) -> list[list[int]]:
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt is empty", param="prompt")
    return [tokenizer(p, add_special_tokens=False)["input_ids"] if isinstance(p, str) else list(p) for p in prompt]


# ---------------------------------------------------------------------------------------------- router


def create_app(serving: OpenAIServing) -> FastAPI:
    """The FastAPI app over `serving`; its lifespan starts and stops the engine worker."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        serving.start()
        try:
            yield
        finally:
            serving.stop()

    app = FastAPI(title="hybridmoe", lifespan=lifespan)
    app.state.serving = serving

    def error(status: int, path: str, body: dict) -> JSONResponse:
        serving.metrics.requests[path, status] += 1
        return JSONResponse(body, status_code=status)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return error(e.status, request.url.path, e.body())

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            message = f"We could not parse the JSON body of your request ({first.get('msg', 'invalid JSON')})"
            return error(400, request.url.path, APIError(400, message).body())
        where = ".".join(loc)
        message = f"{where}: {first.get('msg', 'invalid value')}" if where else first.get("msg", "invalid request")
        return error(400, request.url.path, APIError(400, message, param=where or None).body())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        code = "not_found" if e.status_code == 404 else None
        message = f"{request.method} {request.url.path}: {e.detail}"
        return error(e.status_code, request.url.path, APIError(e.status_code, message, code=code).body())

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        logger.exception("internal error on %s", request.url.path)
        return error(500, request.url.path, APIError(500, f"internal error: {e!r}", "server_error").body())

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await serving.chat(body, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await serving.completions(body, request)

    @app.get("/v1/models")
    async def models():
        card = {"id": serving.model_name, "object": "model", "created": serving.created, "owned_by": "hybridmoe",
                "max_model_len": serving.engine.max_model_len}  # fmt: skip
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health():
        if not serving.worker.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        if serving.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(serving.metrics.render(serving.worker), media_type="text/plain; version=0.0.4")

    return app


# ---------------------------------------------------------------------------------------------- running


class GracefulServer(uvicorn.Server):
    """uvicorn's Server whose exit drains first (`OpenAIServing.drain`): on the first SIGINT/SIGTERM, or
    `begin_shutdown()` from any thread, requests in flight get `grace_s` seconds, then uvicorn exits."""

    def __init__(self, config: uvicorn.Config, serving: OpenAIServing, grace_s: float = 30.0):
        super().__init__(config)
        self.serving, self.grace_s = serving, grace_s
        self._draining = False

    def handle_exit(self, sig, frame) -> None:
        if self._draining or self.serving.loop is None:
            super().handle_exit(sig, frame)  # a second signal, or not started: uvicorn's own exit
        else:
            self.begin_shutdown()

    def begin_shutdown(self, grace_s: float | None = None):
        """Start the drain; returns a concurrent.futures.Future that is done once uvicorn was told to exit."""
        self._draining = True
        grace_s = self.grace_s if grace_s is None else grace_s

        async def drain_then_exit():
            try:
                await self.serving.drain(grace_s)
            finally:
                self.should_exit = True

        return asyncio.run_coroutine_threadsafe(drain_then_exit(), self.serving.loop)


def build_server(
    serving: OpenAIServing, host: str = "127.0.0.1", port: int = 8000, grace_s: float = 30.0, log_level="info"
) -> tuple[GracefulServer, socket.socket]:
    """A GracefulServer and its bound listening socket (port 0: a free port, read it from the socket)."""
    config = uvicorn.Config(create_app(serving), log_level=log_level, timeout_graceful_shutdown=max(1, int(grace_s)))
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return GracefulServer(config, serving, grace_s), sock


class ServerThread:
    """A server running in a background thread (tests, notebooks): `url`, `stop(grace_s)`."""

    def __init__(self, serving: OpenAIServing, host: str = "127.0.0.1", port: int = 0, grace_s: float = 30.0):
        self.server, self.sock = build_server(serving, host, port, grace_s, log_level="warning")
        host, port = self.sock.getsockname()[:2]
        self.url = f"http://{host}:{port}"
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.01)

    def stop(self, grace_s: float | None = None, timeout: float = 60.0) -> None:
        if self.thread.is_alive():
            self.server.begin_shutdown(grace_s).result(timeout)
            self.thread.join(timeout)


def serve(
    checkpoint: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str | None = None,
    grace_s: float = 30.0,
    reasoning_budget: int | None = None,
    **engine_kwargs,
) -> None:
    """`hybridmoe serve`: load the checkpoint into an Engine and serve it until SIGINT/SIGTERM."""
    import os

    from .load import load_engine

    engine, tokenizer = load_engine(checkpoint, **engine_kwargs)
    name = model_name or os.path.basename(os.path.normpath(checkpoint))
    serving = OpenAIServing(engine, tokenizer, name, reasoning_budget)
    server, sock = build_server(serving, host, port, grace_s)
    bound = sock.getsockname()
    print(f"serving {name} ({checkpoint}) on http://{bound[0]}:{bound[1]} ({engine.max_num_seqs} slots of "
          f"{engine.max_model_len} tokens)", flush=True)  # fmt: skip
    server.run(sockets=[sock])
