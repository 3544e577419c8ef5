"""Priority classes on the worker's side: which of its model's queues the next free slot takes from.

Each class (roundhouse.subjects.PRIORITIES: high, normal, low) has its own subject and durable
consumer, a "lane". JetStream orders messages within a consumer, not across them, so the order
across lanes is decided here, each time slots are free:

  - the highest lane with requests waiting goes first: a request of a higher class starts before
    earlier requests of a lower one (`sweep`: no-wait pulls, highest lane first);
  - no lane waits forever: a lower lane not tried for OWED_AFTER starts is tried first, for one
    request (so under a flood of high requests a low one still starts at least once in every
    OWED_AFTER + 1, where it has one waiting);
  - when every lane is empty, each gets a pull request that lingers (for as many as there are
    free slots), and what it brings starts as it comes while a slot is free and nothing of its
    class or higher is held: an idle worker starts an arrival of any class at once. Arrivals
    beyond the free slots are *held* (heartbeated) and started when their lane's turn comes, not
    pushed into an engine that is full, where they would start before higher requests that came
    later. A message held for HOLD_S with no slot free is handed back (a copy, at the end of its
    class's queue), so that another worker of the model can take it;
  - a message no request being read asked for (a pull request given up on whose reply came
    late: jetstream.Puller's `on_stray`) is held the same way: nothing delivered waits unread.

Messages that arrive while the engine is not READY (an eviction began) are handed back: a copy
keeps its class (roundhouse.subjects.handback_of). Nothing here decides how a request is served;
that is the worker's (worker_svc.worker).
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import time
from collections.abc import Sequence

import nats.errors
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg

from roundhouse import jetstream, subjects, tasks
from worker_svc.residency import State
from worker_svc.worker import ModelWorker

log = structlog.get_logger("worker.lanes")

OWED_AFTER = 8   # starts after which a lower lane that was not tried is tried first


def sweep(picks: int, tried_at: Sequence[int], owed_after: int = OWED_AFTER) -> list[tuple[int, int | None]]:
    """Where the next free slots take requests from, in order: (lane, at most this many; None: as
    many as fit). `picks`: requests started so far; `tried_at[i]`: `picks` when lane i (0 is the
    highest class) was last tried. Lower lanes that have gone `owed_after` starts untried come
    first, one request each (the one that has waited longest first); then every lane, highest first."""
    owed = sorted((i for i in range(1, len(tried_at)) if picks - tried_at[i] >= owed_after), key=lambda i: (tried_at[i], i))
    return [(i, 1) for i in owed] + [(i, None) for i in range(len(tried_at))]


def pullers(nc: Client, model: str) -> list[jetstream.Puller]:
    """One per lane, highest class first."""
    return [jetstream.Puller(nc, subjects.STREAM, subjects.consumer_name(model, p)) for p in subjects.PRIORITIES]


HOLD_S = 1.0     # a held message waits this long for a slot here before it is handed back
FAILED_PULL_BACKOFF_S = 0.5


class Lanes:
    """The worker's pull loop over its lanes; the one owner of the lanes' pull requests and of
    the messages they hold."""

    def __init__(self, worker: ModelWorker, lanes: list[jetstream.Puller], owed_after: int = OWED_AFTER,
                 clock=time.monotonic):
        self._worker = worker
        self._lanes = lanes
        self._owed_after = owed_after
        self._clock = clock
        self._polls: dict[int, asyncio.Task] = {}      # lane -> its lingering pull's next message
        # lane -> messages delivered with no slot free (or unasked for), oldest first, with when they came
        self.held: dict[int, collections.deque[tuple[Msg, float]]] = {i: collections.deque() for i in range(len(lanes))}
        self._arrived = asyncio.Event()                 # a message came outside a read: the loop looks
        self.picks = 0
        self._tried_at = [0] * len(lanes)
        for i, lane in enumerate(lanes):
            lane.on_stray = functools.partial(self._hold, i)

    async def start(self) -> None:
        for lane in self._lanes:
            await lane.start()

    async def close(self) -> None:
        for lane in self._lanes:
            with contextlib.suppress(Exception):
                await lane.close()

    @property
    def holding(self) -> int:
        return sum(len(q) for q in self.held.values())

    async def run(self) -> None:
        """Forever (until cancelled; then what it holds is handed back)."""
        worker = self._worker
        try:
            while True:
                self._arrived.clear()
                self._harvest()
                if any(lane.failed for lane in self._lanes):
                    failed = {subjects.PRIORITIES[i]: lane.failed for i, lane in enumerate(self._lanes) if lane.failed}
                    log.warning("lanes.pull_refused", statuses=failed)
                    for lane in self._lanes:
                        lane.failed = ""
                    await asyncio.sleep(FAILED_PULL_BACKOFF_S)  # back off: the consumer is gone or NATS refuses
                if worker.residency.state is not State.READY:
                    await self._give_back(lambda since: True)
                    await self._wait(worker.residency.ready())
                    continue
                free = worker.slots_now()
                if free <= 0:
                    now = self._clock()
                    await self._give_back(lambda since: now - since >= HOLD_S)
                    await self._wait(worker.wait_for_slot(), self._next_overdue(now))
                    continue
                if await self._sweep(free):
                    continue
                for i, lane in enumerate(self._lanes):   # every lane empty: arrivals start as they come
                    if i not in self._polls:
                        try:
                            await lane.request(min(free, jetstream.PULL_BATCH_MAX))
                        except nats.errors.Error as e:
                            log.warning("lanes.pull_failed", error=repr(e))
                            await asyncio.sleep(FAILED_PULL_BACKOFF_S)  # back off: the connection is reconnecting
                            break
                        self._polls[i] = asyncio.create_task(self._linger(i), name=f"lane-{subjects.PRIORITIES[i]}")
                await self._wait(None)
        finally:
            await tasks.cancel_all(list(self._polls.values()))
            self._harvest()
            await self.close()            # what was delivered and not read is held (on_stray)
            await self._give_back(lambda since: True)

    async def heartbeat(self) -> None:
        """Held messages are ours until they start: JetStream must not redeliver them meanwhile."""
        msgs = [m for q in self.held.values() for m, _ in q]
        await asyncio.gather(*(m.in_progress() for m in msgs), return_exceptions=True)

    def _hold(self, i: int, msg: Msg) -> None:
        self.held[i].append((msg, self._clock()))
        self._arrived.set()

    async def _linger(self, i: int) -> None:
        """Reads lane i's lingering pull to its end, each message as it comes (`_arrived_on`)."""
        lane = self._lanes[i]
        while (msg := await lane.next()) is not None:
            self._arrived_on(i, msg)

    def _arrived_on(self, i: int, msg: Msg) -> None:
        """A lingering pull brought `msg`: it starts now if a slot is free, nothing of its class
        or higher waits here for one, and every higher lane has a lingering pull of its own (so
        none has requests waiting in its queue); else it is held for its turn, and the sweep
        that its arrival wakes pulls the higher lanes first. Without the last condition a
        request that came to a lower lane's pull just as a slot freed started before a higher
        one waiting in a queue whose pull had expired while the engine was full (seen in
        test_tenancy: "normal" before "high")."""
        if (self._worker.residency.state is State.READY and self._worker.slots_now() > 0
                and not any(self.held[j] for j in range(i + 1))
                and all(j in self._polls and not self._polls[j].done() for j in range(i))):
            self.picks += 1
            self._worker.start(msg)
        else:
            self._hold(i, msg)

    def _harvest(self) -> None:
        """Lingering pulls that ended: their lanes are tried (and may be pulled again)."""
        for i, task in list(self._polls.items()):
            if task.done():
                del self._polls[i]
                self._tried_at[i] = self.picks
                if not task.cancelled() and task.exception() is not None:
                    log.error("lanes.linger_failed", lane=subjects.PRIORITIES[i], error=repr(task.exception()))

    def _next_overdue(self, now: float) -> float | None:
        """Seconds until the oldest held message has waited HOLD_S; None when none is held."""
        oldest = [q[0][1] for q in self.held.values() if q]
        return max(0.0, min(oldest) + HOLD_S - now) if oldest else None

    async def _wait(self, other, timeout: float | None = None) -> None:
        """Until `other` (an awaitable, or None) completes, a lingering pull ends, a stray comes,
        or `timeout` passes."""
        task = asyncio.ensure_future(other) if other is not None else None
        arrived = asyncio.ensure_future(self._arrived.wait())
        waits = {*self._polls.values(), arrived, *([task] if task is not None else [])}
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (task, arrived):
                if t is not None and not t.done():
                    t.cancel()

    async def _sweep(self, free: int) -> int:
        """Starts up to `free` requests, lanes in `sweep` order, each lane's held messages before
        what it has in its queue; returns how many started."""
        await self._settle_lingering()
        took = 0
        for i, most in sweep(self.picks, self._tried_at, self._owed_after):
            # what is free now: while this awaited, a lingering pull may have started what it brought
            room = min(free - took, self._worker.slots_now())
            want = room if most is None else min(most, room)
            if want <= 0:
                break
            n = 0
            while n < want and self.held[i]:
                await self._start(self.held[i].popleft()[0])
                n += 1
            if n < want and i not in self._polls:   # a lane with a lingering pull gets its message there
                n += await self._pull_now(i, min(want - n, jetstream.PULL_BATCH_MAX))
            self._tried_at[i] = self.picks
            took += n
        return took

    async def _settle_lingering(self) -> None:
        """Before something of a lower class could start: what the lingering pulls of higher
        lanes have been sent is held here first, so that the sweep sees it. Without this a
        request JetStream had stored (and acknowledged to the router) but that was still on its
        way to a lingering pull when a slot freed lost its turn to an earlier, lower one held
        here (seen in test_tenancy). One round trip to nats-server (see jetstream.settle), and
        only when a lower lane has something held or will be pulled."""
        if not self._polls:
            return
        lingering = sorted(self._polls)
        if not any(self.held[i] or i not in self._polls for i in range(lingering[0] + 1, len(self._lanes))):
            return
        await jetstream.settle([self._lanes[i] for i in lingering])
        for i in lingering:
            for msg in self._lanes[i].take_delivered():
                self._hold(i, msg)

    async def _pull_now(self, i: int, batch: int) -> int:
        """Starts what lane `i` has now, up to `batch`."""
        lane = self._lanes[i]
        try:
            await lane.request(batch, no_wait=True)
        except nats.errors.Error as e:
            log.warning("lanes.pull_failed", error=repr(e))
            return 0
        got = 0
        while got < batch:
            msg = await lane.next()
            if msg is None:
                break
            await self._start(msg)
            got += 1
        return got

    async def _start(self, msg: Msg) -> None:
        self.picks += 1
        if self._worker.residency.state is State.READY:
            self._worker.start(msg)   # takes its slot at once (ModelWorker.free_slots)
        else:  # evicting since the pull began: hand it back (a copy; no delivery spent)
            await self._worker.hand_back(msg)

    async def _give_back(self, due) -> None:
        """Hands back the held messages for which `due(since)` holds: copies that keep their class
        (no delivery spent), for another worker or for later."""
        for q in self.held.values():
            keep = collections.deque()
            while q:
                msg, since = q.popleft()
                if not due(since):
                    keep.append((msg, since))
                    continue
                with contextlib.suppress(Exception):  # not handed back: JetStream redelivers it after ack_wait
                    await self._worker.hand_back(msg)
            q.extend(keep)
