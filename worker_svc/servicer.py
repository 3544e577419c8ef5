"""The Worker gRPC service: Load / Evict / Status for the manager and for operators."""
from __future__ import annotations

import grpc

from protos.v1 import worker_pb2, worker_pb2_grpc
from roundhouse.errors import RoundhouseError
from roundhouse.grpcserver import LOAD_FAILED_KEY
from worker_svc.worker import ModelWorker


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, worker: ModelWorker):
        self._worker = worker

    async def Load(self, request: worker_pb2.LoadRequest, context: grpc.aio.ServicerContext) -> worker_pb2.WorkerStatus:
        try:
            await self._worker.load()
        except RoundhouseError as e:
            # Marked, so the manager tells "the model failed to load" from "the worker went away".
            await context.abort(e.code, e.message, trailing_metadata=((LOAD_FAILED_KEY, "1"),))
        return self._worker.status()

    async def Evict(self, request: worker_pb2.EvictRequest, context: grpc.aio.ServicerContext) -> worker_pb2.WorkerStatus:
        if request.drain_timeout_s < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "roundhouse: invalid drain_timeout_s: must be >= 0")
        if request.sleep_level not in (0, 1, 2):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"roundhouse: invalid sleep_level {request.sleep_level}: must be 0 (stop), 1 or 2")
        await self._worker.evict(request.drain_timeout_s or None, request.sleep_level)
        return self._worker.status()

    async def Status(self, request: worker_pb2.StatusRequest, context: grpc.aio.ServicerContext) -> worker_pb2.WorkerStatus:
        return self._worker.status()
