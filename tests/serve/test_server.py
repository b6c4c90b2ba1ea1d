"""The OpenAI-compatible server (`hybridmoe.serve.server`) through the official `openai` client on loopback.

A live uvicorn server in a thread serves the `debug` preset with random weights and a small BPE tokenizer saved to
tmp_path. Output that must parse a certain way (tool calls, long streams) is forced by `ScriptedEngine`, which adds
a logits processor writing a scripted token sequence; otherwise the model's own greedy output is compared across
streaming and non-streaming, and concurrent and alone.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from hybridmoe import HybridMoEConfig, HybridMoEForCausalLM
from hybridmoe.data.tokenizer import load_tokenizer, train_tokenizer, vocab_size_of
from hybridmoe.serve import Engine
from hybridmoe.serve import worker as worker_module
from hybridmoe.serve.engine import RequestOutput
from hybridmoe.serve.protocol import Limits
from hybridmoe.serve.sampling import TokenLogprob
from hybridmoe.serve.server import OpenAIServing, ServerThread, build_server
from hybridmoe.serve.worker import merge_outputs

MODEL = "tiny-test"
CORPUS = (
    "The quick brown fox jumps over the lazy dog. What is the weather in Paris today? It is sunny and warm. "
    'Call the function with {"name": "get_weather", "arguments": {"city": "Paris"}} and read the answer. '
    "Numbers 0 1 2 3 4 5 6 7 8 9, punctuation: ; ( ) [ ] { } \" ' and unicode: café, naïve, 東京, 🙂.\n"
)


def make_checkpoint(path, mtp: bool = False) -> str:
    """A debug-preset model with random weights and a small byte-level BPE tokenizer, saved together (with
    `mtp`, the preset's MTP layer too)."""
    path.mkdir(parents=True, exist_ok=True)
    corpus = path / "corpus.txt"
    corpus.write_text(CORPUS * 40)
    train_tokenizer([str(corpus)], path, vocab_size=400, show_progress=False)
    corpus.unlink()
    torch.manual_seed(0)
    vocab = vocab_size_of(load_tokenizer(path))
    config = HybridMoEConfig.from_preset("debug", num_nextn_predict_layers=int(mtp), vocab_size=vocab, eos_token_id=1)
    HybridMoEForCausalLM(config).save_pretrained(path)
    return str(path)


class Force:
    """A logits processor that makes the request write `script` (token ids), then leaves the model free."""

    def __init__(self, script: list[int], log: list[int]):
        self.script, self.log = script, log

    def __call__(self, output_ids, logits):
        self.log.append(len(output_ids))
        if len(output_ids) >= len(self.script):
            return logits
        forced = torch.full_like(logits, -torch.inf)
        forced[self.script[len(output_ids)]] = 0.0
        return forced


class ScriptedEngine(Engine):
    """An Engine whose requests write `self.script` while it is set (the test's way to fix the model's output);
    the request's own processors (the reasoning budget) still apply after the script's."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.script: list[int] | None = None
        self.steps_seen: list[int] = []  # output lengths the scripted requests reached

    def add_request(self, prompt_token_ids, params=None, request_id=None):
        if self.script is not None:
            force = Force(self.script, self.steps_seen)
            params = dataclasses.replace(params, logits_processors=[force, *params.logits_processors])
        return super().add_request(prompt_token_ids, params, request_id)


def make_serving(checkpoint: str, max_num_seqs: int = 4, max_model_len: int = 512, **kw) -> OpenAIServing:
    """An OpenAIServing over a ScriptedEngine; `kw` go to OpenAIServing (limits, reasoning_budget)."""
    tok = load_tokenizer(checkpoint)
    model = HybridMoEForCausalLM.from_pretrained(checkpoint)
    eos = [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    engine = ScriptedEngine(model, max_num_seqs=max_num_seqs, max_model_len=max_model_len, prefill_chunk=64,
                            eos_token_id=eos, detokenize=tok)  # fmt: skip
    return OpenAIServing(engine, tok, MODEL, **kw)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def live(checkpoint):
    # 1024 positions: a tool definition in the Nemotron format takes ~450 of this tiny tokenizer's tokens.
    server = ServerThread(make_serving(checkpoint, max_model_len=1024))
    yield server
    server.stop(grace_s=1)


@pytest.fixture
def engine(live):
    engine = live.server.serving.engine
    engine.script = None
    yield engine
    engine.script = None


@pytest.fixture
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0, timeout=60)


def tokens(live, text: str, end: bool = True) -> list[int]:
    tok = live.server.serving.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return ids + [tok.convert_tokens_to_ids("<|im_end|>")] if end else ids


USER = [{"role": "user", "content": "What is the weather in Paris?"}]


# ------------------------------------------------------------------------------------------------ happy paths
def test_models_and_health(client, live):
    (card,) = client.models.list().data
    assert card.id == MODEL and card.owned_by == "hybridmoe"
    assert httpx.get(live.url + "/health").json() == {"status": "ok"}


def test_connections_are_not_held_back_by_nagle(live):
    """Every accepted connection has TCP_NODELAY: without it, each keep-alive request after the first (and each
    streamed chunk) waited ~40 ms for the client's delayed ACK before its body left the server."""
    with httpx.Client() as http:
        for _ in range(2):  # one connection, kept alive
            assert http.get(live.url + "/health").status_code == 200
        connections = list(live.server.server_state.connections)
        assert connections
        for protocol in connections:
            sock = protocol.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_idle_connections_outlive_the_clients_keepalive_expiry(checkpoint):
    """The server closes an idle kept-alive connection only after header_timeout_s (and never before 5 s, httpx's
    and the OpenAI client's own expiry), so those clients drop it first."""
    serving = make_serving(checkpoint)
    for header_timeout_s, expected in ((10.0, 10), (2.5, 5), (30.0, 30)):
        serving.limits = Limits(header_timeout_s=header_timeout_s)
        server, sock = build_server(serving, port=0)
        sock.close()
        assert server.config.timeout_keep_alive == expected


def test_chat_streaming_equals_non_streaming(client, engine):
    for reasoning in (True, False):
        extra = {"chat_template_kwargs": {"enable_thinking": reasoning}}
        kw = dict(model=MODEL, messages=USER, temperature=0, max_tokens=12, extra_body=extra)
        full = client.chat.completions.create(**kw)
        choice = full.choices[0]
        assert choice.finish_reason in ("stop", "length") and choice.message.role == "assistant"
        assert 1 <= full.usage.completion_tokens <= 12 and full.usage.prompt_tokens > 10
        reasoning_text, content, finish, usage = "", "", None, None
        for chunk in client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
            if chunk.usage:
                usage = chunk.usage
            for c in chunk.choices:
                reasoning_text += (c.delta.model_extra or {}).get("reasoning_content") or ""
                content += c.delta.content or ""
                finish = c.finish_reason or finish
        assert content == (choice.message.content or "") and finish == choice.finish_reason
        assert reasoning_text == ((choice.message.model_extra or {}).get("reasoning_content") or "")
        assert usage.completion_tokens == full.usage.completion_tokens


def test_reasoning_and_answer_are_parsed(client, engine, live):
    engine.script = tokens(live, "Paris is in France.\nLet me answer.\n</think>\nIt is sunny.")
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=50)
    m = r.choices[0].message
    assert m.content == "It is sunny." and m.model_extra["reasoning_content"] == "Paris is in France.\nLet me answer."
    assert r.choices[0].finish_reason == "stop" and not m.tool_calls


