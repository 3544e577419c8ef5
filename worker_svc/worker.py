"""One model's worker: the engine's lifecycle, the requests in flight, and what happens to each.

The single owner of `active` (requests being generated) and of the engine. A request ends in
exactly one of four ways for JetStream, decided in `_serve`:
  ack        - its stream finished (or failed in a way a retry cannot fix: then `term`);
  retry      - its engine died while running it alone: a real attempt, queued again as a copy
               that counts it (see redelivery), unless it was the last of MAX_ATTEMPTS: then it
               fails, saying why;
  hand back  - not its fault (engine not ready, worker evicting or shutting down, or its engine
               died running others too: then it goes back a suspect, to run alone): a copy is
               queued and the original removed, so the hand-back spends none of its budget;
  term       - nobody waits for it any more (caller cancelled, router gone, deadline passed,
               too many real attempts).
A redelivery of a request this worker is still running (it stalled past ack_wait) is adopted:
the newest delivery's handle is the one acked, and nothing runs twice. Such a redelivery is no
attempt, so every copy carries the attempts this worker counted, never JetStream's count.
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable

import structlog
from nats.aio.msg import Msg

from protos.v1 import common_pb2, manager_pb2, queue_pb2, worker_pb2
from roundhouse import catalogue, entry, subjects, tracing
from roundhouse.errors import EngineDead, RequestError, Unavailable
from worker_svc.config import WorkerConfig
from worker_svc.delivery import Links, RouterLink
from worker_svc import metrics, preflight, redelivery
from worker_svc.engine import Engine, EngineSpec
from worker_svc.residency import Residency, State

log = structlog.get_logger("worker")

RECEIPT_TIMEOUT_S = 30.0   # how long a finished request waits for the router to confirm it
HAND_BACK_NAK_DELAY_S = 1.0


class Stop:
    """Why an in-flight request was stopped before it finished."""

    CALLER_GONE = "caller_gone"      # router said cancel: abort, term
    ROUTER_LOST = "router_lost"      # the owning router's stream broke: abort, term
    REQUEUE = "requeue"              # evict or shutdown: abort, hand back (another delivery serves it)
    ENGINE_DIED = "engine_died"      # its engine died with others in it: hand back as a suspect


@dataclasses.dataclass
class Active:
    msg: Msg
    link: RouterLink
    delivery: int
    attempt: int                      # this real attempt's number, from 1 (see redelivery)
    engine_request_id: str
    task: asyncio.Task | None = None
    stop: str = ""


@dataclasses.dataclass
class Counters:
    completed: int = 0
    expired_skipped: int = 0
    aborted: int = 0
    loads: int = 0
    load_seconds: float = 0.0
    wakes: int = 0
    wake_seconds: float = 0.0
    restart_reason: str = ""          # why the last wake fell back to a cold start
    request_s: float = 0.0            # learned time of one request in the engine (0: none yet)

    def learn_request(self, seconds: float) -> None:
        """A request completed in `seconds`: the mean moves REQUEST_WEIGHT of the way to it
        (the first one sets it)."""
        self.request_s = seconds if self.request_s == 0.0 else self.request_s + REQUEST_WEIGHT * (seconds - self.request_s)


REQUEST_WEIGHT = 0.2   # of each completed request in the learned request time


Republish = Callable[[str, bytes, dict], Awaitable[object]]   # (subject, payload, headers)


class ModelWorker:
    def __init__(self, config: WorkerConfig, republish: Republish | None = None):
        self.config = config
        self.model = config.model.name
        self.residency = Residency(self.model)
        self.counters = Counters()
        self.engine: Engine | None = None
        self.weight_bytes = catalogue.weight_bytes(config.model.path)
        self.active: dict[str, Active] = {}
        self._starting = 0                 # started, their tasks not yet run (see free_slots)
        # Finished requests waiting for their router to confirm the last chunk: still ours, so
        # still heartbeated (else JetStream redelivers a finished request after ack_wait).
        self.settling: dict[str, Msg] = {}
        self.links = Links(config.worker_id, self.cancel, self._router_lost, config.tls_internal)
        self._slot_freed = asyncio.Event()
        self.went_idle = asyncio.Event()   # the last request in hand was settled (see report)
        # Suspects (see redelivery) waiting to run alone, heartbeated meanwhile; one runs at a
        # time, and while one waits for the engine to empty or runs, nothing new is pulled.
        self.waiting: dict[str, Msg] = {}
        self._alone = asyncio.Lock()
        self._death: tuple[Engine, int] | None = None   # the dead engine, and how many it was running
        self._load_task: asyncio.Task | None = None
        self._republish = republish

    # ---- lifecycle -------------------------------------------------------------------------

    async def load(self) -> None:
        """Returns once READY. Concurrent callers share one load; a failed load raises Unavailable."""
        while True:
            state = self.residency.state
            if state is State.READY:
                return
            if state is State.EVICTING:
                await self.residency.wait_for(State.UNLOADED, State.FAILED, State.SLEEPING)
                continue
            if self._load_task is None or self._load_task.done():  # UNLOADED, SLEEPING, or FAILED: a Load retries
                self._load_task = asyncio.create_task(self._do_load(), name="engine-load")
            await asyncio.shield(self._load_task)
            if self.residency.state is State.FAILED:
                raise Unavailable(f"model {self.model} failed to load: {self.residency.error}")

    async def _do_load(self) -> None:
        waking = self.residency.state is State.SLEEPING and self.engine is not None
        await self.residency.set(State.LOADING)
        started = time.monotonic()
        if waking:
            self.counters.restart_reason = ""
            reason = await self.engine.wake()
            if not reason:
                self.counters.wakes += 1
                self.counters.wake_seconds = time.monotonic() - started
                log.info("engine.woken", model=self.model, seconds=round(self.counters.wake_seconds, 2))
                await self.residency.set(State.READY)
                return
            log.error("engine.wake_failed", model=self.model, reason=reason, action="restart")
            self.counters.restart_reason = reason
            await self._shutdown_engine()
            started = time.monotonic()
        await self._cold_start(started)

    async def _cold_start(self, started: float) -> None:
        spec = self.config.model
        self.counters.loads += 1
        problem = await asyncio.to_thread(preflight.check, spec.path)
        if problem:
            log.error("engine.load_failed", model=self.model, error=problem)
            await self.residency.set(State.FAILED, error=problem)
            return
        try:
            self.engine = await Engine.start(
                EngineSpec(
                    model_path=spec.path,
                    served_name=spec.name,
                    max_model_len=spec.max_model_len,
                    max_num_seqs=spec.max_num_seqs,
                    kv_cache_bytes=spec.kv_cache_bytes,
                    adapters=tuple((a.name, a.path) for a in spec.adapters),
                    max_loras=spec.max_loras,
                    max_lora_rank=spec.max_lora_rank,
                    enforce_eager=spec.enforce_eager,
                    logits_processors=spec.logits_processors,
                    engine_metrics=spec.engine_metrics,
                    sched_idle=spec.engine_sched_idle,
                    stream_interval=spec.stream_interval,
                )
            )
        except Exception as e:  # any load failure: bad weights, does not fit, ...
            log.error("engine.load_failed", model=self.model, error=repr(e))
            await self.residency.set(State.FAILED, error=f"{type(e).__name__}: {e}")
            return
        entry.freeze_heap()  # the engine's objects live until it is evicted
        self.counters.load_seconds = time.monotonic() - started
        log.info("engine.loaded", model=self.model, seconds=round(self.counters.load_seconds, 2))
        await self.residency.set(State.READY)

    async def evict(self, drain_timeout_s: float | None = None, sleep_level: int = 0) -> None:
        """Stops taking requests, lets those in flight finish (requeues them past the timeout),
        then puts the engine to sleep at `sleep_level` (1, 2) or stops it (0; a sleeping engine
        too). A sleep that fails stops the engine instead."""
        state = self.residency.state
        if state is State.SLEEPING and not sleep_level:
            await self.residency.set(State.EVICTING)
            await self._shutdown_engine()
            await self.residency.set(State.UNLOADED)
            return
        if state is not State.READY:
            if state is State.EVICTING:
                await self.residency.wait_for(State.UNLOADED, State.FAILED, State.SLEEPING)
            return
        await self.residency.set(State.EVICTING)
        timeout = self.config.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        if not await self._drained(timeout):
            log.warning("engine.drain_timeout", model=self.model, requeued=len(self.active))
            await self._stop_all(Stop.REQUEUE)
        if sleep_level and self.engine is not None and not self.engine.dead:
            started = time.monotonic()
            try:
                await self.engine.sleep(sleep_level)
            except Exception as e:  # noqa: BLE001 - a sleep that fails is answered by a stop
                log.error("engine.sleep_failed", model=self.model, level=sleep_level, error=repr(e), action="stop")
            else:
                log.info("engine.asleep", model=self.model, level=sleep_level, frees_memory=self.engine.can_sleep,
                         seconds=round(time.monotonic() - started, 2))
                await self.residency.set(State.SLEEPING)
                return
        await self._shutdown_engine()
        await self.residency.set(State.UNLOADED)

    async def close(self) -> None:
        """Process shutdown (no new requests are pulled by now): requests in flight get
        `stop_grace_s` to finish, what is left goes back to the queue, the engine stops."""
        if self.active and not await self._drained(self.config.stop_grace_s):
            log.warning("worker.stop_grace_passed", requeued=len(self.active))
        await self._stop_all(Stop.REQUEUE)
        await self._shutdown_engine()
        await self.links.close()

    async def _shutdown_engine(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None:
            await engine.shutdown()
            entry.thaw_heap()  # its objects may be collected now

    async def _drained(self, timeout: float | None) -> bool:
        """True once no request is in flight; False if `timeout` (None: no bound) passes first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.active:
            self._slot_freed.clear()
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._slot_freed.wait(), remaining)
            except TimeoutError:
                return not self.active
        return True

    async def _stop_all(self, reason: str) -> None:
        tasks = [a.task for a in self.active.values() if a.task is not None]
        for request_id in list(self.active):
            self._stop(request_id, reason)
        await asyncio.gather(*tasks, return_exceptions=True)

    # ---- slots -----------------------------------------------------------------------------

    def free_slots(self) -> int:
        """Slots neither running a request nor promised to one `start` handed over (whose task has
        not run yet): a pull loop that reads this right after a start sees that start."""
        return self.config.model.max_num_seqs - len(self.active) - self._starting

    def slots_now(self) -> int:
        """Requests it can take now: its free slots, none while a suspect waits to run alone or runs."""
        return 0 if self._alone.locked() else max(0, self.free_slots())

    async def wait_for_slot(self) -> int:
        while self.slots_now() <= 0:  # no slot, or a suspect waits to run alone, or runs
            self._slot_freed.clear()
            await self._slot_freed.wait()
        return self.slots_now()

    # ---- requests --------------------------------------------------------------------------

    def start(self, msg: Msg) -> None:
        """Takes one fetched message; the worker owns it from here until ack / nak / term. Its
        slot is taken at once (see free_slots)."""
        self._starting += 1
        self._background(self._serve_then_note_idle(msg))

    async def _serve_then_note_idle(self, msg: Msg) -> None:
        # From here `_serve` registers the request in `active` (or takes the lock a suspect runs
        # alone under) before it first awaits anything: the slot stays taken without a gap.
        self._starting -= 1
        try:
            await self._serve(msg)
        finally:
            if not (self.active or self.settling or self.waiting):
                self.went_idle.set()   # the manager hears at once: an idle model is one it may evict

    async def next_report(self, timeout: float) -> None:
        """Returns at the next state change, when the worker goes idle, or after `timeout`."""
        waits = [asyncio.ensure_future(self.residency.next_change(timeout)), asyncio.ensure_future(self.went_idle.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    def cancel(self, request_id: str) -> None:
        """The router says the caller is gone."""
        self._stop(request_id, Stop.CALLER_GONE)

    def _router_lost(self, address: str) -> None:
        for request_id, active in list(self.active.items()):
            if active.link.address == address:
                self._stop(request_id, Stop.ROUTER_LOST)

    def _stop(self, request_id: str, reason: str) -> None:
        active = self.active.get(request_id)
        if active is not None and active.task is not None and not active.stop:
            active.stop = reason
            active.task.cancel()

    async def _serve(self, msg: Msg) -> None:
        # 1. Decode; an undecodable message can never succeed.
        try:
            req = queue_pb2.QueuedRequest.FromString(msg.data)
        except Exception:
            log.error("request.undecodable", subject=msg.subject)
            await msg.term()
            return
        taken_ns = time.time_ns()
        meta = msg.metadata
        d = redelivery.delivery(msg.headers, meta.num_delivered or 1)
        delivery = d.number
        rid = req.request_id
        if delivery > 1:  # counts this message's deliveries and those of the copies before it
            metrics.REDELIVERIES.labels(self.model).inc()
        elif meta.timestamp is not None:
            metrics.QUEUE_WAIT.labels(self.model).observe(max(0.0, taken_ns / 1e9 - meta.timestamp.timestamp()))
        span = tracing.tracer().start_span("roundhouse.worker.request", context=tracing.extract(msg.headers),
                                           start_time=taken_ns, attributes={"roundhouse.request_id": rid,
                                                                            "roundhouse.model": self.model,
                                                                            "roundhouse.delivery": delivery})
        # This request's task: every line from here on carries its id and trace id.
        structlog.contextvars.bind_contextvars(request_id=rid)
        tracing.bind(span)
        outcome = "stopped"  # the worker is going down
        try:
            outcome = await self._serve_taken(msg, req, d)
        finally:
            span.set_attribute("roundhouse.outcome", outcome)
            span.end()
        metrics.REQUESTS.labels(self.model, outcome.replace(" ", "_")).inc()
        log.info("request.settled", delivery=delivery, outcome=outcome,
                 ms=round((time.time_ns() - taken_ns) / 1e6, 1))

    async def _serve_taken(self, msg: Msg, req, d) -> str:
        """`_serve` past decoding; returns how the request was settled (metrics' outcome)."""
        delivery, rid = d.number, req.request_id
        bound = log.bind(request_id=rid, model=self.model, delivery=delivery)
        # 2. Never start an expired request (its caller already got DEADLINE_EXCEEDED).
        remaining = (req.deadline_unix_ms / 1000.0 - time.time()) if req.deadline_unix_ms else None
        if remaining is not None and remaining <= 0:
            self.counters.expired_skipped += 1
            bound.info("request.expired_skipped")
            await msg.term()
            return "term"
        if rid in self.active:  # redelivered while we still run it (a stall past ack_wait)
            self.active[rid].msg = msg
            return "adopted"
        if rid in self.waiting:
            self.waiting[rid] = msg
            return "adopted"
        if rid in self.settling:
            self.settling[rid] = msg
            return "adopted"
        isolated = d.suspect and not d.exhausted
        if isolated:  # its engine died with others in it: it runs alone, so a death now is its own
            msg = await self._wait_alone(rid, msg)
        try:
            engine = self.engine
            if engine is None or engine.dead:  # not loaded, or died since: not its fault
                await self.hand_back(msg, d.attempts)
                return "hand back"
            # 3. Register, announce, generate.
            link = self.links.to(req.reply_to)
            active = Active(msg, link, delivery, d.attempts + 1, f"{rid}@{delivery}", asyncio.current_task())
            if d.exhausted:  # it was running each time its engine or worker died: do not try again
                bound.error("request.attempts_exhausted", attempts=d.attempts)
                receipt = link.push_last(_attempts_exhausted(rid, delivery, d.attempts))
                outcome = "term"
            else:
                self.active[rid] = active
                link.push(worker_pb2.RequestChunk(request_id=rid, delivery=delivery, started=True))
                bound.debug("request.started", reply_to=req.reply_to, alone=isolated)
                outcome, receipt = await self._generate(engine, req, active, remaining, bound)
        finally:
            if isolated:
                self._alone.release()
                self._slot_freed.set()  # pulling resumes
        # 4. Settle with JetStream, only once the router has the stream's last chunk: a worker
        #    that dies before that leaves the request queued for another delivery.
        if receipt is not None:
            self.settling[rid] = active.msg
            try:
                async with asyncio.timeout(RECEIPT_TIMEOUT_S):
                    delivered = await receipt
            except TimeoutError:
                delivered = False
            if not delivered:  # the router (and so the caller) is gone: nobody waits for it
                bound.warning("request.unconfirmed")
                outcome = "term"
        msg = self.settling.pop(rid, None) or active.msg  # the newest delivery's handle
        if outcome == "ack":
            await msg.ack()
        elif outcome == "retry":
            await self.hand_back(msg, active.attempt)
        elif outcome == "hand back":
            await self.hand_back(msg, d.attempts)
        elif outcome == "suspect":
            await self.hand_back(msg, d.attempts, suspect=True)
        else:
            await msg.term()
        return outcome

    async def _generate(self, engine: Engine, req, active: Active, remaining: float | None, bound):
        """Runs the generation; returns (outcome, receipt of the last chunk or None)."""
        rid, delivery, link = req.request_id, active.delivery, active.link
        started = time.monotonic()
        first = True
        outcome = "ack"
        receipt: asyncio.Future | None = None
        try:
            async with asyncio.timeout(remaining):
                async for step in engine.generate(
                    req.prompt,
                    [{"role": m.role, "content": m.content} for m in req.chat.messages],
                    active.engine_request_id,
                    _sampling(req.sampling),
                    req.adapter,
                    req.prompt_token_ids,
                ):
                    if first:
                        first = False
                        metrics.ENGINE_TTFT.labels(self.model).observe(time.monotonic() - started)
                    if step.token_ids or step.text:
                        link.push(
                            worker_pb2.RequestChunk(
                                request_id=rid,
                                delivery=delivery,
                                delta=worker_pb2.RequestDelta(token_ids=step.token_ids, text=step.text),
                            )
                        )
                    if step.finished and step.finish_reason == common_pb2.FINISH_REASON_ABORTED:
                        # Aborted by the engine itself (it is shutting down), not by us: that is
                        # no end for the caller; another delivery continues it.
                        bound.warning("request.aborted_by_engine")
                        return "hand back", None
                    if step.finished:
                        self.counters.completed += 1
                        self.counters.learn_request(time.monotonic() - started)
                        receipt = link.push_last(_finished(rid, delivery, step.finish_reason, step.prompt_tokens, step.completion_tokens))
        except asyncio.CancelledError:
            if not active.stop:
                raise  # not ours: the whole worker is going down
            asyncio.current_task().uncancel()
            if receipt is None:  # still generating: abort it (else it finished just before the stop)
                self.counters.aborted += 1
                if active.stop != Stop.ENGINE_DIED:  # a dead engine holds nothing to abort
                    await engine.abort([active.engine_request_id])
                outcome = {Stop.REQUEUE: "hand back", Stop.ENGINE_DIED: "suspect"}.get(active.stop, "term")
                bound.info("request.stopped", reason=active.stop)
        except TimeoutError:
            self.counters.aborted += 1
            await engine.abort([active.engine_request_id])
            receipt = link.push_last(_error(rid, delivery, "DEADLINE_EXCEEDED", "roundhouse: deadline passed during generation", False))
            outcome = "term"
        except EngineDead as e:
            shared = self._running_at_death(engine) > 1
            bound.error("engine.dead", error=str(e), shared=shared)
            self._background(self._engine_died(str(e)))
            if shared:  # which of them killed it is not known: none is blamed (see redelivery)
                outcome = "suspect"
            elif active.attempt < redelivery.MAX_ATTEMPTS:
                outcome = "retry"  # it ran alone: a real attempt, it counts
            else:  # the last one it gets: say so now rather than at a delivery that needs a new engine
                receipt = link.push_last(_attempts_exhausted(rid, delivery, active.attempt))
                outcome = "term"
        except RequestError as e:
            receipt = link.push_last(_error(rid, delivery, e.code.name, e.message, e.retryable))
            outcome = "term"
        finally:
            del self.active[rid]
            self._slot_freed.set()
        return outcome, receipt

    async def hand_back(self, msg: Msg, attempts: int | None = None, suspect: bool = False) -> None:
        """Queues a copy of `msg` that keeps its counts (see redelivery) and removes `msg`: a
        hand-back that is not the request's fault spends none of its delivery budget. `attempts`:
        the real attempts so far, where this worker knows them better than JetStream (it held the
        request through a redelivery, which is no attempt). Without a way to publish (or when NATS
        refuses) it falls back to a nak: counted, but nothing lost."""
        d = redelivery.delivery(msg.headers, msg.metadata.num_delivered or 1)
        if attempts is not None:
            d = dataclasses.replace(d, attempts=attempts)
        if self._republish is not None:
            try:
                headers = redelivery.copy_headers(msg.headers, d, msg.metadata.sequence.stream, suspect)
                await self._republish(subjects.handback_of(msg.subject), msg.data, headers)
            except Exception as e:  # noqa: BLE001 - any failure: keep the original instead
                log.warning("request.hand_back_failed", error=repr(e))
            else:
                await msg.term()
                return
        metrics.NAKS.labels(self.model).inc()
        await msg.nak(delay=HAND_BACK_NAK_DELAY_S)

    async def _wait_alone(self, rid: str, msg: Msg) -> Msg:
        """Returns once `rid` is the one request its engine will run (nothing new is pulled
        until it is done: see the finally in `_serve`), with its newest delivery's handle."""
        self.waiting[rid] = msg  # still ours: heartbeated while it waits
        try:
            await self._alone.acquire()
            try:
                await self._drained(None)
            except BaseException:  # the worker is going down while it waits
                self._alone.release()
                raise
        finally:
            msg = self.waiting.pop(rid)
        return msg

    def _running_at_death(self, engine: Engine) -> int:
        """How many requests `engine` was running when it died: counted by the first of them
        to hear of the death, before any of them has left `active`."""
        if self._death is None or self._death[0] is not engine:
            self._death = (engine, len(self.active))
        return self._death[1]

    def _background(self, coro) -> None:
        task = asyncio.create_task(coro)
        task.add_done_callback(_log_crash)

    async def _engine_died(self, error: str) -> None:
        """UNLOADED with the reason, not FAILED: the model's files are fine (FAILED tells the
        routers to fail its waiters), so its requests wait for the manager to load it again."""
        if self.residency.state is State.READY:
            await self.residency.set(State.UNLOADED, error=error)
            await self._stop_all(Stop.ENGINE_DIED)
            await self._shutdown_engine()

    async def heartbeat(self) -> None:
        """Tells JetStream that every request in flight is still being worked on."""
        msgs = [a.msg for a in self.active.values()] + list(self.settling.values()) + list(self.waiting.values())
        await asyncio.gather(*(m.in_progress() for m in msgs), return_exceptions=True)

    def report(self, address: str, preflight_error: str) -> manager_pb2.WorkerReport:
        spec = self.config.model
        return manager_pb2.WorkerReport(
            worker_id=self.config.worker_id, model=self.model, address=address, gpu=spec.gpu,
            weight_bytes=self.weight_bytes, kv_cache_bytes=spec.kv_cache_bytes, can_sleep=self.sleep_frees_memory,
            state=self.residency.state.value, error=self.residency.error, in_flight=len(self.active) + len(self.waiting),
            preflight_error=preflight_error, sleep_level=self.sleep_level,
            state_seq=self.residency.seq, request_s=self.counters.request_s,
        )

    @property
    def sleep_frees_memory(self) -> bool:
        """vLLM's sleep mode frees memory on CUDA only; on CPU its sleep pauses the engine."""
        return self.config.model.gpu.startswith("cuda")

    @property
    def sleep_level(self) -> int:
        return self.engine.sleep_level if self.engine is not None and self.residency.state is State.SLEEPING else 0

    def status(self) -> worker_pb2.WorkerStatus:
        c = self.counters
        return worker_pb2.WorkerStatus(
            worker_id=self.config.worker_id,
            model=self.model,
            state=self.residency.state.value,
            error=self.residency.error,
            in_flight=len(self.active) + len(self.waiting),
            engine_unfinished=self.engine.unfinished() if self.engine else 0,
            max_num_seqs=self.config.model.max_num_seqs,
            completed=c.completed,
            expired_skipped=c.expired_skipped,
            aborted=c.aborted,
            load_seconds=c.load_seconds,
            loads=c.loads,
            sleep_level=self.sleep_level,
            wakes=c.wakes,
            wake_seconds=c.wake_seconds,
            restart_reason=c.restart_reason,
            state_seq=self.residency.seq,
        )


def _sampling(p: common_pb2.SamplingParams) -> dict:
    """SamplingParams fields for vLLM; the router has already filled in every default."""
    out: dict = {"max_tokens": p.max_tokens, "ignore_eos": p.ignore_eos}
    for name in ("temperature", "top_p", "top_k", "seed", "stream_interval"):
        if p.HasField(name):
            out[name] = getattr(p, name)
    if p.stop:
        out["stop"] = list(p.stop)
    return out


def _finished(rid: str, delivery: int, reason: int, prompt: int, completion: int) -> worker_pb2.RequestChunk:
    return worker_pb2.RequestChunk(
        request_id=rid,
        delivery=delivery,
        finished=worker_pb2.RequestFinished(
            finish_reason=reason, usage=common_pb2.Usage(prompt_tokens=prompt, completion_tokens=completion)
        ),
    )


def _error(rid: str, delivery: int, code: str, message: str, retryable: bool) -> worker_pb2.RequestChunk:
    return worker_pb2.RequestChunk(
        request_id=rid, delivery=delivery, error=common_pb2.ErrorDetail(code=code, message=message, retryable=retryable)
    )


def _attempts_exhausted(rid: str, delivery: int, attempts: int) -> worker_pb2.RequestChunk:
    return _error(rid, delivery, "INTERNAL",
                  f"roundhouse: this request was being generated each of the {attempts} times its engine or worker "
                  "died; it is not tried again (it may be what kills them)", False)


def _log_crash(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("request.crashed", error=repr(task.exception()))
