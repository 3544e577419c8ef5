"""JetStream in one place: the request stream and per-model consumers (created idempotently), the
one pull loop that both a worker (its model's requests) and the job runners (RH_JOBS) use, and the
advisory in which JetStream gives up on a request.

nats-py's `fetch(batch=N)` returns only when all N messages came or its timeout passed, which
adds up to the whole timeout to a lone message's wait. `pull_loop` keeps one pull request
outstanding for as many messages as its owner can take now and hands each one over the moment
it arrives; the request ends when its batch is filled or the server says it expired (status
408), then the next one is sent.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterable
from typing import NamedTuple

import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy, StorageType, StreamConfig

from roundhouse import subjects

log = structlog.get_logger("jetstream")

PULL_BATCH_MAX = 64
# A pull request lingers this long when the stream is empty. Short, because messages it takes
# while its owner stops taking (a worker being evicted) are handed back, and each hand-back
# counts as a delivery against the consumer's max_deliver.
PULL_EXPIRES_S = 1.0
_HEARTBEAT = "100"


async def ensure_stream(js: JetStreamContext) -> None:
    """RH_REQUESTS: work-queue retention (a message lives until a worker acks it), file storage."""
    config = StreamConfig(
        name=subjects.STREAM,
        subjects=subjects.STREAM_SUBJECTS,
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        duplicate_window=120.0,  # Nats-Msg-Id = request id: a re-sent publish is stored once
    )
    try:
        await js.add_stream(config)
    except nats.js.errors.BadRequestError:
        # Exists with other settings (an older deployment): bring it to these.
        await js.update_stream(config)


def consumer_config(model: str, ack_wait_s: float, max_deliver: int, priority: str = subjects.NORMAL) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=subjects.consumer_name(model, priority),
        filter_subjects=[subjects.request_subject(model, priority), subjects.handback_subject(model, priority)],
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=ack_wait_s,
        max_deliver=max_deliver,
        max_ack_pending=10_000,
        max_waiting=512,
    )


async def ensure_consumers(js: JetStreamContext, model: str, ack_wait_s: float, max_deliver: int) -> None:
    """Creates the model's durable consumers, one per priority class, or updates their mutable
    settings (nats-server >= 2.10)."""
    for priority in subjects.PRIORITIES:
        await js.add_consumer(subjects.STREAM, consumer_config(model, ack_wait_s, max_deliver, priority))


class Depth(NamedTuple):
    pending: tuple[int, ...]    # per priority class (subjects.PRIORITIES order): not yet handed to a worker
    acked: tuple[int, ...]      # per class: handed to a worker and not acked yet

    @property
    def total(self) -> int:
        return sum(self.pending)

    @property
    def ack_pending(self) -> int:
        return sum(self.acked)

    def top(self, handed_out: bool = False) -> int:
        """The highest class with requests waiting (its index in subjects.PRIORITIES), counting
        those handed out and not acked when `handed_out` (a model with no engine: nobody holds
        them); the normal class's when none wait."""
        counts = [p + (a if handed_out else 0) for p, a in zip(self.pending, self.acked)]
        return next((i for i, n in enumerate(counts) if n), subjects.PRIORITIES.index(subjects.NORMAL))


async def depth(js: JetStreamContext, model: str) -> Depth | None:
    """`model`'s queue, every class (read together); None when none of its consumers exists yet."""
    async def info(priority: str):
        try:
            return await js.consumer_info(subjects.STREAM, subjects.consumer_name(model, priority))
        except nats.js.errors.NotFoundError:
            return None

    infos = await asyncio.gather(*(info(p) for p in subjects.PRIORITIES))
    if all(i is None for i in infos):
        return None
    return Depth(tuple(int(i.num_pending or 0) if i else 0 for i in infos),
                 tuple(int(i.num_ack_pending or 0) if i else 0 for i in infos))


async def queued(js: JetStreamContext, model: str) -> int:
    """Requests waiting for `model` (not yet handed to a worker), every class; 0 when no consumer exists yet."""
    d = await depth(js, model)
    return 0 if d is None else d.total


