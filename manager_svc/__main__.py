"""`manager-svc --config models.yaml`: flags → config → serve() until SIGINT / SIGTERM."""
from __future__ import annotations

from roundhouse import entry
from manager_svc.config import parse


def main(argv: list[str] | None = None) -> None:
    config = parse(argv)

    async def serve(stop) -> None:
        from manager_svc.service import serve as serve_forever  # imported late: --help stays fast

        await serve_forever(config, stop)

    entry.run("manager", config.log_level, serve, otel=config.otel, event_loop=config.event_loop)


if __name__ == "__main__":
    main()
