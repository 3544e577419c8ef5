"""CPU per request, by process: what each part of Roundhouse costs a request, apart from its tokens.

    .venv/bin/python -m tests.bench.bench_per_request [--requests 3000] [--concurrency 8] [--max-tokens 1] [--endpoint chat]

Starts `roundhouse up --config` on one tiny model (as bench_openai does, engine statistics off),
sends --requests streamed requests of --max-tokens tokens (ignore_eos) at --concurrency, twice,
and prints for each run the requests/s, the client's time to the first data chunk (p50) and each
process's CPU milliseconds per request (user + system, psutil, before and after): router,
worker, its engine (EngineCore, VLLM::Worker), nats-server, manager. With --max-tokens 1 that is
the fixed cost of a request (HTTP in, admission, tokenization, publish, JetStream, pull, start,
delivery, SSE out, the manager's demand reads). psutil's CPU times tick at 10 ms: keep runs at
thousands of requests. Asserts nothing.
"""
from __future__ import annotations

import argparse
import asyncio
import pathlib
import tempfile
import time

import aiohttp

from roundhouse import stack
from tests.bench import bench_openai


async def drive(base: str, endpoint: str, n: int, concurrency: int, max_tokens: int) -> list[float]:
    """Client times to the first data chunk (ms), sorted."""
    gate = asyncio.Semaphore(concurrency)
    ttfts: list[float] = []
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    async with aiohttp.ClientSession() as s:
        async def one(i: int) -> None:
            text = f"request {i}: " + "how are you today my friend " * 4
            body = {"model": "tiny-0", "max_tokens": max_tokens, "stream": True, "ignore_eos": True, "temperature": 0,
                    **({"messages": [{"role": "user", "content": text}]} if endpoint == "chat" else {"prompt": text})}
            async with gate:
                t = time.perf_counter()
                first = None
                async with s.post(base + path, json=body) as r:
                    assert r.status == 200, await r.text()
                    async for line in r.content:
                        if first is None and line.startswith(b"data: {"):
                            first = time.perf_counter()
                ttfts.append(1000 * ((first or time.perf_counter()) - t))
        await asyncio.gather(*(one(i) for i in range(n)))
    return sorted(ttfts)


def measured_run(proc, base: str, endpoint: str, n: int, concurrency: int, max_tokens: int) -> tuple[float, list[float], dict[str, float]]:
    """One `drive` against the stack `proc` (`roundhouse up`): its wall seconds, its client times to
    the first data chunk (ms, sorted) and the CPU seconds each role spent during it."""
    before = bench_openai.cpu_by_process(proc.pid)
    t = time.perf_counter()
    ttfts = asyncio.run(drive(base, endpoint, n, concurrency, max_tokens))
    wall = time.perf_counter() - t
    after = bench_openai.cpu_by_process(proc.pid)
    return wall, ttfts, {k: after[k] - before.get(k, 0.0) for k in after}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=1)
    p.add_argument("--endpoint", choices=("chat", "completions"), default="chat")
    a = p.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix="rh-bench-per-request-"))
    config = stack.write_tiny_catalogue(work, 1, kv_cache_bytes=128 * 2**20, max_num_seqs=64, max_tokens_limit=1000,
                                        engine_metrics=False)
    proc, base = bench_openai.start_roundhouse(config, work)
    try:
        asyncio.run(drive(base, a.endpoint, 2 * a.concurrency, a.concurrency, a.max_tokens))   # warm-up
        for run in range(2):
            wall, ttfts, spent = measured_run(proc, base, a.endpoint, a.requests, a.concurrency, a.max_tokens)
            per = {k: 1000 * v / a.requests for k, v in spent.items()}
            parts = ", ".join(f"{k} {v:.3f}" for k, v in sorted(per.items(), key=lambda kv: -kv[1]) if v >= 0.005)
            print(f"run {run + 1}: {a.endpoint}, {a.requests} requests of {a.max_tokens} tokens at concurrency "
                  f"{a.concurrency}: {a.requests / wall:.1f} requests/s, first data chunk p50 {ttfts[len(ttfts) // 2]:.1f} ms; "
                  f"CPU ms per request: {parts}", flush=True)
    finally:
        bench_openai.stop(proc)


if __name__ == "__main__":
    main()
