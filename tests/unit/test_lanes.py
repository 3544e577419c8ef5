"""worker_svc.lanes: which priority class a free slot takes from.

`sweep` is pure (Hypothesis checks its promises); `Lanes` runs here against lanes that model
JetStream's pull requests (no-wait and lingering) and a worker that only counts slots: the loop
under test is real, the queues are not (the integration test test_tenancy runs it on nats-server).
"""
from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker_svc import lanes
from worker_svc.residency import State

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]

HIGH, NORMAL, LOW = range(3)


@given(picks=st.integers(0, 10_000), ago=st.lists(st.integers(0, 10_000), min_size=1, max_size=5),
       owed_after=st.integers(1, 50))
def test_sweep_tries_every_lane_highest_first_after_the_owed_ones(picks, ago, owed_after):
    tried_at = [max(0, picks - a) for a in ago]
    order = lanes.sweep(picks, tried_at, owed_after)
    owed = [(i, most) for i, most in order if most is not None]
    assert [i for i, most in order if most is None] == list(range(len(tried_at))), "then every lane, highest first"
    assert order[:len(owed)] == owed, "owed lanes come first"
    assert {i for i, _ in owed} == {i for i in range(1, len(tried_at)) if picks - tried_at[i] >= owed_after}
    assert all(most == 1 for _, most in owed), "an owed lane gets one request, then its class's place"
    assert [tried_at[i] for i, _ in owed] == sorted(tried_at[i] for i, _ in owed), "the longest untried first"


class FakeMsg:
    def __init__(self, name: str):
        self.name = name
        self.progress = 0

    async def in_progress(self):
        self.progress += 1

    def __repr__(self):
        return self.name


class FakeLane:
    """A durable pull consumer as Lanes sees it: a request for up to `batch` messages gets those
    stored now, then (no_wait) an end, or (lingering) later arrivals until filled or expired."""

    def __init__(self):
        self.stored: collections.deque = collections.deque()
        self.out: asyncio.Queue = asyncio.Queue()
        self.lingering = 0

    async def start(self):
        pass

    async def close(self):
        pass

    async def request(self, batch: int, no_wait: bool = False) -> None:
        assert not self.lingering, "one pull request at a time per lane"
        while self.stored and batch:
            self.out.put_nowait(self.stored.popleft())
            batch -= 1
        if batch and no_wait:
            self.out.put_nowait(None)
        elif batch:
            self.lingering = batch

    def push(self, msg: FakeMsg) -> None:
        if self.lingering:
            self.lingering -= 1
            self.out.put_nowait(msg)
        else:
            self.stored.append(msg)

    def expire(self) -> None:
        if self.lingering:
            self.lingering = 0
            self.out.put_nowait(None)

    async def next(self):
        return await self.out.get()


class FakeResidency:
    def __init__(self):
        self.state = State.READY
        self._ready = asyncio.Event()
        self._ready.set()

    def set(self, state: State) -> None:
        self.state = state
        (self._ready.set if state is State.READY else self._ready.clear)()

    async def ready(self):
        await self._ready.wait()


class SlotWorker:
    """Slots and nothing else: what Lanes asks of a ModelWorker."""

    def __init__(self, slots: int):
        self.slots = slots
        self.running: list[FakeMsg] = []
        self.started: list[str] = []
        self.handed_back: list[str] = []
        self.residency = FakeResidency()
        self._freed = asyncio.Event()

    def slots_now(self) -> int:
        return max(0, self.slots - len(self.running))

    async def wait_for_slot(self) -> int:
        while self.slots_now() <= 0:
            self._freed.clear()
            await self._freed.wait()
        return self.slots_now()

    def start(self, msg: FakeMsg) -> None:
        self.running.append(msg)
        self.started.append(msg.name)

    async def hand_back(self, msg: FakeMsg) -> None:
        self.handed_back.append(msg.name)

    def finish_all(self) -> None:
        self.running.clear()
        self._freed.set()


async def until(cond: Callable[[], bool], what: str) -> None:
    """Lets the loop under test run until `cond` holds (bounded: the test's timeout)."""
    while not cond():
        await asyncio.sleep(0.001)  # yields to the loop under test; the condition is what is awaited
    assert cond(), what


