"""The Router gRPC service (Generate, ListModels) and the composition of a router process."""
from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import nats
import nats.errors
import nats.js.api
import structlog

from protos.v1 import manager_pb2, router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc
from roundhouse import grpcserver, jetstream, subjects
from roundhouse.catalogue import ModelSpec
from roundhouse.errors import RoundhouseError
from router_svc.config import RouterConfig
from router_svc.delivery import DeliveryServicer
from router_svc.prompts import PromptCounter
from router_svc.tracker import Tracker
from router_svc.validate import admit

log = structlog.get_logger("router")

ROUTER_SERVICE = router_pb2.DESCRIPTOR.services_by_name["Router"].full_name
DELIVERY_SERVICE = worker_pb2.DESCRIPTOR.services_by_name["Delivery"].full_name
_TERMINAL = frozenset({"finished", "error"})


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, config: RouterConfig, nc: nats.NATS, tracker: Tracker, reply_to: str):
        self._config = config
        self._nc = nc
        self._js = nc.jetstream()
        self._tracker = tracker
        self._reply_to = reply_to
        self._counters = {m.name: PromptCounter.for_model(m.path) for m in config.catalogue.models}

    def _count(self, spec: ModelSpec, req: router_pb2.GenerateRequest) -> int | None:
        counter = self._counters[spec.name]
        if req.WhichOneof("input") == "chat":
            return counter.count_chat([{"role": m.role, "content": m.content} for m in req.chat.messages])
        return counter.count(req.prompt)

    async def Generate(self, request: router_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[router_pb2.GenerateEvent]:
        # 1. Validate and resolve; bad input ends here, before NATS or a GPU sees it.
        remaining = context.time_remaining()
        timeout = self._config.default_timeout_s if remaining is None else min(remaining, self._config.default_timeout_s)
        now = time.time()
        try:
            admitted = admit(
                request, self._config.catalogue, self._count,
                now_ms=int(now * 1000), deadline_ms=int((now + timeout) * 1000), reply_to=self._reply_to,
            )
        except RoundhouseError as e:
            await grpcserver.abort_with(context, e)
            return
        q = admitted.queued
        if q.request_id in self._tracker:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"roundhouse: request_id {q.request_id!r} is already in flight")
        structlog.contextvars.bind_contextvars(request_id=q.request_id, model=q.model)
        flight = self._tracker.open(q.request_id, q.model)
        try:
            # 2. Queue it in the model's subject.
            ack = await self._publish(q)
            if ack is None:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "roundhouse: cannot queue the request (NATS unavailable); retry")
                return
            flight.seq = ack.seq
            log.debug("request.routed", seq=ack.seq)
            with contextlib.suppress(nats.errors.Error):  # demand for the manager; losing one is harmless
                await self._nc.publish(subjects.REQUEST_EVENTS, q.model.encode())
            yield router_pb2.GenerateEvent(queued=router_pb2.Queued(request_id=q.request_id, model=q.model, prompt_tokens=admitted.prompt_tokens))
            loading = self._tracker.loading_event(q.model)
            if loading is not None:
                yield loading
            # 3. Relay events in order until the stream ends or the deadline passes.
            deadline = asyncio.get_running_loop().time() + timeout
            get = flight.events.get
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        event = await get()
                except TimeoutError:
                    await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "roundhouse: deadline exceeded before the generation finished")
                    return
                yield event
                kind = event.WhichOneof("event")
                if kind in _TERMINAL:
                    if kind == "error":
                        await context.abort(grpcserver.status_from_name(event.error.code), event.error.message)
                    return
        finally:
            # 4. Caller gone (cancelled, deadline, or failed before any worker took it): make sure
            #    no engine keeps working on it and no worker starts it later.
            forget = not flight.done or flight.link is None
            self._tracker.close(flight)
            if forget:
                await self._forget(flight)
            structlog.contextvars.unbind_contextvars("request_id", "model")

    async def _publish(self, q) -> "nats.js.api.PubAck | None":
        """Publishes once, and once more on a timeout. The message id is unique to this call, so
        JetStream's duplicate window stores a retried publish once, yet a caller that reuses its
        request_id later is never mistaken for a duplicate."""
        headers = {"Nats-Msg-Id": f"{q.request_id}:{uuid.uuid4().hex}"}
        payload = q.SerializeToString()
        subject = subjects.request_subject(q.model)
        for attempt in (1, 2):
            try:
                return await self._js.publish(subject, payload, timeout=self._config.publish_timeout_s, headers=headers)
            except (nats.errors.Error, asyncio.TimeoutError) as e:
                log.error("request.publish_failed", attempt=attempt, error=repr(e))
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

    async def ListModels(self, request: router_pb2.ListModelsRequest, context: grpc.aio.ServicerContext) -> router_pb2.ListModelsResponse:
        out = router_pb2.ListModelsResponse()
        for m in self._config.catalogue.models:
            try:
                waiting = await jetstream.queued(self._js, m.name)
            except (nats.errors.Error, asyncio.TimeoutError):
                waiting = -1
            out.models.add(
                name=m.name, aliases=m.aliases, max_model_len=m.max_model_len, max_tokens_limit=m.token_limit, queued=waiting
            )
        return out


class Router:
    """A running router: its NATS connection, gRPC server and tracker (tests inspect it)."""

    def __init__(self, config: RouterConfig):
        self.config = config
        self.tracker = Tracker()
        self.port = 0
        self._nc: nats.NATS | None = None
        self._server: grpc.aio.Server | None = None
        self._health = None

    @property
    def address(self) -> str:
        return f"{self.config.advertise_host or self.config.host}:{self.port}"

    async def start(self) -> None:
        self._nc = await nats.connect(self.config.nats_url, name="roundhouse-router", max_reconnect_attempts=-1)
        js = self._nc.jetstream()
        await jetstream.ensure_stream(js)
        await self._nc.subscribe(f"{subjects.MODEL_EVENTS_PREFIX}.>", cb=self._on_model_event)
        self._server = grpcserver.new_server()
        self.port = self._server.add_insecure_port(f"{self.config.host}:{self.config.port}")
        router_pb2_grpc.add_RouterServicer_to_server(RouterServicer(self.config, self._nc, self.tracker, self.address), self._server)
        worker_pb2_grpc.add_DeliveryServicer_to_server(DeliveryServicer(self.tracker), self._server)
        self._health = await grpcserver.add_standard_services(self._server, [ROUTER_SERVICE, DELIVERY_SERVICE])
        await self._server.start()
        log.info("router.serving", address=self.address, models=[m.name for m in self.config.catalogue.models])

    async def _on_model_event(self, msg) -> None:
        try:
            ev = manager_pb2.ModelEvent.FromString(msg.data)
        except Exception:
            log.warning("router.bad_model_event", subject=msg.subject)
            return
        self.tracker.on_model_event(ev.model, ev.state, ev.estimate_s, ev.error)

    async def stop(self, grace: float = 5.0) -> None:
        log.info("router.stopping")
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace)
        nc, self._nc = self._nc, None
        if nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.drain(), 10)
        log.info("router.stopped")


async def serve(config: RouterConfig, stop: asyncio.Event) -> None:
    router = Router(config)
    await router.start()
    try:
        await stop.wait()
    finally:
        await router.stop()
