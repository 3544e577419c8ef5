"""A discrete-event simulator of one GPU's residency: the real `policy.plan` on a virtual clock.

No I/O, no wall clock, no randomness (traces come from `manager_svc.sim_traces`, seeded). It
replays a trace of requests against a policy function with `plan`'s signature, applies the
actions the way `manager.Manager` does, and records when every request ended.

The model of the system (one GPU "gpu" with a byte budget; each model a fixed footprint):
  - requests wait in their model's queue (FIFO) until its engine is READY and has a free slot;
    a READY engine serves up to `max_num_seqs` requests at once, each for its own service time,
    whatever runs beside it (continuous batching hides the batch size up to `max_num_seqs`);
  - the policy is consulted as the manager's decide loop does: after every event (arrival, end
    of a request, end of a load or an eviction) and every `tick_s` (its queue_poll_s), with the
    views `state.Entry.view` builds: frequency decayed with `state.FREQUENCY_HALF_LIFE_S` (one
    touch per arrival, as the routers' request events do), last_used = the last arrival,
    waiting_since = when its queue last became non-empty (for a model not resident, the
    arrival of its oldest request, unless a drain put requests back), in_flight = requests running,
    queue_depth = requests waiting, resident_since = when its load ended, plus min_resident_s,
    priority and pinned from its `SimModel`;
  - actions are applied as `Manager._apply` does: Load -> LOADING for the load time -> READY;
    Evict -> EVICTING: the engine takes no more requests, those in flight finish (those still
    running after `drain_timeout_s` go back to the front of the queue and start over, as the
    worker's requeue does), then the eviction time -> UNLOADED; Fail -> the model's waiting
    requests end unserved. The policy itself keeps one transition per GPU at a time;
  - a load costs `cold_load_s` for a model never loaded and `warm_load_s` for one loaded before
    (a reload with warm compile caches on CPU; a wake from sleep on a GPU, where an eviction is
    a sleep): see `PROFILES`.

Simplifications, each a place where the real system is slower or noisier:
  - the manager sees queue depths at once (it polls them every 0.5 s);
  - the policy is only consulted while a model that is not resident has requests waiting and
    no transition is under way: otherwise `plan` has nothing to decide (it acts only for a
    model that `wants_load`), so skipping those calls changes nothing and saves time;
  - no worker deaths, failed loads or backoff; no prompt-dependent service times;
  - sleep tiers are modelled by their cost only: an evicted model frees its whole footprint
    (no residue) and its view says UNLOADED.
"""
from __future__ import annotations

import collections
import dataclasses
import heapq
import math
from collections.abc import Callable, Iterable, Mapping, Sequence

from manager_svc import policy as policy_module
from manager_svc.policy import RESIDENT, Action, Evict, Fail, Load, ModelView, Phase, wants_load
from manager_svc.state import FREQUENCY_HALF_LIFE_S

GPU = "gpu"
PlanFn = Callable[[Sequence[ModelView], Mapping[str, int], float, float], list[Action]]

_BUSY = (Phase.LOADING, Phase.EVICTING)


# ---- inputs ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SwapCosts:
    cold_load_s: float      # a model never loaded before
    warm_load_s: float      # a model loaded before: a reload (CPU) or a wake from sleep (GPU)
    evict_s: float          # stopping its engine, or putting it to sleep

    def load_s(self, loaded_before: bool) -> float:
        return self.warm_load_s if loaded_before else self.cold_load_s


@dataclasses.dataclass(frozen=True)
class SimModel:
    name: str
    footprint: int = 1
    max_num_seqs: int = 8
    priority: int = 0
    pinned: bool = False
    min_resident_s: float = 30.0     # the catalogue's default


@dataclasses.dataclass(frozen=True)
class Request:
    id: int
    model: str
    arrival: float
    service_s: float


@dataclasses.dataclass(frozen=True)
class SimConfig:
    models: tuple[SimModel, ...]
    budget: int
    costs: SwapCosts
    starvation_s: float = 30.0        # the catalogue's default (manager.starvation_s)
    drain_timeout_s: float = 30.0     # the catalogue's default (manager.drain_timeout_s)
    tick_s: float = 0.5               # the manager's queue_poll_s: it decides at least this often
    loaded_before: bool = True        # every model was loaded once before the trace (a gateway in its steady state)
    resident_at_start: tuple[str, ...] = ()   # READY at t=0 (e.g. a pinned model)
    give_up_s: float = 3600.0         # requests not served this long after the last arrival end unserved


