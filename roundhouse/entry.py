"""What every service's entry point shares: env defaults, the catalogue at the edge, the run loop."""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
from collections.abc import Awaitable, Callable

from roundhouse import catalogue, logs


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


def run(service: str, log_level: str, serve: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Configures logging, then runs `serve(stop)` until SIGINT / SIGTERM sets `stop`."""
    logs.configure(service, log_level)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(stop)

    asyncio.run(main())
