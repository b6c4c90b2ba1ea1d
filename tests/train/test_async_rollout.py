"""Asynchronous rollouts (`hybridmoe.train.async_rollout`) against real `hybridmoe serve` worker processes.

The agent loop is faked (`fake_run_episodes`, the signature of `hybridmoe.envs.agent.run_episodes`: one greedy turn
per episode over the generator), so these tests check what AsyncRollouts owns: versions and the staleness bound
with a trainer slow on purpose, weights published to the workers, and the workers' lifecycle. The "trained" weights
alternate between two debug-preset models with different seeds, whose greedy outputs differ.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import socketserver
import subprocess
import sys
import textwrap
import threading
import time

import httpx
import pytest
import torch
from test_server import make_checkpoint

from hybridmoe import HybridMoEConfig, HybridMoEForCausalLM
from hybridmoe.envs.base import Trajectory
from hybridmoe.serve import Engine, SamplingParams
from hybridmoe.train.async_rollout import AsyncRollouts, HTTPGenerator

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
STEP_S = 0.5  # the slow trainer's step


def prompt_of(seed: int) -> list[int]:
    return [5 + seed % 7, 6, 7]


def fake_run_episodes(envs, requests, generator, tokenizer, *, group_size=1, params, difficulty=1, reasoning=True,
                      max_new_tokens=256, group_offset=0) -> list[Trajectory]:  # fmt: skip
    out = []
    for i, (env, seed) in enumerate(requests):
        prompt = prompt_of(seed)
        for c in generator.generate([prompt] * group_size, params):
            out.append(Trajectory(
                env=env, seed=seed, group=group_offset + i, token_ids=prompt + c.token_ids,
                loss_mask=[0] * len(prompt) + [1] * len(c.token_ids), logprobs=[0.0] * len(prompt) + c.logprobs,
                reward=float(c.token_ids[0] % 2), weight_version=c.weight_version, finish_reason=c.finish_reason,
            ))  # fmt: skip
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def models(checkpoint):
    """The starting weights (version 0, even versions) and other weights (odd versions)."""
    torch.manual_seed(1)
    other = HybridMoEForCausalLM(HybridMoEConfig.from_pretrained(checkpoint))
    return HybridMoEForCausalLM.from_pretrained(checkpoint), other


def greedy_of(model, seeds) -> dict[int, list[int]]:
    engine = Engine(model, max_num_seqs=4, max_model_len=64)
    return {s: engine.generate([prompt_of(s)], GREEDY)[0].token_ids for s in seeds}


def rollouts(checkpoint, **kw) -> AsyncRollouts:
    kw = dict(group_size=2, prompts_per_step=2, params=GREEDY, max_new_tokens=6, max_model_len=64, max_num_seqs=4,
              run_episodes=fake_run_episodes, startup_timeout_s=120, wait_timeout_s=60) | kw  # fmt: skip
    prompts = kw.pop("prompts", (("fake", i) for i in itertools.count()))
    return AsyncRollouts({}, prompts, None, checkpoint=checkpoint, **kw)


def check_batch(batch, version, staleness, group_size=2, groups=2):
    assert len(batch) == group_size * groups
    by_group = {}
    for t in batch:
        by_group.setdefault(t.group, []).append(t)
    assert len(by_group) == groups and all(len(g) == group_size for g in by_group.values())  # whole groups
    assert all(version - staleness <= t.weight_version <= version for t in batch), [t.weight_version for t in batch]


def test_staleness_one_with_a_slow_trainer(checkpoint, models):
    with rollouts(checkpoint, max_staleness=1) as source:
        versions = []
        for step in range(4):
            batch = source.next_batch(step)
            check_batch(batch, step, staleness=1)
            versions.append({t.weight_version for t in batch})
            time.sleep(STEP_S)  # the trainer steps; generation goes on with the weights it has
            source.publish(models[(step + 1) % 2], step + 1)
        # Generation overlapped the steps: the batches after the first were sampled one version behind.
        assert versions == [{0}, {0}, {1}, {2}]
        assert source.stats["dropped_groups"] == 0 and source.metrics()["rollout_staleness"] == 0.75


def test_a_batch_streamed_in_parts(checkpoint, models):
    """stream_batch hands a batch out as its groups finish: whole groups, prompts_per_step of them in all, each within
    the staleness bound, with the same versions as next_batch gives a slow trainer; taking one commits to it, so
    generation moves on to the next batch at once."""
    with rollouts(checkpoint, max_staleness=1, prompts_per_step=3) as source:
        versions = []
        for step in range(4):
            parts = list(source.stream_batch(step))
            assert parts and all(len(part) % 2 == 0 for part in parts)  # whole groups of 2
            batch = [t for part in parts for t in part]
            check_batch(batch, step, staleness=1, groups=3)
            versions.append({t.weight_version for t in batch})
            time.sleep(STEP_S)
            source.publish(models[(step + 1) % 2], step + 1)
        assert versions == [{0}, {0}, {1}, {2}]
        assert source.stats["dropped_groups"] == 0 and source.stats["batches"] == 4
        with pytest.raises(ValueError, match="versions cannot go back"):
            list(source.stream_batch(2))


def test_a_publish_that_fails_in_the_background_is_raised_by_the_next_call(checkpoint, models):
    import copy

    broken = copy.deepcopy(models[1])
    with torch.no_grad():
        next(broken.parameters()).fill_(float("nan"))
    with rollouts(checkpoint, max_staleness=1) as source:
        source.next_batch(0)
        source.publish(broken, 1)  # returns at once: the worker refuses the weights in the background
        with pytest.raises(RuntimeError, match="publishing weight version 1 failed: .*NaN"):
            source.publish(models[1], 2)
        assert source.version == 0


def test_staleness_zero_is_synchronous_and_new_weights_show(checkpoint, models):
    expected = [greedy_of(m, range(8)) for m in models]
    assert expected[0] != expected[1]  # else the test could not tell the weights apart
    with rollouts(checkpoint, max_staleness=0) as source:
        for step in range(3):
            batch = source.next_batch(step)
            check_batch(batch, step, staleness=0)
            for t in batch:  # the tokens are the greedy output of exactly the weights of this version
                assert t.token_ids[3:] == expected[step % 2][t.seed]
            time.sleep(STEP_S)
            assert not source._running and not source._ready  # nothing generated while the trainer steps
            source.publish(models[(step + 1) % 2], step + 1)
        with pytest.raises(ValueError, match="versions must increase"):
            source.publish(models[0], 3)
        with pytest.raises(ValueError, match="publish"):
            source.next_batch(5)


def test_prompts_running_out_and_the_generator(checkpoint):
    prompts = iter([("fake", i) for i in range(5)])
    with rollouts(checkpoint, max_staleness=1, prompts=prompts) as source:
        assert len(source.next_batch(0)) == 4
        assert len([t for part in source.stream_batch(0) for t in part]) == 4
        assert len(source.next_batch(0)) == 2  # the last group
        with pytest.raises(StopIteration):
            source.next_batch(0)
        assert list(source.stream_batch(0)) == []  # streamed: no part at all
        worker = source.workers[0]
        generator = HTTPGenerator(worker.url, worker.api_key)
        (c,) = generator.generate([[5, 6, 7]], GREEDY)
        assert len(c.token_ids) == len(c.logprobs) == 6 and c.finish_reason == "length" and c.weight_version == 0
        (c,) = generator.generate([[5] * 60], GREEDY)  # no room left in max_model_len
        assert c.token_ids == [] and c.finish_reason == "length"
        with pytest.raises(RuntimeError, match="401"):
            HTTPGenerator(worker.url, "wrong").generate([[5, 6, 7]], GREEDY)
        generator.close()


def read_body(rfile) -> dict | None:
    """One HTTP/1.1 request's JSON body off a raw connection; None when the client closed it."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        byte = rfile.read(1)
        if not byte:
            return None
        head += byte
    return json.loads(rfile.read(int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))))


