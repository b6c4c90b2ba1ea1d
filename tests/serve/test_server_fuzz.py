"""A fuzz suite against a live `hybridmoe serve` (a subprocess on 127.0.0.1): random and adversarial bodies for every
route, bounded in count, then the server must still be healthy, answer a normal request, and hold no more than
100 MB more resident memory than before.

Bodies come from hypothesis: a valid request of the route with one field replaced by any JSON value (wrong types,
huge and tiny numbers, unicode edge cases, nesting), fields deleted, and a fixed list of raw bodies that JSON
parsers and tokenizers trip on (NaN, 1e400, 5000-digit integers, nesting 100k deep, lone surrogates, invalid UTF-8,
a prompt over the character limit, a body over the size limit). Every answer must be a response below 500 with
OpenAI's error JSON for the errors (a 503 only with Retry-After, a 504 only from the request time limit).

The number of examples per route is `HYBRIDMOE_FUZZ_EXAMPLES` (default 40; the figures in benchmarks/README.md come
from a larger run), sent within `HYBRIDMOE_FUZZ_SECONDS` (default 300) for the whole suite; the examples are
derandomized (the same in every CI run) unless `HYBRIDMOE_FUZZ_RANDOM=1`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_server import make_checkpoint

MODEL = "fuzz"
EXAMPLES = int(os.environ.get("HYBRIDMOE_FUZZ_EXAMPLES", "40"))
# The whole suite's time bound, from when the server is up: past it the remaining examples send nothing (CI's 200
# requests take ~25 s).
SECONDS = float(os.environ.get("HYBRIDMOE_FUZZ_SECONDS", "300"))
DEADLINE = [float("inf")]
SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, derandomize=os.environ.get("HYBRIDMOE_FUZZ_RANDOM") != "1", database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)  # fmt: skip
TRIED: Counter[str] = Counter()  # requests sent per route
STATUSES: Counter[tuple[str, int]] = Counter()


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) / 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    checkpoint = make_checkpoint(tmp_path_factory.mktemp("ckpt"))
    cmd = [sys.executable, "-m", "hybridmoe.cli", "serve", checkpoint, "--port", "0", "--max-model-len", "96",
           "--served-model-name", MODEL, "--grace", "1", "--request-timeout", "20",
           "--max-num-seqs", "4"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("HYBRIDMOE_API_KEY", None)
    log = tmp_path_factory.mktemp("log") / "server.log"  # a file, not a pipe: a full pipe would block the server
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=env)
    url = None
    deadline = time.monotonic() + 120
    while url is None and time.monotonic() < deadline and proc.poll() is None:
        if m := re.search(r"on (http://127\.0\.0\.1:\d+)", log.read_text()):
            url = m.group(1)
        time.sleep(0.05)
    assert url, log.read_text()
    client = httpx.Client(base_url=url, timeout=30)
    for _ in range(200):
        try:
            if client.get("/health").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.05)
    for _ in range(3):  # warm up: memory is measured against a server that has served requests
        normal_requests(client)
    DEADLINE[0] = time.monotonic() + SECONDS
    yield client, proc, rss_mb(proc.pid)
    client.close()
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def normal_requests(client):
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "The quick brown", "max_tokens": 4})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"]
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                                                  "max_tokens": 4, "stream": True})  # fmt: skip
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")


# ------------------------------------------------------------------------------------------------ bodies
BASES = {
    "/v1/completions": {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 4, "temperature": 0.7,
                        "logprobs": 2, "echo": False, "stream": False, "stop": ["\n"], "seed": 1},
    "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": "What is 2 + 2?"}], "max_tokens": 4, "stream": False,
                             "temperature": 0.5, "top_p": 0.9, "logprobs": True, "top_logprobs": 2,
                             "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
                             "chat_template_kwargs": {"enable_thinking": False, "reasoning_budget": 2}},
    "/tokenize": {"model": MODEL, "prompt": "The quick brown fox"},
    "/detokenize": {"model": MODEL, "tokens": [5, 6, 7]},
}  # fmt: skip
GETS = ["/health", "/v1/models", "/metrics", "/", "/tokenizer_info", "/nowhere"]

TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        [
            "",
            "\x00",
            "\u202e",
            "e\u0301" * 20,
            "🙂" * 30,
            "<|im_end|>",
            "</think>",
            "<tool_call>",
            "\ufeff",
            "\uffff",
            "a" * 5000,
            "{{ 7 * 7 }}",
            "{% for x in y %}",
        ]
    ),  # fmt: skip
)
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**63, -(2**63) - 1, 2**64, 1e-45, 1e308, -1e308, 5e-324, 0.5]),
    st.floats(allow_nan=False, allow_infinity=False), TEXT,
)  # fmt: skip
VALUES = st.recursive(SCALARS, lambda c: st.lists(c, max_size=4) | st.dictionaries(TEXT, c, max_size=4), max_leaves=12)

RAW = [
    b"", b"null", b"[]", b"{", b'{"model": "fuzz", "prompt": "hi", "temperature": NaN}',
    b'{"model": "fuzz", "prompt": "hi", "max_tokens": Infinity}', b'{"model": "fuzz", "prompt": "hi", "top_p": 1e400}',
    b'{"model": "fuzz", "prompt": "hi", "max_tokens": 1' + b"0" * 5000 + b"}",
    b'{"model": "fuzz", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"model": "fuzz", "prompt": ' + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"}",
    b'{"model": "fuzz", "prompt": "\\ud800"}', b'{"model": "fuzz", "prompt": "\\udfff\\ud800"}',
    b'{"model": "fuzz", "messages": [{"role": "user", "content": "\\ud83d"}]}',
    b'{"model": "fuzz", "prompt": "\xff\xfe\xfd"}', b"\xef\xbb\xbf{}",
    b'{"model": "fuzz", "prompt": "' + b"a" * 2**21 + b'"}',
    b'{"model": "fuzz", "prompt": "' + b"a" * 9 * 2**20 + b'"}',
    b'{"model": "fuzz", "tokens": [-1, 99999999999]}', b'{"model": "fuzz", "prompt": [[1], [2, 3], []]}',
    b'{"model": "fuzz", "messages": []}', b'{"model": "fuzz", "messages": [{"role": "tool"}]}',
    b'{"model": "fuzz", "messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", '
    b'"arguments": "{not json"}}]}, {"role": "user", "content": [{"type": "image_url"}]}]}',
]  # fmt: skip


@st.composite
def bodies(draw, route: str):
    base = dict(BASES[route])
    kind = draw(st.sampled_from(["replace", "replace", "delete", "nested", "raw", "add"]))
    if kind == "raw":
        return draw(st.sampled_from(RAW))
    if kind == "replace":
        base[draw(st.sampled_from(sorted(base)))] = draw(VALUES)
    elif kind == "delete":
        base.pop(draw(st.sampled_from(sorted(base))))
    elif kind == "nested" and route == "/v1/chat/completions":
        message = dict(base["messages"][1])
        message[draw(st.sampled_from(["content", "role", "tool_calls", "reasoning_content", "name"]))] = draw(VALUES)
        base["messages"] = [base["messages"][0], message]
    else:
        base[draw(TEXT)] = draw(VALUES)
    return json.dumps(base, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")


def send(client: httpx.Client, method: str, path: str, **kw) -> httpx.Response | None:
    """The answer to one fuzz request, or None past the suite's time bound."""
    return client.request(method, path, **kw) if time.monotonic() < DEADLINE[0] else None