# nats-server's JSConsumerDeliveryExceededAdvisory (server/jetstream_events.go), published on
# subjects.max_deliveries_subject(stream, consumer) when a message that was delivered max_deliver
# times comes due once more: {"type": MAX_DELIVER_TYPE, "id", "timestamp", "stream", "consumer",
# "stream_seq", "deliveries", "domain" (only with a JetStream domain)}.
MAX_DELIVER_TYPE = "io.nats.jetstream.advisory.v1.max_deliver"


class GaveUp(NamedTuple):
    model: str
    stream_seq: int
    deliveries: int


def gave_up_on(data: bytes, models: Iterable[str]) -> GaveUp | None:
    """The request JetStream gave up on, from a max_deliver advisory of the request stream for a
    consumer of one of `models`; None for anything else (not JSON, another type or stream, another
    consumer, a sequence or count that is no positive integer). Never raises: advisories are core
    NATS, and one that is lost or garbled only leaves its request to its deadline."""
    try:
        body = json.loads(data)
    except (ValueError, TypeError, RecursionError):  # bad JSON or UTF-8 (both ValueErrors), or nested too deep
        return None
    if not isinstance(body, dict) or body.get("type") != MAX_DELIVER_TYPE or body.get("stream") != subjects.STREAM:
        return None
    consumer, seq, deliveries = body.get("consumer"), body.get("stream_seq"), body.get("deliveries")
    if not (isinstance(consumer, str) and _positive(seq) and _positive(deliveries)):
        return None
    model = subjects.model_of_consumer(consumer, models)
    return None if model is None else GaveUp(model, seq, deliveries)


def _positive(n: object) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n > 0


NO_WAIT_REPLY_S = 1.0   # how long a no-wait pull's reply may take before the request counts as over
SETTLE_S = 1           # how long settle()'s round trip to nats-server may take (s)
_OVER = object()        # left for `next` by take_delivered when it took all a request asked for


class Puller:
    """Pull requests against one durable consumer, delivered to one inbox.

    The inbox feeds a queue of our own rather than nats-py's `next_msg`: that one waits with
    `asyncio.wait_for`, which on Python 3.11 swallows a cancellation that lands as a message
    arrives, so a loop built on it could outlive its `cancel()` (a router's stop hung on it).

    With `on_stray`, the request being read owns only the messages it asked for: one that comes
    when no request is being read, or beyond its batch (a request given up on whose reply came
    late, or that nats-server kept: nats-io/nats-server#7457), goes to `on_stray` at once, so
    no delivered message waits unread (and unheartbeated) in the queue. Without it every
    delivery is queued for `next` (the jobs runner: it reads until a request ends)."""

    def __init__(self, nc: Client, stream: str, consumer: str, on_stray: Callable[[Msg], None] | None = None):
        self._nc = nc
        self._api = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._inbox = nc.new_inbox()
        self._sub = None
        self._queue: asyncio.Queue = asyncio.Queue()   # deliveries, a request's end, or _OVER
        self.on_stray = on_stray
        self._expect = 0            # messages the request being read may still bring
        self._wait_s = PULL_EXPIRES_S + 2
        self.failed = ""            # the last request ended with this status (not 404 / 408: an error)

    async def start(self) -> None:
        async def arrived(msg: Msg) -> None:
            status = (msg.headers or {}).get("Status") if not msg.data else None
            if status == _HEARTBEAT:
                return
            if self.on_stray is None:
                self._queue.put_nowait(msg)
            elif status is not None or not msg.reply:   # a request's end
                if self._expect:
                    self._expect = 0
                    self._queue.put_nowait(msg)
            elif self._expect:
                self._expect -= 1
                self._queue.put_nowait(msg)
            else:
                self.on_stray(msg)

        self._sub = await self._nc.subscribe(self._inbox, cb=arrived, pending_msgs_limit=4 * PULL_BATCH_MAX)

    async def request(self, batch: int, no_wait: bool = False) -> None:
        """Asks for up to `batch` messages: those there now (`no_wait`: the request ends at once
        with what there is), or as they come until PULL_EXPIRES_S passes."""
        self._settle_leftovers()
        body = json.dumps({"batch": batch, "no_wait": True} if no_wait else
                          {"batch": batch, "expires": int(PULL_EXPIRES_S * 1e9)}).encode()
        self._expect = batch
        self._wait_s = NO_WAIT_REPLY_S if no_wait else PULL_EXPIRES_S + 2
        try:
            await self._nc.publish(self._api, body, reply=self._inbox)
        except BaseException:
            self._expect = 0
            raise

    async def next(self) -> Msg | None:
        """The next delivery, or None once the current pull request is over."""
        while True:
            if self.on_stray is not None and not self._expect and self._queue.empty():
                return None   # it brought all it asked for: nothing more comes for it
            try:
                async with asyncio.timeout(self._wait_s):
                    msg = await self._queue.get()
            except TimeoutError:
                self._expect = 0    # given up on: what it still brings is a stray
                return None
            if msg is _OVER:
                return None
            status = (msg.headers or {}).get("Status") if not msg.data else None
            if status == _HEARTBEAT:
                continue
            if status is not None or not msg.reply:
                if status not in ("404", "408"):
                    self.failed = status or "no status"
                    log.debug("jetstream.pull_status", status=status, description=(msg.headers or {}).get("Description"))
                return None  # 408 expired, 404 no messages, 409 ...: this request is over
            return msg

    async def _handed_on(self) -> None:
        """Until the subscription's queue is empty: its task hands each message on in one step."""
        while self._sub is not None and self._sub.pending_msgs:
            await asyncio.sleep(0)   # lets the subscription's task (ready to run) hand them on

    def take_delivered(self) -> list[Msg]:
        """The messages the request being read has brought that `next` has not returned yet,
        taken from it (its end, if it came, stays for `next`; when they were all it asked for,
        `next` returns None)."""
        taken, rest = [], []
        while not self._queue.empty():
            msg = self._queue.get_nowait()
            (taken if _is_delivery(msg) else rest).append(msg)
        if taken and not rest and not self._expect:
            rest.append(_OVER)
        for msg in rest:
            self._queue.put_nowait(msg)
        return taken

    def _settle_leftovers(self) -> None:
        """Before a new request: what the last one left unread goes to `on_stray` (messages) or
        away (its end)."""
        if self.on_stray is None:
            return
        while not self._queue.empty():
            msg = self._queue.get_nowait()
            if _is_delivery(msg):
                self.on_stray(msg)

    async def close(self) -> None:
        """Stops listening; what was delivered and not read goes to `on_stray`."""
        if self._sub is not None:
            sub, self._sub = self._sub, None
            await sub.unsubscribe()
        self._expect = 0
        self._settle_leftovers()


