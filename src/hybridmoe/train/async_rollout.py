"""Asynchronous rollouts: `hybridmoe serve` workers generate GRPO groups while the trainer steps.

The shape is the one of Nemotron 3 Super's and Ultra's RL (asynchronous GRPO as in NeMo-RL's `docs/guides/
async-grpo.md` and prime-rl's orchestrator): generation runs on separate engines, every trajectory carries the
version of the weights that sampled it, the trainer publishes new weights to the engines after each optimizer step
(here `POST /v1/weights` of each worker, which loads them between two engine steps, mid-generation), and a step uses
only trajectories at most `max_staleness` versions old (the reference uses 1; 0 is synchronous).

- `HTTPGenerator`: the `envs.base.Generator` protocol over one server's `/v1/completions`: token-id prompts,
  `logprobs: 0`, the params' `logprobs_mode` and `return_token_ids: true` (the exact sampled tokens, the end token
  included, and their log-probabilities), one request per prompt, sent concurrently (the engine batches them).
- `AsyncRollouts`: the `RolloutSource` of `hybridmoe.train.rollout` (next_batch / publish / close) over `workers`
  server subprocesses on 127.0.0.1 (a free port each, a random API key, `threads_per_worker` torch threads).
  Background threads run `hybridmoe.envs.agent.run_episodes` one group (one prompt, `group_size` episodes) at a time
  and queue the finished groups with their version (the oldest of their trajectories'). `stream_batch` hands a
  batch out in parts as its groups finish (the RL stage trains them as they come, `rl.stream_groups`).

Versions. The workers start at `initial_version` (the checkpoint's). The trainer holding weights version s asks
`next_batch(s)` and, after its optimizer step, calls `publish(model, s + 1)`. A group may be used by the step at
version s only if its version >= s - max_staleness; older ones are dropped (counted in `stats`, never returned).

Keeping generation at most `max_staleness` steps ahead. With weights version P published and n0 the version of the
next batch to be asked for (P, or P + 1 once batch P was taken), a group started now serves batch n0 + i //
prompts_per_step, i its place among the usable groups queued or running, which must be at most P + max_staleness: so
at most (P + max_staleness - n0 + 1) * prompts_per_step usable groups are queued or running at any time. With
max_staleness 0 that is 0 once batch P was taken, so generation waits for the new weights (synchronous); with 1 the
next batch is generated with the weights version P while the trainer steps on batch P. `next_batch` takes the
oldest usable groups first and waits for running groups that would be too old for the next step rather than take
newer ones over them, so in steady state no group is dropped.

Processes. Each worker runs `python -c <trampoline> serve ...`: the trampoline asks Linux to SIGTERM it when the
process that started it dies (prctl PR_SET_PDEATHSIG, which holds for the starting *thread*: build AsyncRollouts on
a thread that outlives it, e.g. the main one), then runs the CLI. `close()` (also on `with`, on an exception while
starting, and at interpreter exit) sends SIGTERM, waits, then SIGKILLs; each worker's output goes to a log file
whose tail is quoted when a worker dies.

torchrun: rank 0 owns the workers and the queue; `next_batch` broadcasts rank 0's batch (torch.distributed
`broadcast_object_list`) so every rank returns the same global batch and takes its own rows of it, as the other
stages' loaders do; `publish` gathers the full state dict on every rank (FSDP2: a collective) and rank 0 writes it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import torch

from ..envs.base import Completion, Environment, Trajectory
from ..serve.sampling import SamplingParams

logger = logging.getLogger("hybridmoe.train")

MODEL_NAME = "rollout"  # the served model name of the workers


# ---------------------------------------------------------------------------------------------- the generator


class HTTPGenerator:
    """`Generator` over a `hybridmoe serve` (or vLLM) server's `/v1/completions`.

    Each distinct prompt is one request, sent concurrently with the others (at most `max_concurrency` at once);
    a prompt given k times (the samples of a GRPO group) goes out once with n = k (at most `max_n` per request, the
    server's choices limit), so the server takes the k samples in together and prefills the prompt once (the
    engine's prompt sharing). With a seed, choice i samples with seed + i (the server's rule). A request the server
    refuses because the prompt leaves no room to generate (400 context_length_exceeded) gives Completions with no
    tokens and finish_reason "length"; one the engine failed on (500 generation_failed, which fails the request's
    every choice) gives finish_reason "error"; both carry the server's current weight version. A full queue (503)
    is retried, and so is a kept-alive connection the server closed as the request went out (no response at all);
    any other refusal, or a server that cannot be reached, raises.

    Every sending thread has its own `httpx.Client` of one connection. One client's pool shared by the threads can
    close a connection another thread was just handed, under a request waiting for its response (httpcore 1.0.9,
    encode/httpcore#1110: a surplus, expired or room-making idle connection is closed while assigned); the request
    then hangs until its read timeout and fails with EBADF (it stopped a benchmark RL run after 5 steps)."""

    def __init__(self, base_url: str, api_key: str | None = None, model_name: str = MODEL_NAME, *,
                 max_concurrency: int = 64, timeout_s: float = 900.0, retries: int = 20, max_n: int = 64):  # fmt: skip
        if max_n < 1:
            raise ValueError(f"max_n must be >= 1, got {max_n}")
        self.base_url, self.max_n = base_url.rstrip("/"), max_n
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.model_name, self.retries, self.timeout_s = model_name, retries, timeout_s
        self._local = threading.local()
        self._clients: list[httpx.Client] = []  # every thread's, closed by close()
        self._clients_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix="hybridmoe-http")

    @property
    def client(self) -> httpx.Client:
        """This thread's client: one connection, never used by another thread."""
        client = getattr(self._local, "client", None)
        if client is None:
            client = httpx.Client(
                base_url=self.base_url, headers=self._headers, timeout=self.timeout_s,
                # an idle connection is dropped after 2 s, before the server's idle timeout (uvicorn's 5 s) closes it
                limits=httpx.Limits(max_connections=1, max_keepalive_connections=1, keepalive_expiry=2.0),
            )  # fmt: skip
            with self._clients_lock:
                self._clients.append(client)
            self._local.client = client
        return client

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        body = self.request_body(params)
        places: dict[tuple[int, ...], list[int]] = {}  # a distinct prompt -> where it occurs
        for i, p in enumerate(prompts):
            places.setdefault(tuple(p), []).append(i)
        parts = [(prompt, where[j : j + self.max_n]) for prompt, where in places.items()
                 for j in range(0, len(where), self.max_n)]  # fmt: skip
        futures = [self._pool.submit(self._complete, list(prompt), body, len(where)) for prompt, where in parts]
        out: list[Completion | None] = [None] * len(prompts)
        for (_, where), future in zip(parts, futures):
            for i, completion in zip(where, future.result(), strict=True):
                out[i] = completion
        return out

    def request_body(self, params: SamplingParams) -> dict:
        if params.logits_processors:
            raise ValueError("logits_processors cannot be sent to a server; leave them out of the rollout params")
        body = {"model": self.model_name, "max_tokens": params.max_tokens, "temperature": params.temperature,
                "top_p": params.top_p, "ignore_eos": params.ignore_eos, "logprobs": 0,
                "logprobs_mode": params.logprobs_mode, "return_token_ids": True}  # fmt: skip
        if params.top_k:
            body["top_k"] = params.top_k
        if params.stop:
            body["stop"] = list(params.stop)
        if params.stop_token_ids:
            body["stop_token_ids"] = list(params.stop_token_ids)
        if params.seed is not None:
            body["seed"] = params.seed
        return body

    def weight_version(self) -> int:
        r = self.client.get("/v1/weights")
        r.raise_for_status()
        return r.json()["weight_version"]

    def _complete(self, prompt: list[int], body: dict, n: int = 1) -> list[Completion]:
        """`n` samples of one prompt, in choice order."""
        for attempt in range(self.retries + 1):
            try:
                r = self.client.post("/v1/completions", json=body | {"prompt": prompt, "n": n})
            except httpx.RemoteProtocolError:  # closed without a response: the request was not served
                if attempt == self.retries:
                    raise
                logger.warning("%s closed a connection without answering; sending the request again",
                               self.base_url)  # fmt: skip
                continue
            if r.status_code == 200:
                choices = sorted(r.json()["choices"], key=lambda c: c.get("index", 0))
                if len(choices) != n:
                    raise RuntimeError(f"{self.base_url}/v1/completions answered {len(choices)} choices for n={n}")
                return [Completion(c["token_ids"], c["logprobs"]["token_logprobs"], c["finish_reason"],
                                   c["weight_version"]) for c in choices]  # fmt: skip
            error = _error_of(r)
            if r.status_code == 400 and error.get("code") == "context_length_exceeded":
                version = self.weight_version()
                return [Completion([], [], "length", version) for _ in range(n)]
            if r.status_code == 500 and error.get("code") == "generation_failed":
                version = self.weight_version()
                return [Completion([], [], "error", version) for _ in range(n)]
            if r.status_code == 503 and error.get("code") == "queue_full" and attempt < self.retries:
                time.sleep(float(r.headers.get("Retry-After", 1)))
                continue
            raise RuntimeError(f"{self.base_url}/v1/completions answered {r.status_code}: "
                               f"{error.get('message', r.text[:500])}")  # fmt: skip
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._clients_lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()


def _error_of(r: httpx.Response) -> dict:
    try:
        error = r.json().get("error")
    except ValueError:
        return {}
    return error if isinstance(error, dict) else {}


# ---------------------------------------------------------------------------------------------- workers

# Runs in the worker process: die with the process that started it (Linux), then run `hybridmoe serve`.
_TRAMPOLINE = """\
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
except (OSError, AttributeError):
    pass
if os.getppid() != int(sys.argv[1]):  # the parent died before prctl
    sys.exit(1)
from hybridmoe.cli import main
sys.exit(main(sys.argv[2:]))
"""
_SERVING_LINE = re.compile(r"serving .* on http://([0-9.]+):(\d+) \(")


class ServeWorker:
    """One `hybridmoe serve` subprocess on 127.0.0.1 with a random API key; `url`, `api_key`, `stop()`."""

    def __init__(self, checkpoint: str, log_path: str, *, threads: int = 1, max_num_seqs: int = 8,
                 max_model_len: int | None = None, weight_version: int = 0, device: str | None = None,
                 dtype: str | None = None, env: dict[str, str] | None = None):  # fmt: skip
        self.api_key = secrets.token_urlsafe(24)
        self.log_path = log_path
        cmd = [sys.executable, "-c", _TRAMPOLINE, str(os.getpid()), "serve", checkpoint, "--host", "127.0.0.1",
               "--port", "0", "--served-model-name", MODEL_NAME, "--max-num-seqs", str(max_num_seqs), "--grace", "1",
               "--weight-version", str(weight_version), "--max-queue", "4096"]  # fmt: skip
        if max_model_len:
            cmd += ["--max-model-len", str(max_model_len)]
        if device:
            cmd += ["--device", device]
        if dtype:
            cmd += ["--dtype", dtype]
        # The key travels in the environment, not on the command line that `ps` shows.
        threads_env = {k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        full_env = os.environ | threads_env | (env or {}) | {"HYBRIDMOE_API_KEY": self.api_key}
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            env=full_env)  # fmt: skip
        self.url: str | None = None
        self._client: httpx.Client | None = None

    def post_weights(self, path: str, version: int) -> str | None:
        """Have the worker load the weights saved at `path` as `version`; None once it did, else what went wrong.
        One client for the worker's life, used by one publish at a time: a new client builds an SSL context
        (~28 ms on a 2-core EPYC), which every optimizer step would pay."""
        if self._client is None:
            self._client = httpx.Client(
                base_url=self.url, headers={"Authorization": f"Bearer {self.api_key}"}, timeout=600,
                limits=httpx.Limits(max_connections=1, max_keepalive_connections=1, keepalive_expiry=2.0),
            )  # fmt: skip
        try:
            r = self._client.post("/v1/weights", json={"path": path, "version": version})
        except httpx.TransportError as e:
            return f"{self.url}: {e!r}"
        if r.status_code != 200:
            return f"{self.url} answered {r.status_code}: {_error_of(r).get('message', r.text[:300])}"
        return None

    def wait_ready(self, timeout_s: float) -> None:
        """Wait for the server to listen and answer /health; raises RuntimeError with its log when it does not."""
        deadline = time.monotonic() + timeout_s
        while self.url is None:
            m = _SERVING_LINE.search(self.log_tail(200_000))
            if m:
                self.url = f"http://{m.group(1)}:{m.group(2)}"
                break
            self._check_alive("starting")
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {self.log_path} did not start within {timeout_s:g} s:\n{self.log_tail()}")
            time.sleep(0.05)
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            self._check_alive("starting")
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {self.url} did not answer /health within {timeout_s:g} s")
            time.sleep(0.05)

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def _check_alive(self, doing: str) -> None:
        if not self.alive:
            code, log = self.process.returncode, self.log_tail()
            raise RuntimeError(f"rollout worker {self.url or self.log_path} exited with code {code} while {doing}; "
                               f"its log ends:\n{log}")  # fmt: skip

    def log_tail(self, n: int = 3000) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(max(0, os.path.getsize(self.log_path) - n))
                return fh.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self, timeout_s: float = 10.0) -> None:
        _stop_process(self.process, timeout_s)
        if self._client is not None:
            self._client.close()


