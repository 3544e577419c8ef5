"""The worker's side of JetStream: its lanes' pull loop (worker_svc.lanes) and its heartbeats."""
from __future__ import annotations

import asyncio

from worker_svc.lanes import Lanes
from worker_svc.worker import ModelWorker


async def heartbeat_loop(worker: ModelWorker, lanes: Lanes, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)  # a period, not a synchronisation
        await worker.heartbeat()
        await lanes.heartbeat()