def test_reasoning_budget_closes_thinking(client, engine, live):
    # The script never closes its thinking; the budget forces </think> after 3 tokens and the answer goes on.
    script = tokens(live, "thinking about the weather in Paris today")
    engine.script = script
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=60, extra_body={"reasoning_budget": 3})
    decode = live.server.serving.tokenizer.decode
    m = r.choices[0].message
    assert m.model_extra["reasoning_content"] == decode(script[:3]).strip()
    assert m.content == decode(script[4:-1]).strip() and r.usage.completion_tokens == len(script)


def test_completions_logprobs_mode(client):
    # processed_logprobs: the same seeded sample, reported under the temperature's distribution instead of the raw one
    kw = dict(model=MODEL, prompt="The quick brown fox", max_tokens=6, temperature=0.5, seed=7, logprobs=0)
    out = {}
    for mode in ("raw_logprobs", "processed_logprobs"):
        extra = {"logprobs_mode": mode, "return_token_ids": True}
        choice = client.completions.create(**kw, extra_body=extra).choices[0]
        out[mode] = (choice.model_extra["token_ids"], choice.logprobs.token_logprobs)
    assert out["raw_logprobs"][0] == out["processed_logprobs"][0]
    assert all(abs(a - b) > 1e-4 for a, b in zip(out["raw_logprobs"][1], out["processed_logprobs"][1]))
    with pytest.raises(openai.BadRequestError, match="logprobs_mode"):
        client.completions.create(**kw, extra_body={"logprobs_mode": "processed"})


