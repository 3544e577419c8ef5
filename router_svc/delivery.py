"""The router's end of the token-delivery streams: one bidirectional stream per worker, served off
the router's event loop.

Why a thread and a synchronous gRPC server: with grpc.aio, every `context.read()` on the event
loop's thread starts a gRPC core batch, and each one kicks gRPC's poller thread with an eventfd
`write(2)`. A native profile of the router relaying four fast streams (py-spy `record --native
--threads`, bench_loop_lag) put about a third of the loop thread's samples in that `write`
(`DeliveryServicer.Deliver → eventfd_write → write`), next to ~40% idle in epoll: on these VMs a
cross-thread wake-up is a syscall that can take milliseconds under load, and the loop paid one per
worker message. Probes of `/health` saw p99 2 s and short requests waited 3 s for their first
token. So the delivery streams live on their own `grpc.server` (its own port, its own threads):
reading a worker's batches and writing controls back never happens on the loop. What reaches the
loop is one callback per burst of batches (batches that arrive while one is pending ride along),
where the tracker, which owns every flight, applies them.
"""
from __future__ import annotations

import asyncio
import queue
import threading
from concurrent import futures

import grpc
import structlog

from protos.v1 import worker_pb2, worker_pb2_grpc
from roundhouse import grpcserver, tls
from router_svc.tracker import Action, Tracker

log = structlog.get_logger("router.delivery")

_LAST = frozenset({"finished", "error"})
_CLOSE = object()
MAX_LINKS = 256   # worker streams one router serves at once (each holds two threads)


class WorkerLink:
    """Our side of one worker's stream, as the loop sees it: `cancel` and `received` are called
    on the loop and queue controls that the stream's own thread writes."""

    def __init__(self) -> None:
        self._out: queue.SimpleQueue = queue.SimpleQueue()
        self.worker_id = ""

    def cancel(self, request_id: str) -> None:
        self._out.put(worker_pb2.DeliveryControl(cancel_request_ids=[request_id]))

    def send(self, cancels: list[str], received: list[str]) -> None:
        if cancels or received:
            self._out.put(worker_pb2.DeliveryControl(cancel_request_ids=cancels, received_request_ids=received))

    def close(self) -> None:
        self._out.put(_CLOSE)

    def controls(self):
        """What the stream sends back, until the link closes (runs on the stream's thread)."""
        while True:
            item = self._out.get()
            if item is _CLOSE:
                return
            yield item


class _Inbox:
    """Batches read on a stream's thread, handed to the loop: one callback per burst."""

    def __init__(self, loop: asyncio.AbstractEventLoop, apply) -> None:
        self._loop = loop
        self._apply = apply
        self._lock = threading.Lock()
        self._pending: list = []
        self._scheduled = False

    def put(self, item) -> None:  # stream thread
        with self._lock:
            self._pending.append(item)
            if self._scheduled:
                return
            self._scheduled = True
        self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:  # loop thread
        with self._lock:
            items, self._pending, self._scheduled = self._pending, [], False
        self._apply(items)


class DeliveryServicer(worker_pb2_grpc.DeliveryServicer):
    """Synchronous servicer: each Deliver call runs on a server thread, its reads on another."""

    def __init__(self, tracker: Tracker, loop: asyncio.AbstractEventLoop):
        self._tracker = tracker
        self._loop = loop

    def Deliver(self, request_iterator, context):
        link = WorkerLink()
        inbox = _Inbox(self._loop, lambda items: self._apply(link, items))
        context.add_callback(link.close)  # the call ended (worker gone, server stopping)
        threading.Thread(target=self._read, args=(request_iterator, link, inbox), daemon=True,
                         name="delivery-read").start()
        yield from link.controls()

    @staticmethod
    def _read(request_iterator, link: WorkerLink, inbox: _Inbox) -> None:
        try:
            for batch in request_iterator:
                inbox.put(batch)
        except grpc.RpcError:
            pass  # the stream broke: handled below like its end
        except Exception as e:  # never let a reader thread die silently
            log.error("delivery.read_failed", error=repr(e))
        inbox.put(None)
        link.close()

    def _apply(self, link: WorkerLink, items: list) -> None:
        """On the loop: every chunk of every batch to the tracker, controls back in one message."""
        on_chunk = self._tracker.on_chunk
        cancels: list[str] = []
        received: list[str] = []
        for batch in items:
            if batch is None:  # the stream is over
                requeued, failed = self._tracker.lost_link(link)
                if requeued or failed:
                    log.warning("delivery.worker_lost", worker_id=link.worker_id, requeued=len(requeued), failed=len(failed))
                continue
            link.worker_id = batch.worker_id
            for chunk in batch.chunks:
                if on_chunk(chunk, link) is Action.CANCEL:
                    cancels.append(chunk.request_id)
                if chunk.WhichOneof("kind") in _LAST:
                    received.append(chunk.request_id)
        link.send(cancels, received)


class DeliveryServer:
    """The router's internal Delivery endpoint: its own port and threads (see the module doc)."""

    def __init__(self, tracker: Tracker, internal: tls.Internal | None = None):
        self._tracker = tracker
        self._tls = internal     # mutual TLS: only workers holding the internal certificate deliver
        self._server: grpc.Server | None = None
        self.port = 0

    def start(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=MAX_LINKS, thread_name_prefix="delivery"),
                                   options=grpcserver.SERVER_OPTIONS, maximum_concurrent_rpcs=MAX_LINKS)
        worker_pb2_grpc.add_DeliveryServicer_to_server(DeliveryServicer(self._tracker, loop), self._server)
        grpcserver.add_standard_services_sync(self._server, [worker_pb2.DESCRIPTOR.services_by_name["Delivery"].full_name])
        self.port = tls.add_port(self._server, f"{host}:{port}", self._tls)
        self._server.start()
        return self.port

    async def stop(self, grace: float) -> None:
        server, self._server = self._server, None
        if server is not None:
            await asyncio.to_thread(lambda: server.stop(grace).wait())