@dataclasses.dataclass(frozen=True)
class Profile:
    """Swap costs and serving figures of one kind of machine, with the latency objective used on it."""
    name: str
    costs: SwapCosts
    service_s: float        # one request's time in its engine
    max_num_seqs: int
    slo_s: float            # a request meets the objective when arrival -> end <= slo_s
    note: str


PROFILES: dict[str, Profile] = {
    "cpu": Profile(
        "cpu", SwapCosts(cold_load_s=20.0, warm_load_s=6.5, evict_s=0.6), service_s=2.0, max_num_seqs=4, slo_s=60.0,
        note="measured on this CPU (vLLM CPU build, bench_swap): first load 20 s, reload 6.5 s, eviction 0.6 s; "
             "SLO 60 s = a request may wait for about three swaps"),
    "gpu": Profile(
        "gpu", SwapCosts(cold_load_s=48.0, warm_load_s=0.8, evict_s=1.0), service_s=4.0, max_num_seqs=32, slo_s=20.0,
        note="vLLM sleep mode (its blog post): cold load 48 s, sleep 1 s, wake from level 1 0.8 s; "
             "SLO 20 s = 4 s of service and 16 s of waiting"),
    "gpu-l2": Profile(
        "gpu-l2", SwapCosts(cold_load_s=48.0, warm_load_s=2.6, evict_s=1.0), service_s=4.0, max_num_seqs=32, slo_s=20.0,
        note="as gpu, but every sleep is level 2 (weights discarded): wake 2.6 s"),
}


def config_for(profile: Profile, n_models: int = 4, resident: int = 2, **kw) -> SimConfig:
    """`n_models` equal models named a, b, c, ... on one GPU whose budget holds `resident` of them."""
    models = tuple(SimModel(chr(ord("a") + i), max_num_seqs=profile.max_num_seqs) for i in range(n_models))
    return SimConfig(models=models, budget=resident, costs=profile.costs, **kw)


# ---- outputs -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Outcome:
    request: Request
    end: float
    served: bool            # False: its model failed, or it was given up
    starts: int             # times it started in an engine (more than 1: requeued by a drain)

    @property
    def latency(self) -> float:
        return self.end - self.request.arrival


@dataclasses.dataclass(frozen=True)
class Transition:
    time: float
    model: str
    kind: str               # "load" | "ready" | "evict" | "unloaded" | "fail"
    busy: bool = False      # "evict": it had requests running or queued


@dataclasses.dataclass(frozen=True)
class SimResult:
    outcomes: tuple[Outcome, ...]
    transitions: tuple[Transition, ...]
    clock: tuple[float, ...]        # the time of every event, in the order handled
    span_s: float                   # first arrival to the last end
    demand_s: float                 # time with requests waiting or running
    stalled_s: float                # of demand_s: time with none running (swapping, or waiting on a swap)

    def count(self, kind: str, model: str | None = None) -> int:
        return sum(1 for t in self.transitions if t.kind == kind and (model is None or t.model == model))


# ---- the simulator -------------------------------------------------------------------------------

_ARRIVAL, _DONE, _LOADED, _DRAIN_TIMEOUT, _EVICTED, _TICK = range(6)


