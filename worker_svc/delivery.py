"""Token delivery from this worker to the routers that own its requests.

One long-lived bidirectional `Delivery.Deliver` stream per router. Request tasks `push()`
chunks; everything pushed while the event loop runs one engine step's outputs goes as one
batch, so a step across all requests for that router costs one gRPC message. The router
answers on the same stream with the ids of requests whose caller is gone, and of those whose
last chunk it has.

Why grpc's synchronous API on threads of its own, not grpc.aio on the loop: a grpc.aio write
runs gRPC core's batch start on the loop's thread, the socket write and the poller's wake-up
with it. A profile of a worker streaming one request (py-spy `record --gil`, 64-token requests
at concurrency 1) put 45% of the loop thread's time in `_StreamRequestMixin._write`, on the
thread that also turns the engine's outputs into tokens. (The router's Delivery server moved
off its loop for the same reason: router_svc/delivery.py.) Here the loop only hands a batch
to a queue; gRPC's threads write it, and a reader thread hands each control back to the loop.
"""
from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable

import grpc
import structlog

from protos.v1 import worker_pb2, worker_pb2_grpc
from roundhouse import tls

log = structlog.get_logger("worker.delivery")

OnCancel = Callable[[str], None]
OnLost = Callable[[str], None]

CLOSE_JOIN_S = 5.0   # how long close() waits for the reader thread once the call is cancelled


class RouterLink:
    """The stream to one router. Dies as a whole: then `on_lost(address)` is called once, on
    the loop. Everything but `_batches` and `_read` runs on the loop's thread."""

    def __init__(self, address: str, worker_id: str, on_cancel: OnCancel, on_lost: OnLost, internal: tls.Internal | None = None):
        self.address = address
        self._worker_id = worker_id
        self._on_cancel = on_cancel
        self._on_lost = on_lost
        self._loop = asyncio.get_running_loop()
        self._pending: list[worker_pb2.RequestChunk] = []
        self._flush_seen = -1       # len(_pending) when the flush was scheduled; -1: none is
        self._out: queue.SimpleQueue = queue.SimpleQueue()   # chunk lists for gRPC's sender; None ends
        self._closed = False
        self._closing = False       # close() was called: the end is ours, not a loss
        self._receipts: dict[str, asyncio.Future] = {}
        self._channel = tls.sync_channel(address, internal)
        self._call = worker_pb2_grpc.DeliveryStub(self._channel).Deliver(self._batches(), wait_for_ready=False)
        self._reader = threading.Thread(target=self._read, name="delivery-read", daemon=True)
        self._reader.start()

    @property
    def alive(self) -> bool:
        return not self._closed

    def push(self, chunk: worker_pb2.RequestChunk) -> None:
        self._pending.append(chunk)
        if self._flush_seen < 0:
            self._flush_seen = len(self._pending)
            self._loop.call_soon(self._flush)

    def push_last(self, chunk: worker_pb2.RequestChunk) -> asyncio.Future:
        """Pushes a request's last chunk; the future is True once the router has it, False if
        this link died first (then the router, and with it the caller, is gone)."""
        receipt = self._loop.create_future()
        if self._closed:
            receipt.set_result(False)
            return receipt
        self._receipts[chunk.request_id] = receipt
        self.push(chunk)
        return receipt

    def _flush(self) -> None:
        """Sends what was pushed, once a loop turn passes with nothing more pushed: the tasks an
        engine step woke run in the turns after its outputs came, and a batch cut in between
        cost both ends a message (the worker's batches were 1-4 per step at 32 streams)."""
        n = len(self._pending)
        if n != self._flush_seen:
            self._flush_seen = n
            self._loop.call_soon(self._flush)
            return
        chunks, self._pending, self._flush_seen = self._pending, [], -1
        if not self._closed:
            self._out.put(chunks)

    def _batches(self):
        """The request stream, read by gRPC's own sender thread."""
        while True:
            chunks = self._out.get()
            if chunks is None:
                return
            yield worker_pb2.DeliveryBatch(worker_id=self._worker_id, chunks=chunks)

    def _read(self) -> None:
        """The reader thread: the router's controls to the loop, then the stream's end."""
        problem = None
        try:
            for control in self._call:
                self._to_loop(self._on_control, control)
        except grpc.RpcError as e:
            problem = (e.code().name, e.details())
        except Exception as e:  # never let the reader die silently: the link would never end
            problem = ("UNKNOWN", repr(e))
        self._to_loop(self._ended, problem)

    def _to_loop(self, fn, arg) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the worker is gone
            self._loop.call_soon_threadsafe(fn, arg)

    def _on_control(self, control: worker_pb2.DeliveryControl) -> None:
        for request_id in control.cancel_request_ids:
            self._on_cancel(request_id)
        for request_id in control.received_request_ids:
            receipt = self._receipts.pop(request_id, None)
            if receipt is not None and not receipt.done():
                receipt.set_result(True)

    def _ended(self, problem: tuple[str, str] | None) -> None:
        if self._closing:
            return
        if problem is None:
            log.warning("delivery.closed", router=self.address)
        else:
            log.warning("delivery.lost", router=self.address, code=problem[0], detail=problem[1])
        self._shut()
        self._on_lost(self.address)

    def _shut(self) -> None:
        self._closed = True
        self._out.put(None)
        receipts, self._receipts = self._receipts, {}
        for receipt in receipts.values():
            if not receipt.done():
                receipt.set_result(False)

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._shut()
        self._call.cancel()
        await asyncio.to_thread(self._reader.join, CLOSE_JOIN_S)
        self._channel.close()


class Links:
    """The worker's links, one per router address, made on first use."""

    def __init__(self, worker_id: str, on_cancel: OnCancel, on_lost: OnLost, internal: tls.Internal | None = None):
        self._worker_id = worker_id
        self._tls = internal
        self._on_cancel = on_cancel
        self._on_lost = on_lost
        self._links: dict[str, RouterLink] = {}

    def to(self, address: str) -> RouterLink:
        link = self._links.get(address)
        if link is None or not link.alive:
            link = RouterLink(address, self._worker_id, self._on_cancel, self._lost, self._tls)
            self._links[address] = link
        return link

    def _lost(self, address: str) -> None:
        self._links.pop(address, None)
        self._on_lost(address)

    async def close(self) -> None:
        links, self._links = list(self._links.values()), {}
        for link in links:
            await link.close()
