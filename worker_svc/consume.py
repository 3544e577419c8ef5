"""The JetStream pull loop: fetch only while the engine is READY and has free slots."""
from __future__ import annotations

import asyncio

import nats.errors
import structlog
from nats.js import JetStreamContext

from worker_svc.residency import State
from worker_svc.worker import ModelWorker

log = structlog.get_logger("worker.consume")

FETCH_BATCH_MAX = 64
FETCH_WAIT_S = 2.0          # long-poll; returns as soon as one message is there


async def pull_loop(worker: ModelWorker, psub: JetStreamContext.PullSubscription) -> None:
    while True:
        await worker.residency.ready()
        free = await worker.wait_for_slot()
        if worker.residency.state is not State.READY:
            continue
        try:
            msgs = await psub.fetch(batch=min(free, FETCH_BATCH_MAX), timeout=FETCH_WAIT_S)
        except (nats.errors.TimeoutError, asyncio.TimeoutError):
            continue
        except nats.errors.Error as e:
            log.warning("consume.fetch_failed", error=repr(e))
            await asyncio.sleep(0.5)  # back off: the connection is reconnecting
            continue
        for msg in msgs:
            if worker.residency.state is State.READY:
                worker.start(msg)
            else:  # evicting since the fetch began: hand it back at once
                await msg.nak()


async def heartbeat_loop(worker: ModelWorker, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)  # a period, not a synchronisation
        await worker.heartbeat()
