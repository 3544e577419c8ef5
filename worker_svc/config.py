"""Worker configuration: parsed once in __main__ (flags, with ROUNDHOUSE_WORKER_* env defaults)."""
from __future__ import annotations

import argparse
import dataclasses
import socket
import uuid

from roundhouse import catalogue, cpu, entry, metrics, tenancy, tls


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    model: catalogue.ModelSpec
    nats_url: str = "nats://127.0.0.1:4222"
    host: str = "127.0.0.1"
    port: int = 0                      # 0: any free port (logged in `worker.serving`)
    advertise_host: str = ""           # how the manager reaches this worker (default: host)
    worker_id: str = ""
    load_on_start: bool = True
    ack_wait_s: float = 30.0           # JetStream redelivers a request this long after a worker went silent
    max_deliver: int = 10              # deliveries of one request before it is given up
    drain_timeout_s: float = 30.0      # Evict: how long in-flight requests may finish
    stop_grace_s: float = 20.0         # SIGTERM: how long in-flight requests may finish (the rest go back)
    ready_file: str = ""               # written with {"port": N} once the gRPC server listens
    manager: str = ""                  # host:port of the Manager; then the manager decides loads
    report_interval_s: float = 2.0     # how often the worker refreshes its report to the manager
    log_level: str = "info"
    metrics_port: int = 0              # Prometheus /metrics (0: any free port, in the ready file; -1: off)
    otel: bool = False                 # export traces over OTLP (roundhouse.tracing)
    event_loop: str = "asyncio"        # entry.EVENT_LOOPS
    cpu_nice: int = 0                  # roundhouse.cpu: < 0 puts this process (not its engine) ahead for CPU
    engine_group_nice: int = 0         # roundhouse.cpu: > 0 puts every other process ahead of this worker's session
    manager_key: str = ""              # sent with every report (the config's admin.worker_key; "" when none)
    tls_internal: tls.Internal | None = None   # mutual TLS on its port and to the manager and routers


_env = entry.env_reader("worker")


def parse(argv: list[str] | None = None) -> WorkerConfig:
    p = argparse.ArgumentParser(prog="worker-svc", description="Roundhouse worker: one vLLM engine for one model")
    p.add_argument("--config", default=_env("CONFIG", ""), help="models YAML (env ROUNDHOUSE_WORKER_CONFIG)")
    p.add_argument("--model", default=_env("MODEL", ""), help="model name in the catalogue")
    p.add_argument("--nats-url", default=_env("NATS_URL", WorkerConfig.nats_url))
    p.add_argument("--host", default=_env("HOST", WorkerConfig.host))
    p.add_argument("--port", type=int, default=int(_env("PORT", "0")))
    p.add_argument("--advertise-host", default=_env("ADVERTISE_HOST", ""), help="address the manager calls (default: --host)")
    p.add_argument("--worker-id", default=_env("ID", ""))
    p.add_argument("--no-load", action="store_true", help="start UNLOADED and wait for a Load call")
    p.add_argument("--manager", default=_env("MANAGER", ""), help="Manager address; implies --no-load")
    p.add_argument("--ack-wait", type=float, default=float(_env("ACK_WAIT_S", str(WorkerConfig.ack_wait_s))))
    p.add_argument("--max-deliver", type=int, default=int(_env("MAX_DELIVER", str(WorkerConfig.max_deliver))))
    p.add_argument("--drain-timeout", type=float, default=float(_env("DRAIN_TIMEOUT_S", str(WorkerConfig.drain_timeout_s))))
    p.add_argument("--stop-grace", type=float, default=float(_env("STOP_GRACE_S", str(WorkerConfig.stop_grace_s))),
                   help="on SIGTERM, requests in flight get this long to finish; the rest are queued again")
    entry.ready_flag(p, _env)
    metrics.metrics_flag(p, _env, WorkerConfig.metrics_port)
    entry.otel_flag(p, _env)
    entry.event_loop_flag(p, _env, WorkerConfig.event_loop)
    p.add_argument("--log-level", default=_env("LOG_LEVEL", "info"))
    p.add_argument("--cpu-nice", type=cpu.nice_value, default=_env("CPU_NICE", "0"),
                   help="nice value for this process, not its engine's (-20..19; below 0 needs CAP_SYS_NICE): "
                        "`roundhouse up` runs workers at -10 where the kernel's autogroups do not apply, so "
                        "that their own engine does not delay the tokens' way out, and uses "
                        "--engine-group-nice where they do (roundhouse/cpu.py; env ROUNDHOUSE_WORKER_CPU_NICE)")
    p.add_argument("--engine-group-nice", type=cpu.nice_value, default=_env("ENGINE_GROUP_NICE", "0"),
                   help="nice of the kernel's CPU group (autogroup) of this worker's session, which holds its "
                        "engine, where autogroups are on and the worker leads its session: above 0, a wake-up "
                        "of any other process (router, NATS, another worker) takes the CPU from this worker and "
                        "its engine at once; `roundhouse up` uses 10 there, with --cpu-nice 0 "
                        "(roundhouse/cpu.py; env ROUNDHOUSE_WORKER_ENGINE_GROUP_NICE)")
    a = p.parse_args(argv)
    if not a.model:
        p.error("--model is required")
    cat = entry.load_catalogue(p, a.config)
    try:
        spec = cat.get(a.model)
    except catalogue.ConfigError as e:
        p.error(str(e))
    if a.stop_grace < 0:
        p.error("--stop-grace must be >= 0")
    if a.ack_wait <= 1:
        p.error("--ack-wait must be > 1 second")
    manager_key = ""
    try:
        if a.manager and cat.admin is not None and cat.admin.worker_key is not None:
            manager_key = tenancy.read_key(cat.admin.worker_key, "admin.worker_key")
        internal, _ = tls.load(cat.tls)
    except (tenancy.TenancyError, tls.TlsError) as e:
        p.error(f"{a.config}: {e}")
    return WorkerConfig(
        model=spec,
        nats_url=a.nats_url,
        host=a.host,
        port=a.port,
        advertise_host=a.advertise_host,
        worker_id=a.worker_id or f"{socket.gethostname()}-{spec.name}-{uuid.uuid4().hex[:6]}",
        load_on_start=not (a.no_load or a.manager),
        manager=a.manager,
        report_interval_s=cat.manager.report_interval_s,
        ack_wait_s=a.ack_wait,
        max_deliver=a.max_deliver,
        drain_timeout_s=a.drain_timeout,
        stop_grace_s=a.stop_grace,
        ready_file=a.ready_file,
        log_level=a.log_level,
        metrics_port=a.metrics_port,
        otel=a.otel,
        event_loop=a.event_loop,
        cpu_nice=a.cpu_nice,
        engine_group_nice=a.engine_group_nice,
        manager_key=manager_key,
        tls_internal=internal,
    )
