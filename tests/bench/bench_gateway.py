"""Gateway overhead: the same tiny model called directly vs through router → NATS → worker → gRPC.

    .venv/bin/python -m tests.bench.bench_gateway [--requests 64] [--max-tokens 32]

Prints time to first token (p50 / p99) and output tokens/s at concurrency 1 and 32, for the
engine called directly (the worker's own Engine wrapper around vLLM's AsyncLLM, in this process)
and through the whole system (router and worker in their own processes, a real nats-server),
one after the other in one run, with the ratio routed / direct. Not a test: it asserts nothing.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import grpc

from protos.v1 import common_pb2, router_pb2, router_pb2_grpc
from roundhouse import catalogue, natsd, stack


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


class Run:
    def __init__(self) -> None:
        self.ttft: list[float] = []
        self.tokens = 0
        self.wall = 0.0

    def summary(self) -> dict[str, float]:
        return {
            "ttft_p50_ms": 1000 * statistics.median(self.ttft),
            "ttft_p99_ms": 1000 * pct(self.ttft, 99),
            "tok_s": self.tokens / self.wall,
        }


async def drive(one, n: int, concurrency: int) -> Run:
    run = Run()
    sem = asyncio.Semaphore(concurrency)

    async def task(i: int) -> None:
        async with sem:
            t0 = time.perf_counter()
            first = None
            async for count in one(i):
                if first is None and count:
                    first = time.perf_counter() - t0
                run.tokens += count
            run.ttft.append(first)

    t0 = time.perf_counter()
    await asyncio.gather(*(task(i) for i in range(n)))
    run.wall = time.perf_counter() - t0
    return run


async def bench_direct(spec: catalogue.ModelSpec, n: int, max_tokens: int, levels: list[int]) -> dict[int, Run]:
    from worker_svc.engine import Engine, EngineSpec

    engine = await Engine.start(EngineSpec(model_path=spec.path, served_name=spec.name, max_model_len=spec.max_model_len,
                                           max_num_seqs=spec.max_num_seqs, kv_cache_bytes=spec.kv_cache_bytes))
    params = {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}

    def one(tag: str):
        async def gen(i: int):
            async for step in engine.generate(f"benchmark prompt number {i}", [], f"{tag}-{i}", params):
                yield len(step.token_ids)
        return gen

    try:
        await drive(one("warm"), 8, 8)
        return {c: await drive(one(f"c{c}"), n, c) for c in levels}
    finally:
        await engine.shutdown()


async def bench_routed(models_yaml: pathlib.Path, spec: catalogue.ModelSpec, work: pathlib.Path, n: int, max_tokens: int, levels: list[int]) -> dict[int, Run]:
    nats = natsd.start(work / "js")
    port = natsd.free_port()
    router = subprocess.Popen([sys.executable, "-m", "router_svc", "--config", str(models_yaml), "--nats-url", nats.url,
                               "--port", str(port), "--log-level", "warning"], stderr=subprocess.DEVNULL)
    worker = await stack.start_worker(models_yaml, spec.name, nats.url, work / "run", "--log-level", "warning")
    try:
        await worker.load()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            await ch.channel_ready()
            stub = router_pb2_grpc.RouterStub(ch)
            sampling = common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

            async def gen(i: int):
                req = router_pb2.GenerateRequest(model=spec.name, prompt=f"benchmark prompt number {i}", sampling=sampling)
                async for ev in stub.Generate(req, timeout=300):
                    if ev.WhichOneof("event") == "delta":
                        yield len(ev.delta.token_ids)

            await drive(gen, 8, 8)
            return {c: await drive(gen, n, c) for c in levels}
    finally:
        worker.stop()
        router.terminate()
        router.wait()
        nats.stop()


def _phase(a: argparse.Namespace, levels: list[int]) -> None:
    """One side of the comparison, alone in this process; prints its figures as JSON."""
    work = pathlib.Path(a.work)
    models_yaml = stack.write_tiny_catalogue(work, 1, kv_cache_bytes=128 * 2**20, max_num_seqs=64)
    spec = catalogue.load(models_yaml).models[0]
    if a.phase == "direct":
        runs = asyncio.run(bench_direct(spec, a.requests, a.max_tokens, levels))
    else:
        runs = asyncio.run(bench_routed(models_yaml, spec, work, a.requests, a.max_tokens, levels))
    print("RESULT " + json.dumps({c: r.summary() for c, r in runs.items()}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--levels", default="1,32")
    p.add_argument("--phase", choices=["direct", "routed"], help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    a = p.parse_args()
    levels = [int(x) for x in a.levels.split(",")]
    if a.phase:
        _phase(a, levels)
        return
    # Each side runs in its own process, one after the other, so nothing of one (an engine
    # process that has not quite exited) competes with the other for the two cores.
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for phase in ("direct", "routed"):
            out = subprocess.run(
                [sys.executable, "-m", "tests.bench.bench_gateway", "--phase", phase, "--work", tmp,
                 "--requests", str(a.requests), "--max-tokens", str(a.max_tokens), "--levels", a.levels],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, check=True,
            ).stdout
            line = next(ln for ln in out.splitlines() if ln.startswith("RESULT "))
            results[phase] = {int(k): v for k, v in json.loads(line[7:]).items()}
    print(f"\n{a.requests} requests x {a.max_tokens} output tokens, greedy, tiny Llama (vLLM CPU, 2 cores)")
    print(f"{'conc':>4} {'path':>7} {'ttft p50 ms':>12} {'ttft p99 ms':>12} {'out tok/s':>10}")
    for c in levels:
        d, r = results["direct"][c], results["routed"][c]
        for name, s in (("direct", d), ("routed", r)):
            print(f"{c:>4} {name:>7} {s['ttft_p50_ms']:>12.2f} {s['ttft_p99_ms']:>12.2f} {s['tok_s']:>10.0f}")
        print(f"{c:>4} {'added':>7} {r['ttft_p50_ms'] - d['ttft_p50_ms']:>12.2f} {r['ttft_p99_ms'] - d['ttft_p99_ms']:>12.2f} "
              f"{100 * r['tok_s'] / d['tok_s']:>9.0f}%")


if __name__ == "__main__":
    main()
