"""The HTTP server: the FastAPI app, what guards it (limits, API key, allowed hosts), and its lifecycle.

The routes live in `openai.py`, the engine thread and metrics in `worker.py`, the wire format in `protocol.py`; this
file puts them behind the defences a server on a shared machine needs, and runs them under uvicorn.

- `_Guard`, one ASGI middleware around the whole app:
  * refuses a `Host` header naming another host (400, code "invalid_host"): a page on another site that rebinds
    its DNS name to 127.0.0.1 cannot reach a loopback server (https://en.wikipedia.org/wiki/DNS_rebinding). A
    server bound to loopback accepts `localhost`, `127.0.0.1` and `::1`; one bound to an address accepts that
    address; `--allowed-host` adds names (`*` accepts any);
  * with an API key (`--api-key` or `HYBRIDMOE_API_KEY`) requires `Authorization: Bearer KEY` (401) everywhere but
    `/health` and the chat page;
  * reads the body itself: more than `Limits.max_body_bytes` is a 413 (before reading it when Content-Length says
    so), a body that does not arrive within `Limits.body_timeout_s` a 408; the app then gets the bytes in one piece;
  * turns an unexpected exception into a 500 with OpenAI's error body on the same keep-alive connection (Starlette's
    own handler re-raises after responding, which makes uvicorn drop the connection);
  * counts every response in the metrics by route template and status.
- Weight updates: `POST /v1/weights {"path": DIR, "version": N}` loads the safetensors a trainer wrote to DIR
  (`OpenAIServing.update_weights`; `GET /v1/weights` says the loaded version). A server started without an API key
  refuses it (403): a path on this machine chosen by whoever can reach the port must at least come with the key.
- `_HeadTimeoutH11Protocol`: uvicorn's h11 protocol with a deadline for the request head, so a client that opens a
  connection and sends half a header is disconnected after `Limits.header_timeout_s` (uvicorn has no such timeout:
  its keep-alive timer only runs between requests, and stops on the first byte).
- `GracefulServer`: on SIGINT/SIGTERM new requests get 503, requests in flight get `grace_s` seconds to finish, the
  rest end with a clean 503 error (a JSON body, or an error event in their stream); then uvicorn closes. A second
  Ctrl-C forces the exit. Open connections beyond `Limits.max_connections` get uvicorn's 503.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import math
import os
import socket
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path

import h11
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.staticfiles import StaticFiles
from uvicorn.protocols.http.h11_impl import H11Protocol

from .openai import OpenAIServing, add_routes
from .protocol import APIError, Limits, WeightUpdateRequest, parse_body

logger = logging.getLogger("hybridmoe.serve")

_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
# Reachable without the API key: the health check, and the chat page with its files (the page asks for the key).
_DRAIN_BYTES = 64 * 2**20  # how much of a body over the limit is read before the 413 (_Guard._read_body)
_PUBLIC_PATHS, _PUBLIC_PREFIX = ("/health", "/"), "/static/"
_STATIC = Path(__file__).parent / "static"
# The chat page loads only its own files: no inline script, nothing from elsewhere, not framed by another site.
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def create_app(serving: OpenAIServing, api_key: str | None = None, allowed_hosts: set[str] | None = None) -> FastAPI:
    """The FastAPI app over `serving`, guarded (module docstring); its lifespan starts and stops the engine worker.
    allowed_hosts: host names the `Host` header may name (None: any)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        serving.start()
        try:
            yield
        finally:
            serving.stop()

    app = FastAPI(title="hybridmoe", lifespan=lifespan)
    app.state.serving = serving

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()))
        message = f"{where}: {first.get('msg', 'invalid value')}" if where else first.get("msg", "invalid request")
        return JSONResponse(APIError(400, message, param=where or None).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        code = "not_found" if e.status_code == 404 else None
        message = f"{request.method} {request.url.path}: {e.detail}"
        return JSONResponse(APIError(e.status_code, message, code=code).body(), status_code=e.status_code,
                            headers=getattr(e, "headers", None))  # fmt: skip

    add_routes(app, serving)

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

    @app.get("/", include_in_schema=False)
    async def chat_page():
        return FileResponse(_STATIC / "index.html", headers=_PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=_STATIC), name="static")

    @app.get("/v1/weights")
    async def weight_version():
        return {"weight_version": serving.engine.weight_version}

    schema = {"application/json": {"schema": WeightUpdateRequest.model_json_schema()}}

    @app.post("/v1/weights", openapi_extra={"requestBody": {"required": True, "content": schema}})
    async def update_weights(request: Request):
        if api_key is None:  # with a key, _Guard already refused requests without it (401)
            raise APIError(403, "weight updates are refused by a server without an API key; start it with --api-key "
                                "(or HYBRIDMOE_API_KEY) and send the key", code="forbidden")  # fmt: skip
        return await serving.update_weights(parse_body(await request.body(), WeightUpdateRequest))

    app.add_middleware(_Guard, serving=serving, api_key=api_key, allowed_hosts=allowed_hosts)
    return app