def answer_with(wfile, body: bytes) -> None:
    wfile.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: " + str(len(body)).encode()
                + b"\r\n\r\n" + body)  # fmt: skip


def test_a_kept_alive_connection_closed_by_the_server_is_retried():
    """A server may close an idle kept-alive connection just as the client sends on it (uvicorn after 5 s idle):
    the request gets no response at all, and the generator sends it again on a new connection."""
    answer = json.dumps({"choices": [{"token_ids": [9], "logprobs": {"token_logprobs": [-0.5]},
                                      "finish_reason": "length", "weight_version": 3}]}).encode()  # fmt: skip
    served = []

    class Handler(socketserver.StreamRequestHandler):
        def handle(self):  # the first request on each connection is answered, a second one is dropped unanswered
            for n in itertools.count():
                if read_body(self.rfile) is None or n > 0:
                    return  # a second request: closed without a response
                served.append(self.client_address)
                answer_with(self.wfile, answer)

    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        generator = HTTPGenerator(f"http://127.0.0.1:{server.server_address[1]}", max_concurrency=1)
        try:
            for _ in range(3):  # the 2nd and 3rd go out on the kept-alive connection first
                (c,) = generator.generate([[5, 6, 7]], GREEDY)
                assert c.token_ids == [9] and c.logprobs == [-0.5] and c.weight_version == 3
        finally:
            generator.close()
            server.shutdown()
    assert len(served) == 3 and len(set(served)) == 3  # each answered on its own connection


