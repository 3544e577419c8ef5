"""What every service's Prometheus metrics share: bucket sets that fit a CPU and an H100 alike,
the `--metrics-port` flag, and the scrape endpoint (prometheus_client's own server).

Each service defines its metrics in its own `metrics` module, in prometheus_client's global
registry (where vLLM's engine metrics land too, in a worker). Names follow Prometheus style:
`roundhouse_` prefix, base units in the name (`_seconds`, `_bytes`), counters end in `_total`
(prometheus_client adds it). Labels are bounded: model names come from the catalogue, never
from a request that failed to name one (those count under OTHER_MODEL). A service's gauges of
what is true now are a collector read at scrape time; it has no `describe`: the registry calls
its `collect` once at registration, before anything is watched, and learns the names from the
empty families it yields.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable

import prometheus_client

# Latencies a request sees: a token on an H100 (milliseconds) to a cold load on a CPU (a minute).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)
# Gaps between tokens: ~2 ms on an H100, tens of ms on a busy CPU.
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
# Loads, wakes and evictions: a wake in tens of ms (CUDA sleep level 1) to a cold start of minutes.
TRANSITION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)

OTHER_MODEL = "(other)"   # the model label of a request that named no configured model


def metrics_flag(parser: argparse.ArgumentParser, env: Callable[[str, str], str], default: int) -> None:
    parser.add_argument("--metrics-port", type=int, default=int(env("METRICS_PORT", str(default))),
                        help="Prometheus /metrics on this port (0: any free port, in the ready file; -1: off)")


def serve(host: str, port: int) -> int:
    """Serves the global registry's /metrics on its own thread (a scrape never runs on the
    service's event loop); returns the port (0: any free one). -1: not served, returns 0."""
    if port < 0:
        return 0
    server, _ = prometheus_client.start_http_server(port, addr=host)
    return server.server_port


def exposition() -> tuple[bytes, str]:
    """The global registry in the text format, and its content type (for a /metrics handler)."""
    return prometheus_client.generate_latest(), prometheus_client.CONTENT_TYPE_LATEST
