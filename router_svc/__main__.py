"""`router-svc --config models.yaml`: flags → config → serve() until SIGINT / SIGTERM."""
from __future__ import annotations

import structlog

from roundhouse import cpu, entry
from router_svc.config import parse


def main(argv: list[str] | None = None) -> None:
    config = parse(argv)
    refused = cpu.set_nice(config.cpu_nice)   # before any thread starts: they inherit it

    async def serve(stop) -> None:
        from router_svc.server import serve as serve_forever  # imported late: --help stays fast

        if refused:
            structlog.get_logger("router").warning("router.cpu_nice_refused", nice=config.cpu_nice, why=refused,
                                                   hint="runs at its old priority; needs CAP_SYS_NICE")
        await serve_forever(config, stop)

    entry.run("router", config.log_level, serve, otel=config.otel, event_loop=config.event_loop)


if __name__ == "__main__":
    main()
