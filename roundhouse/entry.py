"""What every service's entry point shares: env defaults, the catalogue at the edge, the run loop."""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import pathlib
import signal
from collections.abc import Awaitable, Callable

import structlog

from roundhouse import catalogue, cpu, logs, tracing


def env_reader(service: str) -> Callable[[str, str], str]:
    """`ROUNDHOUSE_<SERVICE>_<NAME>` with a default: every flag's env twin."""
    prefix = f"ROUNDHOUSE_{service.upper()}_"
    return lambda name, default: os.environ.get(prefix + name, default)


def load_catalogue(parser: argparse.ArgumentParser, path: str) -> catalogue.Catalogue:
    """The models YAML, or exit with the error naming the bad key."""
    if not path:
        parser.error("--config is required")
    try:
        return catalogue.load(path)
    except catalogue.ConfigError as e:
        parser.error(str(e))


def freeze_heap() -> None:
    """Puts every object alive now out of the cyclic garbage collector's reach (`gc.freeze`), as
    vLLM's own server does once it has started (vllm.utils.gc_utils.freeze_gc_heap).

    A service allocates per token, so collections run all the time, and each full one walks
    every object of every imported module: a native profile of a worker relaying four fast
    streams (py-spy, bench_loop_lag) put ~80% of its event loop's thread in `gc_collect_main`,
    under vLLM's output handler. Call it once start-up (or a model load) is done."""
    gc.collect()
    gc.freeze()


def thaw_heap() -> None:
    """Undoes `freeze_heap` (before a large part of the heap is let go, such as an engine)."""
    gc.unfreeze()


def write_ready(path: str, **info) -> None:
    """Writes `info` (ports, ids) as JSON to `path` once a service listens: the process that
    started it (`roundhouse up`, the tests) waits for this file. Written whole or not at all."""
    if path:
        tmp = pathlib.Path(path + ".tmp")
        tmp.write_text(json.dumps(info))
        tmp.rename(path)


def ready_flag(parser: argparse.ArgumentParser, env: Callable[[str, str], str]) -> None:
    parser.add_argument("--ready-file", default=env("READY_FILE", ""),
                        help="write the service's ports as JSON here once it listens (for the process that started it)")


def otel_flag(parser: argparse.ArgumentParser, env: Callable[[str, str], str]) -> None:
    parser.add_argument("--otel", action="store_true", default=env("OTEL", "") not in ("", "0", "false"),
                        help="export traces over OTLP (also on when OTEL_EXPORTER_OTLP_ENDPOINT is set); "
                             "needs the roundhouse[otel] extra")


EVENT_LOOPS = ("uvloop", "asyncio")


def event_loop_flag(parser: argparse.ArgumentParser, env: Callable[[str, str], str], default: str) -> None:
    """The router's default is uvloop (measured: `_loop_factory`); the manager's and the worker's
    stay asyncio's own until their own figures say otherwise."""
    parser.add_argument("--event-loop", type=_event_loop, metavar="{" + ",".join(EVENT_LOOPS) + "}", default=env("EVENT_LOOP", default),
                        help=f"uvloop (libuv, which vLLM's own server runs on) or asyncio's own loop ({default})")


def _event_loop(name: str) -> str:
    """A `type`, not `choices`: argparse checks choices only on the command line, but passes a
    string default (the env twin) through `type`, so a bad ROUNDHOUSE_<SERVICE>_EVENT_LOOP is
    refused too."""
    if name not in EVENT_LOOPS:
        raise argparse.ArgumentTypeError(f"{name!r}: must be one of {', '.join(EVENT_LOOPS)}")
    return name


def _loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop (its transports, timers and callbacks are C: bench_router_relay, the router
    on uvloop against asyncio's loop, same code, alternating: 0.90 of the CPU per relayed token),
    or None for asyncio's own."""
    if name == "asyncio":
        return None
    import uvloop

    return uvloop.new_event_loop


def run(service: str, log_level: str, serve: Callable[[asyncio.Event], Awaitable[None]], otel: bool = False,
        event_loop: str = "asyncio", cpu_nice: int = 0, cpu_session: bool = True, session_nice: int = 0) -> None:
    """Configures logging, the process's CPU priority (`cpu.set_nice(cpu_nice, cpu_session)`,
    before tracing or the loop start a thread: threads inherit it; `session_nice`: its session's
    group, `cpu.set_session_nice`) and tracing, then runs `serve(stop)` on `event_loop`
    (EVENT_LOOPS) until SIGINT / SIGTERM sets `stop`."""
    logs.configure(service, log_level)
    refused = cpu.set_nice(cpu_nice, cpu_session)
    if refused:
        structlog.get_logger(service).warning(f"{service}.cpu_nice_refused", nice=cpu_nice, why=refused,
                                              **({"hint": "runs at its old priority; needs CAP_SYS_NICE"}
                                                 if "setpriority" in refused else {}))
    if refused := cpu.set_session_nice(session_nice):
        structlog.get_logger(service).warning(f"{service}.session_nice_not_set", nice=session_nice, why=refused)
    tracing.configure(service, export=True if otel else None)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(stop)

    try:
        with asyncio.Runner(loop_factory=_loop_factory(event_loop)) as runner:
            runner.run(main())
    finally:
        tracing.shutdown()
