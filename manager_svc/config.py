"""Manager configuration: parsed once in __main__ (flags, with ROUNDHOUSE_MANAGER_* env defaults)."""
from __future__ import annotations

import argparse
import dataclasses

from roundhouse import catalogue, entry, metrics, tenancy, tls


@dataclasses.dataclass(frozen=True)
class ManagerConfig:
    catalogue: catalogue.Catalogue
    nats_url: str = "nats://127.0.0.1:4222"
    host: str = "127.0.0.1"
    port: int = 50052
    log_level: str = "info"
    ready_file: str = ""                 # written with the port as JSON once serving
    metrics_port: int = 0                # Prometheus /metrics (0: any free port, in the ready file; -1: off)
    otel: bool = False                   # export traces over OTLP (roundhouse.tracing)
    event_loop: str = "asyncio"          # entry.EVENT_LOOPS
    credentials: tenancy.AdminCredentials | None = None   # read at the edge (None: from the catalogue)
    tls_internal: tls.Internal | None = None   # read at the edge (None: from the catalogue's tls, if any)


_env = entry.env_reader("manager")


def parse(argv: list[str] | None = None) -> ManagerConfig:
    p = argparse.ArgumentParser(prog="manager-svc", description="Roundhouse manager: which models are resident")
    p.add_argument("--config", default=_env("CONFIG", ""), help="models YAML (env ROUNDHOUSE_MANAGER_CONFIG)")
    p.add_argument("--nats-url", default=_env("NATS_URL", ManagerConfig.nats_url))
    p.add_argument("--host", default=_env("HOST", ManagerConfig.host))
    p.add_argument("--port", type=int, default=int(_env("PORT", str(ManagerConfig.port))))
    p.add_argument("--log-level", default=_env("LOG_LEVEL", "info"))
    entry.ready_flag(p, _env)
    metrics.metrics_flag(p, _env, ManagerConfig.metrics_port)
    entry.otel_flag(p, _env)
    entry.event_loop_flag(p, _env, ManagerConfig.event_loop)
    a = p.parse_args(argv)
    cat = entry.load_catalogue(p, a.config)
    try:
        credentials = tenancy.AdminCredentials.of(cat.admin)
        internal, _ = tls.load(cat.tls)
    except (tenancy.TenancyError, tls.TlsError) as e:
        p.error(f"{a.config}: {e}")
    return ManagerConfig(tls_internal=internal, catalogue=cat, nats_url=a.nats_url, host=a.host, port=a.port, log_level=a.log_level,
                         ready_file=a.ready_file, metrics_port=a.metrics_port, otel=a.otel, credentials=credentials,
                         event_loop=a.event_loop)
