"""OpenAI's routes over the engine: `/v1/chat/completions`, `/v1/completions`, `/v1/models`, and vLLM's `/tokenize`,
`/detokenize` and `/tokenizer_info`.

`OpenAIServing` (vLLM's serving class at a small size) turns requests into engine requests and engine outputs into
OpenAI responses; `add_routes` adds the routes to an app. Process, limits and lifecycle live in `server.py`.

- Prompts are rendered and tokenized in a small thread pool, never on the event loop, after their characters were
  counted against `Limits.max_prompt_chars` (a 20 MB prompt is refused before any tokenizer sees it).
- Streaming. Each output's tokens go through `IncrementalDetokenizer` (stop strings cut) and, for chat,
  `ChatOutputParser`; every non-empty delta is one SSE `data:` chunk, then a chunk with finish_reason, an optional
  usage chunk (`stream_options.include_usage`) and `data: [DONE]`. An error after the stream began is sent as
  `data: {"error": {...}}`, which the openai client raises as APIError.
- Cancellation. A client that disconnects cancels its engine request: for streams, Starlette cancels the response
  generator (its `finally` cancels); for plain responses a watcher polls `request.is_disconnected()`. A request
  that runs past `Limits.request_timeout_s` is cancelled and answered 504.
- Errors are OpenAI's body `{"error": {"message", "type", "param", "code"}}`: invalid bodies and parameters and
  context overflow (the engine's AdmissionError, code "context_length_exceeded") are 400, an unknown model 404
  ("model_not_found"), a full queue 503 with Retry-After, a request the engine failed on (non-finite logits, say)
  500 for that request alone.

Scoring (what lm-evaluation-harness's `local-completions` model sends for loglikelihood tasks): `/v1/completions` with
`echo: true` and `logprobs: N` returns the prompt's tokens in `logprobs` too, as OpenAI's legacy API and vLLM did:
the first prompt token with `null` logprob and top_logprobs, every later one with its logprob given the tokens
before it (the engine's prompt logprobs); `max_tokens: 0` (with echo only) scores the prompt and generates nothing.
`top_logprobs` hold the chosen token and the N most likely (up to N + 1 entries, keyed by text); `text_offset` is
the running sum of the tokens' text lengths; the token that ended a request (eos) is listed, as in vLLM, though
not in the text; -inf is sent as -9999.0 (vLLM's JSON-safe stand-in).

Token ids and weight versions (what an RL trainer reads, as from vLLM): `/v1/completions` with `return_token_ids:
true` gives each choice its `prompt_token_ids` and `token_ids` (every sampled token, the one that ended the request
included, aligned with `logprobs.token_logprobs`; streamed chunks carry the new ones). Every completion and chat
choice says `weight_version`: the oldest version of the weights that produced any of its tokens (the engine's
`load_weights` raises the version while requests run). `update_weights` reads a trainer's safetensors directory off
the loop and has the engine worker load it between two steps; its route and who may call it are in `server.py`.

Reasoning is on unless the request says `reasoning_effort: "none"` or `chat_template_kwargs: {"enable_thinking":
false}` (vLLM's switch); `reasoning_budget: N` (or `chat_template_kwargs.reasoning_budget`) forces `</think>` after N
thinking tokens; the server's default budget applies otherwise, to each of the `n` choices on its own.

`n` choices per prompt are n engine requests (choice i of a seeded request samples with seed + i); a request may ask
for at most `Limits.max_prompts` choices in all (prompts times n). Usage counts each prompt once, as OpenAI does.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from jinja2 import TemplateError

from .chat import THINK_END, ChatDelta, ChatOutputParser, IncrementalDetokenizer, ReasoningBudget, render_chat
from .engine import Engine, RequestOutput
from .protocol import (
    SSE_DONE,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    Disconnected,
    Limits,
    TokenizeRequest,
    WeightUpdateRequest,
    _SamplingFields,
    parse_body,
    shutting_down,
    sse,
)
from .sampling import SamplingParams, TokenLogprob
from .worker import EngineWorker, Metrics, admission_error

logger = logging.getLogger("hybridmoe.serve")


class OpenAIServing:
    """What the routes call: turns OpenAI requests into engine requests and engine outputs into OpenAI responses.

    reasoning_budget: the default thinking-token budget of chat requests (None: unlimited). limits: what a request
    may hold (`protocol.Limits`)."""

    def __init__(self, engine: Engine, tokenizer, model_name: str, reasoning_budget: int | None = None,
                 limits: Limits | None = None):  # fmt: skip
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.reasoning_budget = reasoning_budget
        self.limits = limits or Limits()
        self.worker = EngineWorker(engine, max_queue=self.limits.max_queue)
        self.metrics = Metrics()
        self.created = int(time.time())
        self.draining = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.think_end_id = tokenizer.get_vocab().get(THINK_END)
        # Tokenizing a prompt that fills max_model_len takes milliseconds; two threads keep the loop free without
        # letting a burst of large prompts tokenize all at once.
        self._tokenize_pool = ThreadPoolExecutor(2, thread_name_prefix="hybridmoe-tokenize")
        self.tokenizer_size = len(tokenizer)  # ids /detokenize accepts
        self._weights_lock = asyncio.Lock()  # one weight update at a time

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.worker.start()

    def stop(self) -> None:
        self.worker.abort_all(shutting_down())
        self.worker.stop()
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)

    async def drain(self, grace_s: float) -> None:
        """Refuse new requests, give the open ones `grace_s` seconds, then end the rest with a clean error."""
        self.draining = True
        deadline = time.monotonic() + grace_s
        while self.worker.num_open and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.worker.num_open:
            logger.warning("shutdown: ending %d unfinished requests", self.worker.num_open)
            self.worker.abort_all(shutting_down())

    # ------------------------------------------------------------------ checks
    def check(self, model: str) -> None:
        if self.draining:
            raise shutting_down()
        if model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist; this server serves `{self.model_name}`",
                           param="model", code="model_not_found")  # fmt: skip

    def check_prompt_chars(self, n: int, param: str) -> None:
        if n > self.limits.max_prompt_chars:
            raise APIError(400, f"the prompt has {n:,} characters, more than this server's limit of "
                                f"{self.limits.max_prompt_chars:,}; shorten it", param=param,
                           code="context_length_exceeded")  # fmt: skip

    def check_choices(self, num_prompts: int, n: int) -> None:
        """A request generates num_prompts * n sequences; at most `Limits.max_prompts`."""
        if num_prompts * n > self.limits.max_prompts:
            what = f"n={n}" if num_prompts == 1 else f"{num_prompts} prompts x n={n}"
            raise APIError(400, f"{what} asks for {num_prompts * n} choices; this server generates at most "
                                f"{self.limits.max_prompts} per request", param="n")  # fmt: skip

    def sampling_params(self, body: _SamplingFields, prompt_len: int, max_tokens: int | None, choice: int = 0,
                        **kw) -> SamplingParams:  # fmt: skip
        """The engine parameters of one choice. With a seed, choice i samples with seed + i (so the n choices of a
        seeded request differ, and choice 0 is what the same request with n=1 gives)."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(body, name):
                raise APIError(400, f"{name} is not supported; leave it at 0", param=name)
        if max_tokens is None:  # as much as the context allows (at least 1, so an overflowing prompt is reported)
            max_tokens = max(1, self.engine.max_model_len - prompt_len)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > self.limits.max_stop:
            raise APIError(400, f"stop has {len(stop)} strings; at most {self.limits.max_stop} are allowed",
                           param="stop")  # fmt: skip
        stop_ids = body.stop_token_ids or []
        bad = next((t for t in stop_ids if not 0 <= t < self.engine.config.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"stop token id {bad} is outside the vocabulary [0, {self.engine.config.vocab_size})",
                           param="stop_token_ids")  # fmt: skip
        seed = body.seed if body.seed is None or choice == 0 else (body.seed + choice) % 2**64  # torch's seed range
        try:
            return SamplingParams(
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                top_k=body.top_k, max_tokens=max_tokens, stop=stop, seed=seed, stop_token_ids=stop_ids,
                ignore_eos=body.ignore_eos, logprobs_mode=body.logprobs_mode, **kw,
            )  # fmt: skip
        except ValueError as e:
            raise APIError(400, str(e)) from e

    async def off_loop(self, fn, *args):
        """fn(*args) in the tokenizer pool, awaited."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, fn, *args)

    # ------------------------------------------------------------------ engine requests
    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams, queue, param: str,
               stream: bool) -> None:  # fmt: skip
        try:
            self.worker.add(request_id, prompt_ids, params, queue, stream=stream)
        except ValueError as e:  # the engine's AdmissionError and invalid requests
            raise admission_error(e, param) from e

    async def outputs(self, queue: asyncio.Queue, request_ids: list[str], request: Request | None = None):
        """The outputs of `request_ids` (sharing `queue`) until all finish. With `request`, a watcher cancels them
        when the client goes away; leaving early (an error, the stream cancelled, the time limit) cancels what is
        unfinished. A request the engine ended with an error raises APIError(500)."""
        open_ids = set(request_ids)
        watcher = asyncio.ensure_future(self._watch(request, queue)) if request is not None else None
        timeout = self.limits.request_timeout_s
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while open_ids:
                try:
                    wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                    item = await asyncio.wait_for(queue.get(), wait)
                except asyncio.TimeoutError:
                    raise APIError(504, f"the request ran past this server's limit of {timeout:g} s and was stopped; "
                                        "ask for fewer tokens", "server_error", code="timeout") from None  # fmt: skip
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    open_ids.discard(item.request_id)
                if item.finish_reason == "error":
                    raise APIError(500, f"generation failed for this request: {item.error}", "server_error",
                                   code="generation_failed")  # fmt: skip
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
        queue.put_nowait(Disconnected())

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
        kwargs = body.chat_template_kwargs
        reasoning = (kwargs is None or kwargs.enable_thinking) and body.reasoning_effort != "none"
        budget = body.reasoning_budget if body.reasoning_budget is not None else kwargs and kwargs.reasoning_budget
        budget = self.reasoning_budget if budget is None else budget
        self.check_prompt_chars(_message_chars(body.messages), "messages")
        try:
            prompt = await self.off_loop(render_chat, self.tokenizer, body.messages, body.tools, reasoning)
        except (ValueError, TemplateError) as e:
            raise APIError(400, str(e), param="messages") from e
        self.check_choices(1, body.n)
        use_budget = prompt.reasoning and budget is not None and self.think_end_id is not None
        max_tokens = body.max_completion_tokens or body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        chat_id = f"chatcmpl-{uuid.uuid4().hex}"
        request_ids = [chat_id] if body.n == 1 else [f"{chat_id}-{i}" for i in range(body.n)]
        queue: asyncio.Queue = asyncio.Queue()
        parse_tools = bool(body.tools) and body.tool_choice != "none"
        states = {}
        try:
            for i, request_id in enumerate(request_ids):
                processors = [ReasoningBudget(budget, self.think_end_id)] if use_budget else []  # one per choice
                params = self.sampling_params(body, len(prompt.token_ids), max_tokens, choice=i, logprobs=logprobs,
                                              logits_processors=processors)  # fmt: skip
                self.submit(request_id, prompt.token_ids, params, queue, param="messages", stream=bool(body.stream))
                states[request_id] = _ChatState(self, i, chat_id, body.model, prompt.reasoning, parse_tools,
                                                params.stop, body.tools)  # fmt: skip
        except APIError:
            for request_id in states:
                self.worker.cancel(request_id)
            raise
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = self._chat_stream(states, queue, include_usage, t0, body.n)
            return StreamingResponse(stream, media_type="text/event-stream")
        messages = {request_id: ChatDelta() for request_id in states}
        lps = {request_id: [] for request_id in states}
        started = False
        async with aclosing(self.outputs(queue, request_ids, request)) as outputs:
            async for out in outputs:
                if not started:
                    self.metrics.ttft.observe(time.monotonic() - t0)
                    started = True
                state = states[out.request_id]
                messages[out.request_id] += state.update(out)
                lps[out.request_id] += [self._chat_logprob(lp) for lp in self._token_logprobs(out)]
        choices = []
        for request_id, state in states.items():
            self._finish_metrics(state.last, t0)
            message = messages[request_id]
            msg = {"role": "assistant", "content": message.content or (None if message.tool_calls else ""),
                   "reasoning_content": message.reasoning_content or None}  # fmt: skip
            if message.tool_calls:
                msg["tool_calls"] = [c.to_openai() for c in message.tool_calls]
            choices.append({"index": state.index, "message": msg,
                            "logprobs": {"content": lps[request_id]} if body.logprobs else None,
                            "finish_reason": state.finish_reason(state.last),
                            "weight_version": state.last.weight_version})  # fmt: skip
        return {"id": chat_id, "object": "chat.completion", "created": int(time.time()), "model": body.model,
                "choices": choices, "usage": _usage([s.last for s in states.values()], body.n)}  # fmt: skip

    async def _chat_stream(self, states: dict[str, _ChatState], queue: asyncio.Queue, include_usage: bool, t0: float,
                           n: int):  # fmt: skip
        """Each choice's role chunk, its deltas as they come, and its finish chunk as soon as it ends (OpenAI's
        order for n > 1: chunks of different choices interleave, each carrying its `index`)."""

        def chunk(state: _ChatState, delta: dict, finish_reason=None, logprobs=None) -> str:
            choice = {"index": state.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
            if state.last is not None:
                choice["weight_version"] = state.last.weight_version
            return sse(state.header("chat.completion.chunk") | {"choices": [choice]})

        first = next(iter(states.values()))
        for state in states.values():
            yield chunk(state, {"role": "assistant", "content": ""})
        try:
            started = False
            async with aclosing(self.outputs(queue, list(states))) as outputs:
                async for out in outputs:
                    if not started:
                        self.metrics.ttft.observe(time.monotonic() - t0)
                        started = True
                    state = states[out.request_id]
                    delta = state.update(out)
                    lps = [self._chat_logprob(lp) for lp in self._token_logprobs(out)] if out.new_logprobs else None
                    if delta or lps:
                        yield chunk(state, _delta_json(delta), logprobs={"content": lps} if lps else None)
                    if out.finished:
                        yield chunk(state, {}, finish_reason=state.finish_reason(out))
            if include_usage:
                usage = _usage([s.last for s in states.values()], n)
                yield sse(first.header("chat.completion.chunk") | {"choices": [], "usage": usage})
            for state in states.values():
                self._finish_metrics(state.last, t0)
        except APIError as e:
            yield sse(e.body())
        yield SSE_DONE

    # ------------------------------------------------------------------ completions
    async def completions(self, body: CompletionRequest, request: Request):
        t0 = time.monotonic()
        self.check(body.model)
        if body.max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens=0 generates nothing; it is only allowed with echo=true (to score the "
                                "prompt, with logprobs=N)", param="max_tokens")  # fmt: skip
        # The engine scores the prompt for echo with logprobs; a prompt-only request (max_tokens 0) needs it anyway.
        prompt_logprobs = body.logprobs if body.echo else None
        if body.max_tokens == 0 and prompt_logprobs is None:
            prompt_logprobs = 0
        prompts = await self._prompt_ids(body.prompt)
        self.check_choices(len(prompts), body.n)
        cid = f"cmpl-{uuid.uuid4().hex}"
        queue: asyncio.Queue = asyncio.Queue()
        ids = [f"{cid}-{i}" for i in range(len(prompts) * body.n)]  # choice i: prompt i // n, its (i % n)-th sample
        states = {}
        try:
            for i, request_id in enumerate(ids):
                ids_ = prompts[i // body.n]
                params = self.sampling_params(body, len(ids_), body.max_tokens, choice=i % body.n,
                                              logprobs=body.logprobs, prompt_logprobs=prompt_logprobs)  # fmt: skip
                self.submit(request_id, ids_, params, queue, param="prompt", stream=bool(body.stream))
                states[request_id] = _CompletionState(self, i, ids_, params.stop, body.echo, body.logprobs,
                                                      body.return_token_ids)  # fmt: skip
        except APIError:
            for request_id in states:
                self.worker.cancel(request_id)
            raise
        header = {"id": cid, "object": "text_completion", "created": int(time.time()), "model": body.model}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._completion_stream(header, states, queue, include_usage, t0, body.n),
                                     media_type="text/event-stream")  # fmt: skip
        async with aclosing(self.outputs(queue, ids, request)) as outputs:
            async for out in outputs:
                await states[out.request_id].update(out)
        for s in states.values():
            self._finish_metrics(s.last, t0)
        choices = [s.choice(s.text) for s in states.values()]
        return header | {"choices": choices, "usage": _usage([s.last for s in states.values()], body.n)}

    async def _completion_stream(self, header, states, queue, include_usage, t0, n):
        try:
            async with aclosing(self.outputs(queue, list(states))) as outputs:
                async for out in outputs:
                    s = states[out.request_id]
                    text = await s.update(out)
                    if text or out.finished or s.unsent_logprobs or s.unsent_token_ids:
                        yield sse(header | {"choices": [s.choice(text, delta=True)]})
            if include_usage:
                yield sse(header | {"choices": [], "usage": _usage([s.last for s in states.values()], n)})
            for s in states.values():
                self._finish_metrics(s.last, t0)
        except APIError as e:
            yield sse(e.body())
        yield SSE_DONE

    async def _prompt_ids(self, prompt) -> list[list[int]]:
        """The prompt(s) of a completions request as token ids: strings are tokenized off the loop."""
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt is empty", param="prompt")
        if len(prompt) > self.limits.max_prompts:
            raise APIError(400, f"prompt holds {len(prompt)} prompts; this server takes at most "
                                f"{self.limits.max_prompts} per request", param="prompt")  # fmt: skip
        self.check_prompt_chars(sum(len(p) for p in prompt if isinstance(p, str)), "prompt")
        texts = [p for p in prompt if isinstance(p, str)]
        encoded = iter(await self.off_loop(self._encode, texts) if texts else [])
        return [next(encoded) if isinstance(p, str) else list(p) for p in prompt]

    def _encode(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        return [self.tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"] for t in texts]

    def logprob_entries(self, token_ids: list[int], lps: list[TokenLogprob | None]) -> list[tuple]:
        """(text, logprob, top_logprobs) per token in OpenAI's legacy shape: top_logprobs maps the chosen token's and
        the most likely tokens' texts to their logprobs; None for a token without logprobs (the first prompt
        token). The texts are decoded in one batch (call off the loop for a long prompt)."""
        ids = list(token_ids) + [t for lp in lps if lp is not None for t, _ in lp.top]
        texts = iter(self.tokenizer.batch_decode([[t] for t in ids]))
        token_texts = [next(texts) for _ in token_ids]
        entries = []
        for text, lp in zip(token_texts, lps):
            if lp is None:
                entries.append((text, None, None))
                continue
            top = {text: _json_logprob(lp.logprob)}
            for _, v in lp.top:
                top.setdefault(next(texts), _json_logprob(v))
            entries.append((text, _json_logprob(lp.logprob), top))
        return entries

    # ------------------------------------------------------------------ weights
    async def update_weights(self, body: WeightUpdateRequest) -> dict:
        """Load the weights in `body.path` as `body.version` (see the module docstring). 409 unless the version is
        higher than the loaded one, 400 for a path that is not a safetensors model directory of this model."""
        from .load import read_weights

        if self.draining:
            raise shutting_down()
        async with self._weights_lock:
            t0 = time.monotonic()
            if body.version <= self.engine.weight_version:
                raise APIError(409, f"weight version {body.version} is not newer than the loaded version "
                                    f"{self.engine.weight_version}; versions must increase", param="version",
                               code="stale_weight_version")  # fmt: skip

            def read_and_check(path: str) -> dict:
                state_dict = read_weights(path)
                self.engine.check_weights(state_dict)  # reads only the model's names and shapes: safe beside a step
                return state_dict

            try:
                state_dict = await asyncio.to_thread(read_and_check, body.path)
            except ValueError as e:
                raise APIError(400, str(e), param="path", code="invalid_weights") from None
            try:
                await asyncio.wrap_future(self.worker.load_weights(state_dict, body.version))
            except ValueError as e:
                raise APIError(400, str(e), param="path", code="invalid_weights") from None
            except RuntimeError as e:
                raise APIError(503, f"the weights were not loaded: {e}", "server_error", code="engine_stopped") from e
            logger.info("loaded weight version %d from %s in %.2f s", body.version, body.path, time.monotonic() - t0)
            return {"weight_version": self.engine.weight_version, "num_tensors": len(state_dict),
                    "load_s": round(time.monotonic() - t0, 4)}  # fmt: skip

    # ------------------------------------------------------------------ tokenizer routes (vLLM's)
    def check_optional_model(self, model: str | None) -> None:
        if model is not None:
            self.check(model)
        elif self.draining:
            raise shutting_down()

    async def tokenize(self, body: TokenizeRequest) -> dict:
        """{"tokens", "count", "max_model_len"} of a text prompt (tokenized as /v1/completions does) or of chat
        messages rendered as /v1/chat/completions does."""
        self.check_optional_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "pass either prompt (a text) or messages (a chat), not both or neither",
                           param="prompt")  # fmt: skip
        if body.prompt is not None:
            self.check_prompt_chars(len(body.prompt), "prompt")
            (ids,) = await self.off_loop(self._encode, [body.prompt], body.add_special_tokens)
        else:
            if body.add_special_tokens:
                raise APIError(400, "add_special_tokens applies to prompt; for messages the chat template writes the "
                                    "special tokens", param="add_special_tokens")  # fmt: skip
            self.check_prompt_chars(_message_chars(body.messages), "messages")
            kwargs = body.chat_template_kwargs
            reasoning = kwargs is None or kwargs.enable_thinking
            try:
                prompt = await self.off_loop(render_chat, self.tokenizer, body.messages, body.tools, reasoning,
                                             body.add_generation_prompt)  # fmt: skip
            except (ValueError, TemplateError) as e:
                raise APIError(400, str(e), param="messages") from e
            ids = prompt.token_ids
        out = {"tokens": ids, "count": len(ids), "max_model_len": self.engine.max_model_len}
        if body.return_token_strs:
            out["token_strs"] = self.tokenizer.convert_ids_to_tokens(ids)
        return out

    async def detokenize(self, body: DetokenizeRequest) -> dict:
        self.check_optional_model(body.model)
        bad = next((t for t in body.tokens if not 0 <= t < self.tokenizer_size), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the tokenizer's vocabulary [0, {self.tokenizer_size})",
                           param="tokens")  # fmt: skip
        return {"prompt": await self.off_loop(self.tokenizer.decode, body.tokens)}

    def tokenizer_info(self) -> dict:
        """vLLM's /tokenizer_info: the tokenizer's configuration (its init arguments with special tokens as text,
        file paths left out), its class and chat template."""
        info = {k: _plain(v) for k, v in (getattr(self.tokenizer, "init_kwargs", None) or {}).items()
                if k not in _PRIVATE_TOKENIZER_KEYS and not k.endswith("_file")}  # fmt: skip
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            info[name] = getattr(self.tokenizer, name, None)
        info["tokenizer_class"] = type(self.tokenizer).__name__
        template = getattr(self.tokenizer, "chat_template", None)
        if template:
            info["chat_template"] = template
        return info


class _ChatState:
    """One choice of a chat request: its detokenizer and parser, and its last engine output."""

    def __init__(self, serving: OpenAIServing, index, chat_id, model, reasoning, parse_tools, stop, tools=None):
        self.serving, self.index, self.chat_id, self.model = serving, index, chat_id, model
        self.last: RequestOutput | None = None
        self.detok = IncrementalDetokenizer(serving.tokenizer, stop=stop)
        self.parser = ChatOutputParser(reasoning, parse_tools, tools)
        self.num_calls = 0
        self.created = int(time.time())

    def header(self, obj: str) -> dict:
        return {"id": self.chat_id, "object": obj, "created": self.created, "model": self.model}

    def update(self, out: RequestOutput) -> ChatDelta:
        self.serving.metrics.generation_tokens += len(out.new_token_ids)
        self.last = out
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
    """One choice of a completions request: its text (after the echoed prompt, with echo) and, with logprobs, OpenAI's
    legacy `logprobs` lists (the prompt's tokens first, with echo; see the module docstring)."""

    def __init__(self, serving: OpenAIServing, index: int, prompt_ids: list[int], stop, echo: bool,
                 logprobs: int | None, return_token_ids: bool = False):  # fmt: skip
        self.serving, self.index, self.prompt_ids, self.echo, self.top_n = serving, index, prompt_ids, echo, logprobs
        self.return_token_ids = return_token_ids
        self.token_ids: list[int] = []  # every sampled token so far
        self._sent_ids, self._sent_prompt = 0, False  # token ids already streamed; prompt_token_ids sent
        self.detok = IncrementalDetokenizer(serving.tokenizer, stop=stop)
        self.text = ""  # all of the choice's text so far
        self._echo = serving.tokenizer.decode(prompt_ids) if echo else ""  # sent before the first new text
        self.logprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        self._offset = 0  # text offset of the next token
        self._sent = 0  # logprobs entries already streamed
        self.last: RequestOutput | None = None

    @property
    def unsent_logprobs(self) -> bool:
        return len(self.logprobs["tokens"]) > self._sent

    @property
    def unsent_token_ids(self) -> bool:
        return self.return_token_ids and len(self.token_ids) > self._sent_ids

    async def update(self, out: RequestOutput) -> str:
        self.serving.metrics.generation_tokens += len(out.new_token_ids)
        self.last = out
        self.token_ids += out.new_token_ids
        if self.top_n is not None and self.echo and out.prompt_logprobs is not None:
            self._add(await self.serving.off_loop(self.serving.logprob_entries, self.prompt_ids, out.prompt_logprobs))
        text = self._echo + self.detok.add(self.serving._visible_ids(out))
        self._echo = ""
        if out.finished:
            text += self.detok.finish()
        if self.top_n is not None and out.new_logprobs:  # every sampled token, the eos too (vLLM)
            self._add(self.serving.logprob_entries([lp.token_id for lp in out.new_logprobs], out.new_logprobs))
        self.text += text
        return text

    def _add(self, entries) -> None:
        for token, logprob, top in entries:
            self.logprobs["tokens"].append(token)
            self.logprobs["token_logprobs"].append(logprob)
            self.logprobs["top_logprobs"].append(top)
            self.logprobs["text_offset"].append(self._offset)
            self._offset += len(token)

    def choice(self, text: str, delta: bool = False) -> dict:
        """The choice so far (delta: the text given and the logprobs not yet streamed)."""
        logprobs = None
        if self.top_n is not None:
            first = self._sent if delta else 0
            logprobs = {k: v[first:] for k, v in self.logprobs.items()}
            self._sent = len(self.logprobs["tokens"])
        finish = None
        if self.last is not None and self.last.finished:
            finish = "length" if self.last.finish_reason == "length" else "stop"
        version = self.last.weight_version if self.last is not None else None
        out = {"index": self.index, "text": text, "logprobs": logprobs, "finish_reason": finish,
               "weight_version": version}  # fmt: skip
        if self.return_token_ids:
            if not (delta and self._sent_prompt):
                out["prompt_token_ids"] = self.prompt_ids
            out["token_ids"] = self.token_ids[self._sent_ids if delta else 0 :]
            self._sent_ids, self._sent_prompt = len(self.token_ids), True
        return out


_PRIVATE_TOKENIZER_KEYS = {"name_or_path", "is_local", "local_files_only"}  # where the server keeps its files


def _plain(value):
    """A tokenizer config value as JSON: AddedToken as its text, containers element-wise, anything else as str."""
    if hasattr(value, "content"):
        return value.content
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)


