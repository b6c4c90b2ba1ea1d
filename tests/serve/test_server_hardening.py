"""What a hostile or careless client cannot do to `hybridmoe serve`: each case was found by trying it on the server, and
each test failed before its fix. Then the limits (`protocol.Limits`), the API key and the allowed hosts.

The server is test_server's (the `debug` preset with random weights, a ScriptedEngine) on 127.0.0.1, with small
limits so that each is reached cheaply.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time

import httpx
import pytest
import torch
from test_server import MODEL, USER, make_checkpoint, make_serving, tokens

from hybridmoe.serve import Engine, SamplingParams
from hybridmoe.serve.protocol import Limits
from hybridmoe.serve.server import ServerThread, allowed_host_names

LIMITS = dict(max_body_bytes=2**20, max_prompt_chars=400_000, max_prompts=4, max_stop=4, header_timeout_s=1.0,
              body_timeout_s=1.0)  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def live(checkpoint):
    server = ServerThread(make_serving(checkpoint, limits=Limits(**LIMITS)))
    yield server
    server.stop(grace_s=1)


@pytest.fixture
def engine(live):
    engine = live.server.serving.engine
    engine.script = None
    yield engine
    engine.script = None


def post(live, path, body, **kw):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(live.url + path, content=content, headers={"content-type": "application/json"}, timeout=60, **kw)


def assert_serving(live):
    """The server is healthy and answers a normal request."""
    assert httpx.get(live.url + "/health").json() == {"status": "ok"}
    r = post(live, "/v1/completions", {"model": MODEL, "prompt": "The quick", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def error_of(r, status, code=None, param=None):
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


def raw_http(host_port, data: bytes, timeout=30.0) -> socket.socket:
    sock = socket.create_connection(host_port, timeout=timeout)
    sock.sendall(data)
    return sock


def read_response(sock) -> tuple[int, dict, bytes]:
    """One HTTP/1.1 response with a Content-Length body from `sock` (status, headers, body)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"the server closed the connection (read {buf!r})")
        buf += chunk
    head, body = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers["content-length"]):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, body


def request_bytes(live, method, path, body: bytes = b"", host=None) -> bytes:
    host = host or live.url.removeprefix("http://")
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def address(live):
    host, port = live.url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


# ------------------------------------------------------------------------------------------------ 1. sampling
def test_tiny_temperature_is_greedy_and_the_engine_survives(live, engine):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 4}
    greedy = post(live, "/v1/completions", body | {"temperature": 0})
    tiny = post(live, "/v1/completions", body | {"temperature": 1e-45})
    assert tiny.status_code == 200 and tiny.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]
    assert_serving(live)


class _Poison:
    """A logits processor that makes the logits NaN (what a broken model or an overflow gives)."""

    def __call__(self, output_ids, logits):
        return torch.full_like(logits, float("nan"))


