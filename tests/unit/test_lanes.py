"""worker_svc.lanes: which priority class a free slot takes from.

`sweep` is pure (Hypothesis checks its promises); `Lanes` runs here against lanes that model
JetStream's pull requests (no-wait and lingering) and a worker that only counts slots: the loop
under test is real, the queues are not (the integration test test_tenancy runs it on nats-server).
"""
from __future__ import annotations

import asyncio
import collections
import json
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from roundhouse import jetstream, subjects
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
    def __init__(self, name: str, status: str = ""):
        self.name = name
        self.data = b"" if status else name.encode()
        self.reply = "" if status else f"$JS.ACK.{name}"
        self.headers = {"Status": status} if status else None
        self.progress = 0

    async def in_progress(self):
        self.progress += 1

    def __repr__(self):
        return self.name


class FakeConsumer:
    """One durable pull consumer as nats-server answers `$JS.API.CONSUMER.MSG.NEXT`: a request
    for up to `batch` gets what is stored now, then (no_wait) a 404 / 408, or (lingering) later
    arrivals until filled or `expire()`d. Replies go out on the next loop turn, as a network's do.
    `keep_no_wait`: a no-wait request that finds nothing gets no reply and stays (nats-server
    before 2.12.2: nats-io/nats-server#7457)."""

    def __init__(self, deliver):
        self._deliver = deliver
        self.stored: collections.deque = collections.deque()
        self.waiting: list[list] = []     # [reply, still wanted]
        self.keep_no_wait = False

    def next_request(self, reply: str, body: dict) -> None:
        batch = body["batch"]
        sent = 0
        while self.stored and sent < batch:
            self._deliver(reply, self.stored.popleft())
            sent += 1
        if sent == batch:
            return
        if body.get("no_wait") and not (self.keep_no_wait and sent == 0):
            self._deliver(reply, FakeMsg("end", "408" if sent else "404"))
        else:
            self.waiting.append([reply, batch - sent])

    def push(self, msg: FakeMsg) -> None:
        if self.waiting:
            self.waiting[0][1] -= 1
            self._deliver(self.waiting[0][0], msg)
            if not self.waiting[0][1]:
                self.waiting.pop(0)
        else:
            self.stored.append(msg)

    def expire(self) -> None:
        for reply, _ in self.waiting:
            self._deliver(reply, FakeMsg("end", "408"))
        self.waiting.clear()


class FakeNats:
    """What jetstream.Puller asks of a NATS client, wired to FakeConsumers by API subject."""

    def __init__(self):
        self.consumers: dict[str, FakeConsumer] = {}
        self._subs: dict[str, object] = {}
        self._n = 0
        self.lag = 0      # extra loop turns a delivery takes

    def consumer(self, name: str) -> FakeConsumer:
        return self.consumers.setdefault(f"$JS.API.CONSUMER.MSG.NEXT.S.{name}", FakeConsumer(self._deliver))

    def new_inbox(self) -> str:
        self._n += 1
        return f"_INBOX.{self._n}"

    async def subscribe(self, subject, cb, pending_msgs_limit):
        self._subs[subject] = cb
        nc = self

        class Sub:
            pending_msgs = 0   # each delivery goes to its callback's task at once

            async def unsubscribe(self):
                nc._subs.pop(subject, None)
        return Sub()

    async def publish(self, subject, body, reply):
        self.consumers[subject].next_request(reply, json.loads(body))

    async def flush(self, timeout):
        """The PONG: after what was sent before it has reached its subscriptions."""
        pong = asyncio.get_running_loop().create_future()
        self._deliver("", pong)
        await pong

    def _deliver(self, reply: str, msg) -> None:
        """On a later loop turn (`self.lag` turns later), in order; each to its subscription's
        callback in a task of its own (a future: flush's PONG, resolved after those before it)."""
        loop = asyncio.get_running_loop()

        def send(turns: int):
            if turns:
                loop.call_soon(send, turns - 1)
            elif isinstance(msg, asyncio.Future):
                asyncio.ensure_future(_resolve(msg))
            elif (cb := self._subs.get(reply)) is not None:
                asyncio.ensure_future(cb(msg))
        loop.call_soon(send, self.lag)