@dataclasses.dataclass
class _Model:
    """One model's state as the manager and its worker see it."""
    spec: SimModel
    phase: Phase = Phase.UNLOADED
    queue: collections.deque[Request] = dataclasses.field(default_factory=collections.deque)
    running: dict[int, tuple[Request, float]] = dataclasses.field(default_factory=dict)
    starts: dict[int, int] = dataclasses.field(default_factory=dict)
    waiting_since: float | None = None   # when its queue last became non-empty (as state.Entry.set_queue)
    last_used: float = 0.0
    frequency: float = 0.0
    frequency_at: float = 0.0
    resident_since: float = 0.0
    loaded_before: bool = False
    epoch: int = 0                  # counts transitions: an event of an older one is stale
    unload_scheduled: bool = False

    def enqueue(self, requests: Sequence[Request], now: float, front: bool = False) -> None:
        if requests and not self.queue:
            self.waiting_since = now
        if front:
            self.queue.extendleft(reversed(requests))
        else:
            self.queue.extend(requests)

    def dequeue(self) -> Request:
        r = self.queue.popleft()
        if not self.queue:
            self.waiting_since = None
        return r

    def touch(self, now: float) -> None:
        self.frequency = self.decayed_frequency(now) + 1.0
        self.frequency_at = self.last_used = now

    def decayed_frequency(self, now: float) -> float:
        return self.frequency * 0.5 ** (max(0.0, now - self.frequency_at) / FREQUENCY_HALF_LIFE_S)

    def view(self, now: float) -> ModelView:
        return ModelView(
            name=self.spec.name, gpu=GPU, footprint=self.spec.footprint, phase=self.phase,
            queue_depth=len(self.queue), in_flight=len(self.running),
            waiting_since=self.waiting_since,
            pinned=self.spec.pinned, priority=self.spec.priority, last_used=self.last_used,
            frequency=self.decayed_frequency(now), resident_since=self.resident_since,
            min_resident_s=self.spec.min_resident_s,
        )


