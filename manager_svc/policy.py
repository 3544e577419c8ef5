"""Which model to load next and what to evict for it: pure functions of the manager's view.

Pure decision; no I/O, no logging, no clock (the caller passes `now`). The manager's loop
applies the result and waits for the workers' reports before deciding again.

Rules, per GPU:
  - one transition at a time: while a model loads or is evicted, nothing else starts;
  - a model with waiting requests and no engine is loaded, highest priority first, then the one
    waiting longest; it shares the budget with what is resident (weights + KV + overhead);
  - to make room, evict only models that are: not pinned, past their minimum resident time, not
    of a higher priority than the one loading, and idle (no requests in flight or queued).
    Among those, lowest priority first, then least frequently, then least recently used.
    If idle ones cannot make room, a busy one is drained only once the waiting model has waited
    `starvation_s` (so alternating traffic is grouped, not swapped on every request);
  - if nothing can make room, nothing is evicted (never evict for nothing);
  - a model larger than its whole budget, or whose files cannot load, fails at once with the
    reason, before anything is evicted for it.
"""
from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence


class Phase(enum.Enum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    READY = "ready"
    EVICTING = "evicting"
    FAILED = "failed"


@dataclasses.dataclass(frozen=True)
class ModelView:
    name: str
    gpu: str
    footprint: int
    phase: Phase
    has_worker: bool = True
    queue_depth: int = 0
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


@dataclasses.dataclass(frozen=True)
class Load:
    model: str


@dataclasses.dataclass(frozen=True)
class Evict:
    model: str


@dataclasses.dataclass(frozen=True)
class Fail:
    model: str
    reason: str


Action = Load | Evict | Fail

_BUSY = (Phase.LOADING, Phase.EVICTING)
_RESIDENT = (Phase.LOADING, Phase.READY, Phase.EVICTING)


def used_bytes(models: Sequence[ModelView], gpu: str) -> int:
    """What the models loading, ready or being evicted on `gpu` take of its budget."""
    return sum(m.footprint for m in models if m.gpu == gpu and m.phase in _RESIDENT)


def wants_load(m: ModelView, now: float) -> bool:
    return (
        m.has_worker
        and m.phase in (Phase.UNLOADED, Phase.FAILED)
        and m.queue_depth > 0
        and not m.draining
        and now >= m.backoff_until
    )


def plan(models: Sequence[ModelView], budgets: Mapping[str, int], now: float, starvation_s: float = 30.0) -> list[Action]:
    actions: list[Action] = []
    for gpu, budget in budgets.items():
        on_gpu = [m for m in models if m.gpu == gpu]
        if any(m.phase in _BUSY for m in on_gpu):
            continue  # one load or eviction at a time per GPU
        waiting = sorted(
            (m for m in on_gpu if wants_load(m, now)),
            key=lambda m: (-m.priority, m.waiting_since if m.waiting_since is not None else now, m.name),
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
        if used + target.footprint <= budget:
            actions.append(Load(target.name))
            continue
        starving = target.waiting_since is not None and now - target.waiting_since >= starvation_s
        victims = eviction_for(target, on_gpu, used + target.footprint - budget, now, allow_busy=starving)
        actions.extend(Evict(v) for v in victims)
    return actions


def eviction_for(target: ModelView, on_gpu: Sequence[ModelView], need: int, now: float, allow_busy: bool = False) -> list[str]:
    """The models to evict so that `need` more bytes are free; [] when no choice frees enough."""
    def evictable(m: ModelView) -> bool:
        return (
            m.phase is Phase.READY
            and m.name != target.name
            and not m.pinned
            and m.priority <= target.priority
            and now - m.resident_since >= m.min_resident_s
        )

    def idle(m: ModelView) -> bool:
        return m.in_flight == 0 and m.queue_depth == 0

    order = lambda m: (m.priority, m.frequency, m.last_used, m.name)  # noqa: E731
    candidates = sorted((m for m in on_gpu if evictable(m) and idle(m)), key=order)
    if allow_busy:
        candidates += sorted((m for m in on_gpu if evictable(m) and not idle(m)), key=lambda m: (m.queue_depth, *order(m)))
    chosen, freed = [], 0
    for m in candidates:
        if freed >= need:
            break
        chosen.append(m.name)
        freed += m.footprint
    return chosen if freed >= need else []


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"
