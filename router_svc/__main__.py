"""`router-svc --config models.yaml`: flags → config → serve() until SIGINT / SIGTERM."""
from __future__ import annotations

from roundhouse import entry
from router_svc.config import parse


def main(argv: list[str] | None = None) -> None:
    config = parse(argv)

    async def serve(stop) -> None:
        from router_svc.server import serve as serve_forever  # imported late: --help stays fast

        await serve_forever(config, stop)

    entry.run("router", config.log_level, serve, otel=config.otel, event_loop=config.event_loop,
              cpu_nice=config.cpu_nice)


if __name__ == "__main__":
    main()
