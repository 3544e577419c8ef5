"""The router's end of the token-delivery streams: one bidirectional stream per worker."""
from __future__ import annotations

import asyncio

import grpc
import structlog

from protos.v1 import worker_pb2, worker_pb2_grpc
from router_svc.tracker import Action, Tracker

log = structlog.get_logger("router.delivery")

_LAST = frozenset({"finished", "error"})


class WorkerLink:
    """Our side of one worker's stream: cancels are batched and written by one task."""

    def __init__(self, context: grpc.aio.ServicerContext):
        self._context = context
        self._cancels: list[str] = []
        self._received: list[str] = []
        self._wake = asyncio.Event()
        self.worker_id = ""

    def cancel(self, request_id: str) -> None:
        self._cancels.append(request_id)
        self._wake.set()

    def received(self, request_id: str) -> None:
        """The last chunk of `request_id` is here: the worker may ack it."""
        self._received.append(request_id)
        self._wake.set()

    async def write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            cancels, self._cancels = self._cancels, []
            received, self._received = self._received, []
            if cancels or received:
                await self._context.write(worker_pb2.DeliveryControl(cancel_request_ids=cancels, received_request_ids=received))


class DeliveryServicer(worker_pb2_grpc.DeliveryServicer):
    def __init__(self, tracker: Tracker):
        self._tracker = tracker

    async def Deliver(self, request_iterator, context: grpc.aio.ServicerContext):
        link = WorkerLink(context)
        writer = asyncio.create_task(link.write_loop(), name="delivery-writer")
        on_chunk = self._tracker.on_chunk
        try:
            while True:
                batch = await context.read()
                if batch is grpc.aio.EOF:
                    break
                link.worker_id = batch.worker_id
                for chunk in batch.chunks:
                    if on_chunk(chunk, link) is Action.CANCEL:
                        link.cancel(chunk.request_id)
                    if chunk.WhichOneof("kind") in _LAST:
                        link.received(chunk.request_id)
        finally:
            writer.cancel()
            waiting = self._tracker.lost_link(link)
            if waiting:
                log.warning("delivery.worker_lost", worker_id=link.worker_id, waiting_for_redelivery=len(waiting))
