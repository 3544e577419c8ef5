"""`manager-svc --config models.yaml`: flags → ManagerConfig → asyncio.run(serve())."""
from __future__ import annotations

import asyncio
import signal

from manager_svc.config import parse
from roundhouse import logs


def main(argv: list[str] | None = None) -> None:
    config = parse(argv)
    logs.configure("manager", config.log_level)

    async def run() -> None:
        from manager_svc.service import serve

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(config, stop)

    asyncio.run(run())


if __name__ == "__main__":
    main()