def test_each_sending_thread_has_its_own_connection(monkeypatch):
    """No connection pool is shared between the sending threads: one shared pool can close a connection it has
    just handed to another thread's request (encode/httpcore#1110), which then hangs and fails with EBADF."""
    answer = json.dumps({"choices": [{"token_ids": [9], "logprobs": {"token_logprobs": [-0.5]},
                                      "finish_reason": "length", "weight_version": 0}]}).encode()  # fmt: skip
    connections = set()

    class Handler(socketserver.StreamRequestHandler):
        def handle(self):  # keep-alive: every request on the connection answered, after a short wait
            while read_body(self.rfile) is not None:
                connections.add(self.client_address)
                time.sleep(0.02)
                answer_with(self.wfile, answer)

    used = []  # (sending thread, client) per request
    send = httpx.Client.send

    def recording_send(client, request, **kwargs):
        used.append((threading.get_ident(), id(client)))
        return send(client, request, **kwargs)

    monkeypatch.setattr(httpx.Client, "send", recording_send)
    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        generator = HTTPGenerator(f"http://127.0.0.1:{server.server_address[1]}", max_concurrency=3)
        try:
            for _ in range(2):
                out = generator.generate([[5, 6, k] for k in range(12)], GREEDY)
                assert [c.token_ids for c in out] == [[9]] * 12
            clients = list(generator._clients)
        finally:
            generator.close()
            server.shutdown()
    threads_of = {c: {t for t, k in used if k == c} for _, c in used}
    clients_of = {t: {k for u, k in used if u == t} for t, _ in used}
    assert len(used) == 24 and len(clients_of) <= 3
    assert all(len(v) == 1 for v in threads_of.values()) and all(len(v) == 1 for v in clients_of.values())
    assert len(connections) == len(clients) <= 3 and all(c.is_closed for c in clients)


def test_identical_prompts_go_out_as_one_request_with_n():
    """A GRPO group's k samples of one prompt are one request with n = k (at most max_n), so the server admits them
    together and prefills the prompt once; the completions come back in the prompts' order."""
    bodies = []

    class Handler(socketserver.StreamRequestHandler):
        def handle(self):
            while body := read_body(self.rfile):
                bodies.append(body)
                choices = [{"index": i, "token_ids": [body["prompt"][-1], i], "finish_reason": "length",
                            "logprobs": {"token_logprobs": [-1.0, -2.0]}, "weight_version": 0}
                           for i in range(body["n"])]  # fmt: skip
                answer_with(self.wfile, json.dumps({"choices": choices[::-1]}).encode())  # any order: by index

    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        generator = HTTPGenerator(f"http://127.0.0.1:{server.server_address[1]}", max_concurrency=2, max_n=3)
        try:
            prompts = [[1, 7], [1, 8], [1, 7], [1, 7], [1, 7], [1, 9], [1, 8]]
            out = generator.generate(prompts, GREEDY)
        finally:
            generator.close()
            server.shutdown()
    assert sorted((b["prompt"], b["n"]) for b in bodies) == [([1, 7], 1), ([1, 7], 3), ([1, 8], 2), ([1, 9], 1)]
    assert [c.token_ids for c in out] == [[7, 0], [8, 0], [7, 1], [7, 2], [7, 0], [9, 0], [8, 1]]
    with pytest.raises(ValueError, match="max_n"):
        HTTPGenerator("http://127.0.0.1:1", max_n=0)


def test_workers_stop_on_close_on_errors_and_when_a_worker_dies(checkpoint):
    with pytest.raises(KeyError), rollouts(checkpoint) as source:
        processes = [w.process for w in source.workers]
        raise KeyError("the trainer failed")
    assert all(p.poll() is not None for p in processes)
    assert source.workdir is None  # the weights directory is gone too

    with rollouts(checkpoint) as source:
        source.next_batch(0)
        source.workers[0].process.kill()
        with pytest.raises(RuntimeError, match="exited with code|a rollout failed"):
            for _ in range(5):  # the groups finished before the kill may still come out
                source.next_batch(0)


def test_workers_die_with_the_trainer_process(checkpoint, tmp_path):
    """A trainer killed outright (SIGKILL: no close, no atexit) leaves no worker behind (PR_SET_PDEATHSIG)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the parent-death signal is Linux's")
    script = tmp_path / "trainer.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys, time
        sys.path[:0] = [{os.path.dirname(__file__)!r}, {os.path.join(os.path.dirname(__file__), "..", "serve")!r}]
        from test_async_rollout import rollouts
        source = rollouts({checkpoint!r})
        print(source.workers[0].process.pid, flush=True)
        time.sleep(600)
    """)
    )
    trainer = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        worker_pid = int(trainer.stdout.readline())
    finally:
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(10)
    deadline = time.monotonic() + 30
    while _running(worker_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(worker_pid)


def _running(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
