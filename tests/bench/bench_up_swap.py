"""Swaps through `roundhouse up`'s embedded defaults, as a user sees them: request to first
generated token.

    .venv/bin/python -m tests.bench.bench_up_swap [--rounds 3] [--gap 16]

Starts `roundhouse up` (its own var/ under a temp dir, free ports), loads `chat` and `code` (the
CPU budget holds two of the three tiny models), then asks, in turn, for `reasoning` and `code`:
each request is for a model that is not resident (the first `reasoning` one is a first load; the
later ones are swaps back to a model loaded before). Before each of those requests it waits
`--gap` seconds, so the model to evict is past its `min_resident_s` (15 s in the defaults);
`--gap 0` asks back to back, where that anti-thrash hold is part of the wait. `chat` is asked
before each gap, so it stays the most used model. Time to first token is read from the raw SSE
stream: the first `data:` chunk that carries generated text. Not a test: it asserts nothing.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import tempfile
import time

import aiohttp
import psutil


async def first_token_s(session: aiohttp.ClientSession, http: str, model: str) -> float:
    body = {"model": model, "prompt": "hello there", "max_tokens": 8, "stream": True, "temperature": 0}
    t0 = time.monotonic()
    async with session.post(f"{http}/completions", json=body) as r:
        r.raise_for_status()
        async for raw in r.content:
            line = raw.decode().strip()
            if line.startswith("data:") and line != "data: [DONE]" and json.loads(line[5:])["choices"][0]["text"]:
                return time.monotonic() - t0
    raise RuntimeError(f"{model}: the stream ended with no generated text")


async def main(a: argparse.Namespace) -> None:
    var = tempfile.mkdtemp(prefix="rh-bench-up-")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "roundhouse.cli", "up", "--var", var, "--port", "0", "--http-port", "0",
        "--manager-port", "0", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    log: list[str] = []

    async def read_until(pattern: str) -> re.Match:
        while line := (await proc.stdout.readline()).decode():
            log.append(line)
            if m := re.search(pattern, line):
                return m
        raise RuntimeError("roundhouse up exited:\n" + "".join(log))

    async def drain_output() -> None:  # roundhouse up prints progress; keep its pipe flowing
        while line := (await proc.stdout.readline()).decode():
            log.append(line)

    try:
        http = (await asyncio.wait_for(read_until(r"HTTP (http://\S+)"), 180)).group(1)
        drainer = asyncio.create_task(drain_output())
        rows = []
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
            for model in ("chat", "code"):
                rows.append((model, "first load", await first_token_s(s, http, model)))
            for i in range(2 * a.rounds):
                model = ("reasoning", "code")[i % 2]
                await first_token_s(s, http, "chat")
                await asyncio.sleep(a.gap)   # the user's think time: the resident model settles
                rows.append((model, "first load" if i == 0 else "swap back", await first_token_s(s, http, model)))
        print(f"\nroundhouse up, embedded defaults, gap {a.gap:g} s before each swap")
        print(f"{'model':<10} {'kind':<11} {'request to first token s':>25}")
        for model, kind, seconds in rows:
            print(f"{model:<10} {kind:<11} {seconds:>25.2f}")
        backs = sorted(sec for _, kind, sec in rows if kind == "swap back")
        print(f"swap back: min {backs[0]:.2f} s, max {backs[-1]:.2f} s over {len(backs)}")
        drainer.cancel()
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 60)
            except TimeoutError:
                for p in psutil.Process(proc.pid).children(recursive=True):
                    p.kill()
                proc.kill()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="swap pairs (reasoning, code) after the first loads")
    p.add_argument("--gap", type=float, default=16.0, help="seconds before each swap request (min_resident_s is 15)")
    asyncio.run(main(p.parse_args()))
