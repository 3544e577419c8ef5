"""The manager: one task owns every model's residency and applies the policy's decisions.

Inputs: workers' reports (gRPC `Report`), queue depths (JetStream consumer info), request
events from routers (core NATS), admin calls (gRPC). Effects: `Load` / `Evict` to workers over
gRPC, `ModelEvent`s to routers. After a restart it waits one report interval before deciding
anything, so its view is rebuilt from the workers first and nothing is ever loaded twice.

One writer: the decide loop is the only task that changes an `Entry`. Every input (a report, a
queue depth read, a request event, an admin call, the answer to a Load or Evict) is posted to
its inbox as a change and applied there, in arrival order, before it decides; gRPC handlers,
NATS callbacks and the tasks that wait on workers or JetStream only read and post.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import time
from collections.abc import Callable

import grpc
import nats
import nats.errors
import structlog

from manager_svc import budget, metrics
from manager_svc.policy import Evict, Fail, Load, Phase, plan, sleep_level_for
from manager_svc.state import PHASE_OF, Entry
from protos.v1 import manager_pb2, worker_pb2, worker_pb2_grpc
from roundhouse import grpcserver, jetstream, natsconn, subjects
from roundhouse import tls as roundhouse_tls
from roundhouse.catalogue import Catalogue
from roundhouse.catalogue import weight_bytes as catalogue_weight_bytes
from roundhouse.errors import ModelNotFound, ModelPinned, RoundhouseError, Unavailable

log = structlog.get_logger("manager")

LOAD_RPC_TIMEOUT_S = 900.0
# A request for a model with no engine is decided on once every queue has been read, this long
# after its event: requests published with it, for other models, are counted by then (decided
# on one queue alone, the model those requests were for looked idle and was evicted for it).
EVENT_SETTLE_S = 0.05
# A resident model's request events read its queue at most this often. Each read is one
# JetStream API call per priority class: read on every event, a busy model's reads ran back to
# back (measured: 0.35 ms of the manager's CPU and more of nats-server's per request, 10% of a
# core at 300 requests/s), for a depth no decision needs fresher than this.
READ_EVERY_S = 0.1
STOP_STEP_TIMEOUT_S = 5.0


class Manager:
    def __init__(self, catalogue: Catalogue, nats_url: str, clock=time.time, tls: "roundhouse_tls.Internal | None" = None):
        self.catalogue = catalogue
        self._tls = tls   # mutual TLS to the workers' control ports
        self.settings = catalogue.manager
        self.budgets = budget.budgets(catalogue.gpus)
        gpus = {g.id: g for g in catalogue.gpus}
        self.entries = {
            m.name: Entry(m, gpus[m.gpu].engine_overhead_bytes, weight_bytes=catalogue_weight_bytes(m.path),
                          pinned=m.pinned, swap=gpus[m.gpu].swap)
            for m in catalogue.models
        }
        self.host_of = {g.id: catalogue.host(g) for g in catalogue.gpus}
        self._nats_url = nats_url
        self._clock = clock
        self._wake = asyncio.Event()
        self._changed = asyncio.Condition()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._tasks: list[asyncio.Task] = []
        self._nc: nats.NATS | None = None
        self._js = None
        self._sweep: asyncio.Task | None = None
        self._sweep_again = False
        self._last_decide = self._awake_since = clock()
        self._inbox: collections.deque[tuple[Callable[[], object], asyncio.Future | None]] = collections.deque()

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._nc = await natsconn.connect(self._nats_url, "roundhouse-manager")
        self._js = self._nc.jetstream()
        await jetstream.ensure_stream(self._js)
        await self._nc.subscribe(subjects.REQUEST_EVENTS, cb=self._on_request_event)
        self._tasks = [
            asyncio.create_task(self._poll_queues(), name="poll-queues"),
            asyncio.create_task(self._decide_loop(), name="decide"),
            asyncio.create_task(self._announce(), name="announce"),
        ]
        log.info("manager.started", budgets={g: f"{b / 2**20:.0f}MiB" for g, b in self.budgets.items()})

    async def stop(self) -> None:
        """Stops deciding and closes connections; every step bounded, idempotent. Workers keep
        their engines: a manager that comes back rebuilds its view from their reports."""
        tasks = self._tasks + [t for e in self.entries.values() for t in (e.op, e.reading) if t is not None]
        if self._sweep is not None:
            tasks.append(self._sweep)
        for _, future in self._inbox:
            if future is not None and not future.done():
                future.cancel()
        self._inbox.clear()
        self._tasks = []
        for t in tasks:
            t.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=STOP_STEP_TIMEOUT_S)
            if pending:
                log.warning("manager.stop_tasks_pending", tasks=[t.get_name() for t in pending])
        channels, self._channels = list(self._channels.values()), {}
        for ch in channels:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ch.close(), STOP_STEP_TIMEOUT_S)
        nc, self._nc = self._nc, None
        if nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), STOP_STEP_TIMEOUT_S)

    def now(self) -> float:
        """The manager's clock (what its entries' times are in)."""
        return self._clock()

    # ---- the one writer's inbox ---------------------------------------------------------------

    def _post(self, change: Callable[[], object], future: asyncio.Future | None = None) -> None:
        """Queues `change` for the decide loop (the only writer of the entries)."""
        self._inbox.append((change, future))
        self._wake.set()

    async def call(self, change: Callable[[], object]):
        """Applies `change` in the decide loop and returns what it returned (or raises what it
        raised): how handlers and tasks write."""
        future = asyncio.get_running_loop().create_future()
        self._post(change, future)
        return await future

    def _apply_inbox(self) -> None:
        while self._inbox:
            change, future = self._inbox.popleft()
            try:
                result = change()
            except Exception as err:  # noqa: BLE001 - the caller gets it; a posted change logs it
                if future is None:
                    log.exception("manager.change_failed", error=repr(err))
                elif not future.done():
                    future.set_exception(err)
            else:
                if future is not None and not future.done():
                    future.set_result(result)

    # ---- inputs ------------------------------------------------------------------------------

    def on_report(self, r: manager_pb2.WorkerReport) -> None:
        """A worker's report (the gRPC handler): applied by the decide loop."""
        if r.model not in self.entries:
            raise RoundhouseError(f"model {r.model!r} is not in the manager's catalogue")
        self._post(functools.partial(self.apply_report, r))

    def apply_report(self, r: manager_pb2.WorkerReport) -> None:
        e = self.entries[r.model]
        # A report sent before this manager's last Load / Evict answer from the same worker
        # process (a fast wake answers before the report of its LOADING arrives) is a sign of
        # life, not its state.
        stale = r.worker_id == e.worker_id and r.state_seq < e.state_seq
        e.worker_id, e.address, e.reported_at = r.worker_id, r.address, self._clock()
        if not stale:
            e.state_seq = r.state_seq
        if r.weight_bytes:
            e.weight_bytes = r.weight_bytes
        if r.in_flight == 0 and e.in_flight > 0:
            self._read_soon(e)   # its queue's ack-pending count may still hold what it just settled
        e.reported_in_flight = r.in_flight
        if r.request_s > 0:
            e.request_s = r.request_s
        e.broken = r.preflight_error
        e.worker_can_sleep = r.can_sleep
        if e.op is None and not stale:  # while a Load / Evict is under way, that call is the truth
            phase = PHASE_OF.get(r.state, Phase.UNLOADED)
            error = r.error if phase in (Phase.FAILED, Phase.UNLOADED) else ""
            if e.phase is Phase.FAILED and phase is Phase.UNLOADED:
                # this manager's verdict (refused, or its load failed) stands until it loads again
                phase, error = Phase.FAILED, e.error
            if phase is Phase.READY and e.phase is not Phase.READY:
                e.resident_since = self._clock()
            if phase is Phase.LOADING and e.phase is not Phase.LOADING:  # a load this manager did not start
                e.op_started, e.op_estimate_s = self._clock(), e.last_load_s
            if phase is Phase.SLEEPING:
                e.sleep_level = r.sleep_level
            changed = phase is not e.phase
            if e.phase is Phase.READY and phase is Phase.UNLOADED and r.error:  # its engine died
                e.engine_died(r.error, self._clock(), self.settings.load_backoff_s)
                metrics.FAILURES.labels(e.spec.name, "engine_died").inc()
                log.error("residency.engine_died", model=e.spec.name, error=r.error,
                          reload_in_s=round(e.backoff_until - self._clock(), 1))
            e.phase, e.error = phase, error
            if changed:  # e.g. a worker counted lost that reports again: say so (log, routers)
                self._set_changed(e)
                return
        self._notify()

    async def _on_request_event(self, msg) -> None:
        """A router queued a request for this model (its JetStream ack came first, so the
        queue holds it now): its queue is read at once, not at the next poll. A wake takes tens
        of milliseconds; the poll period would have been most of a swap."""
        e = self.entries.get(msg.data.decode(errors="replace"))
        if e is not None:
            self._post(functools.partial(self._request_seen, e))

    def _request_seen(self, e: Entry) -> None:
        e.touch(self._clock())
        if e.phase in (Phase.READY, Phase.LOADING):
            self._read_soon(e)           # keeps its in-flight count fresh
        else:
            self._sweep_soon()

    def _sweep_soon(self) -> None:
        """Reads every model's queue EVENT_SETTLE_S from now (once more after a sweep under way:
        asks coalesce, as in `_read_soon`)."""
        if self._sweep is None:
            self._sweep = asyncio.create_task(self._sweep_queues())
        else:
            self._sweep_again = True

    async def _sweep_queues(self) -> None:
        await asyncio.sleep(EVENT_SETTLE_S)  # a settling period (see EVENT_SETTLE_S)
        await self._read_all(self._swept)

    def _swept(self) -> None:
        self._sweep = None
        if self._sweep_again:
            self._sweep_again = False
            self._sweep_soon()

    async def _read_all(self, then: Callable[[], None] | None = None) -> None:
        """Reads every model's queue; the depths are applied together (then `then`), so the
        decision that follows sees one picture."""
        now = self._clock()
        infos = [(e, await self._queue_info(e)) for e in self.entries.values()]
        self._post(functools.partial(self._set_queues, infos, now, then))

    def _set_queues(self, infos, now: float, then: Callable[[], None] | None) -> None:
        for e, info in infos:
            self._set_queue(e, info, now)
        if then is not None:
            then()

    def _read_soon(self, e: Entry) -> None:
        """Reads its queue now, or READ_EVERY_S after its last read began (once more after a
        read under way: asks coalesce). Until that read is done the model counts as busy
        (`counting`), so it is never taken for idle in between."""
        if self._js is None:
            return
        if e.reading is None:
            e.reading = asyncio.create_task(self._read_for(e))
        else:
            e.reread = True

    async def _read_for(self, e: Entry) -> None:
        wait = e.queue_read_at + READ_EVERY_S - self._clock()
        if wait > 0:
            await asyncio.sleep(wait)  # a pacing period: reads of one busy queue are READ_EVERY_S apart
        now = self._clock()
        self._post(functools.partial(self._read_done, e, await self._queue_info(e), now))

    def _read_done(self, e: Entry, info, now: float) -> None:
        self._set_queue(e, info, now)
        e.reading = None
        if e.reread:
            e.reread = False
            self._read_soon(e)

    def _set_queue(self, e: Entry, depth: jetstream.Depth | None, now: float) -> None:
        if depth is not None:
            e.set_queue(depth, now)

    async def _queue_info(self, e: Entry) -> jetstream.Depth | None:
        """Its queue, every priority class; None (no consumer there yet, or NATS did not answer)."""
        try:
            return await jetstream.depth(self._js, e.spec.name)
        except (nats.errors.Error, asyncio.TimeoutError) as err:
            log.warning("manager.queue_poll_failed", model=e.spec.name, error=repr(err))
            return None

    async def _announce(self) -> None:
        """Every model's state, every report interval, for routers that started since it last
        changed (they route "auto" requests around models far from serving)."""
        while True:
            if self._nc is not None and self._nc.is_connected:
                now = self._clock()
                snapshot = manager_pb2.ResidencySnapshot(models=[e.event(now) for e in self.entries.values()])
                with contextlib.suppress(nats.errors.Error):
                    await self._nc.publish(subjects.RESIDENCY_SNAPSHOTS, snapshot.SerializeToString())
            await asyncio.sleep(self.settings.report_interval_s)  # a publishing period

    async def _poll_queues(self) -> None:
        while True:
            await self._read_all()
            await asyncio.sleep(self.settings.queue_poll_s)  # a polling period

    # ---- decisions -----------------------------------------------------------------------------

    async def _decide_loop(self) -> None:
        # Rebuild the view from the workers' reports before acting (a restarted manager): its
        # inbox is applied from the start, decisions wait.
        decide_from = self._clock() + 1.5 * self.settings.report_interval_s
        while True:
            self._wake.clear()
            self._apply_inbox()
            now = self._clock()
            wait = self.settings.queue_poll_s
            if now < decide_from:
                wait = min(wait, decide_from - now)
            else:
                self._decide(now)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()

    def _decide(self, now: float) -> None:
        if now - self._last_decide > self.settings.report_interval_s:
            self._awake_since = now  # this process itself was stalled: reports may be waiting unread
        self._last_decide = now
        self._expire_silent(now)
        actions = plan([e.view(now) for e in self.entries.values()], self.budgets, now, self.settings.starvation_s,
                       self.host_free())
        for action in actions:
            self._apply(action)

    def _expire_silent(self, now: float) -> None:
        """A worker that stopped reporting (killed, frozen, host gone) is lost: its model counts
        as unloaded with no worker, so nothing waits on it and its bytes are free for others.
        A worker that comes back (or its replacement) reports and is used again."""
        limit = self.settings.worker_timeout_s
        for e in self.entries.values():
            # Silent since its last report, or since this manager was last able to hear it. While
            # a Load / Evict to it is under way, that call is the proof of life (a loading worker
            # can be too busy to report: measured 10 s silent during a CPU engine's compile) and
            # a dead worker fails it at once.
            if not e.address or e.op is not None or now - max(e.reported_at, self._awake_since) <= limit:
                continue
            log.error("residency.worker_lost", model=e.spec.name, worker_id=e.worker_id, silent_s=round(now - e.reported_at, 1))
            e.worker_gone(f"its worker stopped reporting {now - e.reported_at:.0f} s ago (lost)")
            metrics.FAILURES.labels(e.spec.name, "worker_lost").inc()
            self._set_changed(e)

    def _apply(self, action) -> None:
        e = self.entries[action.model]
        if isinstance(action, Fail):
            e.failed(action.reason, self._clock(), self.settings.load_backoff_s)
            metrics.FAILURES.labels(e.spec.name, "refused").inc()
            log.error("residency.load_refused", model=e.spec.name, reason=action.reason)
            self._publish(e)
            self._notify()
        elif isinstance(action, Load) and e.op is None:
            self._start_load(e)
        elif isinstance(action, Evict) and e.op is None:
            self._start_evict(e, action.level, "policy")

    def host_sleep_used(self) -> dict[str, int]:
        """Per host: the host RAM its level-1 sleepers hold."""
        used = {h.id: 0 for h in self.host_of.values()}
        for e in self.entries.values():
            used[self.host_of[e.spec.gpu].id] += e.host_bytes
        return used

    def host_free(self) -> dict[str, int]:
        """Per GPU: what its host still lends to level-1 sleepers."""
        used = self.host_sleep_used()
        return {gpu: max(0, h.sleep_budget_bytes - used[h.id]) for gpu, h in self.host_of.items()}

    def _start_load(self, e: Entry) -> None:
        waking = e.phase is Phase.SLEEPING
        e.phase, e.error = Phase.LOADING, ""
        if not waking:
            e.loads += 1
        e.op_started = self._clock()
        e.op_estimate_s = e.last_wake_s if waking else e.last_load_s
        e.load_reason = "admin" if e.requested else "pinned" if e.pinned else "demand"
        self._set_changed(e, waking=waking)
        e.op = asyncio.create_task(self._load(e, waking))

    async def _load(self, e: Entry, waking: bool) -> None:
        """The Load call; its answer is applied by the decide loop, and this task ends once
        it has been (whoever awaits `e.op` then sees the state it led to)."""
        status, error = None, None
        try:
            status = await self._worker(e).Load(worker_pb2.LoadRequest(), timeout=LOAD_RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError as err:
            error = err
        await self.call(functools.partial(self._loaded, e, waking, status, error))

    def _loaded(self, e: Entry, waking: bool, status, err) -> None:
        try:
            if err is None:
                e.state_seq = max(e.state_seq, status.state_seq)
                self._became_ready(e, waking, status)
                return
            if any(k == grpcserver.LOAD_FAILED_KEY for k, _ in (err.trailing_metadata() or ())):
                e.failed(err.details() or err.code().name, self._clock(), self.settings.load_backoff_s)
                metrics.FAILURES.labels(e.spec.name, "failed").inc()
                log.error("residency.load_failed", model=e.spec.name, error=e.error,
                          retry_in_s=round(e.backoff_until - self._clock(), 1))
            else:  # the worker went away mid-load (killed, restarted): not the model's fault, no
                # FAILED for its waiters and no backoff; it loads again once a worker reports
                log.warning("residency.load_interrupted", model=e.spec.name, error=err.details() or err.code().name)
                metrics.FAILURES.labels(e.spec.name, "interrupted").inc()
                e.worker_gone("")
        finally:
            e.op = None
            self._set_changed(e)

    def _became_ready(self, e: Entry, waking: bool, status) -> None:
        e.phase, e.failures, e.requested = Phase.READY, 0, False
        e.resident_since = e.reported_at = self._clock()  # its answer is a sign of life too
        took = e.resident_since - e.op_started
        kind = "wake" if waking and not status.restart_reason else "load"
        if waking and status.restart_reason:  # the wake failed its check: a cold start it was
            log.error("residency.wake_failed", model=e.spec.name, reason=status.restart_reason)
            e.loads += 1
        elif waking:
            e.wakes += 1
        e.learn(kind, took)
        metrics.LOADS.labels(e.spec.name, kind, e.load_reason or "demand").inc()
        metrics.LOAD_SECONDS.labels(e.spec.name, kind).observe(max(0.0, took))

    def _start_evict(self, e: Entry, level: int = 0, reason: str = "policy") -> None:
        """Drains it, then puts its engine to sleep at `level` (1, 2) or stops it (0). A sleeping
        model evicted again is stopped. `reason`: policy, admin or drain (metrics)."""
        if e.phase is Phase.SLEEPING:
            level = 0
        else:
            e.evictions += 1
        metrics.EVICTIONS.labels(e.spec.name, f"sleep{level}" if level else "stop", reason).inc()
        e.evict_started = self._clock()
        e.phase = Phase.EVICTING
        self._set_changed(e, level=level)
        e.op = asyncio.create_task(self._evict(e, level))

    async def _evict(self, e: Entry, level: int) -> None:
        """The Evict call; its answer is applied by the decide loop (see `_load`)."""
        status, error = None, None
        try:
            status = await self._worker(e).Evict(
                worker_pb2.EvictRequest(drain_timeout_s=self.settings.drain_timeout_s, sleep_level=level),
                timeout=self.settings.drain_timeout_s + 120)
        except grpc.aio.AioRpcError as err:
            error = err
        await self.call(functools.partial(self._evicted, e, status, error))

    def _evicted(self, e: Entry, status, err) -> None:
        try:
            if err is not None:
                raise err
            e.state_seq = max(e.state_seq, status.state_seq)
            asleep = status.state == worker_pb2.ENGINE_STATE_SLEEPING
            e.phase, e.reported_at = (Phase.SLEEPING if asleep else Phase.UNLOADED), self._clock()
            e.evicted_at = e.reported_at
            e.sleep_level = status.sleep_level if asleep else 0
            metrics.EVICTION_SECONDS.labels(e.spec.name, f"sleep{e.sleep_level}" if asleep else "stop").observe(
                max(0.0, e.evicted_at - e.evict_started))
        except grpc.aio.AioRpcError as failed:
            log.error("residency.evict_failed", model=e.spec.name, error=failed.details())
            e.phase = Phase.FAILED
            e.error = failed.details() or failed.code().name
        finally:
            e.op = None
            self._set_changed(e)

    def _worker(self, e: Entry) -> worker_pb2_grpc.WorkerStub:
        ch = self._channels.get(e.address)
        if ch is None:
            ch = self._channels[e.address] = roundhouse_tls.channel(e.address, self._tls)
        return worker_pb2_grpc.WorkerStub(ch)

    # ---- effects and waiting ----------------------------------------------------------------

    def _set_changed(self, e: Entry, **why) -> None:
        """`why`: what the transition is (waking=True, level=N), logged with it."""
        log.info("residency.changed", model=e.spec.name, state=e.phase.name, loads=e.loads, evictions=e.evictions,
                 wakes=e.wakes, **({"sleep_level": e.tier} if e.tier else {}),
                 **why, **({"error": e.error} if e.error else {}))
        self._publish(e)
        self._notify()

    def _publish(self, e: Entry) -> None:
        if self._nc is None or not self._nc.is_connected:
            return
        event = e.event(self._clock())
        asyncio.ensure_future(self._nc.publish(subjects.model_event_subject(e.spec.name), event.SerializeToString()))

    def _notify(self) -> None:
        self._wake.set()

        async def notify() -> None:
            async with self._changed:
                self._changed.notify_all()

        asyncio.ensure_future(notify())

    async def wait_until(self, e: Entry, *phases: Phase) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: e.op is None and e.phase in phases)

    # ---- admin -------------------------------------------------------------------------------

    def entry(self, model: str) -> Entry:
        spec = self.catalogue.resolve(model)  # a name or an alias
        e = self.entries.get(spec.name) if spec is not None else None
        if e is None:
            raise ModelNotFound(f"model {model!r} is not in the catalogue")
        return e

    async def pin(self, model: str, pinned: bool) -> Entry:
        e = self.entry(model)
        await self.call(functools.partial(setattr, e, "pinned", pinned))
        return e

    async def load_by_hand(self, model: str) -> Entry:
        e = self.entry(model)

        def request() -> None:
            e.requested, e.draining, e.backoff_until = True, False, 0.0

        await self.call(request)
        await self.wait_until(e, Phase.READY, Phase.FAILED)
        await self.call(functools.partial(setattr, e, "requested", False))
        if e.phase is Phase.FAILED:
            raise Unavailable(f"model {model} failed to load: {e.error or e.broken}")
        return e

    async def evict_by_hand(self, model: str) -> Entry:
        """Evicts it as the policy would (to sleep where its GPU's swap allows); a sleeping
        model evicted by hand is stopped."""
        e = self.entry(model)
        if e.pinned:
            raise ModelPinned(f"model {e.spec.name} is pinned; unpin it first")
        return await self._unload(e, sleep=True)

    async def drain(self, model: str) -> Entry:
        """Stops its engine once its requests are done (not to sleep: a drained model is taken
        out of service)."""
        e = self.entry(model)
        await self.call(functools.partial(setattr, e, "draining", True))
        return await self._unload(e, sleep=False)

    async def _unload(self, e: Entry, sleep: bool) -> Entry:
        """Returns once its eviction (this call's, or the one under way) has ended, whatever
        the policy decides for the model right after (a wake can follow in milliseconds)."""
        while True:
            op = await self.call(functools.partial(self._start_unload, e, sleep))
            if op is None:
                return e
            await asyncio.shield(op)
            if op is e.last_unload:
                return e

    def _start_unload(self, e: Entry, sleep: bool) -> asyncio.Task | None:
        """The task to wait for: a Load or Evict under way (then this is asked again), or the
        eviction started now; None when there is nothing to evict."""
        if e.op is not None:
            return e.op
        if e.phase not in (Phase.READY, Phase.SLEEPING):
            return None
        asleep = e.phase is Phase.SLEEPING
        level = sleep_level_for(e.view(self._clock()), self.host_free()[e.spec.gpu]) if sleep and not asleep else 0
        self._start_evict(e, level, "admin" if sleep else "drain")
        e.last_unload = e.op
        return e.op