def _json_logprob(value: float) -> float:
    return max(value, -9999.0)  # JSON has no -inf; vLLM sends -9999.0


def _delta_json(delta: ChatDelta) -> dict:
    out = {}
    if delta.reasoning_content:
        out["reasoning_content"] = delta.reasoning_content
    if delta.content:
        out["content"] = delta.content
    if delta.tool_calls:
        out["tool_calls"] = [c.to_openai() | {"index": c.index} for c in delta.tool_calls]
    return out


def _usage(outs: list[RequestOutput], n: int = 1) -> dict:
    """OpenAI's usage of the requests `outs`: n choices per prompt, each prompt counted once."""
    prompt = sum(o.num_prompt_tokens for o in outs) // n
    completion = sum(o.num_generated_tokens for o in outs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _message_chars(messages: list[dict]) -> int:
    """Characters of the text in chat messages (string contents and text parts), counted before rendering."""
    n = 0
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            n += len(content)
        elif isinstance(content, list):
            n += sum(len(p["text"]) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return n


# ---------------------------------------------------------------------------------------------- routes


def add_routes(app: FastAPI, serving: OpenAIServing) -> None:
    """Add the OpenAI routes to `app`. Bodies are read by `protocol.parse_body`; their schemas are still published
    in the OpenAPI document."""

    def schema(model) -> dict:
        content = {"application/json": {"schema": model.model_json_schema()}}
        return {"requestBody": {"required": True, "content": content}}

    @app.post("/v1/chat/completions", openapi_extra=schema(ChatCompletionRequest))
    async def chat_completions(request: Request):
        return await serving.chat(parse_body(await request.body(), ChatCompletionRequest), request)

    @app.post("/v1/completions", openapi_extra=schema(CompletionRequest))
    async def completions(request: Request):
        return await serving.completions(parse_body(await request.body(), CompletionRequest), request)

    @app.post("/tokenize", openapi_extra=schema(TokenizeRequest))
    async def tokenize(request: Request):
        return await serving.tokenize(parse_body(await request.body(), TokenizeRequest))

    @app.post("/detokenize", openapi_extra=schema(DetokenizeRequest))
    async def detokenize(request: Request):
        return await serving.detokenize(parse_body(await request.body(), DetokenizeRequest))

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return serving.tokenizer_info()

    @app.get("/v1/models")
    async def models():
        card = {"id": serving.model_name, "object": "model", "created": serving.created, "owned_by": "hybridmoe",
                "max_model_len": serving.engine.max_model_len}  # fmt: skip
        return {"object": "list", "data": [card]}
