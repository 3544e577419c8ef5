"""Swap latency on this machine: evict + load + first token, and the added wait of a cold request.

    .venv/bin/python -m tests.bench.bench_swap [--swaps 6] [--swap stop|sleep] [--gpu]

Three tiny models and a budget that holds one ready (and two asleep), so every request to another model is a swap:
the manager evicts the resident one, loads the next, and the request that was waiting in the
queue gets its first token. `--swap stop` (the CPU default): an eviction is a vLLM shutdown and
a load an engine start. `--swap sleep`: an eviction puts the engine to sleep through vLLM's
`sleep` and a load of a model evicted before is a `wake_up` plus the wake probe (on CPU vLLM's
sleep frees no memory: this measures the control path). `--gpu`: the same models on cuda:0
with `swap: auto` (sleep mode, level 1 while the host lends room), for a CUDA machine. For each swap it prints the time
from the request to the `loading` event (eviction and decision), from `loading` to `started`
(the load), and from `started` to the first token; then the cold request's time to first token
against a warm one's, p50 / p99. Not a test: it asserts nothing.
"""
from __future__ import annotations

import argparse
import os
import asyncio
import pathlib
import statistics
import tempfile
import time

import grpc

from manager_svc.config import ManagerConfig
from manager_svc.service import ManagerService
from protos.v1 import common_pb2, router_pb2, router_pb2_grpc
from roundhouse import catalogue, logs, natsd, stack
from router_svc.config import RouterConfig
from router_svc.server import Router

MiB = 2**20


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def timed(stub, model: str, i: int) -> dict[str, float]:
    req = router_pb2.GenerateRequest(model=model, prompt=f"swap {i}", sampling=common_pb2.SamplingParams(
        max_tokens=8, temperature=0.0, ignore_eos=True))
    t0, marks = time.perf_counter(), {}
    async for ev in stub.Generate(req, timeout=600):
        marks.setdefault(ev.WhichOneof("event"), time.perf_counter() - t0)
    return marks


async def run(swaps: int, swap: str, gpu: bool) -> None:
    logs.configure("bench", os.environ.get("BENCH_LOG", "warning"))
    work = pathlib.Path(tempfile.mkdtemp())
    device = catalogue.GpuSpec(id="cuda:0", budget_bytes=170 * MiB, engine_overhead_bytes=32 * MiB, swap="auto") if gpu else \
        catalogue.GpuSpec(id="cpu", budget_bytes=170 * MiB, engine_overhead_bytes=32 * MiB, swap=swap)
    yaml = stack.write_tiny_catalogue(
        work, 3, prefix="swap",
        gpus=(device,),
        manager=catalogue.ManagerSpec(report_interval_s=1, queue_poll_s=0.25),
        kv_cache_bytes=64 * MiB, min_resident_s=0,
    )
    cat = catalogue.load(yaml)
    nats = natsd.start(work / "js")
    manager = ManagerService(ManagerConfig(catalogue=cat, nats_url=nats.url, port=0))
    await manager.start()
    router = Router(RouterConfig(catalogue=cat, nats_url=nats.url, port=0, http_port=-1))
    await router.start()
    workers = [await stack.start_worker(yaml, m.name, nats.url, work / "run", "--manager", manager.address, "--log-level", "warning")
               for m in cat.models]
    rows, warm = [], []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as ch:
            stub = router_pb2_grpc.RouterStub(ch)
            names = [m.name for m in cat.models]
            await timed(stub, names[0], -1)  # first load, not a swap
            for i in range(swaps):
                model = names[(i + 1) % len(names)]
                marks = await timed(stub, model, i)
                rows.append((model, marks))
                warm.append((await timed(stub, model, 1000 + i))["delta"])
    finally:
        for w in workers:
            w.stop()
        await router.stop(grace=1)
        await manager.stop()
        nats.stop()
    how = "sleep mode, cuda:0" if gpu else f"swap: {swap}, vLLM CPU"
    print(f"\nswap = evict the resident tiny model + load (or wake) the requested one + first token ({how})")
    print(f"{'model':8} {'to loading s':>12} {'load s':>8} {'1st token ms':>13} {'swap total s':>13}")
    for model, m in rows:
        # A wake can end before its `loading` event reaches the waiting request: then the load
        # column is from `queued` and the first shows "-".
        loading = m.get("loading")
        print(f"{model:8} {'-' if loading is None else f'{loading:.2f}':>12} {m['started'] - (loading or m['queued']):>8.2f} "
              f"{1000 * (m['delta'] - m['started']):>13.1f} {m['delta']:>13.2f}")
    cold = [m["delta"] for _, m in rows]
    added = [c - w for c, w in zip(cold, warm)]
    print(f"cold-request TTFT  p50 {statistics.median(cold):.2f} s  p99 {pct(cold, 99):.2f} s")
    print(f"warm-request TTFT  p50 {1000 * statistics.median(warm):.1f} ms  p99 {1000 * pct(warm, 99):.1f} ms")
    print(f"added wait of the first request to a cold model  p50 {statistics.median(added):.2f} s  p99 {pct(added, 99):.2f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--swaps", type=int, default=6)
    p.add_argument("--swap", choices=("stop", "sleep"), default="stop", help="how the CPU engines are evicted")
    p.add_argument("--gpu", action="store_true", help="on cuda:0, swap: auto (needs CUDA)")
    a = p.parse_args()
    asyncio.run(run(a.swaps, a.swap, a.gpu))


if __name__ == "__main__":
    main()