class _Sim:
    def __init__(self, config: SimConfig, policy: PlanFn):
        self.config = config
        self.policy = policy
        self.models = {s.name: _Model(s, loaded_before=config.loaded_before) for s in config.models}
        for name in config.resident_at_start:
            m = self.models[name]
            m.phase, m.loaded_before = Phase.READY, True
        self.now = 0.0
        self.events: list[tuple[float, int, int, str, object]] = []
        self.seq = 0
        self.tick_pending = False
        self.outcomes: dict[int, Outcome] = {}
        self.transitions: list[Transition] = []
        self.clock: list[float] = []
        self.demand_s = self.stalled_s = 0.0

    # events

    def push(self, at: float, kind: int, model: str, payload: object = None) -> None:
        self.seq += 1
        heapq.heappush(self.events, (at, self.seq, kind, model, payload))

    def run(self, trace: Sequence[Request]) -> SimResult:
        for r in trace:
            self.push(r.arrival, _ARRIVAL, r.model, r)
        first = min((r.arrival for r in trace), default=0.0)
        self.now = first
        give_up = max((r.arrival for r in trace), default=0.0) + self.config.give_up_s
        while self.events and self.events[0][0] <= give_up:
            at = self.events[0][0]
            self.advance(at)
            touched: set[str] = set()
            while self.events and self.events[0][0] == at:
                _, _, kind, model, payload = heapq.heappop(self.events)
                self.clock.append(at)
                self.handle(kind, self.models[model] if model else None, payload)
                touched.add(model)
            for name in touched:
                if name:
                    self.pull(self.models[name])
            self.decide()
        self.advance(max(self.now, give_up) if self.unfinished() else self.now)
        self.give_up_rest()
        last = max((o.end for o in self.outcomes.values()), default=first)
        return SimResult(
            outcomes=tuple(self.outcomes[r.id] for r in trace), transitions=tuple(self.transitions),
            clock=tuple(self.clock), span_s=last - first, demand_s=self.demand_s, stalled_s=self.stalled_s,
        )

    def advance(self, at: float) -> None:
        if at < self.now:
            raise AssertionError(f"the virtual clock went back from {self.now} to {at}")
        dt, self.now = at - self.now, at
        if any(m.queue or m.running for m in self.models.values()):
            self.demand_s += dt
            if not any(m.running for m in self.models.values()):
                self.stalled_s += dt

    def handle(self, kind: int, m: _Model | None, payload: object) -> None:
        if kind == _ARRIVAL:
            self.arrive(m, payload)
        elif kind == _DONE:
            self.done(m, payload)
        elif kind == _LOADED and payload == m.epoch:
            m.phase, m.resident_since, m.loaded_before = Phase.READY, self.now, True
            self.note(m, "ready")
        elif kind == _DRAIN_TIMEOUT and payload == m.epoch and m.phase is Phase.EVICTING:
            self.requeue_running(m)
            self.schedule_unload(m)
        elif kind == _EVICTED and payload == m.epoch:
            m.phase = Phase.UNLOADED
            self.note(m, "unloaded")
        elif kind == _TICK:
            self.tick_pending = False

    def arrive(self, m: _Model, r: Request) -> None:
        m.touch(self.now)
        m.starts[r.id] = 0
        m.enqueue([r], self.now)

    def done(self, m: _Model, payload: tuple[int, float]) -> None:
        rid, started = payload
        if m.running.get(rid, (None, None))[1] != started:
            return  # it was requeued by a drain: this run of it did not finish
        r, _ = m.running.pop(rid)
        self.end(r, served=True, starts=m.starts.pop(rid))
        if m.phase is Phase.EVICTING and not m.running:
            self.schedule_unload(m)

    def end(self, r: Request, served: bool, starts: int) -> None:
        if r.id in self.outcomes:
            raise AssertionError(f"request {r.id} ended twice")
        self.outcomes[r.id] = Outcome(r, self.now, served, starts)

    def pull(self, m: _Model) -> None:
        """A READY engine takes waiting requests while it has free slots (the worker's pull loop)."""
        while m.phase is Phase.READY and m.queue and len(m.running) < m.spec.max_num_seqs:
            r = m.dequeue()
            m.running[r.id] = (r, self.now)
            m.starts[r.id] += 1
            self.push(self.now + r.service_s, _DONE, m.spec.name, (r.id, self.now))

    # decisions

    def decide(self) -> None:
        if not self.may_act():
            return
        views = [dataclasses.replace(m.view(self.now), swap_s=self.config.costs.load_s(m.loaded_before))
                 for m in self.models.values()]
        for action in self.policy(views, {GPU: self.config.budget}, self.now, self.config.starvation_s):
            self.apply(action)
        if self.may_act() and not self.tick_pending:
            self.tick_pending = True
            self.push(self.now + self.config.tick_s, _TICK, "")

    def may_act(self) -> bool:
        """Whether `plan` could act now: some model not resident has requests waiting and no
        transition is under way (see the module's docstring)."""
        ms = self.models.values()
        return not any(m.phase in _BUSY for m in ms) and any(
            m.queue and m.phase in (Phase.UNLOADED, Phase.FAILED) for m in ms)

    def apply(self, action: Action) -> None:
        m = self.models[action.model]
        if isinstance(action, Fail):
            m.phase = Phase.FAILED
            self.note(m, "fail")
            while m.queue:
                r = m.dequeue()
                self.end(r, served=False, starts=m.starts.pop(r.id))
        elif isinstance(action, Load) and m.phase in (Phase.UNLOADED, Phase.FAILED):
            m.phase, m.epoch = Phase.LOADING, m.epoch + 1
            self.note(m, "load")
            self.push(self.now + self.config.costs.load_s(m.loaded_before), _LOADED, m.spec.name, m.epoch)
        elif isinstance(action, Evict) and m.phase is Phase.READY:
            if m.spec.pinned:
                raise AssertionError(f"the policy evicted pinned model {m.spec.name}")
            busy = bool(m.running or m.queue)
            m.phase, m.epoch, m.unload_scheduled = Phase.EVICTING, m.epoch + 1, False
            self.note(m, "evict", busy)
            if m.running:
                self.push(self.now + self.config.drain_timeout_s, _DRAIN_TIMEOUT, m.spec.name, m.epoch)
            else:
                self.schedule_unload(m)

    def schedule_unload(self, m: _Model) -> None:
        if not m.unload_scheduled:
            m.unload_scheduled = True
            self.push(self.now + self.config.costs.evict_s, _EVICTED, m.spec.name, m.epoch)

    def requeue_running(self, m: _Model) -> None:
        """Past the drain timeout, what still runs goes back to the front of its queue."""
        back = sorted((r for r, _ in m.running.values()), key=lambda r: (r.arrival, r.id))
        m.running.clear()
        m.enqueue(back, self.now, front=True)

    def note(self, m: _Model, kind: str, busy: bool = False) -> None:
        self.transitions.append(Transition(self.now, m.spec.name, kind, busy))

    # the end

    def unfinished(self) -> bool:
        return any(m.queue or m.running for m in self.models.values())

    def give_up_rest(self) -> None:
        for m in self.models.values():
            for r in [*m.queue, *(r for r, _ in m.running.values())]:
                self.end(r, served=False, starts=m.starts.pop(r.id))
            m.queue.clear()
            m.running.clear()


