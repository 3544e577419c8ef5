"""Which model to load next and what to evict for it: pure functions of the manager's view.

Pure decision; no I/O, no logging, no clock (the caller passes `now`). The manager's loop
applies the result and waits for the workers' reports before deciding again.

Rules, per GPU:
  - one transition at a time: while a model loads or is evicted, nothing else starts;
  - a model with waiting requests and no engine is loaded: the one whose waiting requests
    include the highest tenant class first (high, normal, low: roundhouse.tenancy), then the
    highest model priority, then the one waiting longest; it shares the budget with what is resident (weights + KV + overhead);
  - to make room, evict only models that are: not pinned, past their minimum resident time
    (or four of their own loads or wakes, if shorter), not of a higher priority than the one
    loading, and idle (no requests in flight or queued, none just announced). Among those,
    lowest priority first, then least frequently, then least recently used. If idle ones
    cannot make room, a busy one is drained only once the waiting model has waited
    `starvation_s`, or four of its own loads or wakes if that is shorter (so alternating
    traffic is grouped, not swapped on every request);
  - if nothing can make room, nothing is evicted (never evict for nothing);
  - a model larger than its whole budget, or whose files cannot load, fails at once with the
    reason, before anything is evicted for it.

Sleep tiers (a GPU whose `swap` lets its engines sleep): an evicted model goes to sleep rather
than stopping. Level 1 (weights to host RAM, the fastest wake) while its host's sleep budget
has room for its weights, else level 2 (weights discarded, process and compiled graphs kept).
A sleeping engine keeps `residue` bytes of its GPU (its context); when room is still short,
sleeping engines are stopped too, those used least first. A sleeping model with waiting
requests is woken by a Load like any other.
"""
from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping, Sequence