async def _resolve(future: asyncio.Future) -> None:
    future.set_result(None)


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
    """Slots and nothing else: what Lanes asks of a ModelWorker, with its timing: `start` takes
    the slot at once, the request itself begins on a later loop turn."""

    def __init__(self, slots: int):
        self.slots = slots
        self.running: list[FakeMsg] = []
        self.started: list[str] = []
        self.handed_back: list[str] = []
        self.residency = FakeResidency()
        self._starting = 0
        self._freed = asyncio.Event()

    def slots_now(self) -> int:
        return max(0, self.slots - len(self.running) - self._starting)

    async def wait_for_slot(self) -> int:
        while self.slots_now() <= 0:
            self._freed.clear()
            await self._freed.wait()
        return self.slots_now()

    def start(self, msg: FakeMsg) -> None:
        self._starting += 1
        self.started.append(msg.name)

        def begin():
            self._starting -= 1
            self.running.append(msg)
        asyncio.get_running_loop().call_soon(begin)

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
        self.nats = FakeNats()
        self.consumers = [self.nats.consumer(p) for p in subjects.PRIORITIES]
        self.lanes = [jetstream.Puller(self.nats, "S", p) for p in subjects.PRIORITIES]  # type: ignore[arg-type]
        self.loop = lanes.Lanes(self.worker, self.lanes, owed_after)  # type: ignore[arg-type]
        self.task: asyncio.Task | None = None

    async def __aenter__(self):
        await self.loop.start()
        self.task = asyncio.create_task(self.loop.run())
        return self

    async def __aexit__(self, *exc):
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)

    async def idle(self) -> None:
        """Every lane empty and lingering: the loop waits for an arrival."""
        await until(lambda: all(c.waiting for c in self.consumers), "every lane has a lingering pull")

    def push(self, lane: int, name: str) -> None:
        self.consumers[lane].push(FakeMsg(name))

    def held(self, lane: int) -> list[str]:
        return [m.name for m, _ in self.loop.held[lane]]


@pytest.fixture(autouse=True)
def _patient_hold(monkeypatch):
    """Held messages wait for a slot as long as a test needs (the one test of HOLD_S sets its own)."""
    monkeypatch.setattr(lanes, "HOLD_S", 60.0)


async def test_a_freed_slot_takes_the_highest_class_before_earlier_lower_ones():
    async with Running(slots=1) as r:
        await r.idle()
        r.push(LOW, "blocker")
        await until(lambda: r.worker.started == ["blocker"], "an arrival in any class starts at once")
        for name in ("low-1", "low-2", "low-3"):
            r.push(LOW, name)
        r.push(NORMAL, "normal-1")   # its lane still lingers: held, not pushed into the full engine
        r.push(HIGH, "high-1")
        await until(lambda: r.loop.holding == 2, "arrivals beyond the free slots are held")
        assert r.worker.started == ["blocker"]
        for _ in range(5):
            n = len(r.worker.started)
            r.worker.finish_all()
            await until(lambda: len(r.worker.started) == n + 1, "a freed slot takes one request")
            assert len(r.worker.started) == n + 1, "one slot, one start (a start takes its slot at once)"
        assert r.worker.started == ["blocker", "high-1", "normal-1", "low-1", "low-2", "low-3"]


async def test_an_arrival_waits_for_a_higher_class_whose_pull_expired_while_the_engine_was_full():
    """The high lane's lingering pull runs out while the one slot is taken, so a high request
    stays in its queue; a slot then frees just as a normal request reaches its lane's
    still-lingering pull: the sweep starts the high one first (test_tenancy saw "normal" first)."""
    async with Running(slots=1) as r:
        await r.idle()
        r.push(LOW, "blocker")
        await until(lambda: r.worker.started == ["blocker"], "started at once")
        r.consumers[HIGH].expire()
        r.push(HIGH, "high-1")
        assert [m.name for m in r.consumers[HIGH].stored] == ["high-1"], "no pull asks for it: it waits in its queue"
        r.worker.slots = 2                    # a slot frees, and the normal request arrives before the loop sweeps
        r.push(NORMAL, "normal-1")
        await until(lambda: len(r.worker.started) == 2, "the free slot takes one request")
        assert r.worker.started == ["blocker", "high-1"] and r.held(NORMAL) == ["normal-1"]


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


async def test_an_idle_worker_starts_arrivals_of_any_class_as_they_come():
    async with Running(slots=8) as r:
        await r.idle()
        assert [c.waiting[0][1] for c in r.consumers] == [8] * 3, "each lane lingers for as many as are free"
        for name, lane in (("low-0", LOW), ("normal-0", NORMAL), ("low-1", LOW), ("high-0", HIGH)):
            r.push(lane, name)
        await until(lambda: len(r.worker.started) == 4, "each started as it came")
        assert sorted(r.worker.started) == ["high-0", "low-0", "low-1", "normal-0"] and not r.loop.holding


async def test_a_burst_fills_every_free_slot_highest_first():
    async with Running(slots=4) as r:
        await r.idle()
        r.worker.slots = 0                       # full while the burst queues
        r.push(LOW, "low-0")
        await until(lambda: r.held(LOW) == ["low-0"], "held")
        for i in range(3):
            r.push(LOW, f"low-{i + 1}")
            r.push(HIGH, f"high-{i}")
        r.worker.slots = 4
        r.worker.finish_all()
        await until(lambda: len(r.worker.started) == 4, "four slots, four starts")
        assert r.worker.started == ["high-0", "high-1", "high-2", "low-0"]
        assert r.held(LOW) == ["low-1", "low-2", "low-3"], "the rest its lingering pull brought waits its turn"