# ---------------------------------------------------------------------------------------------- the guard


class _Guard:
    """The ASGI middleware described in the module docstring."""

    def __init__(self, app, serving: OpenAIServing, api_key: str | None, allowed_hosts: set[str] | None):
        self.app, self.serving, self.limits = app, serving, serving.limits
        self.api_key = api_key.encode() if api_key else None
        self.allowed_hosts = allowed_hosts
        self._routes = None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = None

        async def send_counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            error = self._refuse(scope)
            if error is None:
                receive, error = await self._read_body(scope, receive)
            if error is not None:
                await _send_error(send_counted, error)
            else:
                await self.app(scope, receive, send_counted)
        except Exception as e:
            logger.exception("internal error on %s %s", scope.get("method"), scope.get("path"))
            if status is None:  # nothing sent yet: a 500 the client can read, and the connection stays open
                await _send_error(send_counted, APIError(500, f"internal error: {e!r}", "server_error"))
        finally:
            if status is not None:
                self.serving.metrics.requests[self._route(scope), status] += 1

    def _refuse(self, scope) -> APIError | None:
        headers = dict(scope["headers"])
        if self.allowed_hosts is not None and b"host" in headers:
            host = _host_name(headers[b"host"].decode("latin-1"))
            if host not in self.allowed_hosts:
                return APIError(400, f"the Host header names {host!r}, which this server does not answer to; "
                                     "start it with --allowed-host for that name", code="invalid_host")  # fmt: skip
        public = scope["path"] in _PUBLIC_PATHS or scope["path"].startswith(_PUBLIC_PREFIX)
        if self.api_key is not None and not public:
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, b"Bearer " + self.api_key):
                what = "is missing" if not given else "is wrong"
                return APIError(401, f"the API key {what}; send the header 'Authorization: Bearer <key>'",
                                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
        return None

    async def _read_body(self, scope, receive):
        """(receive for the app, None) with the whole body buffered, or (None, the APIError to answer with)."""
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return receive, None
        limit = self.limits.max_body_bytes
        length = dict(scope["headers"]).get(b"content-length")
        declared = int(length) if length is not None and length.isdigit() else 0
        # A body over the limit is still read (and dropped), up to _DRAIN_BYTES more, before the 413: a socket closed
        # with unread data resets the connection, and the client would lose the answer (nginx's lingering close).
        too_large = declared > limit
        chunks, size = [], 0
        deadline = time.monotonic() + self.limits.body_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                if too_large:
                    break
                return None, APIError(408, f"the request body did not arrive within {self.limits.body_timeout_s:g} "
                                           "s", code="timeout", headers={"Connection": "close"})  # fmt: skip
            if message["type"] == "http.disconnect":
                return receive, None  # let the app see the disconnect
            chunk = message.get("body", b"")
            size += len(chunk)
            too_large = too_large or size > limit
            if not too_large:
                chunks.append(chunk)
            if not message.get("more_body", False) or size > limit + _DRAIN_BYTES:
                break
        if too_large:
            return None, _too_large(max(size, declared), limit)
        body, delivered = b"".join(chunks), False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls: the disconnect watcher

        return replay, None

    def _route(self, scope) -> str:
        """The route template the request matched (or "unmatched"): a metrics label with bounded values."""
        app = scope.get("app")
        for route in getattr(getattr(app, "router", None), "routes", ()):
            if getattr(route, "path", None) is not None and route.matches(scope)[0] != Match.NONE:
                return route.path
        return "unmatched"


def _too_large(size: int, limit: int) -> APIError:
    return APIError(413, f"the request body has {size:,} bytes or more, more than this server's limit of "
                         f"{limit:,}; send less, or start the server with a larger --max-body-mb",
                    code="request_too_large", headers={"Connection": "close"})  # fmt: skip


async def _send_error(send, e: APIError) -> None:
    body = json.dumps(e.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (e.headers or {}).items()]
    await send({"type": "http.response.start", "status": e.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _host_name(host: str) -> str:
    """The name part of a Host header value: no port, no IPv6 brackets, lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def allowed_host_names(bound: str, extra: list[str] | tuple[str, ...] = ()) -> set[str] | None:
    """The Host names a server bound to `bound` answers to (None: any; see the module docstring)."""
    extra = [_host_name(h) for h in extra]
    if "*" in extra:
        return None
    try:
        address = ipaddress.ip_address(bound)
    except ValueError:  # a name
        address = None
    if address is not None and address.is_unspecified:
        return set(extra) if extra else None  # 0.0.0.0 answers on every interface: only --allowed-host narrows it
    if bound in _LOOPBACK_NAMES or (address is not None and address.is_loopback):
        return {*_LOOPBACK_NAMES, _host_name(bound), *extra}
    return {_host_name(bound), *extra}


# ---------------------------------------------------------------------------------------------- running


class _HeadTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request head is not complete within `head_timeout` seconds
    of the connection opening or of the previous response ending."""

    head_timeout = 10.0  # set per server by build_server (a subclass per server)

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE and self._head_timer is not None:
            self._head_timer.cancel()  # the head arrived
            self._head_timer = None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._head_timer is None and not self.transport.is_closing():
            self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def connection_lost(self, exc) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


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
    serving: OpenAIServing,
    host: str = "127.0.0.1",
    port: int = 8000,
    grace_s: float = 30.0,
    log_level="info",
    api_key: str | None = None,
    allowed_hosts: list[str] | tuple[str, ...] = (),
    sock: socket.socket | None = None,
) -> tuple[GracefulServer, socket.socket]:
    """A GracefulServer and its bound listening socket (port 0: a free port, read it from the socket); `sock`: one
    `listen_socket` bound already."""
    limits = serving.limits
    app = create_app(serving, api_key=api_key, allowed_hosts=allowed_host_names(host, allowed_hosts))
    protocol = type("HeadTimeoutH11Protocol", (_HeadTimeoutH11Protocol,), {"head_timeout": limits.header_timeout_s})
    # An idle kept-alive connection stays open as long as the head timeout allows (10 s by default), not uvicorn's
    # 5 s: httpx and the OpenAI client drop idle connections after 5 s, so they do it first, never sending a request
    # on a connection the server is closing at that moment (which gets no response at all).
    config = uvicorn.Config(
        app, http=protocol, log_level=log_level, timeout_graceful_shutdown=max(1, int(grace_s)),
        limit_concurrency=limits.max_connections, timeout_keep_alive=max(5, math.ceil(limits.header_timeout_s)),
    )  # fmt: skip
    return GracefulServer(config, serving, grace_s), sock or listen_socket(host, port)


def listen_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound to host:port (port 0: a free one); uvicorn listens on it. `serve` binds it before
    loading the model, so that a port in use or an unknown host is an error within a second, not after the load."""
    # IPPROTO_TCP named, not 0: asyncio sets TCP_NODELAY only on connections whose socket says TCP, and without it
    # Nagle's algorithm holds a response's body behind its head until the client's delayed ACK (~40 ms) on every
    # request after a keep-alive connection's first (streamed chunks can wait the same way).
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # and Linux passes it on to accepted connections
    try:
        sock.bind((host, port))
    except OSError as e:  # an unknown host name, an address not on this machine, a port in use or privileged
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}; pick another --host or --port") from None
    return sock


class ServerThread:
    """A server running in a background thread (tests, notebooks): `url`, `stop(grace_s)`. Keyword arguments go to
    `build_server` (api_key, allowed_hosts)."""

    def __init__(self, serving: OpenAIServing, host: str = "127.0.0.1", port: int = 0, grace_s: float = 30.0, **kw):
        self.server, self.sock = build_server(serving, host, port, grace_s, log_level="warning", **kw)
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
    limits: Limits | None = None,
    api_key: str | None = None,
    allowed_hosts: list[str] | tuple[str, ...] = (),
    weight_version: int = 0,
    **engine_kwargs,
) -> None:
    """`hybridmoe serve`: load the checkpoint into an Engine and serve it until SIGINT/SIGTERM. api_key: default
    the HYBRIDMOE_API_KEY environment variable (none: no key required). weight_version: the version the
    checkpoint's weights are reported as (a trainer's step when resuming)."""
    from .load import load_engine

    api_key = api_key or os.environ.get("HYBRIDMOE_API_KEY") or None
    sock = listen_socket(host, port)
    try:
        engine, tokenizer = load_engine(checkpoint, **engine_kwargs)
    except BaseException:
        sock.close()
        raise
    engine.weight_version = weight_version
    name = model_name or os.path.basename(os.path.normpath(checkpoint))
    serving = OpenAIServing(engine, tokenizer, name, reasoning_budget, limits)
    server, sock = build_server(serving, host, port, grace_s, api_key=api_key, allowed_hosts=allowed_hosts, sock=sock)
    bound = sock.getsockname()
    key = "required" if api_key else "not required"
    print(f"serving {name} ({checkpoint}) on http://{bound[0]}:{bound[1]} ({engine.max_num_seqs} slots of "
          f"{engine.max_model_len} tokens; API key {key})", flush=True)  # fmt: skip
    if allowed_host_names(host, allowed_hosts) is None and not allowed_hosts:
        print(f"note: bound to {host}, the server answers any Host header; pass --allowed-host NAME to restrict it "
              "(protects against DNS rebinding)", flush=True)  # fmt: skip
    server.run(sockets=[sock])
