"""JetStream publish-to-PubAck latency on the embedded nats-server, durable or not.

    .venv/bin/python -m tests.bench.bench_publish [--rounds 20]

Starts nats-server as `roundhouse up` does (`durable`: `sync_interval: always`, every message
fsynced before its PubAck, which the nothing-lost promise needs) and without it, and publishes
200-byte messages at concurrency 1 and 32. Prints p50 / p99 per case: the part of a request's
time to first token that durability costs. Asserts nothing.
"""
from __future__ import annotations

import argparse
import asyncio
import pathlib
import tempfile
import time

import nats

from roundhouse import natsd


async def run(durable: bool, rounds: int) -> None:
    server = await natsd.start_async(pathlib.Path(tempfile.mkdtemp(prefix="rh-bench-pub-")) / "js", durable=durable)
    nc = await nats.connect(server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(name="BENCH", subjects=["bench.>"])
        for concurrency in (1, 32):
            lat: list[float] = []

            async def one() -> None:
                t = time.perf_counter()
                await js.publish("bench.x", b"x" * 200)
                lat.append(time.perf_counter() - t)

            for _ in range(rounds):
                await asyncio.gather(*(one() for _ in range(concurrency)))
            lat.sort()
            print(f"durable={durable!s:5} concurrency {concurrency:>2}: p50 {lat[len(lat) // 2] * 1e3:6.2f} ms  "
                  f"p99 {lat[int(len(lat) * 0.99)] * 1e3:6.2f} ms  ({len(lat)} publishes)")
    finally:
        await nc.close()
        server.stop()


async def main(a: argparse.Namespace) -> None:
    for durable in (False, True):
        await run(durable, a.rounds)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=20)
    asyncio.run(main(p.parse_args()))