def check(route: str, r: httpx.Response | None) -> None:
    if r is None:
        return
    TRIED[route] += 1
    STATUSES[route, r.status_code] += 1
    assert r.status_code < 500 or r.status_code in (503, 504), (route, r.status_code, r.text[:500])
    if r.status_code == 503:
        assert "retry-after" in r.headers, r.text[:300]
    if r.status_code >= 400:
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], r.text[:300]
    elif r.headers.get("content-type", "").startswith("text/event-stream"):
        events = [line for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        for event in events[:-1]:
            obj = json.loads(event[6:])
            assert "error" not in obj or obj["error"]["code"] in ("timeout", "generation_failed"), obj


@pytest.mark.parametrize("route", sorted(BASES))
def test_fuzz_post_routes(server, route):
    client = server[0]

    @SETTINGS
    @given(body=bodies(route))
    def run(body):
        check(route, send(client, "POST", route, content=body, headers={"content-type": "application/json"}))

    run()


@SETTINGS
@given(path=st.sampled_from(GETS), query=st.dictionaries(TEXT, TEXT, max_size=3), method=st.sampled_from(["GET",
       "POST", "PUT", "DELETE", "HEAD", "OPTIONS"]))  # fmt: skip
def test_fuzz_other_routes_and_methods(server, path, query, method):
    client = server[0]
    params = {k.encode("utf-8", "surrogatepass").decode("utf-8", "replace"): v.encode("utf-8", "surrogatepass")
              .decode("utf-8", "replace") for k, v in query.items()}  # fmt: skip
    r = send(client, method, path, params=params)
    if r is None:
        return
    TRIED[f"{method} {path}"] += 1
    assert r.status_code < 500 or (path == "/health" and r.status_code == 503), (method, path, r.status_code, r.text)


def test_after_the_fuzz_the_server_is_whole(server):
    client, proc, rss_before = server
    assert proc.poll() is None, "the server exited"
    assert all(TRIED[route] for route in BASES), TRIED  # the fuzz did run
    assert client.get("/health").json() == {"status": "ok"}
    normal_requests(client)
    rss_after = rss_mb(proc.pid)
    print(f"\nfuzz: {sum(TRIED.values())} requests {dict(sorted(TRIED.items()))}; statuses "
          f"{dict(sorted(STATUSES.items()))}; server RSS {rss_before:.0f} -> {rss_after:.0f} MB")  # fmt: skip
    assert rss_after - rss_before < 100, (rss_before, rss_after)