def test_completions_stream_echo_stop_and_logprobs(client, engine):
    kw = dict(model=MODEL, prompt="The quick brown fox", max_tokens=10, temperature=0)
    full = client.completions.create(**kw, logprobs=2)
    text = full.choices[0].text
    assert full.object == "text_completion" and full.usage.completion_tokens <= 10
    lp = full.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) <= 10
    assert all(v <= 0 for v in lp.token_logprobs) and all(len(t) <= 2 for t in lp.top_logprobs)
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True))
    assert streamed == text
    echo = client.completions.create(**kw, echo=True)
    assert echo.choices[0].text == "The quick brown fox" + text
    if len(text) > 3:  # a stop string ends the text before it
        stop = text[2:4]
        cut = client.completions.create(**kw, stop=[stop]).choices[0]
        assert cut.text == text[: text.index(stop)] and cut.finish_reason == "stop"
    batch = client.completions.create(model=MODEL, prompt=["The quick", "What is"], max_tokens=3, temperature=0)
    assert sorted(c.index for c in batch.choices) == [0, 1]


def test_n_choices_per_prompt(client, engine, live):
    # Choice i of a seeded request samples with seed + i: choice 0 is the request with n=1; usage counts prompts once.
    kw = dict(model=MODEL, max_tokens=6, temperature=1.0, seed=3)
    alone = [client.completions.create(**kw, prompt=p).choices[0].text for p in ("The quick", "What is")]
    r = client.completions.create(**kw, prompt=["The quick", "What is"], n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3] and [r.choices[0].text, r.choices[2].text] == alone
    assert r.usage.prompt_tokens == len(tokens(live, "The quick", end=False)) + len(tokens(live, "What is", end=False))
    kw = dict(model=MODEL, messages=USER, max_tokens=4, temperature=0)
    one, three = client.chat.completions.create(**kw), client.chat.completions.create(**kw, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert {c.message.content for c in three.choices} == {one.choices[0].message.content}  # greedy: all alike
    assert three.usage.prompt_tokens == one.usage.prompt_tokens
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens


def test_a_non_streamed_request_reaches_the_event_loop_twice(client, engine, live, monkeypatch):
    """The engine thread hands a non-streamed request its first output and then one merged output at its end, not
    one per token (each a wake-up of the event loop); a streamed one gets every token. The texts are the same."""
    delivered = []
    real = worker_module._deliver
    monkeypatch.setattr(worker_module, "_deliver", lambda items: delivered.append(items) or real(items))
    engine.script = tokens(live, "The quick brown fox jumps over the lazy dog.", end=False)
    assert len(engine.script) > 5
    kw = dict(model=MODEL, prompt="What is", max_tokens=5, temperature=0, logprobs=0)
    whole = client.completions.create(**kw)
    outputs = [out for items in delivered for _, out in items]
    assert len(outputs) == 2 and outputs[-1].finished and len(outputs[0].new_token_ids) == 1
    assert len(outputs[-1].new_token_ids) == len(outputs[-1].new_logprobs) == 4
    delivered.clear()
    streamed = list(client.completions.create(**kw, stream=True))
    assert len([out for items in delivered for _, out in items]) == 5
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text
    lps = [v for c in streamed for v in c.choices[0].logprobs.token_logprobs]
    assert lps == whole.choices[0].logprobs.token_logprobs


def test_merge_outputs_joins_tokens_and_keeps_the_later_state():
    lp = [TokenLogprob(4, -0.5)], [TokenLogprob(5, -1.5), TokenLogprob(6, -0.1)]
    a = RequestOutput("r", [4], lp[0], False, None, None, 3, 1, prompt_logprobs=[None, TokenLogprob(2, -2.0)],
                      weight_version=1)  # fmt: skip
    b = RequestOutput("r", [5, 6], lp[1], True, "stop", 6, 3, 3, weight_version=1)
    m = merge_outputs(a, b)
    assert m.new_token_ids == [4, 5, 6] and m.new_logprobs == lp[0] + lp[1]
    assert (m.finished, m.finish_reason, m.stop_reason, m.num_generated_tokens) == (True, "stop", 6, 3)
    assert m.prompt_logprobs == a.prompt_logprobs and m.weight_version == 1
    none = RequestOutput("r", [7], None, False, None, None, 3, 1)
    assert merge_outputs(none, dataclasses.replace(none, new_token_ids=[8])).new_logprobs is None


# ------------------------------------------------------------------------------------------------ tools
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]  # fmt: skip
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_tool_calls_non_streaming_and_streaming(client, engine, live):
    engine.script = tokens(live, f"I need the weather.\n</think>\n{CALL}")
    r = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice="auto", max_tokens=60)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert choice.message.model_extra["reasoning_content"] == "I need the weather."

    calls, finish = {}, None
    for chunk in client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, max_tokens=60, stream=True):
        for c in chunk.choices:
            finish = c.finish_reason or finish
            for d in c.delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"name": "", "arguments": "", "id": None})
                entry["id"] = d.id or entry["id"]
                entry["name"] += d.function.name or ""
                entry["arguments"] += d.function.arguments or ""
    assert finish == "tool_calls" and list(calls) == [0]
    assert calls[0]["name"] == "get_weather" and json.loads(calls[0]["arguments"]) == {"city": "Paris"}

    # The tool's answer goes back; tool_choice "none" leaves tool-call text unparsed in the content.
    history = USER + [choice.message.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny"}'}]  # fmt: skip
    r = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice="none", max_tokens=60)
    assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
    assert '"get_weather"' in r.choices[0].message.content


