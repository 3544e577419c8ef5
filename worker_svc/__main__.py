"""`worker-svc --config models.yaml`: flags → config → serve() until SIGINT / SIGTERM."""
from __future__ import annotations

from roundhouse import entry
from worker_svc.config import parse


def main(argv: list[str] | None = None) -> None:
    config = parse(argv)

    async def serve(stop) -> None:
        from worker_svc.service import serve as serve_forever  # imported late: --help stays fast

        await serve_forever(config, stop)

    # Its session holds its engine's processes too: the process's own nice (which the engine's
    # processes are given back once started, Engine.start) and, apart, the session's group.
    entry.run("worker", config.log_level, serve, otel=config.otel, event_loop=config.event_loop,
              cpu_nice=config.cpu_nice, cpu_session=False, session_nice=config.engine_group_nice)


if __name__ == "__main__":
    main()