def simulate(trace: Sequence[Request], config: SimConfig, policy: PlanFn | None = None) -> SimResult:
    """Replays `trace` under `policy` (default: the manager's `policy.plan`, looked up at call time)."""
    return _Sim(config, policy or policy_module.plan).run(trace)


# ---- the baseline: LRU on demand -----------------------------------------------------------------


def lru_plan(models: Sequence[ModelView], budgets: Mapping[str, int], now: float, starvation_s: float = 30.0) -> list[Action]:
    """The seeds' policy behind `plan`'s signature: load what is waiting, oldest request first;
    if it does not fit, evict the least recently used resident models at once, busy or not, with
    no minimum resident time, no priority and no grouping. Pinned models stay (an operator's
    order), and one transition per GPU at a time (the machine's limit, not a policy)."""
    actions: list[Action] = []
    for gpu, budget in budgets.items():
        on_gpu = [m for m in models if m.gpu == gpu]
        if any(m.phase in _BUSY for m in on_gpu):
            continue
        waiting = sorted((m for m in on_gpu if wants_load(m, now)),
                         key=lambda m: (m.waiting_since if m.waiting_since is not None else now, m.name))
        if not waiting:
            continue
        target = waiting[0]
        if target.footprint > budget:
            actions.append(Fail(target.name, "larger than its budget"))
            continue
        need = sum(m.footprint for m in on_gpu if m.phase in RESIDENT) + target.footprint - budget
        if need <= 0:
            actions.append(Load(target.name))
            continue
        victims, freed = [], 0
        resident = [m for m in on_gpu if m.phase is Phase.READY and not m.pinned]
        for m in sorted(resident, key=lambda m: (m.last_used, m.name)):
            if freed >= need:
                break
            victims.append(m.name)
            freed += m.footprint
        if freed >= need:
            actions.extend(Evict(v) for v in victims)
    return actions


# ---- metrics -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Metrics:
    requests: int
    met: float              # fraction of requests that ended served within the SLO
    swaps_per_hour: float   # evictions per hour of the run's span
    idle_pct: float         # of the time requests were waiting or running, the share with none running

    def row(self) -> str:
        return f"met {self.met:6.1%}  swaps/h {self.swaps_per_hour:7.1f}  idle {self.idle_pct:5.1f}%"


def metrics(result: SimResult, slo_s: float) -> Metrics:
    n = len(result.outcomes)
    met = sum(1 for o in result.outcomes if o.served and o.latency <= slo_s)
    hours = result.span_s / 3600.0
    return Metrics(
        requests=n,
        met=met / n if n else 1.0,
        swaps_per_hour=result.count("evict") / hours if hours > 0 else 0.0,
        idle_pct=100.0 * result.stalled_s / result.demand_s if result.demand_s > 0 else 0.0,
    )


def sustainable_rate(met_at: Callable[[float], float], start: float, target: float = 0.9,
                     ceiling: float = 1024.0, steps: int = 6) -> float:
    """The highest rate at which `met_at(rate)` (the fraction meeting the objective) is >= `target`:
    doubling from `start` until it fails, then `steps` bisections (geometric) between the last
    rate that passed and the first that failed. 0.0 when `start` already fails."""
    good, bad = 0.0, start
    while bad <= ceiling and met_at(bad) >= target:
        good, bad = bad, bad * 2
    if good == 0.0 or bad > ceiling:
        return good
    for _ in range(steps):
        mid = math.sqrt(good * bad)
        if met_at(mid) >= target:
            good = mid
        else:
            bad = mid
    return good


def requests_of(pairs: Iterable[tuple[float, str]], service_s: float) -> list[Request]:
    """Requests from (arrival, model) pairs, in arrival order, ids from 0."""
    return [Request(i, model, at, service_s) for i, (at, model) in enumerate(sorted(pairs))]
