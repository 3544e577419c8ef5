"""The router's OpenAI-compatible HTTP front door (aiohttp, on the router's event loop).

    POST /v1/chat/completions   POST /v1/completions   (streaming as server-sent events, or not)
    GET  /v1/models             GET  /health

Each request goes through the same Gateway as gRPC. The model and the reason it was chosen come
back in the `x-roundhouse-model` / `x-roundhouse-route-reason` headers; header `x-request-timeout`
(seconds) sets a deadline, as a gRPC deadline does, and `x-request-id` the request id. A client that disconnects
(streaming or not) ends its handler, and the gateway aborts the generation.
"""
from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Callable

import structlog
from aiohttp import HttpVersion11, web

from roundhouse import metrics as shared_metrics
from roundhouse import routing, tracing
from roundhouse.errors import InvalidRequest, RoundhouseError
from roundhouse.metrics import OTHER_MODEL
from router_svc import metrics, openai_api
from router_svc.auth import ANYONE, Auth, Tenant
from router_svc.gateway import Gateway
from router_svc.tracker import Delta, kind_of

log = structlog.get_logger("router.http")

_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _json(status: int, body: dict, headers: dict | None = None) -> web.Response:
    return web.Response(status=status, text=json.dumps(body), content_type="application/json", headers=headers)


def _error(e: RoundhouseError, headers: dict | None = None) -> web.Response:
    status, body, extra = openai_api.error_from(e)
    return _json(status, body, {**(headers or {}), **extra})


def _timeout(request: web.Request) -> float | None:
    """The caller's deadline in seconds (header `x-request-timeout`), like a gRPC deadline."""
    raw = request.headers.get("x-request-timeout")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise InvalidRequest("x-request-timeout", f"must be a number of seconds, got {raw!r}") from None
    if value <= 0 or value != value:
        raise InvalidRequest("x-request-timeout", f"must be > 0 seconds, got {raw!r}")
    return value


MAX_BODY_BYTES = 16 * 2**20   # a larger body gets 413 before it is read whole
QUEUED_COMMENT_AFTER_S = 1.0   # a stream that waits this long for its first token says so


async def _next_or_comment(events, write):
    """The next event; if none comes within QUEUED_COMMENT_AFTER_S, writes `: queued` first.
    Only used before the first token: it costs a task per event."""
    nxt = asyncio.ensure_future(anext(events))
    try:
        done, _ = await asyncio.wait({nxt}, timeout=QUEUED_COMMENT_AFTER_S)
        if not done:
            await write(openai_api.QUEUED_COMMENT)
        return await nxt
    except BaseException:
        nxt.cancel()  # the caller is gone: the generator must not run on in a task of its own
        raise


SINK_BUFFER_LIMIT = 2**16   # bytes unsent to a stream's caller past which its tokens wait as events


class _SseSink:
    """A stream's token text written straight to its connection (Gateway.stream's `sink`), as
    one chunk of the chunked body each: `data: {...}\n\n`, as `_stream` would write it. It
    declines (the token then comes to `_stream` as an event) until the first data chunk is
    out, and whenever the connection is closing or its caller reads slower than tokens come
    (more than SINK_BUFFER_LIMIT unsent), so a slow caller is paced by aiohttp's drain as before.

    Written by hand because aiohttp's StreamResponse.write is a coroutine: a token could not go
    out from the tracker's callback, only through a task woken for it."""

    __slots__ = ("_transport", "_frame")

    def __init__(self) -> None:
        self._transport = None
        self._frame: Callable[[str], bytes] | None = None

    def open(self, transport, frame: Callable[[str], bytes]) -> None:
        self._transport, self._frame = transport, frame

    def __call__(self, text: str) -> bool:
        t = self._transport
        if t is None or t.is_closing() or t.get_write_buffer_size() > SINK_BUFFER_LIMIT:
            return False
        if text:
            data = self._frame(text)
            t.write(b"%x\r\n%b\r\n" % (len(data), data))
        return True


class _SseResponse(web.StreamResponse):
    """A stream whose headers go out with its first bytes (the first data chunk, or a progress
    comment) in one write, as aiohttp does for a whole Response: one send(2) fewer per request,
    and one wake-up fewer for the caller. A caller still has its headers within
    QUEUED_COMMENT_AFTER_S, when the `: queued` comment goes. (aiohttp reads this class
    attribute since 3.11; an older one sends the headers at once, as before.)"""

    _send_headers_immediately = False