# ------------------------------------------------------------------------------------------------ errors
def _error(excinfo):
    return excinfo.value.body if "error" not in (excinfo.value.body or {}) else excinfo.value.body["error"]


def test_bad_requests_get_openai_errors(client, live):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=USER)
    assert _error(e)["code"] == "model_not_found" and _error(e)["param"] == "model"
    for kw, param in (
        (dict(temperature=3.5), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(n=0), "n"),
        (dict(n=65), "n"),  # more choices than Limits.max_prompts
        (dict(tool_choice="required", tools=TOOLS), "tool_choice"),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=USER, **kw)
        assert e.value.status_code == 400 and _error(e)["type"] == "invalid_request_error"
        assert _error(e)["param"] == param, kw
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "hi"}])
    assert _error(e)["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:  # context overflow: the engine's AdmissionError
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "weather " * 1200}])
    assert _error(e)["code"] == "context_length_exceeded" and "max_model_len of 1024" in _error(e)["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hello", max_tokens=2000)
    assert _error(e)["code"] == "context_length_exceeded" and _error(e)["param"] == "prompt"
    # Raw HTTP: invalid JSON, a body that is not an object, an unknown route.
    for content in (b"{not json", b"[1, 2]"):
        r = httpx.post(live.url + "/v1/chat/completions", content=content, headers={"content-type": "application/json"})
        assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.get(live.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


# ------------------------------------------------------------------------------------------------ load, cancel
def test_concurrent_clients(client, engine):
    prompts = [[{"role": "user", "content": f"Question number {i}: what is {i} + {i}?"}] for i in range(18)]

    def ask(i):
        extra = {"reasoning_effort": "none"}
        kw = dict(model=MODEL, messages=prompts[i], temperature=0, max_tokens=8, extra_body=extra)
        if i % 2:
            chunks = client.chat.completions.create(**kw, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return client.chat.completions.create(**kw).choices[0].message.content

    with ThreadPoolExecutor(18) as pool:
        together = list(pool.map(ask, range(18)))
    assert [ask(i) for i in (0, 1, 17)] == [together[i] for i in (0, 1, 17)]  # greedy: same as alone


def test_metrics(client, live):
    client.chat.completions.create(model=MODEL, messages=USER, max_tokens=3)
    with pytest.raises(openai.NotFoundError):  # counted by its status
        client.chat.completions.create(model="no-such-model", messages=USER, max_tokens=3)
    text = httpx.get(live.url + "/metrics").text
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert float(lines['hybridmoe_requests_total{endpoint="/v1/chat/completions",status="200"}']) >= 1
    assert float(lines['hybridmoe_requests_total{endpoint="/v1/chat/completions",status="404"}']) >= 1
    assert float(lines["hybridmoe_generation_tokens_total"]) >= 3 and float(lines["hybridmoe_prompt_tokens_total"]) > 0
    assert lines["hybridmoe_num_requests_running"] == "0" and lines["hybridmoe_num_requests_waiting"] == "0"
    assert float(lines["hybridmoe_request_latency_seconds_count"]) >= 1
    assert (
        lines['hybridmoe_request_latency_seconds_bucket{le="+Inf"}'] == lines["hybridmoe_request_latency_seconds_count"]
    )


def _wait_idle(engine, timeout=10.0):
    deadline = time.monotonic() + timeout
    while engine.has_unfinished() and time.monotonic() < deadline:
        time.sleep(0.02)
    return not engine.has_unfinished()


def test_client_disconnect_cancels_the_request(engine, live):
    engine.script = tokens(live, "word " * 480, end=False)
    body = {"model": MODEL, "messages": USER, "max_tokens": 480, "stream": True}
    engine.steps_seen.clear()
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
    assert _wait_idle(engine) and max(engine.steps_seen) < 200  # cancelled long before max_tokens
    engine.steps_seen.clear()
    with pytest.raises(httpx.ReadTimeout):  # a plain request whose client gives up
        httpx.post(live.url + "/v1/chat/completions", json=body | {"stream": False}, timeout=0.2)
    assert _wait_idle(engine) and max(engine.steps_seen) < 400


# ------------------------------------------------------------------------------------------------ shutdown
def test_graceful_shutdown(checkpoint):
    serving = make_serving(checkpoint)
    server = ServerThread(serving)
    url = server.url
    serving.engine.script = serving.tokenizer("word " * 100, add_special_tokens=False)["input_ids"]
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    started = threading.Event()
    result = {}

    def long_stream(key, max_tokens):
        try:
            finish = None
            for chunk in client.chat.completions.create(model=MODEL, messages=USER, max_tokens=max_tokens, stream=True):
                started.set()
                finish = chunk.choices[0].finish_reason if chunk.choices else finish
            result[key] = finish
        except openai.APIError as e:
            result[key] = e

    # In-flight requests finish within the grace period; new ones are refused meanwhile. The stream is held after
    # its 5th token until the refusals were checked, so it cannot finish (and the server exit) before they are made.
    gate = threading.Event()
    add = serving.engine.add_request

    def held(prompt_token_ids, params=None, request_id=None):
        hold = lambda ids, logits: (len(ids) < 5 or gate.wait(30)) and logits  # noqa: E731
        return add(prompt_token_ids, dataclasses.replace(params, logits_processors=[hold]), request_id)

    serving.engine.add_request = held
    t = threading.Thread(target=long_stream, args=("finished", 60))
    t.start()
    assert started.wait(30)
    serving.engine.add_request = add
    done = server.server.begin_shutdown(grace_s=30)
    time.sleep(0.1)
    r = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": USER, "max_tokens": 2})
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
    assert httpx.get(url + "/health").status_code == 503
    gate.set()
    t.join(60)
    done.result(30)
    server.thread.join(30)
    assert result["finished"] == "length" and not server.thread.is_alive()

    # Past the grace period the rest end with a clean error: an error event in a stream, a 503 body otherwise.
    serving = make_serving(checkpoint)
    server = ServerThread(serving)
    serving.engine.script = serving.tokenizer("word " * 100, add_special_tokens=False)["input_ids"]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    started.clear()
    t = threading.Thread(target=long_stream, args=("aborted", 240))
    t.start()
    plain = {}
    body = {"model": MODEL, "messages": USER, "max_tokens": 240}

    def post():
        plain["r"] = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)

    t2 = threading.Thread(target=post)
    t2.start()
    assert started.wait(30)
    deadline = time.monotonic() + 30
    while serving.worker.num_open < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    server.stop(grace_s=0)
    t.join(30)
    t2.join(30)
    assert isinstance(result["aborted"], openai.APIError) and "shutting down" in result["aborted"].message
    assert plain["r"].status_code == 503 and plain["r"].json()["error"]["code"] == "shutting_down"
