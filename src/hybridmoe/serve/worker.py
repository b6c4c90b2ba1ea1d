"""The engine worker (one thread stepping the engine, outputs routed to each request's asyncio queue), admission,
and the server's metrics in Prometheus's text format.

- `EngineWorker` owns the engine: one thread runs `engine.step()` while any request is unfinished and sleeps on an
  event otherwise. Handlers (on the asyncio loop) add requests, which the engine allows from another thread (its
  inboxes), and receive `RequestOutput`s through their own asyncio.Queue: one `loop.call_soon_threadsafe` per step
  hands over everything the step produced. A streamed request gets every output; one that is not (`stream=False`)
  gets its first output (time to first token) and then one output at its end that merges the rest (`merge_outputs`),
  so that a non-streamed request costs the event loop two wake-ups rather than one per token (the loop shares the
  CPU with the engine thread: on a rollout worker of one core, per-token wake-ups took a fifth of it).
- Failures stay with the request that caused them: the engine ends such a request with finish_reason "error" and
  goes on (see `Engine.step`). Should a step still raise (a bug), the worker fails the requests that were open,
  resets the engine (every slot freed) and keeps serving; `/metrics` counts such failures.
- Weight updates (`load_weights`) are applied by the same thread between two steps, so no forward ever sees half
  of them; the caller gets a concurrent Future that is done once they are in.
- Admission: at most `max_queue` requests wait for a slot; beyond that `add` raises a 503 with Retry-After.
- `Metrics` counts requests by route template (`/v1/completions`, never the raw path, so unknown paths cannot grow
  the series) and status, tokens, and latency histograms (https://prometheus.io/docs/instrumenting/exposition_formats/).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import Counter, deque
from concurrent.futures import Future
from dataclasses import dataclass, replace

from .engine import AdmissionError, Engine, RequestOutput
from .protocol import APIError
from .sampling import SamplingParams

logger = logging.getLogger("hybridmoe.serve")


class EngineWorker:
    """Runs the engine's step loop in one background thread and routes each request's outputs to its queue."""

    def __init__(self, engine: Engine, max_queue: int = 256):
        self.engine, self.max_queue = engine, max_queue
        self.num_failures = 0  # steps that raised (each reset the engine)
        self._queues: dict[str, _Route] = {}
        self._wake = threading.Event()
        self._loads: deque[tuple[dict, int, Future]] = deque()  # weight updates waiting for the thread
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="hybridmoe-engine", daemon=True)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

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
        while self._loads:
            self._loads.popleft()[2].set_exception(RuntimeError("the engine stopped before the weights were loaded"))

    def load_weights(self, state_dict: dict, version: int) -> Future:
        """Have the worker thread call `engine.load_weights(state_dict, version)` between two steps; the Future
        holds None once they are in, or the engine's error (ValueError: they do not fit the model)."""
        future: Future = Future()
        if not self.alive or self._stop:
            future.set_exception(RuntimeError("the engine is not running"))
            return future
        self._loads.append((state_dict, version, future))
        self._wake.set()
        return future

    def _apply_loads(self) -> None:
        while self._loads:
            state_dict, version, future = self._loads.popleft()
            try:
                self.engine.load_weights(state_dict, version)
            except Exception as e:
                future.set_exception(e)
            else:
                future.set_result(None)

    def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, queue: asyncio.Queue,
            stream: bool = True) -> None:  # fmt: skip
        """Called on the event loop. stream=False: the queue gets the request's first output and then one merged
        output at its end (module docstring). Raises APIError(503) when the queue is full or the worker stopped, and
        the engine's AdmissionError / ValueError for a request it cannot take."""
        if not self.alive:
            raise APIError(503, "the engine is not running; retry later", "server_error", code="engine_stopped")
        if self.engine.num_waiting >= self.max_queue:
            raise APIError(503, f"the server is busy ({self.engine.num_waiting} requests are waiting, the most it "
                                "queues); retry shortly", "server_error", code="queue_full",
                           headers={"Retry-After": "1"})  # fmt: skip
        self._queues[request_id] = _Route(asyncio.get_running_loop(), queue, stream)  # before any output exists
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
        for request_id, route in list(self._queues.items()):
            self.cancel(request_id)
            _put(route.loop, [(route.queue, error)])

    def _run(self) -> None:
        while not self._stop:
            self._apply_loads()
            if not self.engine.has_unfinished():
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # not one request's fault (the engine contains those): start over clean
                logger.exception("engine step failed; failing the open requests and resetting the engine")
                self.num_failures += 1
                # reset before the errors go out: a client told of the failure finds the engine clean, and a
                # request it sends at once is not dropped by a reset still to come
                self.engine.reset()
                self.abort_all(APIError(500, f"the engine failed: {e!r}", "server_error"))
                continue
            self._route(outputs)

    def _route(self, outputs: list[RequestOutput]) -> None:
        """Hand a step's outputs to their queues: one call into each event loop for all of them."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for out in outputs:
            route = self._queues.pop(out.request_id, None) if out.finished else self._queues.get(out.request_id)
            if route is None:
                continue
            if not route.stream and route.started:
                route.held = out if route.held is None else merge_outputs(route.held, out)
                if not out.finished:
                    continue
                out, route.held = route.held, None
            route.started = True
            batches.setdefault(route.loop, []).append((route.queue, out))
        for loop, items in batches.items():
            _put(loop, items)


@dataclass
class _Route:
    """Where a request's outputs go; `held`: what a non-streamed request produced since its first output."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    stream: bool
    started: bool = False
    held: RequestOutput | None = None