class HttpApi:
    def __init__(self, gateway: Gateway, healthy: Callable[[], bool], stop_grace_s: float = 20.0, auth: Auth | None = None,
                 ssl_context: ssl.SSLContext | None = None):
        self._gw = gateway
        self._ssl = ssl_context
        self._auth = auth
        self._stop_grace_s = stop_grace_s
        self._healthy = healthy
        self._created = int(time.time())
        self._runner: web.AppRunner | None = None
        self.port = 0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post("/v1/chat/completions", lambda r: self._generate(r, "chat"))
        app.router.add_post("/v1/completions", lambda r: self._generate(r, "completions"))
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        return app

    async def start(self, host: str, port: int) -> int:
        # handler_cancellation: a client that disconnects cancels its handler, even one that is
        # not writing (a non-streamed request), so its generation is aborted at once.
        self._runner = web.AppRunner(self.app(), access_log=None, handler_cancellation=True,
                                     shutdown_timeout=self._stop_grace_s)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=self._ssl)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self.port

    async def stop(self) -> None:
        """Stops listening; handlers in flight (streams) get stop_grace_s to finish."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _health(self, request: web.Request) -> web.Response:
        ok = self._healthy()
        return _json(200 if ok else 503, {"status": "ok" if ok else "unavailable"})

    async def _metrics(self, request: web.Request) -> web.Response:
        """Prometheus text format. On the loop: the in-flight gauges read the tracker, which
        only the loop may read (a scrape of a few hundred series takes about a millisecond)."""
        body, content_type = shared_metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def _tenant(self, request: web.Request, endpoint: str) -> Tenant:
        if self._auth is None:
            return ANYONE
        return await self._auth.check(request.headers.get("Authorization"), request.remote or "", endpoint)

    async def _models(self, request: web.Request) -> web.Response:
        """The models the caller's key may use (every one when the router asks for no key)."""
        try:
            tenant = await self._tenant(request, "http")
        except RoundhouseError as e:
            return _error(e)
        data = []
        for m in self._gw.catalogue.models:
            if tenant.may_use(m.name):
                for name in (m.name, *m.aliases):
                    data.append({"id": name, "object": "model", "created": self._created, "owned_by": "roundhouse",
                                 "root": m.name, "max_model_len": m.max_model_len})
            for a in m.adapters:
                if tenant.may_use(a.name):
                    data.append({"id": a.name, "object": "model", "created": self._created, "owned_by": "roundhouse",
                                 "root": a.path, "parent": m.name, "max_model_len": m.max_model_len})
        if self._gw.catalogue.routing is not None:
            data.append({"id": routing.AUTO, "object": "model", "created": self._created, "owned_by": "roundhouse",
                         "root": routing.AUTO})
        return _json(200, {"object": "list", "data": data})

    async def _generate(self, request: web.Request, endpoint: str) -> web.StreamResponse:
        try:  # before the body is read: an unknown caller costs no parsing
            tenant = await self._tenant(request, "http")
        except RoundhouseError as e:
            metrics.refused(OTHER_MODEL, "http", e.code.name)
            return _error(e)
        try:
            body = await request.json(loads=json.loads)
        except web.HTTPRequestEntityTooLarge:
            metrics.refused(OTHER_MODEL, "http", "INVALID_ARGUMENT", tenant.name)
            _, err = openai_api.error("INVALID_ARGUMENT", f"roundhouse: the body is larger than {MAX_BODY_BYTES} bytes", "body")
            return _json(413, err)
        except (ValueError, RecursionError) as e:  # RecursionError: nesting deeper than the parser goes
            metrics.refused(OTHER_MODEL, "http", "INVALID_ARGUMENT", tenant.name)
            problem = str(e) if isinstance(e, ValueError) else "nested too deeply"
            _, err = openai_api.error("INVALID_ARGUMENT", f"roundhouse: the body is not valid JSON: {problem}", "body")
            return _json(400, err)
        try:
            req, opts = openai_api.parse(body, endpoint, request.headers.get("x-request-id", ""))
        except RoundhouseError as e:
            metrics.refused(OTHER_MODEL, "http", e.code.name, tenant.name)
            return _error(e)
        try:
            admitted = self._gw.admit(req, _timeout(request), endpoint="http", parent=tracing.extract(request.headers),
                                      tenant=tenant)
        except RoundhouseError as e:
            return _error(e)
        q = admitted.queued
        model = q.adapter or q.model  # what serves it: the model, or the LoRA adapter on it
        headers = {"x-request-id": q.request_id, "x-roundhouse-model": model,
                   "x-roundhouse-route-reason": admitted.route_reason,
                   tracing.TRACEPARENT: admitted.traceparent}
        rid, created = openai_api.response_id(endpoint, q.request_id), int(time.time())
        sink = _SseSink() if opts.stream and request.version >= HttpVersion11 else None
        events = self._gw.stream(admitted, sink)
        try:
            if opts.stream:
                return await self._stream(request, events, opts, rid, created, model, headers, sink)
            return await self._whole(events, opts, rid, created, model, headers)
        except RoundhouseError as e:  # could not queue
            return _error(e, headers)
        finally:
            await events.aclose()  # caller gone or done: the gateway aborts what is left

    async def _whole(self, events, opts, rid, created, model, headers) -> web.Response:
        text: list[str] = []
        async for ev in events:
            if type(ev) is Delta:
                text.append(ev.text)
                continue
            kind = ev.WhichOneof("event")
            if kind == "finished":
                return _json(200, openai_api.complete(opts, rid, created, model, "".join(text), ev.finished), headers)
            elif kind == "error":
                status, body = openai_api.error(ev.error.code, ev.error.message)
                return _json(status, body, headers)
        status, body = openai_api.error("INTERNAL", "roundhouse: the stream ended without a result")
        return _json(status, body, headers)

    async def _stream(self, request, events, opts, rid, created, model, headers, sink: "_SseSink | None") -> web.StreamResponse:
        """Server-sent events. A `data:` chunk goes out only once the model has generated text
        (for chat, the assistant role rides on that first chunk), so a client's time to first
        token is the real one. While the request waits in its queue (past QUEUED_COMMENT_AFTER_S)
        or for its model to load, progress goes out as SSE comment lines (`: queued`,
        `: loading code, about 20 s`), which OpenAI clients skip and proxies take as keep-alive.
        A request served at once gets no comment at all: some clients mishandle them (vLLM's
        bench strips each network read, so a comment read on its own glues itself to the data
        after it and the whole stream is lost)."""
        first = await anext(events)  # raises before any byte is sent when the request cannot be queued
        resp = _SseResponse(headers={**_SSE_HEADERS, **headers})
        if sink is not None:
            resp.enable_chunked_encoding()  # the sink frames its chunks itself (HTTP/1.1 only)
        await resp.prepare(request)
        write = resp.write
        frame = openai_api.text_framer(opts, rid, created, model)
        opened = False  # has a data chunk gone out (for chat: the role)?

        def data(obj) -> bytes:
            return b"data: " + json.dumps(obj).encode() + b"\n\n"

        # The stream's last events (finish, usage, [DONE]) and the end of the chunked body go
        # out as one write: each write is a send(2), the router's main per-request cost after
        # the tokens themselves.
        tail: list[bytes] = []
        ev = first
        while True:
            kind = kind_of(ev)
            if kind == "delta":
                if ev.text and opened:
                    await write(frame(ev.text))
                elif ev.text:
                    await write(data(openai_api.chunk(opts, rid, created, model, text=ev.text, first=True)))
                    opened = True
                    if sink is not None:
                        sink.open(request.transport, frame)
            elif kind == "finished":
                if not opened and opts.endpoint == "chat":
                    tail.append(data(openai_api.chunk(opts, rid, created, model, text="", first=True)))
                tail.append(data(openai_api.chunk(opts, rid, created, model, finish=ev.finished.finish_reason)))
                if opts.include_usage:
                    tail.append(data(openai_api.usage_chunk(opts, rid, created, model, ev.finished.usage)))
                break
            elif kind == "error":
                tail.append(data(openai_api.error(ev.error.code, ev.error.message)[1]))
                break
            elif kind == "loading":
                await write(openai_api.progress_comment(ev))
            try:
                ev = await (anext(events) if opened else _next_or_comment(events, write))
            except StopAsyncIteration:
                break
        await resp.write_eof(b"".join(tail) + b"data: [DONE]\n\n")
        return resp
