"""Async jobs: a request accepted now, run by any router, its result kept in a key-value bucket.

Submit (NATS request on `rh.jobs.submit`, or gRPC SubmitJob) validates and classifies the request
like any other, stores a QUEUED record under the job id in the `rh-jobs` bucket, and publishes
the job to the `RH_JOBS` work-queue stream; the reply is the record, at once. Every router runs
jobs from that stream's one durable consumer: it marks the job RUNNING, sends it through the
gateway, publishes each event on `rh.jobs.<id>.events`, stores the result, and only then acks.
A router that stops hands its running jobs back (nak); one that dies has them redelivered after
`ack_wait`. Either way another router runs the job again from the start (attempts + 1), so a job
survives a router restart. Cancel marks the record CANCELLED and tells the router running it.

Body of a NATS submit: the JSON of an OpenAI chat or completions request (`messages` or
`prompt`, `model` may be "auto"), plus an optional `job_id` (idempotent: resubmitting an id returns
the existing record). With header `Content-Type: application/x-protobuf` the body is a
GenerateRequest (request_id = job id) and the reply a Job. Records are JSON (Job's fields).

When the router has tenants (roundhouse.tenancy), a submit carries the tenant's API key (header
`Authorization: Bearer <key>` on NATS, metadata on gRPC); the record keeps the tenant's name, the
run is held to its models and limits (over a limit: the job waits and runs later, like one that
meets a full queue), and only that tenant can read or cancel it.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import time
import uuid
from collections.abc import Callable

import nats
import nats.errors
import nats.js.errors
import structlog
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from nats.js.api import AckPolicy, ConsumerConfig, KeyValueConfig, RetentionPolicy, StorageType, StreamConfig

from protos.v1 import common_pb2, router_pb2
from roundhouse import jetstream, subjects, tasks, tracing
from roundhouse.errors import InvalidRequest, JobNotFound, PermissionDenied, QueueFull, RoundhouseError, Unavailable
from router_svc import metrics, openai_api
from router_svc.auth import ANYONE, Auth, Tenant
from router_svc.gateway import Gateway
from router_svc.tracker import as_event

log = structlog.get_logger("router.jobs")

PROTOBUF = "application/x-protobuf"
_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_TERMINAL = frozenset({router_pb2.JOB_STATE_SUCCEEDED, router_pb2.JOB_STATE_FAILED, router_pb2.JOB_STATE_CANCELLED})


@dataclasses.dataclass(frozen=True)
class JobsConfig:
    ack_wait_s: float = 30.0         # a dead router's jobs go to another after this long
    concurrency: int = 64            # jobs one router runs at once
    ttl_s: float = 7 * 86400         # records are kept this long
    max_deliver: int = 5             # runs of one job; one more delivery only records it FAILED
    queue_full_backoff_s: float = 2.0   # a job that meets a full model queue waits this long, doubling
    queue_full_backoff_max_s: float = 60.0


def to_json(job: router_pb2.Job) -> bytes:
    return json_format.MessageToJson(job, preserving_proto_field_name=True, indent=None).encode()


def from_json(data: bytes) -> router_pb2.Job:
    return json_format.Parse(data, router_pb2.Job(), ignore_unknown_fields=True)


def _now_ms() -> int:
    return int(time.time() * 1000)


class Jobs:
    def __init__(self, gateway: Gateway, nc: nats.NATS, config: JobsConfig, auth: Auth | None = None):
        self._gw = gateway
        self._auth = auth
        self._nc = nc
        self._js = nc.jetstream()
        self._config = config
        self._kv = None
        self._running: dict[str, asyncio.Task] = {}
        self._slot_freed = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._subs: list = []
        self._stopping = False

    async def start(self) -> None:
        js = self._js
        config = StreamConfig(name=subjects.JOBS_STREAM, subjects=[subjects.JOBS_RUN], retention=RetentionPolicy.WORK_QUEUE,
                              storage=StorageType.FILE, duplicate_window=120.0)
        try:
            await js.add_stream(config)
        except nats.js.errors.BadRequestError:
            await js.update_stream(config)
        try:
            self._kv = await js.key_value(subjects.JOBS_BUCKET)
        except (nats.js.errors.BucketNotFoundError, nats.js.errors.NotFoundError):
            self._kv = await js.create_key_value(KeyValueConfig(
                bucket=subjects.JOBS_BUCKET, history=1, ttl=self._config.ttl_s, storage=StorageType.FILE))
        await js.add_consumer(subjects.JOBS_STREAM, ConsumerConfig(
            durable_name=subjects.JOBS_RUNNERS, filter_subject=subjects.JOBS_RUN, ack_policy=AckPolicy.EXPLICIT,
            # One delivery past max_deliver: it only records the job FAILED (else, past the limit,
            # JetStream stops delivering and the record would stay RUNNING for ever).
            ack_wait=self._config.ack_wait_s, max_deliver=self._config.max_deliver + 1, max_ack_pending=100_000))
        self._puller = jetstream.Puller(self._nc, subjects.JOBS_STREAM, subjects.JOBS_RUNNERS)
        await self._puller.start()
        self._subs.append(await self._nc.subscribe(subjects.JOBS_SUBMIT, queue="rh-routers", cb=self._on_submit))
        self._subs.append(await self._nc.subscribe(subjects.JOBS_CANCEL, cb=self._on_cancel))
        self._tasks.append(asyncio.create_task(self._pull_loop(), name="jobs-pull"))

    async def stop(self) -> None:
        """Hands running jobs back to the stream (another router runs them now) and stops."""
        self._stopping = True
        # Stop pulling first: a job handed back must not land in this router's own open pull.
        await tasks.cancel_all(self._tasks)
        for sub in [*self._subs, getattr(self, "_puller", None)]:
            if sub is not None:
                with contextlib.suppress(Exception):
                    await (sub.close() if sub is self._puller else sub.unsubscribe())
        await tasks.cancel_all(list(self._running.values()))  # each hands its job back (see _run)

    # ---- the API (gRPC and NATS) ----------------------------------------------------------------

    async def submit(self, request: router_pb2.GenerateRequest, traceparent: str = "", tenant: Tenant = ANYONE) -> router_pb2.Job:
        """`traceparent`: the submitter's trace (W3C), continued by the job's run. `tenant`: who
        submits (router_svc.auth)."""
        job_id = request.request_id or uuid.uuid4().hex
        if not _JOB_ID.match(job_id):
            raise InvalidRequest("job_id", "1-64 characters of letters, digits, _ and -")
        request.request_id = job_id  # never in flight itself: each run is `<job_id>.<attempt>`
        # Bad input fails here, nothing stored. A full model queue does not: a job waits in RH_JOBS,
        # and meets the model's queue only when it runs (then it waits and retries).
        admitted = self._gw.admit(request, check_queue=False, endpoint=None, tenant=tenant)
        request.model = admitted.queued.model  # classified once: a rerun does not change its mind
        now = _now_ms()
        job = router_pb2.Job(job_id=job_id, state=router_pb2.JOB_STATE_QUEUED, model=admitted.queued.model,
                             route_reason=admitted.route_reason, created_unix_ms=now, updated_unix_ms=now, request=request,
                             tenant=tenant.name)
        try:
            revision = await self._kv.create(job_id, to_json(job))
        except nats.js.errors.KeyWrongLastSequenceError:
            # Idempotent resubmission. A record still QUEUED may be one whose run message never
            # made it (see below): publish it again; within JetStream's duplicate window the
            # same message id is stored once.
            existing = await self.get(job_id, tenant)
            if existing.state == router_pb2.JOB_STATE_QUEUED:
                await self._publish_run(existing.request, traceparent)
            return existing
        # A job is either queued and will run, or its submit fails and leaves nothing behind.
        try:
            await self._publish_run(request, traceparent)
        except (nats.errors.Error, asyncio.TimeoutError) as e:
            with contextlib.suppress(nats.errors.Error, asyncio.TimeoutError):
                await self._kv.delete(job_id, last=revision)
            raise Unavailable(f"roundhouse: job {job_id} could not be queued ({type(e).__name__}); "
                              "nothing was stored, submit it again") from None
        metrics.JOBS.labels(job.model, "submitted").inc()
        log.info("job.submitted", job_id=job_id, model=job.model, route=job.route_reason)
        return job

    async def _publish_run(self, request: router_pb2.GenerateRequest, traceparent: str = "") -> None:
        headers = {"Nats-Msg-Id": request.request_id}
        if traceparent:
            headers[tracing.TRACEPARENT] = traceparent
        await self._js.publish(subjects.JOBS_RUN, request.SerializeToString(), headers=headers, timeout=10)

    async def get(self, job_id: str, tenant: Tenant = ANYONE) -> router_pb2.Job:
        """The record of `job_id`; another tenant's job is not found (its existence is not told)."""
        job = (await self._read(job_id))[1]
        if tenant is not ANYONE and job.tenant != tenant.name:
            raise JobNotFound(f"job {job_id!r} not found (unknown, or expired)")
        return job

    async def _read(self, job_id: str):
        """The stored record of `job_id` and its KV entry (for its revision)."""
        try:
            entry = await self._kv.get(job_id)
        except (nats.js.errors.KeyNotFoundError, ValueError):  # ValueError: not a valid key
            raise JobNotFound(f"job {job_id!r} not found (unknown, or expired)") from None
        return entry, from_json(entry.value)

    async def cancel(self, job_id: str, tenant: Tenant = ANYONE) -> router_pb2.Job:
        await self.get(job_id, tenant)
        job = await self._update(job_id, lambda j: _finish(j, router_pb2.JOB_STATE_CANCELLED))
        await self._nc.publish(subjects.JOBS_CANCEL, job_id.encode())
        return job

    async def _update(self, job_id: str, change: Callable[[router_pb2.Job], bool]) -> router_pb2.Job:
        """Applies `change` to the stored record (compare-and-set); a finished job never changes."""
        for _ in range(20):
            entry, job = await self._read(job_id)
            if job.state in _TERMINAL or not change(job):
                return job
            job.updated_unix_ms = _now_ms()
            try:
                await self._kv.update(job_id, to_json(job), last=entry.revision)
                return job
            except nats.js.errors.KeyWrongLastSequenceError:
                continue
        raise RoundhouseError(f"job {job_id!r}: too many concurrent updates")

    # ---- NATS handlers ----------------------------------------------------------------------------

    async def _on_submit(self, msg) -> None:
        headers = msg.headers or {}
        proto = headers.get("Content-Type") == PROTOBUF
        try:
            tenant = ANYONE if self._auth is None else await self._auth.check(headers.get("Authorization"), "", "job")
            if proto:
                try:
                    request = router_pb2.GenerateRequest.FromString(msg.data)
                except DecodeError as e:
                    raise InvalidRequest("body", f"not a GenerateRequest: {e}") from None
            else:
                try:
                    body = json.loads(msg.data)
                except ValueError as e:
                    raise InvalidRequest("body", f"not valid JSON: {e}") from None
                endpoint = "chat" if isinstance(body, dict) and "messages" in body else "completions"
                request, _ = openai_api.parse(body, endpoint, str(body.get("job_id", "")) if isinstance(body, dict) else "",
                                              also=frozenset({"job_id"}))
            job = await self.submit(request, headers.get(tracing.TRACEPARENT, ""), tenant)
            reply = job.SerializeToString() if proto else to_json(job)
        except (RoundhouseError, nats.errors.Error, asyncio.TimeoutError) as e:
            err = _error_detail(e)
            reply = router_pb2.Job(error=err).SerializeToString() if proto else json.dumps(
                {"error": {"code": err.code, "message": err.message, "retryable": err.retryable}}).encode()
        if msg.reply:
            await msg.respond(reply)

    async def _on_cancel(self, msg) -> None:
        task = self._running.get(msg.data.decode(errors="replace"))
        if task is not None:
            task.cancel("job cancelled")

    # ---- running jobs -----------------------------------------------------------------------------

    async def _pull_loop(self) -> None:
        """Runs jobs from RH_JOBS (the shared pull loop), up to `concurrency` at once."""
        async def room() -> int:
            while len(self._running) >= self._config.concurrency:
                self._slot_freed.clear()
                await self._slot_freed.wait()
            return self._config.concurrency - len(self._running)

        async def take(msg) -> None:
            try:
                request = router_pb2.GenerateRequest.FromString(msg.data)
            except Exception:
                log.error("job.bad_message")
                await msg.term()
                return
            task = asyncio.create_task(self._run(request, msg), name=f"job-{request.request_id}")
            self._running[request.request_id] = task
            task.add_done_callback(lambda t, jid=request.request_id: self._ended(jid))

        await jetstream.pull_loop(self._puller, room, take)

    def _ended(self, job_id: str) -> None:
        self._running.pop(job_id, None)
        self._slot_freed.set()

    async def _run(self, request: router_pb2.GenerateRequest, msg) -> None:
        job_id = request.request_id
        attempt = msg.metadata.num_delivered
        heartbeat = asyncio.create_task(self._heartbeat(msg))
        job = None
        try:
            if attempt > self._config.max_deliver:  # every run was lost (its router or worker died)
                failed = router_pb2.Job(state=router_pb2.JOB_STATE_FAILED, error=common_pb2.ErrorDetail(
                    code="UNAVAILABLE", retryable=True,
                    message=f"roundhouse: job {job_id} was started {self._config.max_deliver} times and never finished "
                            "(its router or worker was lost each time); submit it again"))
                await self._conclude(job_id, attempt, msg, lambda j: _result(j, failed))
                log.error("job.gave_up", job_id=job_id, attempts=self._config.max_deliver)
                return
            job = await self._update(job_id, lambda j: _start(j, attempt))
            if job.state in _TERMINAL:  # cancelled while queued, or finished by an earlier run
                await msg.ack()
                return
            run = router_pb2.GenerateRequest()
            run.CopyFrom(request)
            run.request_id = f"{job_id}.{attempt}"  # a rerun is a new request: never spliced with the last
            try:
                result = await self._generate(job_id, attempt, run, tracing.extract(msg.headers), self._tenant_of(job))
            except QueueFull as e:  # a full queue, or its tenant over a limit
                if attempt < self._config.max_deliver:  # transient: wait and run it again
                    delay = min(self._config.queue_full_backoff_max_s, max(
                        e.retry_after_s, self._config.queue_full_backoff_s * 2 ** (attempt - 1)))
                    await self._update(job_id, _requeue)
                    await msg.nak(delay=delay)
                    log.warning("job.queue_full", job_id=job_id, attempt=attempt, retry_in_s=delay)
                    return
                result = router_pb2.Job(state=router_pb2.JOB_STATE_FAILED, error=_error_detail(e))
            job = await self._conclude(job_id, attempt, msg, lambda j: _result(j, result))
            log.info("job.done", job_id=job_id, state=router_pb2.JobState.Name(job.state), attempt=attempt)
        except asyncio.CancelledError:
            if self._stopping:
                with contextlib.suppress(Exception):
                    await msg.nak()  # another router runs it now
                raise
            await self._conclude(job_id, attempt, msg, lambda j: _finish(j, router_pb2.JOB_STATE_CANCELLED))
        except JobNotFound:
            await msg.term()
        finally:
            heartbeat.cancel()

    async def _conclude(self, job_id: str, attempt: int, msg, change: Callable[[router_pb2.Job], bool]) -> router_pb2.Job:
        """Records the run's outcome, tells the job's followers, and only then acks its message."""
        job = await self._update(job_id, change)
        await self._events(job_id, attempt, {"job": json.loads(to_json(job))}, job.tenant)
        await msg.ack()
        if job.state in _TERMINAL:
            metrics.JOBS.labels(job.model, router_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_").lower()).inc()
        return job

    def _tenant_of(self, job: router_pb2.Job) -> Tenant | None:
        """The tenant a job runs as; None: its tenant is no longer configured."""
        if self._auth is None or not self._auth.enabled:
            return ANYONE
        return self._auth.tenants.get(job.tenant)

    async def _generate(self, job_id: str, attempt: int, request: router_pb2.GenerateRequest, parent=None,
                        tenant: Tenant | None = ANYONE) -> router_pb2.Job:
        """Runs the request through the gateway; returns the result fields (state, text, ...)."""
        out = router_pb2.Job()
        try:
            if tenant is None:
                raise PermissionDenied(f"job {job_id}'s tenant is no longer configured on this router")
            # QueueFull goes to the caller: it waits and retries
            admitted = self._gw.admit(request, endpoint="job", parent=parent, tenant=tenant)
            async for event in self._gw.stream(admitted):
                ev = as_event(event)
                await self._events(job_id, attempt, {"event": json_format.MessageToDict(ev, preserving_proto_field_name=True)},
                                   tenant.name)
                kind = ev.WhichOneof("event")
                if kind == "delta":
                    out.text += ev.delta.text
                    out.token_ids.extend(ev.delta.token_ids)
                elif kind == "finished":
                    out.state = router_pb2.JOB_STATE_SUCCEEDED
                    out.finish_reason = ev.finished.finish_reason
                    out.usage.CopyFrom(ev.finished.usage)
                elif kind == "error":
                    out.state = router_pb2.JOB_STATE_FAILED
                    out.error.CopyFrom(ev.error)
        except QueueFull:
            raise
        except RoundhouseError as e:
            out.state = router_pb2.JOB_STATE_FAILED
            out.error.CopyFrom(_error_detail(e))
        if out.state == router_pb2.JOB_STATE_UNSPECIFIED:
            out.state = router_pb2.JOB_STATE_FAILED
            out.error.CopyFrom(common_pb2.ErrorDetail(code="INTERNAL", message="roundhouse: the stream ended without a result"))
        return out

    async def _events(self, job_id: str, attempt: int, payload: dict, tenant: str) -> None:
        """To the job's followers: its tenant's subject (subjects.job_events_subject)."""
        with contextlib.suppress(nats.errors.Error):
            await self._nc.publish(subjects.job_events_subject(job_id, tenant),
                                   json.dumps({"job_id": job_id, "attempt": attempt, **payload}).encode())

    async def _heartbeat(self, msg) -> None:
        while True:
            await asyncio.sleep(self._config.ack_wait_s / 3)
            with contextlib.suppress(nats.errors.Error):
                await msg.in_progress()


def _error_detail(e: Exception) -> common_pb2.ErrorDetail:
    if isinstance(e, RoundhouseError):
        return common_pb2.ErrorDetail(code=e.code.name, message=e.message, retryable=e.retryable)
    return common_pb2.ErrorDetail(code="UNAVAILABLE", message=f"roundhouse: the job store is unavailable ({e!r}); retry",
                                  retryable=True)


# ---- record transitions (pure) --------------------------------------------------------------------


def _start(job: router_pb2.Job, attempt: int) -> bool:
    job.state = router_pb2.JOB_STATE_RUNNING
    job.attempts = attempt
    return True


def _requeue(job: router_pb2.Job) -> bool:
    job.state = router_pb2.JOB_STATE_QUEUED
    return True


def _finish(job: router_pb2.Job, state: int) -> bool:
    job.state = state
    return True


def _result(job: router_pb2.Job, result: router_pb2.Job) -> bool:
    job.state = result.state
    job.text = result.text
    job.token_ids[:] = result.token_ids
    job.finish_reason = result.finish_reason
    job.usage.CopyFrom(result.usage)
    if result.HasField("error"):
        job.error.CopyFrom(result.error)
    return True
