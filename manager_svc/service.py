"""Composes a manager process: the Manager core and its gRPC server."""
from __future__ import annotations

import asyncio

import structlog

from manager_svc import metrics
from manager_svc.config import ManagerConfig
from manager_svc.manager import Manager
from manager_svc.servicer import ManagerServicer
from protos.v1 import manager_pb2, manager_pb2_grpc
from roundhouse import entry, grpcserver, tls
from roundhouse import metrics as shared_metrics
from roundhouse.tenancy import AdminCredentials

log = structlog.get_logger("manager")

SERVICE_NAME = manager_pb2.DESCRIPTOR.services_by_name["Manager"].full_name


class ManagerService:
    """A running manager (tests start, kill and restart it in-process)."""

    def __init__(self, config: ManagerConfig):
        self.config = config
        self.tls = config.tls_internal or tls.load(config.catalogue.tls)[0]
        self.manager = Manager(config.catalogue, config.nats_url, tls=self.tls)
        self.port = 0
        self._server = None
        self._health = None

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    async def start(self) -> None:
        await self.manager.start()
        self._server = grpcserver.new_server()
        credentials = self.config.credentials or AdminCredentials.of(self.config.catalogue.admin)
        manager_pb2_grpc.add_ManagerServicer_to_server(ManagerServicer(self.manager, credentials), self._server)
        self._health = await grpcserver.add_standard_services(self._server, [SERVICE_NAME])
        self.port = tls.add_port(self._server, f"{self.config.host}:{self.config.port}", self.tls)
        await self._server.start()
        log.info("manager.serving", address=self.address)

    async def stop(self, grace: float = 2.0) -> None:
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace)
        await self.manager.stop()
        log.info("manager.stopped")


async def serve(config: ManagerConfig, stop: asyncio.Event) -> None:
    service = ManagerService(config)
    await service.start()
    metrics.GAUGES.watch(service.manager)
    metrics_port = shared_metrics.serve(config.host, config.metrics_port)
    log.info("manager.metrics", port=metrics_port or None)
    entry.freeze_heap()
    entry.write_ready(config.ready_file, port=service.port, metrics_port=metrics_port)
    try:
        await stop.wait()
    finally:
        await service.stop()