def test_nan_logits_fail_only_that_request(live, engine, monkeypatch):
    add = engine.add_request
    poisoned = tokens(live, "What is", end=False)

    def add_request(prompt_token_ids, params=None, request_id=None):
        if list(prompt_token_ids) == poisoned:
            params.logits_processors = [*params.logits_processors, _Poison()]
        return add(prompt_token_ids, params, request_id)

    monkeypatch.setattr(engine, "add_request", add_request)
    results = {}

    def ask(name, prompt):
        results[name] = post(live, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 6})

    threads = [threading.Thread(target=ask, args=(n, p)) for n, p in (("bad", "What is"), ("good", "The quick"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    error_of(results["bad"], 500, code="generation_failed")
    assert "NaN" in results["bad"].json()["error"]["message"]
    assert results["good"].status_code == 200
    monkeypatch.undo()
    assert_serving(live)
    # Streaming: the error arrives as an error event, then [DONE].
    monkeypatch.setattr(engine, "add_request", add_request)
    with httpx.stream("POST", live.url + "/v1/completions", json={"model": MODEL, "prompt": "What is",
                      "max_tokens": 6, "stream": True}) as r:  # fmt: skip
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert json.loads(events[-2][6:])["error"]["code"] == "generation_failed" and events[-1] == "data: [DONE]"


def test_a_step_that_raises_resets_the_engine_and_serving_goes_on(live, engine, monkeypatch):
    step = engine.step
    calls = []

    def failing_step():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug outside any request")
        return step()

    monkeypatch.setattr(engine, "step", failing_step)
    r = post(live, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2})
    error_of(r, 500)
    assert "a bug outside any request" in r.json()["error"]["message"]
    assert not engine.has_unfinished() and engine.num_free_slots == engine.max_num_seqs
    assert_serving(live)
    assert "hybridmoe_engine_failures_total 1" in httpx.get(live.url + "/metrics").text


# ------------------------------------------------------------------------------------------------ 2. size, event loop
def test_an_oversized_body_is_refused_before_it_is_read(live):
    big = f"POST /v1/completions HTTP/1.1\r\nHost: {live.url[7:]}\r\nContent-Length: {20 * 2**20}\r\n\r\n".encode()
    sock = raw_http(address(live), big)
    status, headers, body = read_response(sock)
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"
    # A body that is sent whole is read and dropped before the 413, so the client gets the answer (a socket closed
    # with unread data resets the connection: "peer closed connection without sending complete message body").
    head = f"POST /v1/completions HTTP/1.1\r\nHost: {live.url[7:]}\r\nContent-Length: {40 * 2**20}\r\n\r\n"
    sock = raw_http(address(live), head.encode())
    sock.sendall(b"x" * (40 * 2**20))  # before: the server had closed the connection (EPIPE / reset)
    status, headers, body = read_response(sock)
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"
    # A chunked body (no Content-Length) is cut off at the limit too.
    r = httpx.post(live.url + "/v1/completions", content=iter([b"x" * 2**16] * 40), timeout=60)
    error_of(r, 413, code="request_too_large")
    assert_serving(live)


def test_a_long_prompt_is_refused_by_characters_and_tokenizing_leaves_the_loop_free(live):
    r = post(live, "/v1/completions", {"model": MODEL, "prompt": "x" * 400_001})
    error_of(r, 400, code="context_length_exceeded", param="prompt")
    assert "400,000" in r.json()["error"]["message"]
    # A prompt under the character limit but over max_model_len in tokens: tokenized off the event loop, so /health
    # answers while it is tokenized.
    prompt = "The quick brown fox jumps over the lazy dog. " * 8800
    done, health_during = threading.Event(), []

    def big():
        error_of(post(live, "/v1/completions", {"model": MODEL, "prompt": prompt}), 400, "context_length_exceeded")
        done.set()

    t = threading.Thread(target=big)
    t.start()
    while not done.is_set():
        ok = httpx.get(live.url + "/health", timeout=60).status_code == 200
        health_during.append(ok and not done.is_set())
    t.join(60)
    assert any(health_during)


# ---------------------------------------------------------------------------------------- 3. a 500 keeps the connection
def test_an_internal_error_is_a_500_and_the_connection_stays_open(live, monkeypatch):
    serving = live.server.serving

    async def broken(body, request):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(serving, "completions", broken)
    body = json.dumps({"model": MODEL, "prompt": "hi"}).encode()
    sock = raw_http(address(live), request_bytes(live, "POST", "/v1/completions", body))
    status, headers, payload = read_response(sock)
    assert status == 500 and json.loads(payload)["error"]["type"] == "server_error"
    assert headers.get("connection") != "close"
    monkeypatch.undo()
    sock.sendall(request_bytes(live, "GET", "/health"))  # the same connection
    status, _, payload = read_response(sock)
    assert status == 200 and json.loads(payload) == {"status": "ok"}


# ------------------------------------------------------------------------------------------------ 4. bad input is a 400
@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/v1/completions", b'{"model": "tiny-test", "prompt": "\\ud800"}', "prompt"),
        (
            "/v1/chat/completions",
            b'{"model": "tiny-test", "messages": [{"role": "user", "content": "a\\udfffb"}]}',
            "messages.0.content",
        ),
        (
            "/v1/chat/completions",
            {"messages": [*USER, {"role": "assistant", "content": "x", "tool_calls": 5}]},
            "messages",
        ),
        (
            "/v1/chat/completions",
            {"messages": [*USER, {"role": "assistant", "content": "x", "reasoning_content": 5}]},
            "messages",
        ),
        (
            "/v1/chat/completions",
            b'{"model": "tiny-test", "messages": [{"role": "user", "content": "hi"}], '
            b'"chat_template_kwargs": {"reasoning_budget": 1e400}}',
            "chat_template_kwargs.reasoning_budget",
        ),
        (
            "/v1/chat/completions",
            {"messages": USER, "chat_template_kwargs": {"enable_thinking": "perhaps"}},
            "chat_template_kwargs.enable_thinking",
        ),
        ("/v1/completions", b'{"model": "tiny-test", "prompt": "hi", "temperature": NaN}', None),
        ("/v1/completions", b'{"model": "tiny-test", "prompt": "hi", "max_tokens": 1' + b"0" * 5000 + b"}", None),
        ("/v1/completions", b'{"model": "tiny-test", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None),
        ("/v1/completions", b'{"model": "tiny-test", "prompt": [[1, 2], [3, 999999]]}', "prompt"),
        ("/v1/completions", b"\xff\xfe{}", None),
    ],
)
def test_bad_input_is_a_400_naming_the_field(live, path, body, param):
    if isinstance(body, dict):
        body = {"model": MODEL} | body
    error_of(post(live, path, body), 400, param=param)


def test_enable_thinking_false_as_a_string_turns_reasoning_off(live, engine, monkeypatch):
    seen = []
    add = engine.add_request
    monkeypatch.setattr(
        engine, "add_request", lambda ids, params=None, rid=None: seen.append(ids) or add(ids, params, rid)
    )
    think_end = live.server.serving.think_end_id
    for value, reasoning in (("false", False), (False, False), ("true", True)):
        body = {"model": MODEL, "messages": USER, "max_tokens": 1, "chat_template_kwargs": {"enable_thinking": value}}
        assert post(live, "/v1/chat/completions", body).status_code == 200
        assert (seen[-1][-1] != think_end) == reasoning, value  # off: the prompt ends with <think></think>


# ------------------------------------------------------------------------------------------------ 5. metrics labels
def test_metrics_are_labelled_by_route_template(live):
    with httpx.Client() as client:
        for i in range(300):
            client.get(f"{live.url}/no/such/path/{i}")
    httpx.get(live.url + "/evil%22%7D%0Afake_metric%201")  # the decoded path holds `"}` and a newline
    text = httpx.get(live.url + "/metrics").text
    endpoints = set(re.findall(r'hybridmoe_requests_total\{endpoint="([^"]*)"', text))
    assert "unmatched" in endpoints and all(not e.startswith("/no/such") for e in endpoints)
    sample = re.compile(r'^[a-z_]+(\{([a-z_]+="([^"\\]|\\.)*",?)*\})? [-+0-9.eE]+$')
    for line in text.splitlines():
        assert line.startswith("#") or sample.match(line), line  # the exposition format holds


# ---------------------------------------------------------------------------------------- 6. half-open connections
def test_half_open_connections_are_closed(live):
    socks = [
        raw_http(address(live), b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le") for _ in range(50)
    ]
    for sock in socks:
        sock.settimeout(30)  # header_timeout_s is 1 s: each must be closed well before this
        assert sock.recv(1024) == b""  # closed by the server
        sock.close()
    # After a complete response, half of the next request's head is cut off as well.
    sock = raw_http(address(live), request_bytes(live, "GET", "/health"))
    assert read_response(sock)[0] == 200
    sock.sendall(b"GET /health HTTP/1.1\r\nHo")
    sock.settimeout(30)
    assert sock.recv(1024) == b""
    # A body that never arrives ends with a 408.
    sock = raw_http(address(live), request_bytes(live, "POST", "/v1/completions", b"x" * 100)[:-90])
    status, _, body = read_response(sock)
    assert status == 408 and json.loads(body)["error"]["code"] == "timeout"
    assert_serving(live)


# ------------------------------------------------------------------------------------------------ limits
def test_prompt_and_stop_counts_are_limited(live):
    error_of(post(live, "/v1/completions", {"model": MODEL, "prompt": ["a"] * 5}), 400, param="prompt")
    error_of(post(live, "/v1/completions", {"model": MODEL, "prompt": "a", "stop": list("abcde")}), 400, param="stop")
    assert post(live, "/v1/completions", {"model": MODEL, "prompt": ["a"] * 4, "max_tokens": 1}).status_code == 200


class _Slow:
    """50 ms per token, and nothing before `gate` opens (so the test, not the machine's speed, decides when the
    requests may move on)."""

    def __init__(self, gate: threading.Event):
        self.gate = gate

    def __call__(self, output_ids, logits):
        self.gate.wait(30)
        time.sleep(0.05)
        return logits


def test_a_full_queue_is_a_503_and_a_slow_request_a_504(checkpoint):
    serving = make_serving(checkpoint, max_num_seqs=1, limits=Limits(max_queue=1, request_timeout_s=1.0))
    engine = serving.engine
    engine.script = serving.tokenizer("word " * 300, add_special_tokens=False)["input_ids"]  # no early eos
    add = engine.add_request
    gate = threading.Event()

    def slow_add(prompt_token_ids, params=None, request_id=None):
        params.logits_processors = [*params.logits_processors, _Slow(gate)]
        return add(prompt_token_ids, params, request_id)

    engine.add_request = slow_add
    server = ServerThread(serving)
    try:
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 200}
        results = []
        threads = [threading.Thread(target=lambda: results.append(post(server, "/v1/completions", body)))
                   for _ in range(2)]  # fmt: skip
        # One holds the slot, then one waits. (Started together, both could arrive before the engine scheduled the
        # first: the second found the queue full and got the 503 meant for the third.)
        for t, state in zip(threads, ((1, 0), (1, 1))):
            t.start()
            deadline = time.monotonic() + 30
            while (engine.num_running, engine.num_waiting) != state and time.monotonic() < deadline:
                time.sleep(0.01)
        r = post(server, "/v1/completions", body)
        error_of(r, 503, code="queue_full")
        assert r.headers["retry-after"] == "1"
        gate.set()
        for t in threads:
            t.join(60)
        assert {r.status_code for r in results} == {504}  # 200 tokens at 50 ms each: past the 1 s limit
        assert results[0].json()["error"]["code"] == "timeout"
        deadline = time.monotonic() + 30
        while engine.has_unfinished() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not engine.has_unfinished()  # the timed-out requests were cancelled in the engine
    finally:
        server.stop(grace_s=0)


def test_api_key_and_allowed_hosts(checkpoint):
    server = ServerThread(make_serving(checkpoint), api_key="s3cret", allowed_hosts=["chat.example"])
    try:
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
        error_of(post(server, "/v1/completions", body), 401, code="invalid_api_key")
        error_of(post(server, "/v1/completions", body, auth=_Bearer("wrong")), 401, code="invalid_api_key")
        assert post(server, "/v1/completions", body, auth=_Bearer("s3cret")).status_code == 200
        error_of(httpx.get(server.url + "/v1/models"), 401)
        assert httpx.get(server.url + "/health").status_code == 200  # public
        # DNS rebinding: a page on evil.example whose name now points at 127.0.0.1.
        port = server.url.rsplit(":", 1)[1]
        for host, ok in ((f"evil.example:{port}", False), (f"localhost:{port}", True), (f"chat.example:{port}", True),
                         (f"127.0.0.1:{port}", True)):  # fmt: skip
            r = httpx.get(server.url + "/health", headers={"host": host})
            assert (r.status_code == 200) == ok, host
            if not ok:
                error_of(r, 400, code="invalid_host")
    finally:
        server.stop(grace_s=0)


class _Bearer(httpx.Auth):
    def __init__(self, key):
        self.key = key

    def auth_flow(self, request):
        request.headers["Authorization"] = f"Bearer {self.key}"
        yield request


def test_allowed_host_names():
    assert allowed_host_names("127.0.0.1") == {"localhost", "127.0.0.1", "::1"}
    assert allowed_host_names("::1", ["Chat.Example:8000"]) == {"localhost", "127.0.0.1", "::1", "chat.example"}
    assert allowed_host_names("0.0.0.0") is None and allowed_host_names("0.0.0.0", ["a.b"]) == {"a.b"}
    assert allowed_host_names("10.0.0.5") == {"10.0.0.5"} and allowed_host_names("10.0.0.5", ["*"]) is None


def test_too_many_connections_get_a_503(checkpoint):
    server = ServerThread(make_serving(checkpoint, limits=Limits(max_connections=2, header_timeout_s=30)))
    try:
        idle = [socket.create_connection(address(server)) for _ in range(2)]
        sock = raw_http(address(server), request_bytes(server, "GET", "/health"))
        assert read_response(sock)[0] == 503
        for s in idle:
            s.close()
    finally:
        server.stop(grace_s=0)


# ------------------------------------------------------------------------------------------------ the engine alone
def test_engine_contains_a_failing_forward_to_its_request(checkpoint):
    """A forward that raises for one request's token (a decode batch and a prefill chunk) fails that request only;
    the others give exactly what they give alone."""
    from hybridmoe import HybridMoEForCausalLM

    model = HybridMoEForCausalLM.from_pretrained(checkpoint)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = [[5, 6, 8], [9, 10, 11, 12], [13, 14]]
    alone = Engine(model, max_num_seqs=4, max_model_len=64, eos_token_id=None).generate(prompts, params)
    poison = min(set(range(3, 100)) - {t for o in alone for t in o.token_ids})  # a token none of them meets

    class Flaky(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.config, self.lm_head = model, model.config, model.lm_head

        def new_cache(self, *a, **k):
            return model.new_cache(*a, **k)

        def forward(self, ids, **kw):
            if (ids == poison).any():
                raise RuntimeError("poisoned forward")
            return model(ids, **kw)

    engine = Engine(Flaky(), max_num_seqs=4, max_model_len=64, eos_token_id=None)
    # A request whose prompt holds the poison fails in its prefill; one forced to generate it, in the batched decode.
    force = [lambda ids, lg: lg.index_fill(0, torch.tensor([poison]), 1e9)]
    forced = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logits_processors=force)
    out = engine.generate([*prompts, [poison, 3, 4], [15, 16]], [params] * 4 + [forced])
    assert [o.token_ids for o in out[:3]] == [o.token_ids for o in alone]
    assert out[3].finish_reason == "error" and "poisoned forward" in out[3].error  # its prefill
    assert out[4].finish_reason == "error" and out[4].token_ids == [poison]  # its first decode
    assert engine.num_free_slots == 4 and not engine.has_unfinished()
