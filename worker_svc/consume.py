"""The worker's side of the pull loop (roundhouse.jetstream): it takes requests only while its
engine is READY and has free slots, and hands back what arrives after an eviction began."""
from __future__ import annotations

import asyncio

from nats.aio.client import Client
from nats.aio.msg import Msg

from roundhouse import jetstream, subjects
from worker_svc.residency import State
from worker_svc.worker import ModelWorker


def puller(nc: Client, model: str) -> jetstream.Puller:
    return jetstream.Puller(nc, subjects.STREAM, subjects.consumer_name(model))


async def pull_loop(worker: ModelWorker, puller: jetstream.Puller) -> None:
    async def room() -> int:
        await worker.residency.ready()
        free = await worker.wait_for_slot()
        return free if worker.residency.state is State.READY else 0

    async def take(msg: Msg) -> None:
        if worker.residency.state is State.READY:
            worker.start(msg)
        else:  # evicting since the pull began: hand it back (a copy; no delivery spent)
            await worker.hand_back(msg)

    await jetstream.pull_loop(puller, room, take)


async def heartbeat_loop(worker: ModelWorker, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)  # a period, not a synchronisation
        await worker.heartbeat()