class Phase(enum.Enum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    READY = "ready"
    EVICTING = "evicting"
    FAILED = "failed"
    SLEEPING = "sleeping"


@dataclasses.dataclass(frozen=True)
class ModelView:
    name: str
    gpu: str
    footprint: int
    phase: Phase
    has_worker: bool = True
    queue_depth: int = 0
    lane: int = 1                          # the highest priority class waiting (0 high, 1 normal, 2 low)
    in_flight: int = 0
    waiting_since: float | None = None     # when its oldest queued request was first seen
    pinned: bool = False
    priority: int = 0
    last_used: float = 0.0
    frequency: float = 0.0                 # decayed request rate
    resident_since: float = 0.0
    min_resident_s: float = 0.0
    backoff_until: float = 0.0
    draining: bool = False                 # an operator asked it to stop taking work
    broken: str = ""                       # why it can never load (checked before anything is evicted)
    can_sleep: bool = False                # its engine may be put to sleep when evicted
    sleep_level: int = 0                   # SLEEPING: 1 (weights in host RAM) or 2 (discarded)
    residue: int = 0                       # GPU bytes its engine keeps while sleeping
    weight_bytes: int = 0                  # host RAM a level-1 sleep takes
    swap_s: float = math.inf               # its expected load, or wake where it can sleep (learned;
                                           # inf: not known): what bringing it (back) costs
    counting: bool = False                 # a request event came and its queue is being read:
                                           # not idle yet (its requests may not be counted, and
                                           # it must not be evicted for a model asked for with it)


@dataclasses.dataclass(frozen=True)
class Load:
    model: str


@dataclasses.dataclass(frozen=True)
class Evict:
    model: str
    level: int = 0        # 0: stop its engine; 1 / 2: put it to sleep at that level


@dataclasses.dataclass(frozen=True)
class Fail:
    model: str
    reason: str


Action = Load | Evict | Fail

_BUSY = (Phase.LOADING, Phase.EVICTING)
RESIDENT = (Phase.LOADING, Phase.READY, Phase.EVICTING)   # phases that hold GPU memory


def used_bytes(models: Sequence[ModelView], gpu: str) -> int:
    """What the models loading, ready, being evicted or asleep on `gpu` take of its budget."""
    return sum(_held(m) for m in models if m.gpu == gpu)


def _held(m: ModelView) -> int:
    if m.phase in RESIDENT:
        return m.footprint
    return m.residue if m.phase is Phase.SLEEPING else 0


def sleep_level_for(m: ModelView, host_free: int) -> int:
    """How `m` is evicted: 1 while its weights fit what its host lends to sleepers, else 2;
    0 (stopped) when its engine cannot sleep."""
    if not m.can_sleep:
        return 0
    return 1 if m.weight_bytes <= host_free else 2


def wants_load(m: ModelView, now: float) -> bool:
    return (
        m.has_worker
        and m.phase in (Phase.UNLOADED, Phase.FAILED, Phase.SLEEPING)
        and m.queue_depth > 0
        and not m.draining
        and now >= m.backoff_until
    )


def plan(models: Sequence[ModelView], budgets: Mapping[str, int], now: float, starvation_s: float = 30.0,
         host_free: Mapping[str, int] | None = None) -> list[Action]:
    """`host_free`: per GPU, the bytes its host still lends to level-1 sleepers (GPUs of one
    host share one figure; absent: none)."""
    host_free = dict(host_free or {})
    actions: list[Action] = []
    for gpu, budget in budgets.items():
        on_gpu = [m for m in models if m.gpu == gpu]
        if any(m.phase in _BUSY for m in on_gpu):
            continue  # one load or eviction at a time per GPU
        waiting = sorted(
            (m for m in on_gpu if wants_load(m, now)),
            key=lambda m: (m.lane, -m.priority, m.waiting_since if m.waiting_since is not None else now, m.name),
        )
        if not waiting:
            continue
        target = waiting[0]
        if target.broken:
            actions.append(Fail(target.name, target.broken))
            continue
        if target.footprint > budget:
            actions.append(Fail(target.name, f"needs {_mib(target.footprint)} but the budget of {gpu} is {_mib(budget)}"))
            continue
        used = used_bytes(on_gpu, gpu)
        more = target.footprint - _held(target)   # a sleeper's residue is on the GPU already
        if used + more <= budget:
            actions.append(Load(target.name))
            continue
        starving = target.waiting_since is not None and now - target.waiting_since >= starving_after(target, starvation_s)
        actions.extend(evictions_for(target, on_gpu, used + more - budget, now, host_free.get(gpu, 0), allow_busy=starving))
    return actions


STARVATION_SWAPS = 4.0   # a waiter may drain busy models after this many of its own swaps


def starving_after(target: ModelView, starvation_s: float) -> float:
    """How long `target` waits before busy models may be drained for it: `starvation_s`, or
    STARVATION_SWAPS of its own load or wake if that is shorter. A wait of 30 s before a 1 s
    wake is 30 s lost to every request that cannot be served by the resident models (found
    with manager_svc.simulator: on the GPU profile no request for a cold model met a 20 s
    objective); on CPU, where a reload takes ~14 s, the configured figure still rules."""
    return min(starvation_s, STARVATION_SWAPS * target.swap_s)


def evictions_for(target: ModelView, on_gpu: Sequence[ModelView], need: int, now: float, host_free: int,
                  allow_busy: bool = False) -> list[Evict]:
    """The evictions (each with its sleep level) that free `need` more bytes; [] when none do.
    Ready models first, each to sleep where it can (a ready model that sleeps frees its
    footprint less its residue), then sleeping ones stopped (each frees its residue)."""
    def evictable(m: ModelView) -> bool:
        return (
            m.phase is Phase.READY
            and m.name != target.name
            and not m.pinned
            and m.priority <= target.priority
            and settled(m)
        )

    def settled(m: ModelView) -> bool:
        # min_resident_s, or STARVATION_SWAPS of its own reloads if that is shorter: a model
        # that wakes in a second needs no 30 s of protection from eviction after its load.
        return now - m.resident_since >= min(m.min_resident_s, STARVATION_SWAPS * m.swap_s)

    def idle(m: ModelView) -> bool:
        return m.in_flight == 0 and m.queue_depth == 0 and not m.counting

    order = lambda m: (m.priority, m.frequency, m.last_used, m.name)  # noqa: E731
    candidates = sorted((m for m in on_gpu if evictable(m) and idle(m)), key=order)
    if allow_busy:
        candidates += sorted((m for m in on_gpu if evictable(m) and not idle(m)), key=lambda m: (m.queue_depth, *order(m)))
    sleepers = sorted((m for m in on_gpu if m.phase is Phase.SLEEPING and m.name != target.name and m.residue > 0),
                      key=lambda m: (m.last_used, m.name))
    chosen: list[Evict] = []
    freed = 0
    for m in [*candidates, *sleepers]:
        if freed >= need:
            break
        level = sleep_level_for(m, host_free) if m.phase is Phase.READY else 0
        if level == 1:
            host_free -= m.weight_bytes
        chosen.append(Evict(m.name, level))
        freed += m.footprint - (m.residue if level else 0) if m.phase is Phase.READY else m.residue
    return chosen if freed >= need else []


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"
