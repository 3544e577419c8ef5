"""The Manager gRPC service: workers' reports and the admin surface."""
from __future__ import annotations

import time

import grpc

from manager_svc.manager import Manager
from manager_svc.policy import used_bytes
from protos.v1 import manager_pb2, manager_pb2_grpc
from roundhouse.errors import RoundhouseError, Unauthenticated
from roundhouse.grpcserver import abort_with
from roundhouse.tenancy import AdminCredentials


class ManagerServicer(manager_pb2_grpc.ManagerServicer):
    """Reports need the worker key and admin calls an admin key, when the config's `admin` gives
    them (roundhouse.tenancy.AdminSpec); ListResidency (read only) is open."""

    def __init__(self, manager: Manager, credentials: AdminCredentials = AdminCredentials()):
        self._m = manager
        self._credentials = credentials

    async def _check(self, context, worker: bool = False) -> None:
        metadata = dict(context.invocation_metadata() or ())
        if not self._credentials.allows(metadata.get("authorization"), worker=worker):
            what = "the worker key (admin.worker_key)" if worker else "an admin key (admin.keys)"
            await abort_with(context, Unauthenticated(f"this call needs {what} as 'authorization' metadata"))

    async def Report(self, request, context):
        await self._check(context, worker=True)
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
        await self._check(context)
        try:
            entry = await fn(*args)
        except RoundhouseError as e:
            await abort_with(context, e)
        return entry.residency()
