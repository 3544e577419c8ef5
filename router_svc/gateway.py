"""The one request path behind every front door (gRPC, OpenAI HTTP, NATS jobs): admit, queue, relay.

`admit` is synchronous and raises a RoundhouseError for anything wrong with the request, before
NATS or a GPU sees it. `stream` queues the admitted request and yields its events in order:
queued, (loading), started, deltas, then exactly one terminal event, finished or error (a passed
deadline is an error event too). A caller that stops iterating (cancelled, disconnected) makes
sure no engine keeps working on the request and no worker starts it later.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Callable

import nats
import nats.errors
import nats.js.api
import structlog
from opentelemetry import trace

from protos.v1 import router_pb2
from roundhouse import subjects, tracing
from roundhouse.catalogue import ModelSpec
from roundhouse.errors import DuplicateRequest, QueueFull, RoundhouseError, Unavailable
from roundhouse.metrics import OTHER_MODEL
from router_svc import classifier, metrics
from router_svc.demand import DemandSignal
from router_svc.auth import ANYONE, Tenant
from router_svc.limits import Limiter, tokens_of
from router_svc.config import RouterConfig
from router_svc.prompts import PromptCounter
from router_svc.tracker import REQUEUE, Delta, Event, Tracker, error_event
from router_svc.readiness import ReadinessBook
from router_svc.validate import BY_NAME, Admitted, admit

log = structlog.get_logger("router")

TERMINAL = frozenset({"finished", "error"})
DEADLINE = object()   # in a flight's events: the request's deadline passed


class Gateway:
    def __init__(self, config: RouterConfig, nc: nats.NATS, tracker: Tracker, reply_to: str,
                 readiness: ReadinessBook | None = None, limiter: Limiter | None = None):
        self.catalogue = config.catalogue
        self._config = config
        self._nc = nc
        self._js = nc.jetstream()
        self._tracker = tracker
        self._reply_to = reply_to
        self._readiness = readiness or ReadinessBook()
        self._limiter = limiter
        self._counters = {m.name: PromptCounter.for_model(m.path) for m in config.catalogue.models}
        self._predictor = classifier.for_routing(config.catalogue.routing, config.catalogue.resolve)
        loop = asyncio.get_running_loop()
        self._demand = DemandSignal(self._tell_manager, loop.time, loop.call_later)
        self._telling: set[asyncio.Task] = set()

    def _tell_manager(self, model: str) -> None:
        """Demand for the manager (router_svc/demand.py); losing one is harmless."""
        task = asyncio.create_task(self._nc.publish(subjects.REQUEST_EVENTS, model.encode()))
        self._telling.add(task)
        task.add_done_callback(self._told)

    def _told(self, task: asyncio.Task) -> None:
        self._telling.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("demand.not_sent", error=repr(task.exception()))

    def _tokenize(self, spec: ModelSpec, req: router_pb2.GenerateRequest) -> list[int] | None:
        counter = self._counters[spec.name]
        if req.WhichOneof("input") == "chat":
            return counter.chat_ids([{"role": m.role, "content": m.content} for m in req.chat.messages])
        return counter.ids(req.prompt)

    def admit(self, request: router_pb2.GenerateRequest, timeout_s: float | None = None, check_queue: bool = True,
              endpoint: str | None = "grpc", parent=None, tenant: Tenant = ANYONE) -> Admitted:
        """Validates and resolves `request` (classifying model "auto"), or raises a RequestError.
        `check_queue=False`: no QueueFull (a job's submit: jobs wait in their own stream).
        `endpoint`: the front door (metrics label); None for a job's submit, which is no request
        yet. `parent`: the caller's trace context (tracing.extract), if it sent one. `tenant`: who
        asks (router_svc.auth; its limits are applied by `stream`)."""
        started_ns = time.time_ns()
        try:
            admitted = self._admit(request, timeout_s, check_queue, started_ns, tenant)
        except RoundhouseError as e:
            if endpoint is not None:
                spec = self.catalogue.resolve(request.model) if request.model else None
                metrics.refused(spec.name if spec is not None else OTHER_MODEL, endpoint, e.code.name, tenant.name)
            raise
        if endpoint is None:
            return admitted
        q = admitted.queued
        span = tracing.tracer().start_span(
            "roundhouse.request", context=parent, kind=trace.SpanKind.SERVER, start_time=started_ns,
            attributes={"roundhouse.request_id": q.request_id, "roundhouse.model": q.adapter or q.model,
                        "roundhouse.endpoint": endpoint, "roundhouse.route_reason": admitted.route_reason})
        return dataclasses.replace(admitted, endpoint=endpoint, admitted_ns=started_ns, span=span,
                                   traceparent=tracing.traceparent(span))

    def _admit(self, request, timeout_s, check_queue, started_ns: int, tenant: Tenant) -> Admitted:
        timeout = self._config.default_timeout_s if timeout_s is None else min(timeout_s, self._config.default_timeout_s)
        now_ms = started_ns // 1_000_000
        admitted = admit(  # a deadline less than a whole millisecond away is already past
            request, self.catalogue, self._tokenize,
            now_ms=now_ms, deadline_ms=now_ms + int(timeout * 1000), reply_to=self._reply_to,
            readiness=self._readiness.view, predictor=self._predictor, tenant=tenant,
        )
        q = admitted.queued
        if admitted.route_reason != BY_NAME:
            metrics.CLASSIFIED.labels(q.model, admitted.route_rule or "default").inc()
            log.info("request.classified", request_id=q.request_id, asked=request.model or "(none)",
                     model=q.adapter or q.model, reason=admitted.route_reason)
        if q.request_id in self._tracker:
            raise DuplicateRequest(f"request_id {q.request_id!r} is already in flight")
        if check_queue and self._tracker.waiting(q.model) >= admitted.spec.max_queued:
            estimate = self._tracker.loading_estimate(q.model)
            raise QueueFull(
                f"model {q.model} already has {admitted.spec.max_queued} requests waiting; retry later",
                retry_after_s=max(1.0, estimate or 1.0),
            )
        return admitted

    async def stream(self, admitted: Admitted, sink: Callable[[str], bool] | None = None) -> AsyncIterator[Event]:
        """Queues the admitted request and yields its events (a `Delta` for generated tokens, a
        GenerateEvent for the rest: `tracker.as_event` makes any of them a message); raises Unavailable when it cannot
        queue, RateLimited when its tenant is over a limit (both before any event).

        `sink(text) -> bool`: a front door's way to take generated text without an event.
        Once a Delta has been yielded, while this generator waits for its next event with
        none unread, deltas go to `sink` as the worker's batch is applied; those it declines
        (False: the front door is not ready for them, or its caller is slow) come as Deltas.
        A token's trip through the events queue, this generator and the front door's own
        generator was most of the router's CPU per relayed token (bench_router_relay)."""
        q = admitted.queued
        span = admitted.span or trace.INVALID_SPAN
        structlog.contextvars.bind_contextvars(request_id=q.request_id, model=q.model)
        tracing.bind(span)
        tenant = admitted.tenant.name
        clock = metrics.RequestClock(q.model, admitted.endpoint, admitted.admitted_ns or time.time_ns(), tenant)
        lease = None
        if self._limiter is not None:
            try:
                lease = await self._limiter.acquire(admitted.tenant)
            except RoundhouseError as e:
                _record(clock, span, e.code.name.lower(), None)
                structlog.contextvars.unbind_contextvars("request_id", "model", "trace_id")
                raise
        status, usage = "cancelled", None   # until a terminal event says otherwise
        flight = self._tracker.open(q.request_id, q.model)
        deadline = None
        try:
            priority = admitted.priority
            ack = await self._publish(q, admitted.traceparent, priority)
            if ack is None:
                status = "unavailable"
                raise Unavailable("cannot queue the request (NATS unavailable); retry")
            clock.queued_ns = time.time_ns()
            flight.seq = ack.seq
            log.debug("request.routed", seq=ack.seq, route=admitted.route_reason)
            self._demand.queued(q.model)
            yield router_pb2.GenerateEvent(queued=router_pb2.Queued(
                request_id=q.request_id, model=q.model, prompt_tokens=admitted.prompt_tokens,
                route_reason=admitted.route_reason))
            loading = self._tracker.loading_event(q.model)
            if loading is not None:
                clock.loading_ns = time.time_ns()
                yield loading
            loop = asyncio.get_running_loop()
            events = flight.events
            # One timer per request puts DEADLINE in its events, rather than a timeout around
            # each wait: asyncio.timeout_at per event (a Timeout, a timer scheduled and
            # cancelled) tripled the loop's cost of waking a stream for a token (1.8 -> 4.8 µs).
            deadline = loop.call_at(loop.time() + (q.deadline_unix_ms / 1000 - time.time()), events.put_nowait, DEADLINE)
            ready: collections.deque = collections.deque()
            straight = None if sink is None else _straight(sink, clock)
            while True:
                if not ready:
                    if straight is not None and clock.first_ns:
                        flight.sink = straight
                    try:
                        ready.append(await events.get())
                    finally:
                        flight.sink = None
                    while not events.empty():
                        ready.append(events.get_nowait())
                event = ready.popleft()
                if event is DEADLINE:
                    status = "deadline_exceeded"
                    yield error_event("DEADLINE_EXCEEDED", "roundhouse: deadline exceeded before the generation finished", False)
                    return
                if event is REQUEUE:  # its worker was lost before sending anything: queue it again
                    failed = await self._requeue(flight, q, admitted.traceparent, priority)
                    if failed is not None:
                        status = "unavailable"
                        yield failed
                        return
                    continue
                if type(event) is Delta:
                    clock.last_ns = time.time_ns()
                    if not clock.first_ns:
                        clock.first_ns = clock.last_ns
                    if ready and type(ready[0]) is Delta:  # deltas that queued up while the caller was slower: one
                        run = [event]
                        while ready and type(ready[0]) is Delta:
                            run.append(ready.popleft())
                        event = Delta.merged(run)
                    yield event
                    continue
                kind = event.WhichOneof("event")
                if kind == "started":
                    clock.started_ns = time.time_ns()
                    event.started.model = q.adapter or q.model
                    event.started.route_reason = admitted.route_reason
                elif kind == "finished":
                    status, usage = "ok", event.finished.usage
                elif kind == "loading" and not clock.loading_ns:
                    clock.loading_ns = time.time_ns()
                elif kind == "error":
                    status = event.error.code.lower() or "internal"
                yield event
                if kind in TERMINAL:
                    return
        finally:
            if deadline is not None:
                deadline.cancel()
            # Caller gone (cancelled, deadline, or failed before any worker took it): make sure
            # no engine keeps working on it and no worker starts it later.
            forget = not flight.done or flight.link is None
            self._tracker.close(flight)
            _record(clock, span, status, usage)  # before the await below, which a cancel can cut short
            charged = tokens_of(admitted.prompt_tokens, usage.completion_tokens if usage is not None else len(flight.out_tokens),
                                flight.started or bool(flight.out_tokens))
            if charged:
                metrics.TENANT_TOKENS.labels(tenant).inc(charged)
            if self._limiter is not None:
                self._limiter.release(lease, charged)
            if forget:
                await self._forget(flight)
            structlog.contextvars.unbind_contextvars("request_id", "model", "trace_id")

    async def _publish(self, q, traceparent: str, priority: str) -> "nats.js.api.PubAck | None":
        """Publishes once, and once more on a timeout, to its model's subject for `priority` (its
        tenant's class, or a lower one it asked for: workers take the highest class first). The message id is unique to this
        call, so JetStream's duplicate window stores a retried publish once, yet a caller that
        reuses its request_id later is never mistaken for a duplicate. The request's trace goes with it."""
        headers = {"Nats-Msg-Id": f"{q.request_id}:{uuid.uuid4().hex}"}
        if traceparent:
            headers[tracing.TRACEPARENT] = traceparent
        payload = q.SerializeToString()
        subject = subjects.request_subject(q.model, priority)
        for attempt in (1, 2):
            try:
                return await self._js.publish(subject, payload, timeout=self._config.publish_timeout_s, headers=headers)
            except (nats.errors.Error, asyncio.TimeoutError) as e:
                log.error("request.publish_failed", attempt=attempt, error=repr(e))
        return None

    async def _requeue(self, flight, q, traceparent: str, priority: str) -> router_pb2.GenerateEvent | None:
        """Replaces the lost worker's message with a new one; an error event if NATS refuses."""
        with contextlib.suppress(Exception):  # gone already is fine: it must not run again
            await self._js.delete_msg(subjects.STREAM, flight.seq)
        ack = await self._publish(q, traceparent, priority)
        if ack is None:
            return error_event("UNAVAILABLE", f"roundhouse: the worker serving model {q.model} was lost and the request "
                                              "could not be queued again (NATS unavailable); send it again", True)
        flight.seq = ack.seq
        self._tracker.requeued(flight)
        log.warning("request.requeued", seq=ack.seq, requeues=flight.requeues)
        return None

    async def _forget(self, flight) -> None:
        if flight.link is not None:
            flight.link.cancel(flight.request_id)
        elif flight.seq:
            # Still queued: take it out of the stream so no worker ever starts it. If a worker
            # took it meanwhile, its first chunk is answered with a cancel (unknown request).
            with contextlib.suppress(Exception):
                await self._js.delete_msg(subjects.STREAM, flight.seq)
        log.info("request.cancelled", request_id=flight.request_id)


def _straight(sink: Callable[[str], bool], clock: metrics.RequestClock) -> Callable[[list[int], str], bool]:
    """The tracker's side of a front door's sink: the request's clock sees the tokens it takes."""
    def take(token_ids: list[int], text: str) -> bool:
        if not sink(text):
            return False
        clock.last_ns = time.time_ns()
        return True
    return take


def _record(clock: metrics.RequestClock, span, status: str, usage) -> None:
    """The request's metrics, and its spans (admit, queue, generate) from the clock's times."""
    prompt, completion = (usage.prompt_tokens, usage.completion_tokens) if usage is not None else (0, 0)
    end = clock.done(status, prompt, completion)
    log.info("request.done", endpoint=clock.endpoint, status=status, prompt_tokens=prompt, completion_tokens=completion,
             ttft_ms=round((clock.first_ns - clock.admitted_ns) / 1e6, 1) if clock.first_ns else None,
             ms=round((end - clock.admitted_ns) / 1e6, 1))
    if not span.is_recording():
        return
    admitted = clock.queued_ns or end
    tracing.child("roundhouse.admit_and_publish", span, clock.admitted_ns, admitted)
    if clock.queued_ns:
        tracing.child("roundhouse.queue_wait", span, clock.queued_ns, clock.started_ns or end)
    if clock.loading_ns:  # part of the queue wait: its model was loading
        tracing.child("roundhouse.model_load_wait", span, clock.loading_ns, clock.started_ns or end)
    if clock.started_ns:
        tracing.child("roundhouse.generate", span, clock.started_ns, end,
                      **({"roundhouse.first_token_s": (clock.first_ns - clock.started_ns) / 1e9} if clock.first_ns else {}))
    span.set_attribute("roundhouse.status", status)
    if usage is not None:
        span.set_attributes({"gen_ai.usage.input_tokens": prompt, "gen_ai.usage.output_tokens": completion})
    if status != "ok":
        span.set_status(trace.Status(trace.StatusCode.ERROR, status))
    span.end(end_time=end)
