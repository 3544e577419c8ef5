"""One engine's start and stop, in a loop: what a swap costs inside the worker.

    .venv/bin/python -m tests.bench.bench_engine_start [--loads 3] [--eager]

Makes a tiny model, then --loads times: starts the worker's Engine (worker_svc/engine.py, real
vLLM CPU), streams 64 greedy tokens, stops it. Prints each start, the 64 tokens' time and each
stop. The first start compiles (unless vLLM's compile cache already holds this model); the
later ones are the reload of a model loaded before. vLLM's own log lines (stderr) show where a
start goes: the EngineCore's first line, "Warming up model", "init engine ... took". Asserts
nothing.
"""
from __future__ import annotations

import argparse
import asyncio
import pathlib
import tempfile
import time

from roundhouse import stack
from worker_svc.engine import Engine, EngineSpec


async def main(a: argparse.Namespace) -> None:
    root = pathlib.Path(tempfile.mkdtemp(prefix="rh-bench-engine-"))
    stack.write_tiny_catalogue(root, 1)
    spec = EngineSpec(model_path=str(root / "models" / "tiny-0"), served_name="tiny-0", max_model_len=1024,
                      kv_cache_bytes=64 * 2**20, max_num_seqs=8, enforce_eager=a.eager)
    rows = []
    for i in range(a.loads):
        t0 = time.monotonic()
        engine = await Engine.start(spec)
        t1 = time.monotonic()
        tokens = 0
        async for step in engine.generate("hello there", [], f"r{i}", {"max_tokens": 64, "ignore_eos": True, "temperature": 0.0}):
            tokens += len(step.token_ids)
        t2 = time.monotonic()
        await engine.shutdown()
        t3 = time.monotonic()
        rows.append((i, t1 - t0, t2 - t1, t3 - t2, tokens))
    print(f"\ntiny Llama on CPU, enforce_eager={a.eager}")
    print(f"{'load':>4} {'start s':>8} {'64 tokens s':>12} {'stop s':>7}")
    for i, start, gen, stop, tokens in rows:
        print(f"{i:>4} {start:>8.2f} {gen:>12.3f} {stop:>7.2f}" + ("" if tokens == 64 else f"  ({tokens} tokens)"))


if __name__ == "__main__":  # the engine's processes start from a fork server or by spawn: guard the entry
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loads", type=int, default=3)
    p.add_argument("--eager", action="store_true", help="enforce_eager: no compile, slower steps")
    asyncio.run(main(p.parse_args()))
