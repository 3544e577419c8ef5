"""The JetStream pull loop: fetch only while the engine is READY and has free slots.

nats-py's `fetch(batch=N)` returns only when all N messages came or its timeout passed, which
adds up to the whole timeout to a lone request's wait. This loop keeps one pull request
outstanding for the free slots and starts each message the moment it arrives; the request ends
when its batch is filled or the server says it expired (status 408), then the next one is sent.
"""
from __future__ import annotations

import asyncio
import json

import nats.errors
import structlog
from nats.aio.client import Client

from roundhouse import subjects
from worker_svc.residency import State
from worker_svc.worker import ModelWorker

log = structlog.get_logger("worker.consume")

PULL_BATCH_MAX = 64
# A pull request lingers this long when the queue is empty. Short, because messages it takes
# while the engine is being evicted are handed back (nak), and each hand-back counts as a
# delivery against the consumer's max_deliver.
PULL_EXPIRES_S = 1.0
NOT_READY_NAK_DELAY_S = 1.0
_HEARTBEAT = "100"


class Puller:
    """Pull requests against the model's durable consumer, delivered to one inbox."""

    def __init__(self, nc: Client, model: str):
        self._nc = nc
        self._api = f"$JS.API.CONSUMER.MSG.NEXT.{subjects.STREAM}.{subjects.consumer_name(model)}"
        self._inbox = nc.new_inbox()
        self._sub = None

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(self._inbox, pending_msgs_limit=4 * PULL_BATCH_MAX)

    async def request(self, batch: int) -> None:
        body = json.dumps({"batch": batch, "expires": int(PULL_EXPIRES_S * 1e9)}).encode()
        await self._nc.publish(self._api, body, reply=self._inbox)

    async def next(self):
        """The next delivery, or None once the current pull request is over."""
        try:
            msg = await self._sub.next_msg(timeout=PULL_EXPIRES_S + 2)
        except nats.errors.TimeoutError:
            return None
        status = (msg.headers or {}).get("Status") if not msg.data else None
        if status == _HEARTBEAT:
            return await self.next()
        if status is not None or not msg.reply:
            if status not in ("404", "408"):
                log.debug("consume.pull_status", status=status, description=(msg.headers or {}).get("Description"))
            return None  # 408 expired, 404 no messages, 409 ...: this request is over
        return msg

    async def close(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()


async def pull_loop(worker: ModelWorker, puller: Puller) -> None:
    while True:
        await worker.residency.ready()
        free = await worker.wait_for_slot()
        if worker.residency.state is not State.READY:
            continue
        batch = min(free, PULL_BATCH_MAX)
        try:
            await puller.request(batch)
        except nats.errors.Error as e:
            log.warning("consume.pull_failed", error=repr(e))
            await asyncio.sleep(0.5)  # back off: the connection is reconnecting
            continue
        for _ in range(batch):
            msg = await puller.next()
            if msg is None:
                break
            if worker.residency.state is State.READY:
                worker.start(msg)
            else:  # evicting since the pull began: hand it back, redelivered after the delay
                await msg.nak(delay=NOT_READY_NAK_DELAY_S)


async def heartbeat_loop(worker: ModelWorker, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)  # a period, not a synchronisation
        await worker.heartbeat()