def _is_delivery(msg) -> bool:
    """A message of the stream, not a pull request's end (a status, or _OVER)."""
    return msg is not _OVER and bool(msg.data or msg.reply)


async def settle(pullers: list[Puller]) -> bool:
    """Until what nats-server has sent `pullers` so far has been handed on (queued for `next`,
    or to `on_stray`). A message JetStream has stored and acknowledged to its publisher may
    still be on its way to a pull; a caller that must not overtake it (worker_svc.lanes)
    settles first. A PING's PONG comes after whatever the server wrote to that connection
    before it, and the client's read loop hands messages to each subscription's queue in
    order, so after one `flush` per connection only those queues are left. False when a round
    trip failed (a reconnect): the caller goes on without."""
    try:
        for nc in {id(p._nc): p._nc for p in pullers}.values():
            await nc.flush(SETTLE_S)
    except (TimeoutError, nats.errors.Error) as e:
        log.debug("jetstream.settle_gave_up", error=repr(e))
        return False
    for p in pullers:
        await p._handed_on()
    return True


async def pull_loop(puller: Puller, room: Callable[[], Awaitable[int]], take: Callable[[Msg], Awaitable[None]]) -> None:
    """Forever: waits for `room()` (how many messages the owner can take now, > 0 once it can
    take any), pulls that many, and gives each to `take` as it arrives."""
    while True:
        batch = min(await room(), PULL_BATCH_MAX)
        if batch <= 0:
            continue
        try:
            await puller.request(batch)
        except nats.errors.Error as e:
            log.warning("jetstream.pull_failed", error=repr(e))
            await asyncio.sleep(0.5)  # back off: the connection is reconnecting
            continue
        for _ in range(batch):
            msg = await puller.next()
            if msg is None:
                break
            await take(msg)