def _stop_process(process: subprocess.Popen, timeout_s: float = 10.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout_s)


def _stop_all(processes: list[subprocess.Popen]) -> None:
    """At interpreter exit or garbage collection: no worker outlives its AsyncRollouts."""
    for p in processes:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in processes:
        _stop_process(p, 5.0)


# ---------------------------------------------------------------------------------------------- rollouts


@dataclass
class _Group:
    id: int
    version: int  # the oldest weight version of its trajectories
    trajectories: list[Trajectory]


RunEpisodes = Callable[..., list[Trajectory]]  # hybridmoe.envs.agent.run_episodes's signature


class AsyncRollouts:
    """Groups generated by `hybridmoe serve` workers while the trainer steps (module docstring).

    envs, prompts, tokenizer, group_size, params, difficulty, reasoning, max_new_tokens: as for
    `hybridmoe.envs.agent.run_episodes` (prompts: an iterator of (environment name, seed), one group each).
    checkpoint: the model directory the workers serve (the trainer's starting weights, version `initial_version`).
    prompts_per_step: groups per `next_batch`. max_staleness: how many versions old a trajectory may be.
    workers: server subprocesses; threads_per_worker: the torch threads of each; devices: one device per worker
    (e.g. ["cuda:1", "cuda:2"]; default the server's choice); max_num_seqs, max_model_len, dtype: each engine's.
    groups_per_worker: groups generated at once on each worker (default: enough to fill its slots).
    wait_timeout_s: the longest `next_batch` waits (None: no limit; a dead worker or a failed episode raises at once).
    run_episodes: the agent loop (default `hybridmoe.envs.agent.run_episodes`)."""

    def __init__(
        self,
        envs: dict[str, Environment],
        prompts: Iterator[tuple[str, int]],
        tokenizer,
        *,
        checkpoint: str,
        group_size: int,
        prompts_per_step: int,
        params: SamplingParams,
        difficulty: int = 1,
        reasoning: bool = True,
        max_new_tokens: int = 256,
        workers: int = 1,
        max_staleness: int = 1,
        threads_per_worker: int = 1,
        devices: list[str] | None = None,
        max_num_seqs: int = 8,
        max_model_len: int | None = None,
        dtype: str | None = None,
        groups_per_worker: int | None = None,
        initial_version: int = 0,
        startup_timeout_s: float = 300.0,
        wait_timeout_s: float | None = None,
        run_episodes: RunEpisodes | None = None,
        distributed: bool = True,
    ):
        if group_size < 1 or prompts_per_step < 1 or workers < 1 or threads_per_worker < 1:
            raise ValueError(f"group_size, prompts_per_step, workers and threads_per_worker must be >= 1; got "
                             f"{group_size}, {prompts_per_step}, {workers}, {threads_per_worker}")  # fmt: skip
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0 (0: synchronous), got {max_staleness}")
        if devices is not None and len(devices) != workers:
            raise ValueError(f"devices lists {len(devices)} devices for {workers} workers; give one per worker")
        self.envs, self.prompts, self.tokenizer = envs, iter(prompts), tokenizer
        self.group_size, self.prompts_per_step, self.max_staleness = group_size, prompts_per_step, max_staleness
        self.episode_kwargs = dict(group_size=group_size, params=params, difficulty=difficulty, reasoning=reasoning,
                                   max_new_tokens=max_new_tokens)  # fmt: skip
        self.wait_timeout_s = wait_timeout_s
        # distributed=False: the caller alone (rank 0 of a trainer that shares the batches itself) uses this source
        self.rank, self.world_size = _rank_and_world() if distributed else (0, 1)
        self.version = initial_version  # published and loaded by every worker
        self._last_taken = initial_version - 1  # the version of the last batch returned
        self._cond = threading.Condition()
        self._ready: list[_Group] = []
        self._running: dict[int, int] = {}  # group id -> the published version when it started
        self._streamed = 0  # groups of the batch `stream_batch` is handing out, taken so far (still "pending")
        self._group_ids = itertools.count()
        self._error: BaseException | None = None
        self._exhausted = self._closing = self._finished = False
        self.stats = {"groups": 0, "trajectories": 0, "dropped_groups": 0, "dropped_trajectories": 0,
                      "batches": 0, "used_trajectories": 0, "wait_s": 0.0, "staleness_sum": 0}  # fmt: skip
        self.workers: list[ServeWorker] = []
        self.generators: list[HTTPGenerator] = []
        self._threads: list[threading.Thread] = []
        self.workdir = None
        self._publisher = ThreadPoolExecutor(1, thread_name_prefix="rollouts-publish")
        self._publishing = None  # the publish in flight (one process)
        self._requested_version = initial_version  # the last version published or being published
        if self.rank != 0:
            return
        if run_episodes is None:
            from ..envs.agent import run_episodes
        self._run_episodes = run_episodes
        self.workdir = tempfile.mkdtemp(prefix="hybridmoe-rollouts-")
        processes: list[subprocess.Popen] = []
        self._finalizer = weakref.finalize(self, _stop_all, processes)
        try:
            for i in range(workers):
                worker = ServeWorker(
                    checkpoint, os.path.join(self.workdir, f"worker-{i}.log"), threads=threads_per_worker,
                    max_num_seqs=max_num_seqs, max_model_len=max_model_len, weight_version=initial_version,
                    device=devices[i] if devices else None, dtype=dtype,
                )  # fmt: skip
                self.workers.append(worker)
                processes.append(worker.process)
            for worker in self.workers:
                worker.wait_ready(startup_timeout_s)
        except BaseException:
            self.close()
            raise
        per_worker = groups_per_worker or max(1, math.ceil(max_num_seqs / group_size))
        for i, worker in enumerate(self.workers):
            generator = HTTPGenerator(worker.url, worker.api_key, max_concurrency=max(8, per_worker * group_size))
            self.generators.append(generator)
            for j in range(per_worker):
                thread = threading.Thread(target=self._drive, args=(generator,), name=f"rollouts-{i}-{j}", daemon=True)
                thread.start()
                self._threads.append(thread)
        logger.info("rollouts: %d worker(s) at %s, %d group(s) at once each, max_staleness %d", workers,
                    ", ".join(w.url for w in self.workers), per_worker, max_staleness)  # fmt: skip

    def __enter__(self) -> AsyncRollouts:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ the producer (rank 0's threads)
    def _cap(self) -> int:
        """Usable groups that may be queued or running now (module docstring)."""
        n0 = max(self.version, self._last_taken + 1)
        return (self.version + self.max_staleness - n0 + 1) * self.prompts_per_step

    def _pending(self) -> int:
        oldest = max(self.version, self._last_taken + 1) - self.max_staleness
        queued = sum(1 for g in self._ready if g.version >= oldest) + self._streamed
        return queued + sum(1 for v in self._running.values() if v >= oldest)

    def _drive(self, generator: HTTPGenerator) -> None:
        while True:
            with self._cond:
                while not self._closing and not self._exhausted and self._pending() >= self._cap():
                    self._cond.wait()
                if self._closing or self._exhausted:
                    return
                try:
                    env, seed = next(self.prompts)
                except StopIteration:
                    self._exhausted = True
                    self._cond.notify_all()
                    return
                except BaseException as e:
                    self._fail(e)
                    return
                group_id = next(self._group_ids)
                self._running[group_id] = self.version
            try:
                trajectories = self._run_episodes(self.envs, [(env, seed)], generator, self.tokenizer,
                                                  group_offset=group_id, **self.episode_kwargs)  # fmt: skip
                if len(trajectories) != self.group_size:
                    raise RuntimeError(f"run_episodes returned {len(trajectories)} trajectories for a group of "
                                       f"{self.group_size}")  # fmt: skip
                version = min(t.weight_version for t in trajectories)
            except BaseException as e:
                with self._cond:
                    self._running.pop(group_id, None)
                    if not self._closing:
                        self._fail(e)
                return
            with self._cond:
                self._running.pop(group_id, None)
                self._ready.append(_Group(group_id, version, trajectories))
                self.stats["groups"] += 1
                self.stats["trajectories"] += len(trajectories)
                self._cond.notify_all()

    def _fail(self, e: BaseException) -> None:
        """Called holding the lock: keep the first error for next_batch to raise."""
        if self._error is None:
            self._error = e
        self._cond.notify_all()

    # ------------------------------------------------------------------ the RolloutSource API
    def next_batch(self, version: int) -> list[Trajectory]:
        """`prompts_per_step` whole groups for the trainer holding weights `version`, every trajectory's
        weight_version >= version - max_staleness (the same list on every rank under torchrun). When the prompts
        run out: the groups left (fewer), then StopIteration."""
        result = None
        if self.rank == 0:
            try:
                result = ("ok", self._next_batch(version))
            except StopIteration:
                result = ("stop", None)
            except BaseException as e:
                result = ("error", f"{type(e).__name__}: {e}")
                if self.world_size == 1:
                    raise
        result = _broadcast(result, self.world_size)
        if result[0] == "stop":
            raise StopIteration("the rollout prompts ran out")
        if result[0] == "error":
            raise RuntimeError(f"rank 0's rollouts failed: {result[1]}")
        return result[1]

    def _check_batch_version(self, version: int, call: str) -> None:
        """Before taking batch `version`: wait for the weights it needs if they are being published (and raise a
        failed publish), then refuse a version that goes back or that the published weights cannot serve."""
        if version - self.max_staleness > self.version or self._publishing is not None and self._publishing.done():
            self._wait_published()
        if version < self._last_taken:
            raise ValueError(f"{call}({version}) after batch {self._last_taken}; versions cannot go back")
        if version - self.max_staleness > self.version:
            raise ValueError(f"{call}({version}) but the workers hold weight version {self.version}, more than "
                             f"max_staleness={self.max_staleness} behind; publish(model, {version}) first")  # fmt: skip

    def _drop_stale(self, oldest: int) -> None:
        """With the lock held: raise a failed rollout's error, then drop (and count) the ready groups generated
        before weight version `oldest`."""
        if self._error is not None:
            raise RuntimeError(f"a rollout failed: {self._error!r}") from self._error
        for group in [g for g in self._ready if g.version < oldest]:
            self._ready.remove(group)
            self.stats["dropped_groups"] += 1
            self.stats["dropped_trajectories"] += len(group.trajectories)

    def _wait_for_groups(self, deadline: float | None, waited: Callable[[], str]) -> None:
        """With the lock held: check that every worker lives, raise TimeoutError (`waited()` says what for, the
        running groups counted) once past `deadline`, else wait at most a second for a group to finish."""
        for worker in self.workers:
            worker._check_alive("generating")
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"{waited()}; {len(self._running)} running")
        self._cond.wait(1.0 if deadline is None else max(0.01, min(1.0, deadline - time.monotonic())))

    def _next_batch(self, version: int) -> list[Trajectory]:
        self._check_batch_version(version, "next_batch")
        if self._finished:
            raise StopIteration
        t0 = time.monotonic()
        deadline = None if self.wait_timeout_s is None else t0 + self.wait_timeout_s
        oldest = version - self.max_staleness
        with self._cond:
            while True:
                self._drop_stale(oldest)
                expiring = sum(1 for g in self._ready if g.version == oldest)
                expiring_running = any(v <= oldest for v in self._running.values())
                enough = len(self._ready) >= self.prompts_per_step
                if enough and (expiring >= self.prompts_per_step or not expiring_running):
                    break
                if self._exhausted and not self._running:
                    if not self._ready:
                        self._finished = True
                        raise StopIteration
                    break  # the last, smaller batch
                self._wait_for_groups(deadline, lambda: f"next_batch({version}) waited {self.wait_timeout_s:g} s "
                                      f"for {self.prompts_per_step} groups; {len(self._ready)} ready")  # fmt: skip
            self._ready.sort(key=lambda g: (g.version, g.id))
            batch, self._ready = self._ready[: self.prompts_per_step], self._ready[self.prompts_per_step :]
            self._last_taken = version
            self.stats["batches"] += 1
            self.stats["wait_s"] += time.monotonic() - t0
            self.stats["staleness_sum"] += sum((version - g.version) * len(g.trajectories) for g in batch)
            self.stats["used_trajectories"] += sum(len(g.trajectories) for g in batch)
            self._cond.notify_all()
        return [t for g in batch for t in g.trajectories]

    def stream_batch(self, version: int) -> Iterator[list[Trajectory]]:
        """`next_batch(version)` in parts, as its groups finish: each part the trajectories of whole groups, every
        weight_version >= version - max_staleness, at most `prompts_per_step` groups in all. A trainer can work on
        the first groups while the batch's slowest ones still generate. While groups at the oldest allowed version
        run, only such groups are handed out (as `next_batch` prefers them), so none is dropped in steady state.
        Generation moves on to the next batch once this one is whole, as after `next_batch`. One process only (no
        torchrun: a part is not broadcast)."""
        if self.world_size != 1:
            raise RuntimeError("stream_batch is for a single process; under torchrun use next_batch")
        self._check_batch_version(version, "stream_batch")
        if self._finished:
            return
        deadline = None if self.wait_timeout_s is None else time.monotonic() + self.wait_timeout_s
        taken = 0
        try:
            while taken < self.prompts_per_step:
                part = self._take_part(version, self.prompts_per_step - taken, deadline)
                if part is None:
                    self._finished = taken == 0
                    return  # the prompts ran out: the last, smaller batch (or none)
                taken += len(part)
                yield [t for g in part for t in g.trajectories]
        finally:
            with self._cond:  # the batch is taken: generation moves on to the next one (`_cap`), as after next_batch
                self._last_taken, self._streamed = version, 0
                self.stats["batches"] += taken > 0
                self._cond.notify_all()

    def _take_part(self, version: int, room: int, deadline: float | None) -> list[_Group] | None:
        """Wait for usable groups of batch `version` that are sure to belong to it (`stream_batch`) and take at
        most `room` of them; None when no group is left to come."""
        oldest = version - self.max_staleness
        t0 = time.monotonic()
        with self._cond:
            while True:
                self._drop_stale(oldest)
                self._ready.sort(key=lambda g: (g.version, g.id))
                expiring_running = any(v <= oldest for v in self._running.values())
                part = [g for g in self._ready if g.version <= oldest or not expiring_running][:room]
                if part:
                    break
                if self._exhausted and not self._running and not self._ready:
                    return None
                self._wait_for_groups(
                    deadline, lambda: f"stream_batch({version}) waited {self.wait_timeout_s:g} s for its groups"
                )
            for group in part:
                self._ready.remove(group)
            self._streamed += len(part)
            self.stats["wait_s"] += time.monotonic() - t0
            self.stats["staleness_sum"] += sum((version - g.version) * len(g.trajectories) for g in part)
            self.stats["used_trajectories"] += sum(len(g.trajectories) for g in part)
            self._cond.notify_all()
        return part

    def publish(self, model: torch.nn.Module, version: int) -> None:
        """Write `model`'s weights once (safetensors in a fresh directory, then renamed) and have every worker load
        them as `version` (higher than the last). In one process the writing and loading go on in the background
        on a CPU copy of the weights (the trainer steps on meanwhile; ~60 ms a step for a 3M-parameter model on
        2 cores): a failure is raised by the next call, and a batch that needs the new weights waits for them. Under
        torchrun every rank calls it, and it returns once every worker has the weights."""
        state_dict = _full_state_dict(model, self.world_size)
        error = None
        if self.rank == 0 and self.world_size == 1:
            self._wait_published()
            if version <= self._requested_version:
                raise ValueError(f"publish(version={version}) after version {self._requested_version}; versions must "
                                 "increase")  # fmt: skip
            self._requested_version = version
            snapshot = {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()}
            self._publishing = self._publisher.submit(self._publish, model.config, snapshot, version)
            return
        if self.rank == 0:
            try:
                self._publish(model.config, state_dict, version)
            except BaseException as e:
                error = f"{type(e).__name__}: {e}"
                if self.world_size == 1:
                    raise
        error = _broadcast(error, self.world_size)
        if error is not None:
            raise RuntimeError(f"rank 0 could not publish weight version {version}: {error}")

    def _wait_published(self) -> None:
        """Wait for the publish in flight, if any; raise its error."""
        publishing, self._publishing = self._publishing, None
        if publishing is not None:
            try:
                publishing.result()
            except BaseException as e:
                raise RuntimeError(f"publishing weight version {self._requested_version} failed: {e}") from e

    def _publish(self, config, state_dict: dict, version: int) -> None:
        from .checkpoint import save_state_dict_pretrained

        if version <= self.version:
            raise ValueError(f"publish(version={version}) after version {self.version}; versions must increase")
        tmp = tempfile.mkdtemp(prefix=f".v{version}.", dir=self.workdir)
        path = os.path.join(self.workdir, f"v{version}")
        try:
            save_state_dict_pretrained(config, state_dict, tmp)
            os.replace(tmp, path)
            with ThreadPoolExecutor(len(self.workers)) as pool:
                answers = list(pool.map(lambda w: w.post_weights(path, version), self.workers))
            failed = [a for a in answers if a is not None]
            if failed:
                raise RuntimeError("; ".join(failed))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(path, ignore_errors=True)
        with self._cond:
            self.version = version
            self._cond.notify_all()

    def close(self) -> None:
        """Stop generating and stop the workers (SIGTERM, then SIGKILL); safe to call twice."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        with contextlib.suppress(Exception):
            self._wait_published()
        self._publisher.shutdown(wait=True)
        for worker in self.workers:
            with contextlib.suppress(Exception):
                worker.stop()
        for generator in self.generators:
            generator.close()
        for thread in self._threads:
            thread.join(10.0)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def metrics(self) -> dict:
        """Counters for the step log: groups and trajectories generated and dropped, the trainer's total wait, the
        mean staleness of the trajectories used."""
        used = self.stats["used_trajectories"]
        return {"rollout_groups": self.stats["groups"], "rollout_dropped_groups": self.stats["dropped_groups"],
                "rollout_wait_s": round(self.stats["wait_s"], 3),
                "rollout_staleness": self.stats["staleness_sum"] / used if used else 0.0}  # fmt: skip


# ---------------------------------------------------------------------------------------------- torchrun


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _broadcast(obj, world_size: int):
    """rank 0's `obj` on every rank (itself without torchrun)."""
    if world_size == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _full_state_dict(model: torch.nn.Module, world_size: int) -> dict:
    """The model's full state dict (module names) on rank 0: gathered from every rank when it is sharded."""
    from torch.distributed.tensor import DTensor

    if world_size > 1 or any(isinstance(p, DTensor) for p in model.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return model.state_dict()
