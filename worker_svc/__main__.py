"""`worker-svc --config models.yaml`: flags → config → serve() until SIGINT / SIGTERM."""
from __future__ import annotations

import structlog

from roundhouse import cpu, entry
from worker_svc.config import parse


def main(argv: list[str] | None = None) -> None:
    config = parse(argv)
    # Its session holds its engine's processes too: the process's own nice only, which the
    # engine's processes are given back once started (Engine.start).
    refused = cpu.set_nice(config.cpu_nice, session=False)

    async def serve(stop) -> None:
        from worker_svc.service import serve as serve_forever  # imported late: --help stays fast

        if refused:
            structlog.get_logger("worker").warning("worker.cpu_nice_refused", nice=config.cpu_nice, why=refused,
                                                   hint="runs at its old priority; needs CAP_SYS_NICE")
        await serve_forever(config, stop)

    entry.run("worker", config.log_level, serve, otel=config.otel, event_loop=config.event_loop)


if __name__ == "__main__":
    main()
