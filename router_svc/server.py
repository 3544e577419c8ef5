"""The Router gRPC service and the composition of a router process: gRPC, HTTP and jobs on one gateway."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import nats
import nats.errors
import structlog
from google.protobuf.message import DecodeError

from protos.v1 import manager_pb2, queue_pb2, router_pb2, router_pb2_grpc
from roundhouse import entry, grpcserver, jetstream, natsconn, subjects, tls, tracing
from roundhouse.errors import RoundhouseError
from router_svc.auth import ANYONE, Auth, Tenant, peer_host
from router_svc.config import RouterConfig
from router_svc.limits import Limiter
from router_svc.delivery import DeliveryServer
from router_svc.gateway import Gateway
from router_svc.readiness import ReadinessBook
from router_svc import metrics
from router_svc.http import HttpApi
from router_svc.jobs import Jobs, JobsConfig
from router_svc.tracker import Flight, Tracker, as_event

log = structlog.get_logger("router")

ROUTER_SERVICE = router_pb2.DESCRIPTOR.services_by_name["Router"].full_name


class RouterServicer(router_pb2_grpc.RouterServicer):
    """gRPC onto the gateway and the jobs; no request state of its own."""

    def __init__(self, gateway: Gateway, jobs: Jobs, js, auth: Auth):
        self._gw = gateway
        self._jobs = jobs
        self._js = js
        self._auth = auth

    async def _tenant(self, context: grpc.aio.ServicerContext) -> Tenant:
        """The caller's tenant from its `authorization` metadata; aborts UNAUTHENTICATED."""
        if not self._auth.enabled:
            return ANYONE
        metadata = dict(context.invocation_metadata() or ())
        try:
            return await self._auth.check(metadata.get("authorization"), peer_host(context.peer() or ""), "grpc")
        except RoundhouseError as e:
            await grpcserver.abort_with(context, e)
            raise  # (abort raises; never reached)

    async def Generate(self, request: router_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[router_pb2.GenerateEvent]:
        tenant = await self._tenant(context)
        try:
            admitted = self._gw.admit(request, context.time_remaining(), endpoint="grpc",
                                      parent=tracing.extract(dict(context.invocation_metadata() or ())), tenant=tenant)
        except RoundhouseError as e:
            await grpcserver.abort_with(context, e)
            return
        await context.send_initial_metadata(((tracing.TRACEPARENT, admitted.traceparent),))
        events = self._gw.stream(admitted)
        try:
            async for ev in events:
                event = as_event(ev)
                yield event
                if event.WhichOneof("event") == "error":
                    await context.abort(grpcserver.status_from_name(event.error.code), event.error.message)
        except RoundhouseError as e:  # could not queue
            await grpcserver.abort_with(context, e)
        finally:
            await events.aclose()

    async def ListModels(self, request: router_pb2.ListModelsRequest, context: grpc.aio.ServicerContext) -> router_pb2.ListModelsResponse:
        """The models the caller's key may use (with only the adapters it may use)."""
        tenant = await self._tenant(context)
        out = router_pb2.ListModelsResponse()
        for m in self._gw.catalogue.models:
            adapters = [a.name for a in m.adapters if tenant.may_use(a.name)]
            if not tenant.may_use(m.name) and not adapters:
                continue
            try:
                waiting = await jetstream.queued(self._js, m.name)
            except (nats.errors.Error, asyncio.TimeoutError):
                waiting = -1
            out.models.add(
                name=m.name, aliases=m.aliases, max_model_len=m.max_model_len, max_tokens_limit=m.token_limit, queued=waiting,
                adapters=adapters,
            )
        return out

    async def SubmitJob(self, request: router_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> router_pb2.Job:
        tenant = await self._tenant(context)
        metadata = dict(context.invocation_metadata() or ())
        return await self._job_call(context, self._jobs.submit(request, metadata.get(tracing.TRACEPARENT, ""), tenant))

    async def GetJob(self, request: router_pb2.JobRequest, context: grpc.aio.ServicerContext) -> router_pb2.Job:
        tenant = await self._tenant(context)
        return await self._job_call(context, self._jobs.get(request.job_id, tenant))

    async def CancelJob(self, request: router_pb2.JobRequest, context: grpc.aio.ServicerContext) -> router_pb2.Job:
        tenant = await self._tenant(context)
        return await self._job_call(context, self._jobs.cancel(request.job_id, tenant))

    async def _job_call(self, context, call) -> router_pb2.Job:
        try:
            return await call
        except RoundhouseError as e:
            await grpcserver.abort_with(context, e)
        except (nats.errors.Error, asyncio.TimeoutError) as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"roundhouse: the job store is unavailable ({e!r}); retry")


class Router:
    """A running router: its NATS connection, gRPC server and tracker (tests inspect it)."""

    def __init__(self, config: RouterConfig):
        self.config = config
        self.tracker = Tracker()
        metrics.IN_FLIGHT.watch(self.tracker)
        self.readiness = ReadinessBook()
        self.port = 0
        self.http_port = 0
        self._nc: nats.NATS | None = None
        self._js = None
        self._server: grpc.aio.Server | None = None
        self._health = None
        self._http: HttpApi | None = None
        self._jobs: Jobs | None = None
        self.auth = config.auth or Auth(config.catalogue)  # (built by config.parse; here for routers built in code)
        internal, public = tls.load(config.catalogue.tls) if config.tls_internal is None and config.tls_public is None \
            else (config.tls_internal, config.tls_public)
        self.tls_internal, self.tls_public = internal, public
        self._delivery = DeliveryServer(self.tracker, self.tls_internal)
        self._limiter: Limiter | None = None

    @property
    def address(self) -> str:
        return f"{self.config.advertise_host or self.config.host}:{self.port}"

    @property
    def delivery_address(self) -> str:
        """Where workers stream tokens back (internal; named in each queued request's reply_to)."""
        return f"{self.config.advertise_host or self.config.host}:{self._delivery.port}"

    async def start(self) -> None:
        self._nc = await natsconn.connect(self.config.nats_url, "roundhouse-router")
        js = self._js = self._nc.jetstream()
        await jetstream.ensure_stream(js)
        await self._nc.subscribe(f"{subjects.MODEL_EVENTS_PREFIX}.>", cb=self._on_model_event)
        await self._nc.subscribe(subjects.RESIDENCY_SNAPSHOTS, cb=self._on_snapshot)
        await self._nc.subscribe(subjects.max_deliveries_subject(), cb=self._on_max_deliveries)
        self._server = grpcserver.new_server()
        self.port = tls.add_port(self._server, f"{self.config.host}:{self.config.port}", self.tls_public)
        self._delivery.start(self.config.host, self.config.delivery_port)
        if any(t.limits.any for t in self.config.catalogue.tenants):
            self._limiter = Limiter(js)
            await self._limiter.start()
        gateway = Gateway(self.config, self._nc, self.tracker, self.delivery_address, self.readiness, self._limiter)
        self._jobs = Jobs(gateway, self._nc, JobsConfig(ack_wait_s=self.config.job_ack_wait_s,
                                                        concurrency=self.config.job_concurrency), self.auth)
        router_pb2_grpc.add_RouterServicer_to_server(RouterServicer(gateway, self._jobs, js, self.auth), self._server)
        self._health = await grpcserver.add_standard_services(self._server, [ROUTER_SERVICE])
        await self._server.start()
        if self.config.http_port >= 0:
            nc = self._nc
            self._http = HttpApi(gateway, healthy=lambda: nc.is_connected, stop_grace_s=self.config.stop_grace_s, auth=self.auth,
                                 ssl_context=self.tls_public.ssl_context() if self.tls_public else None)
            self.http_port = await self._http.start(self.config.host, self.config.http_port)
        await self._jobs.start()
        log.info("router.serving", address=self.address, delivery=self.delivery_address, http_port=self.http_port or None,
                 models=[m.name for m in self.config.catalogue.models], tenants=sorted(self.auth.tenants) or None)

    async def _on_model_event(self, msg) -> None:
        try:
            ev = manager_pb2.ModelEvent.FromString(msg.data)
        except Exception:
            log.warning("router.bad_model_event", subject=msg.subject)
            return
        self.tracker.on_model_event(ev.model, ev.state, ev.estimate_s, ev.error)
        self.readiness.on_event(ev)

    async def _on_snapshot(self, msg) -> None:
        try:
            self.readiness.on_snapshot(manager_pb2.ResidencySnapshot.FromString(msg.data))
        except Exception:
            log.warning("router.bad_residency_snapshot", subject=msg.subject)

    async def _on_max_deliveries(self, msg) -> None:
        """JetStream gave up on a queued request: its caller hears so now, not at its deadline.
        Every router hears every such advisory; only the one whose flight it is acts."""
        gave_up = jetstream.gave_up_on(msg.data, (m.name for m in self.config.catalogue.models))
        if gave_up is None:
            log.warning("router.advisory_ignored", subject=msg.subject, reason="malformed, or no model of this router's")
            return
        model, seq, deliveries = gave_up
        flight = self.tracker.gave_up(model, seq, deliveries) or await self._gave_up_copy(gave_up)
        if flight is None:
            return  # another router's request, or one that is over already
        log.warning("request.gave_up", request_id=flight.request_id, model=model, deliveries=deliveries, seq=seq)
        # Work-queue retention keeps an unacked message for ever, and JetStream will not deliver
        # it again: nobody else removes it.
        with contextlib.suppress(nats.errors.Error, asyncio.TimeoutError):
            await self._js.delete_msg(subjects.STREAM, seq)

    async def _gave_up_copy(self, gave_up: jetstream.GaveUp) -> Flight | None:
        """The message may be a worker's hand-back copy, whose sequence its flight never learns:
        read it back (the stream still holds it) to see whether it is one of ours."""
        try:
            raw = await self._js.get_msg(subjects.STREAM, gave_up.stream_seq)
            queued = queue_pb2.QueuedRequest.FromString(raw.data or b"")
        except (nats.errors.Error, asyncio.TimeoutError, DecodeError):
            return None  # gone already, or NATS unavailable: the caller's deadline still ends it
        if queued.reply_to != self.delivery_address:
            return None  # its tokens go to another router
        return self.tracker.gave_up(gave_up.model, gave_up.stream_seq, gave_up.deliveries, request_id=queued.request_id)

    async def stop(self, grace: float | None = None) -> None:
        """Refuses new calls at once; streams in flight get `grace` (default: stop_grace_s) to
        finish on both front doors, while the delivery port still brings their tokens."""
        grace = self.config.stop_grace_s if grace is None else grace
        log.info("router.stopping", grace_s=grace)
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._jobs is not None:
            await self._jobs.stop()
        log.debug("router.stopping", step="jobs stopped")
        await asyncio.gather(
            *([self._http.stop()] if self._http is not None else []),
            *([self._server.stop(grace)] if self._server is not None else []),
        )
        log.debug("router.stopping", step="http and grpc stopped")
        await self._delivery.stop(grace)
        log.debug("router.stopping", step="delivery stopped")
        if self._limiter is not None:
            await self._limiter.stop()  # charges still pending, and this router's in-flight counts back to 0
        nc, self._nc = self._nc, None
        if nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.drain(), 10)
        log.info("router.stopped")


async def serve(config: RouterConfig, stop: asyncio.Event) -> None:
    router = Router(config)
    await router.start()
    entry.freeze_heap()
    entry.write_ready(config.ready_file, port=router.port, http_port=router.http_port, delivery=router.delivery_address)
    try:
        await stop.wait()
    finally:
        await router.stop()
