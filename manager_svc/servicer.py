"""The Manager gRPC service: workers' reports and the admin surface."""
from __future__ import annotations

import time

import grpc

from manager_svc.manager import Manager
from manager_svc.policy import used_bytes
from protos.v1 import manager_pb2, manager_pb2_grpc
from roundhouse.errors import RoundhouseError
from roundhouse.grpcserver import abort_with


class ManagerServicer(manager_pb2_grpc.ManagerServicer):
    def __init__(self, manager: Manager):
        self._m = manager

    async def Report(self, request, context):
        try:
            self._m.on_report(request)
        except RoundhouseError as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, e.message)
        return manager_pb2.ReportAck()

    async def ListResidency(self, request, context):
        m = self._m
        out = manager_pb2.ListResidencyResponse(models=[e.residency() for e in m.entries.values()])
        now = time.time()
        views = [e.view(now) for e in m.entries.values()]
        host_used = m.host_sleep_used()
        for gpu, budget in m.budgets.items():
            host = m.host_of[gpu]
            swaps = {"sleep" if e.can_sleep else "stop" for e in m.entries.values() if e.spec.gpu == gpu}
            out.gpus.add(gpu=gpu, budget_bytes=budget, used_bytes=used_bytes(views, gpu), swap="/".join(sorted(swaps)),
                         host=host.id, host_sleep_budget_bytes=host.sleep_budget_bytes, host_sleep_used_bytes=host_used[host.id])
        return out

    async def Pin(self, request, context):
        return await self._admin(context, self._m.pin, request.model, True)

    async def Unpin(self, request, context):
        return await self._admin(context, self._m.pin, request.model, False)

    async def LoadModel(self, request, context):
        return await self._admin(context, self._m.load_by_hand, request.model)

    async def EvictModel(self, request, context):
        return await self._admin(context, self._m.evict_by_hand, request.model)

    async def Drain(self, request, context):
        return await self._admin(context, self._m.drain, request.model)

    async def _admin(self, context, fn, *args) -> manager_pb2.ModelResidency:
        try:
            entry = await fn(*args)
        except RoundhouseError as e:
            await abort_with(context, e)
        return entry.residency()