def merge_outputs(a: RequestOutput, b: RequestOutput) -> RequestOutput:
    """One output for two consecutive outputs `a`, `b` of the same request: their tokens (and log-probabilities) in
    order, the state (finished, reasons, counts) of the later one, the prompt logprobs of whichever carries them."""
    logprobs = None if a.new_logprobs is None and b.new_logprobs is None else [*(a.new_logprobs or []),
                                                                               *(b.new_logprobs or [])]  # fmt: skip
    return replace(b, new_token_ids=a.new_token_ids + b.new_token_ids, new_logprobs=logprobs,
                               prompt_logprobs=a.prompt_logprobs or b.prompt_logprobs)  # fmt: skip


def _put(loop: asyncio.AbstractEventLoop, items: list[tuple[asyncio.Queue, object]]) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
        loop.call_soon_threadsafe(_deliver, items)


def _deliver(items: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def admission_error(e: ValueError, param: str) -> APIError:
    """The 400 for a request the engine refused (AdmissionError: it can never fit)."""
    code = "context_length_exceeded" if isinstance(e, AdmissionError) else None
    return APIError(400, str(e), param=param, code=code)


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


def _label(value: str) -> str:
    """A Prometheus label value, escaped (backslash, double quote, newline)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """Counters and histograms in Prometheus's text format (updated on the event loop only)."""

    def __init__(self):
        self.requests: Counter[tuple[str, int]] = Counter()  # (route template, HTTP status)
        self.prompt_tokens = self.generation_tokens = 0
        self.latency, self.ttft = _Histogram(), _Histogram()

    def render(self, worker: EngineWorker) -> str:
        lines = ["# HELP hybridmoe_requests_total Requests by route and HTTP status.",
                 "# TYPE hybridmoe_requests_total counter"]  # fmt: skip
        for (route, status), n in sorted(self.requests.items()):
            lines.append(f'hybridmoe_requests_total{{endpoint="{_label(route)}",status="{status}"}} {n}')
        for name, value, kind, doc in (
            ("hybridmoe_prompt_tokens_total", self.prompt_tokens, "counter", "Prompt tokens of finished requests."),
            ("hybridmoe_generation_tokens_total", self.generation_tokens, "counter", "Tokens generated."),
            ("hybridmoe_num_requests_running", worker.engine.num_running, "gauge", "Requests holding a slot."),
            ("hybridmoe_num_requests_waiting", worker.engine.num_waiting, "gauge", "Requests waiting for a slot."),
            ("hybridmoe_engine_failures_total", worker.num_failures, "counter", "Engine steps that raised."),
            ("hybridmoe_weight_version", worker.engine.weight_version, "gauge", "Version of the loaded weights."),
        ):
            lines += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}", f"{name} {value}"]
        for name, hist, doc in (
            ("hybridmoe_request_latency_seconds", self.latency, "Time from arrival to the last token."),
            ("hybridmoe_time_to_first_token_seconds", self.ttft, "Time from arrival to the first token."),
        ):
            lines += [f"# HELP {name} {doc}", f"# TYPE {name} histogram", *hist.lines(name)]
        return "\n".join(lines) + "\n"
