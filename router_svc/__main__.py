"""`router-svc --config models.yaml`: flags → RouterConfig → asyncio.run(serve())."""
from __future__ import annotations

import asyncio
import signal

from roundhouse import logs
from router_svc.config import parse


def main(argv: list[str] | None = None) -> None:
    config = parse(argv)
    logs.configure("router", config.log_level)

    async def run() -> None:
        from router_svc.server import serve

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(config, stop)

    asyncio.run(run())


if __name__ == "__main__":
    main()