async def test_what_is_held_when_the_engine_stops_serving_is_handed_back_and_heartbeated_before():
    async with Running(slots=1) as r:
        await r.idle()
        r.push(NORMAL, "running")
        await until(lambda: r.worker.started == ["running"], "started")
        r.push(HIGH, "held")
        await until(lambda: r.held(HIGH) == ["held"], "held")
        held = r.loop.held[HIGH][0][0]
        await r.loop.heartbeat()
        assert held.progress == 1, "a held message is heartbeated like one in flight"
        r.worker.residency.set(State.EVICTING)
        r.consumers[LOW].expire()                # the loop wakes (as it does when a pull ends)
        await until(lambda: r.worker.handed_back == ["held"], "handed back, not kept through an eviction")
        assert not r.loop.holding and r.worker.started == ["running"]
        r.worker.residency.set(State.READY)


async def test_a_message_held_with_no_slot_for_a_while_goes_back_for_another_worker(monkeypatch):
    monkeypatch.setattr(lanes, "HOLD_S", 0.05)
    async with Running(slots=1) as r:
        await r.idle()
        r.push(LOW, "a")
        await until(lambda: r.worker.started == ["a"], "started")
        r.push(HIGH, "h")
        await until(lambda: r.worker.handed_back == ["h"], "handed back once HOLD_S passed with no slot")
        assert r.worker.started == ["a"] and not r.loop.holding


async def test_a_no_wait_pull_the_server_keeps_loses_nothing_and_starts_nothing_twice(monkeypatch):
    """nats-server before 2.12.2 keeps a no-wait pull that found nothing, unanswered
    (nats-io/nats-server#7457); it takes a later arrival, so the lane's next pull request's
    message comes after that one was read. That message is held (heartbeated) at once, not left
    unread in the inbox while the engine is full, and starts once."""
    monkeypatch.setattr(jetstream, "NO_WAIT_REPLY_S", 0.05)
    async with Running(slots=1) as r:
        await r.idle()
        r.consumers[NORMAL].keep_no_wait = True
        r.consumers[NORMAL].expire()             # its lingering pull ends: the next sweep pulls it no-wait
        await until(lambda: len(r.consumers[NORMAL].waiting) == 2, "a kept no-wait pull, then a lingering one")
        r.push(NORMAL, "n1")                     # to the kept pull: read as the lingering one's
        await until(lambda: r.worker.started == ["n1"], "started")
        r.push(NORMAL, "n2")                     # to the lingering pull, already answered as far as we know
        await until(lambda: r.held(NORMAL) == ["n2"], "held at once, not left unread")
        await r.loop.heartbeat()
        assert r.loop.held[NORMAL][0][0].progress == 1
        r.worker.finish_all()
        await until(lambda: r.worker.started == ["n1", "n2"], "and started when a slot frees")
        assert not r.loop.holding and not r.worker.handed_back


async def test_cancelled_it_hands_back_what_it_holds():
    r = Running(slots=1)
    async with r:
        await r.idle()
        r.push(LOW, "a")
        await until(lambda: r.worker.started == ["a"], "started")
        r.push(NORMAL, "b")
        await until(lambda: r.held(NORMAL) == ["b"], "held")
    assert r.worker.handed_back == ["b"]


async def test_a_start_takes_its_slot_before_the_request_runs(tmp_path):
    """What Lanes counts on: ModelWorker.start takes the slot at once, not when its task runs."""
    from roundhouse.catalogue import ModelSpec
    from worker_svc.config import WorkerConfig
    from worker_svc.worker import ModelWorker

    worker = ModelWorker(WorkerConfig(model=ModelSpec(name="m", path=str(tmp_path), max_model_len=64,
                                                      default_max_tokens=16, max_num_seqs=2)))

    class Undecodable(FakeMsg):
        async def term(self):
            self.termed = True

    msg = Undecodable("x")
    msg.data, msg.subject = b"\xff\xff", subjects.request_subject("m")
    assert worker.slots_now() == 2
    worker.start(msg)
    assert worker.slots_now() == 1, "taken before the loop runs the request"
    await until(lambda: getattr(msg, "termed", False), "the request ran (and, undecodable, was refused)")
    assert worker.slots_now() == 2


async def test_a_higher_request_on_its_way_when_a_slot_frees_starts_before_a_held_lower_one():
    """The slot frees while a high request is stored and on its way to the worker (its lane's
    lingering pull has not handed it on yet) and a normal one is held: high starts first."""
    async with Running(slots=1) as r:
        await r.idle()
        r.push(LOW, "blocker")
        await until(lambda: r.worker.started == ["blocker"], "an arrival in any class starts at once")
        r.push(NORMAL, "normal")
        await until(lambda: r.held(NORMAL) == ["normal"], "held: no slot free")
        r.nats.lag = 20
        r.push(HIGH, "high")          # on its way: delivered 20 loop turns later
        r.worker.finish_all()         # in the same turn the slot frees
        await until(lambda: len(r.worker.started) == 2, "the freed slot takes one request")
        r.worker.finish_all()
        await until(lambda: len(r.worker.started) == 3, "then the next")
        assert r.worker.started == ["blocker", "high", "normal"]
