"""Router configuration: parsed once in __main__ (flags, with ROUNDHOUSE_ROUTER_* env defaults)."""
from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import socket

from roundhouse import catalogue, cpu, entry, tenancy, tls
from router_svc.auth import Auth


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    catalogue: catalogue.Catalogue
    nats_url: str = "nats://127.0.0.1:4222"
    host: str = "127.0.0.1"
    port: int = 50051                    # 0: any free port
    http_port: int = 8000                # OpenAI-compatible HTTP API; 0: any free port, -1: off
    delivery_port: int = 0               # internal: workers stream tokens here (0: any free port;
                                         # workers learn it from each request's reply_to)
    advertise_host: str = ""             # how workers reach this router (default: host)
    default_timeout_s: float = 600.0     # deadline of a request whose caller set none
    publish_timeout_s: float = 5.0
    job_ack_wait_s: float = 30.0         # a lost router's running jobs are rerun after this long
    job_concurrency: int = 64
    stop_grace_s: float = 20.0           # on SIGTERM, streams in flight get this long to finish
    log_level: str = "info"
    ready_file: str = ""                 # written with the ports as JSON once serving
    otel: bool = False                   # export traces over OTLP (roundhouse.tracing)
    event_loop: str = "uvloop"           # entry.EVENT_LOOPS
    cpu_nice: int = 0                    # roundhouse.cpu: < 0 puts the router ahead of a local engine
    auth: Auth | None = None             # the tenants' keys, read at the edge (None: built from the catalogue)
    tls_internal: tls.Internal | None = None   # the delivery port's mutual TLS (None: from the catalogue's tls)
    tls_public: tls.Public | None = None       # the gRPC and HTTP ports' TLS (None: from the catalogue's tls)


_env = entry.env_reader("router")


def parse(argv: list[str] | None = None) -> RouterConfig:
    p = argparse.ArgumentParser(prog="router-svc", description="Roundhouse router: the public gRPC front door")
    p.add_argument("--config", default=_env("CONFIG", ""), help="models YAML (env ROUNDHOUSE_ROUTER_CONFIG)")
    p.add_argument("--nats-url", default=_env("NATS_URL", RouterConfig.nats_url))
    p.add_argument("--host", default=_env("HOST", RouterConfig.host))
    p.add_argument("--port", type=int, default=int(_env("PORT", str(RouterConfig.port))))
    p.add_argument("--http-port", type=int, default=int(_env("HTTP_PORT", str(RouterConfig.http_port))),
                   help="OpenAI-compatible HTTP port (0: any free port, -1: off)")
    p.add_argument("--delivery-port", type=int, default=int(_env("DELIVERY_PORT", str(RouterConfig.delivery_port))),
                   help="internal port workers stream tokens back to (0: any free port)")
    p.add_argument("--job-ack-wait", type=float, default=float(_env("JOB_ACK_WAIT_S", str(RouterConfig.job_ack_wait_s))))
    p.add_argument("--job-concurrency", type=int, default=int(_env("JOB_CONCURRENCY", str(RouterConfig.job_concurrency))))
    p.add_argument("--advertise-host", default=_env("ADVERTISE_HOST", ""))
    p.add_argument("--default-timeout", type=float, default=float(_env("DEFAULT_TIMEOUT_S", str(RouterConfig.default_timeout_s))))
    p.add_argument("--stop-grace", type=float, default=float(_env("STOP_GRACE_S", str(RouterConfig.stop_grace_s))),
                   help="on SIGTERM, streams in flight get this long to finish")
    p.add_argument("--log-level", default=_env("LOG_LEVEL", "info"))
    p.add_argument("--insecure", action="store_true", default=_env("INSECURE", "") not in ("", "0", "false"),
                   help="serve on a non-loopback address with no API keys (the config has no tenants): anyone "
                        "who reaches the port may use every model (env ROUNDHOUSE_ROUTER_INSECURE=1)")
    entry.ready_flag(p, _env)
    entry.otel_flag(p, _env)
    entry.event_loop_flag(p, _env, RouterConfig.event_loop)
    p.add_argument("--cpu-nice", type=cpu.nice_value, default=_env("CPU_NICE", "0"),
                   help="nice value for this process and its session (-20..19; below 0 needs CAP_SYS_NICE): "
                        "`roundhouse up` runs the router at -10 so that the engine beside it does not delay "
                        "its wake-ups (roundhouse/cpu.py; env ROUNDHOUSE_ROUTER_CPU_NICE)")
    a = p.parse_args(argv)
    cat = entry.load_catalogue(p, a.config)
    try:
        auth = Auth(cat)
        internal, public = tls.load(cat.tls)
    except (tenancy.TenancyError, tls.TlsError) as e:
        p.error(f"{a.config}: {e}")
    if not auth.enabled and not a.insecure and not is_loopback(a.host):
        p.error(f"--host {a.host} is reachable from other machines and the config has no tenants, so anyone could use "
                "every model: add tenants with API keys to the config (see roundhouse.tenancy; `roundhouse key new` "
                "makes a key), or pass --insecure to serve it open")
    if a.default_timeout <= 0:
        p.error("--default-timeout must be > 0")
    if a.stop_grace < 0:
        p.error("--stop-grace must be >= 0")
    if a.job_ack_wait <= 0 or a.job_concurrency <= 0:
        p.error("--job-ack-wait and --job-concurrency must be > 0")
    return RouterConfig(
        catalogue=cat,
        nats_url=a.nats_url,
        host=a.host,
        port=a.port,
        http_port=a.http_port,
        delivery_port=a.delivery_port,
        job_ack_wait_s=a.job_ack_wait,
        job_concurrency=a.job_concurrency,
        advertise_host=a.advertise_host,
        default_timeout_s=a.default_timeout,
        stop_grace_s=a.stop_grace,
        log_level=a.log_level,
        ready_file=a.ready_file,
        otel=a.otel,
        event_loop=a.event_loop,
        cpu_nice=a.cpu_nice,
        auth=auth,
        tls_internal=internal,
        tls_public=public,
    )


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or a name) is only reachable from this machine."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
    except (OSError, ValueError):
        return False
