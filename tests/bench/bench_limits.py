"""What a tenant's limits add to admission: `Limiter.acquire` against a real nats-server (KV bucket
rh-limits), for a tenant with requests per minute only and one with all four limits.

    .venv/bin/python -m tests.bench.bench_limits

Tenants with no limits skip the limiter entirely (no NATS call). Asserts nothing.
"""
from __future__ import annotations

import asyncio
import pathlib
import statistics
import tempfile
import time

import nats

from roundhouse import natsd, tenancy
from router_svc.auth import Tenant
from router_svc.limits import Limiter


async def main() -> None:
    d = pathlib.Path(tempfile.mkdtemp())
    s = await natsd.start_async(d/"js")
    nc = await nats.connect(s.url)
    lim = Limiter(nc.jetstream())
    await lim.start()
    cases = {"rpm": tenancy.Limits(requests_per_minute=10**9),
             "rpm+tpm+tpd+conc": tenancy.Limits(requests_per_minute=10**9, tokens_per_minute=10**12, tokens_per_day=10**12, concurrent_requests=10**6)}
    for name, l in cases.items():
        t = Tenant(name.replace("+","_"), None, l)
        xs: list[float] = []
        for _ in range(300):
            t0 = time.perf_counter()
            lease = await lim.acquire(t)
            xs.append(time.perf_counter() - t0)
            lim.release(lease, 10)
        await asyncio.sleep(0.5)
        xs.sort()
        print(f"{name}: acquire p50 {statistics.median(xs)*1e3:.2f} ms p99 {xs[int(len(xs)*.99)]*1e3:.2f} ms")
    await lim.stop()
    await nc.close()
    s.stop()


if __name__ == "__main__":
    asyncio.run(main())