class Running:
    def __init__(self, slots: int, owed_after: int = lanes.OWED_AFTER):
        self.worker = SlotWorker(slots)
        self.lanes = [FakeLane(), FakeLane(), FakeLane()]
        self.loop = lanes.Lanes(self.worker, self.lanes, owed_after)  # type: ignore[arg-type]
        self.task: asyncio.Task | None = None

    async def __aenter__(self):
        self.task = asyncio.create_task(self.loop.run())
        return self

    async def __aexit__(self, *exc):
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)

    async def idle(self) -> None:
        """Every lane empty and lingering: the loop waits for an arrival."""
        await until(lambda: all(lane.lingering for lane in self.lanes), "every lane has a lingering pull")

    def push(self, lane: int, name: str) -> None:
        self.lanes[lane].push(FakeMsg(name))


async def test_a_freed_slot_takes_the_highest_class_before_earlier_lower_ones():
    async with Running(slots=1) as r:
        await r.idle()
        r.push(LOW, "blocker")
        await until(lambda: r.worker.started == ["blocker"], "an arrival in any class starts at once")
        for name in ("low-1", "low-2", "low-3"):
            r.push(LOW, name)
        r.push(NORMAL, "normal-1")   # its lane still lingers: held, not pushed into the full engine
        r.push(HIGH, "high-1")
        await until(lambda: len(r.loop.held) == 2, "arrivals beyond the free slots are held")
        assert r.worker.started == ["blocker"]
        for _ in range(5):
            n = len(r.worker.started)
            r.worker.finish_all()
            await until(lambda: len(r.worker.started) == n + 1, "a freed slot takes one request")
        assert r.worker.started == ["blocker", "high-1", "normal-1", "low-1", "low-2", "low-3"]


async def test_a_lower_class_is_never_starved():
    owed_after = 4
    async with Running(slots=1, owed_after=owed_after) as r:
        for i in range(40):
            r.push(HIGH, f"high-{i}")
        for i in range(5):
            r.push(LOW, f"low-{i}")
        for k in range(30):
            await until(lambda: len(r.worker.started) == k + 1, "a freed slot takes one request")
            r.worker.finish_all()
        started = r.worker.started[:30]
    gaps = [i for i, name in enumerate(started) if name.startswith("low")]
    assert gaps, started
    assert all(b - a <= owed_after + 1 for a, b in zip([-1, *gaps], gaps)), f"a low request every {owed_after + 1}: {started}"
    assert sum(name.startswith("high") for name in started) >= 30 - 30 // owed_after, "high keeps most of the slots"
    assert [n for n in started if n.startswith("low")] == sorted(n for n in started if n.startswith("low")), "FIFO within a class"


async def test_a_burst_fills_every_free_slot_highest_first():
    async with Running(slots=4) as r:
        await r.idle()
        r.worker.slots = 0                       # full while the burst queues
        r.push(LOW, "low-0")
        await until(lambda: LOW in r.loop.held, "held")
        for i in range(3):
            r.push(LOW, f"low-{i + 1}")
            r.push(HIGH, f"high-{i}")
        r.worker.slots = 4
        r.worker.finish_all()
        await until(lambda: len(r.worker.started) == 4, "four slots, four starts")
        assert r.worker.started == ["high-0", "high-1", "high-2", "low-0"]


async def test_what_is_held_when_the_engine_stops_serving_is_handed_back_and_heartbeated_before():
    async with Running(slots=1) as r:
        await r.idle()
        r.push(NORMAL, "running")
        await until(lambda: r.worker.started == ["running"], "started")
        r.push(HIGH, "held")
        await until(lambda: HIGH in r.loop.held, "held")
        held = r.loop.held[HIGH]
        await r.loop.heartbeat()
        assert held.progress == 1, "a held message is heartbeated like one in flight"
        r.worker.residency.set(State.EVICTING)
        r.lanes[LOW].expire()                    # the loop wakes (as it does when a pull ends)
        await until(lambda: r.worker.handed_back == ["held"], "handed back, not kept through an eviction")
        assert not r.loop.held and r.worker.started == ["running"]
        r.worker.residency.set(State.READY)


async def test_cancelled_it_hands_back_what_it_holds():
    r = Running(slots=1)
    async with r:
        await r.idle()
        r.push(LOW, "a")
        await until(lambda: r.worker.started == ["a"], "started")
        r.push(NORMAL, "b")
        await until(lambda: NORMAL in r.loop.held, "held")
    assert r.worker.handed_back == ["b"]
