"""The manager's view of one model: what workers reported, what the queues say, what it did."""
from __future__ import annotations

import asyncio
import dataclasses
import math

from protos.v1 import manager_pb2, worker_pb2
from roundhouse import jetstream
from roundhouse.catalogue import ModelSpec
from manager_svc.policy import ModelView, Phase

FREQUENCY_HALF_LIFE_S = 60.0
BACKOFF_MAX_S = 300.0
DEATHS_FORGOTTEN_S = 600.0   # an engine that served this long before dying starts its backoff over

PHASE_OF = {
    worker_pb2.ENGINE_STATE_UNLOADED: Phase.UNLOADED,
    worker_pb2.ENGINE_STATE_LOADING: Phase.LOADING,
    worker_pb2.ENGINE_STATE_READY: Phase.READY,
    worker_pb2.ENGINE_STATE_EVICTING: Phase.EVICTING,
    worker_pb2.ENGINE_STATE_FAILED: Phase.FAILED,
    worker_pb2.ENGINE_STATE_SLEEPING: Phase.SLEEPING,
}
STATE_OF = {v: k for k, v in PHASE_OF.items()}


@dataclasses.dataclass
class Entry:
    spec: ModelSpec
    overhead_bytes: int
    weight_bytes: int = 0
    worker_id: str = ""
    address: str = ""
    reported_at: float = 0.0          # when its worker last reported (a heartbeat every report_interval_s)
    state_seq: int = 0                # its worker's state changes as of the last answer or report taken
    phase: Phase = Phase.UNLOADED
    error: str = ""
    broken: str = ""
    in_flight: int = 0
    reported_in_flight: int = 0
    queue_depth: int = 0
    top_lane: int = 1                 # the highest priority class with requests waiting (subjects.PRIORITIES index)
    lanes: jetstream.Depth | None = None   # its queue per priority class, as last read
    waiting_since: float | None = None
    last_used: float = 0.0
    frequency: float = 0.0
    frequency_at: float = 0.0
    loads: int = 0
    evictions: int = 0
    pinned: bool = False
    draining: bool = False
    requested: bool = False           # an operator asked for it (LoadModel)
    failures: int = 0                 # failed loads in a row
    deaths: int = 0                   # engine deaths, each within DEATHS_FORGOTTEN_S of a load
    backoff_until: float = 0.0
    resident_since: float = 0.0
    last_load_s: float = 30.0         # a cold load's expected seconds (learned: see learn)
    request_s: float = 0.0            # one request's time in its engine, as its worker learned it (0: unknown)
    swap: str = "auto"                # its GPU's swap setting (catalogue)
    worker_can_sleep: bool = False    # its worker says a sleep frees memory (CUDA sleep mode; not CPU)
    sleep_level: int = 0              # SLEEPING: 1 or 2
    wakes: int = 0
    last_wake_s: float = 5.0          # a wake's expected seconds (learned: see learn)
    last_transition_s: float = 0.0    # its last load or wake took this long
    measured: frozenset = frozenset()  # which of "load", "wake" it has measured
    op_started: float = 0.0           # when the load or wake under way (LOADING) started
    op_estimate_s: float = 0.0        # and how long it was expected to take
    queue_read_at: float = 0.0        # when its queue depth was last asked for
    evicted_at: float = 0.0           # when its last eviction ended
    evict_started: float = 0.0        # when its last eviction started
    load_reason: str = ""             # why its last load or wake started: demand, pinned, admin (metrics)
    reading: asyncio.Task | None = None   # a read of its queue, started by a request event
    reread: bool = False              # events came during that read: read once more
    op: asyncio.Task | None = None    # the Load / Evict this manager has under way
    last_unload: asyncio.Task | None = None   # the last eviction an admin call started

    @property
    def footprint(self) -> int:
        return self.weight_bytes + self.spec.kv_cache_bytes + self.overhead_bytes

    @property
    def can_sleep(self) -> bool:
        """Evicting it puts its engine to sleep: `swap: sleep`, or `auto` where vLLM's sleep
        mode frees memory (CUDA)."""
        return self.swap == "sleep" or (self.swap == "auto" and self.worker_can_sleep)

    @property
    def tier(self) -> int:
        """The level it sleeps at now (1 or 2); 0 when it is not asleep."""
        return self.sleep_level if self.phase is Phase.SLEEPING else 0

    @property
    def host_bytes(self) -> int:
        """Host RAM its sleep holds: its weights at level 1."""
        return self.weight_bytes if self.tier == 1 else 0

    @property
    def demand(self) -> int:
        """Its queue depth, once read after its last eviction ended: a depth read while it was
        still serving counts requests it has served (a wake takes milliseconds: such a stale
        depth woke a model just put to sleep)."""
        return self.queue_depth if self.queue_read_at > self.evicted_at else 0

    def learn(self, kind: str, seconds: float) -> None:
        """A load or wake took `seconds`: the estimate moves halfway to it (the first
        measurement replaces the configured guess)."""
        attr = "last_load_s" if kind == "load" else "last_wake_s"
        known = kind in self.measured
        setattr(self, attr, 0.5 * getattr(self, attr) + 0.5 * seconds if known else seconds)
        self.measured |= {kind}
        self.last_transition_s = seconds

    def ready_in(self, now: float) -> float:
        """Seconds until it could serve if asked now (inf: it cannot, for now)."""
        if self.phase is Phase.READY:
            return 0.0
        if not self.address or self.broken or (self.phase is Phase.FAILED and now < self.backoff_until):
            return math.inf
        if self.phase is Phase.LOADING:
            return max(0.0, self.op_started + self.op_estimate_s - now)
        return self.last_wake_s if self.phase is Phase.SLEEPING else self.last_load_s

    @property
    def queue_s(self) -> float:
        """Seconds a request sent now would wait, once its model serves, for those queued ahead
        of it (and, when it is READY, those it runs): a round of max_num_seqs requests takes the
        learned request time, and a request gets a slot in round `ahead // max_num_seqs` (the
        requests a load releases start together). 0 while a slot is free, or while the request
        time is unknown."""
        ahead = self.queue_depth + (self.in_flight if self.phase is Phase.READY else 0)
        return (ahead // max(1, self.spec.max_num_seqs)) * self.request_s

    def comeback_s(self, now: float) -> float:
        """What bringing it (back) would cost: a wake where it sleeps or would sleep when
        evicted, else a load; what is left of one under way."""
        if self.phase in (Phase.READY, Phase.EVICTING):
            return self.last_wake_s if self.can_sleep else self.last_load_s
        return self.ready_in(now)

    def event(self, now: float) -> manager_pb2.ModelEvent:
        estimate = self.op_estimate_s if self.phase is Phase.LOADING else 0.0
        queue_s = self.queue_s
        return manager_pb2.ModelEvent(model=self.spec.name, state=STATE_OF[self.phase], error=self.error,
                                      estimate_s=estimate, ready_in_s=self.ready_in(now) + queue_s, queue_s=queue_s)

    def touch(self, now: float) -> None:
        """One request for this model was seen."""
        self.frequency = self.decayed_frequency(now) + 1.0
        self.frequency_at = self.last_used = now

    def decayed_frequency(self, now: float) -> float:
        return self.frequency * 0.5 ** (max(0.0, now - self.frequency_at) / FREQUENCY_HALF_LIFE_S)

    def set_queue(self, queue: jetstream.Depth, now: float) -> bool:
        """`queue`: its consumers' num_pending and num_ack_pending, per priority class, as just read.

        A worker pulls only while its engine is READY, so a message handed out and not acked
        while the model is not resident belongs to nobody: one a dead worker took (redelivered
        after ack_wait) or one handed back while it was being evicted (redelivered after a delay).
        JetStream counts those in num_ack_pending, not num_pending, yet they are demand: without
        them a request that met a dying or evicting worker never got its model loaded again and
        waited for its deadline. (`queue_depth` and `top_lane` are what was read, judged by the
        phase at that moment.)"""
        self.queue_read_at = now
        unattended = self.phase in (Phase.UNLOADED, Phase.FAILED)   # not SLEEPING: its worker lives
        depth = queue.total + (queue.ack_pending if unattended else 0)
        changed = depth != self.queue_depth
        self.queue_depth = depth
        self.top_lane = queue.top(handed_out=unattended)
        self.lanes = queue
        self.in_flight = max(queue.ack_pending, self.reported_in_flight)
        if depth == 0:
            self.waiting_since = None
        elif self.waiting_since is None:
            self.waiting_since = now
        return changed

    def worker_gone(self, error: str) -> None:
        """Its worker died or went silent: unloaded, with no worker until one reports again."""
        self.address = self.worker_id = ""
        self.reported_in_flight = 0
        self.phase, self.error = Phase.UNLOADED, error

    def engine_died(self, error: str, now: float, backoff_s: float) -> None:
        """Its engine died while READY (its worker lives and says why): unloaded, and loaded
        again on demand after a backoff that doubles with each death close to the last one, so
        an engine that keeps dying is not restarted in a loop."""
        if now - self.resident_since > DEATHS_FORGOTTEN_S:
            self.deaths = 0
        self.deaths += 1
        self.phase, self.error = Phase.UNLOADED, error
        self.backoff_until = now + min(BACKOFF_MAX_S, backoff_s * 2 ** (self.deaths - 1))

    def failed(self, reason: str, now: float, backoff_s: float) -> None:
        self.phase, self.error = Phase.FAILED, reason
        self.failures += 1
        self.backoff_until = now + min(BACKOFF_MAX_S, backoff_s * 2 ** (self.failures - 1))

    def view(self, now: float) -> ModelView:
        return ModelView(
            name=self.spec.name,
            gpu=self.spec.gpu,
            footprint=self.footprint,
            phase=self.phase,
            has_worker=bool(self.address),
            queue_depth=max(self.demand, 1 if self.requested else 0),
            lane=self.top_lane,
            in_flight=self.in_flight,
            waiting_since=self.waiting_since if self.waiting_since is not None else (now if self.requested else None),
            pinned=self.pinned,
            priority=self.spec.priority,
            last_used=self.last_used,
            frequency=self.decayed_frequency(now),
            resident_since=self.resident_since,
            min_resident_s=self.spec.min_resident_s,
            backoff_until=self.backoff_until,
            draining=self.draining,
            broken=self.broken,
            can_sleep=self.can_sleep,
            sleep_level=self.tier,
            residue=self.overhead_bytes,
            weight_bytes=self.weight_bytes,
            counting=self.reading is not None,
            swap_s=self.comeback_s(now),
        )

    def residency(self) -> manager_pb2.ModelResidency:
        return manager_pb2.ModelResidency(
            model=self.spec.name, state=STATE_OF[self.phase], worker_id=self.worker_id, gpu=self.spec.gpu,
            footprint_bytes=self.footprint, queue_depth=self.queue_depth, in_flight=self.in_flight,
            last_used_unix=self.last_used, loads=self.loads, evictions=self.evictions, pinned=self.pinned,
            priority=self.spec.priority, error=self.error or self.broken, backoff_until_unix=self.backoff_until,
            draining=self.draining, sleep_level=self.tier,
            wakes=self.wakes, last_transition_s=self.last_transition_s, host_bytes=self.host_bytes,
            sleep_frees_memory=self.worker_can_sleep,
        )
