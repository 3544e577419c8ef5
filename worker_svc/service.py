"""Composes a worker process: NATS consumer, engine owner, gRPC control server; ordered shutdown."""
from __future__ import annotations

import asyncio
import contextlib

import grpc
import structlog


from protos.v1 import manager_pb2_grpc, worker_pb2, worker_pb2_grpc
from roundhouse import entry, grpcserver, jetstream, natsconn, reaper, subjects, tasks as aiotasks, tls
from roundhouse import metrics as shared_metrics
from worker_svc import consume, lanes, metrics, preflight
from worker_svc.config import WorkerConfig
from worker_svc.servicer import WorkerServicer
from worker_svc.worker import ModelWorker

log = structlog.get_logger("worker")

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name


async def serve(config: WorkerConfig, stop: asyncio.Event) -> None:
    structlog.contextvars.bind_contextvars(worker_id=config.worker_id, model=config.model.name)
    reaper.guard()  # the engine processes it will start die with it, however it dies
    # 1. NATS: the stream, this model's consumer, a pull subscription bound to it.
    nc = await natsconn.connect(config.nats_url, config.worker_id)
    js = nc.jetstream()
    await jetstream.ensure_stream(js)
    await jetstream.ensure_consumers(js, config.model.name, config.ack_wait_s, config.max_deliver)

    # 2. The worker and its control server.
    async def republish(subject: str, payload: bytes, headers: dict) -> None:
        await js.publish(subject, payload, headers=headers, timeout=10)

    worker = ModelWorker(config, republish)
    pull = lanes.Lanes(worker, lanes.pullers(nc, config.model.name))   # one consumer per priority class
    await pull.start()
    metrics.GAUGES.watch(worker)
    metrics_port = shared_metrics.serve(config.host, config.metrics_port)
    server = grpcserver.new_server()
    worker_pb2_grpc.add_WorkerServicer_to_server(WorkerServicer(worker), server)
    health = await grpcserver.add_standard_services(server, [SERVICE_NAME])
    port = tls.add_port(server, f"{config.host}:{config.port}", config.tls_internal)
    await server.start()
    log.info("worker.serving", address=f"{config.host}:{port}", subject=subjects.request_subject(config.model.name),
             metrics_port=metrics_port or None)
    entry.write_ready(config.ready_file, port=port, worker_id=config.worker_id, metrics_port=metrics_port)

    heartbeat = asyncio.create_task(consume.heartbeat_loop(worker, pull, config.ack_wait_s / 3), name="heartbeat")
    tasks = [asyncio.create_task(pull.run(), name="pull")]
    if config.manager:
        tasks.append(asyncio.create_task(_report_loop(worker, config, f"{config.advertise_host or config.host}:{port}"), name="report"))
    if config.load_on_start:
        tasks.append(asyncio.create_task(_load_quietly(worker), name="initial-load"))
    try:
        await stop.wait()
    finally:
        # 3. Shutdown: stop answering health, stop fetching, requeue what is in flight,
        #    stop the engine, close the server and the NATS connection.
        log.info("worker.stopping")
        await health.enter_graceful_shutdown()
        await aiotasks.cancel_all(tasks)
        await worker.close()  # requests in flight finish (still heartbeated) or are handed back
        await aiotasks.cancel_all([heartbeat])
        await server.stop(grace=2)
        await pull.close()
        with contextlib.suppress(Exception):
            await nc.drain()
        log.info("worker.stopped")


async def _load_quietly(worker: ModelWorker) -> None:
    with contextlib.suppress(Exception):  # the failure is in the state (FAILED) and the log
        await worker.load()





async def _report_loop(worker: ModelWorker, config: WorkerConfig, address: str) -> None:
    """Registers with the manager, then reports every state change, every time it goes idle
    (the manager may evict an idle model at once), and periodically."""
    problem = await asyncio.to_thread(preflight.check, config.model.path)
    async with tls.channel(config.manager, config.tls_internal) as channel:
        stub = manager_pb2_grpc.ManagerStub(channel)
        metadata = (("authorization", f"Bearer {config.manager_key}"),) if config.manager_key else ()
        while True:
            worker.went_idle.clear()
            try:
                await stub.Report(worker.report(address, problem), timeout=5, metadata=metadata)
            except grpc.aio.AioRpcError as e:
                refused = e.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
                # A refused key is a configuration error a person must see; a manager away is routine.
                (log.error if refused else log.debug)("worker.report_failed", manager=config.manager,
                                                       code=e.code().name, error=e.details() if refused else None)
            await worker.next_report(config.report_interval_s)
