"""Router CPU per relayed token, by thread: what the router costs on the token path.

    .venv/bin/python -m tests.bench.bench_relay [--streams 32] [--max-tokens 256] [--seconds 30] [--runs 3]

Starts `roundhouse up` on the embedded defaults, keeps --streams streamed /v1/completions
requests of --max-tokens tokens running on `chat` for --seconds, and reads the router process's
CPU time per thread from /proc before and after (the event loop is the main thread; the Delivery
server's threads and gRPC's own show apart). Prints CPU µs per relayed SSE data chunk (one token
each at this load) for the process and each kind of thread. Per-request work (admission,
tokenization, publish) is included, spread over --max-tokens chunks. Asserts nothing.
Linux only (/proc).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import aiohttp
import psutil

from roundhouse import natsd


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds by kind of thread: the main thread (the event loop), the rest by name."""
    tick = os.sysconf("SC_CLK_TCK")
    out: collections.Counter = collections.Counter()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        kind = "event loop (main thread)" if tid == str(pid) else ("other Python threads (Delivery server)" if name == "python" else name)
        out[kind] += (int(fields[11]) + int(fields[12])) / tick
    return dict(out)


def per_chunk(before: dict[str, float], after: dict[str, float], chunks: int) -> dict[str, float]:
    """CPU µs per chunk by kind of thread, between two `thread_cpu` readings."""
    return {k: 1e6 * (after.get(k, 0.0) - before.get(k, 0.0)) / chunks for k in after}


def print_kinds(spent: dict[str, float]) -> None:
    for kind, us in sorted(spent.items(), key=lambda kv: -kv[1]):
        if us > 0:
            print(f"    {kind:42s} {us:7.1f} µs/chunk")


async def load(base: str, streams: int, max_tokens: int, seconds: float) -> int:
    """Streams until `seconds` pass; returns the data chunks received."""
    chunks = 0
    stop = time.monotonic() + seconds

    async def client(i: int, session: aiohttp.ClientSession) -> None:
        nonlocal chunks
        while time.monotonic() < stop:
            body = {"model": "chat", "prompt": f"relay {i}", "max_tokens": max_tokens, "stream": True,
                    "ignore_eos": True, "temperature": 0}
            async with session.post(f"{base}/completions", json=body) as r:
                async for line in r.content:
                    if line.startswith(b"data: {"):
                        chunks += 1

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        await asyncio.gather(*(client(i, session) for i in range(streams)))
    return chunks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--runs", type=int, default=3)
    a = p.parse_args()
    port = natsd.free_port()
    with tempfile.TemporaryDirectory(prefix="rh-relay-") as var:
        up = subprocess.Popen([sys.executable, "-m", "roundhouse.cli", "up", "--var", var, "--port", "0", "--http-port", str(port),
                               "--manager-port", "0", "--log-level", "warning"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            for line in up.stdout:  # its progress lines, until it serves
                if "ready." in line:
                    break
            else:
                raise SystemExit("roundhouse up exited before it was ready")
            threading.Thread(target=lambda: [None for _ in up.stdout], daemon=True).start()  # keep its pipe drained
            [router] = [c for c in psutil.Process(up.pid).children(recursive=True) if "router_svc" in c.cmdline()]
            base = f"http://127.0.0.1:{port}/v1"
            asyncio.run(load(base, 2, 8, 1))  # chat loads on demand: before the clock starts
            print(f"{a.streams} streams of {a.max_tokens} tokens on chat, {a.seconds:.0f} s per run; router CPU per relayed chunk")
            for run in range(1, a.runs + 1):
                before = thread_cpu(router.pid)
                chunks = asyncio.run(load(base, a.streams, a.max_tokens, a.seconds))
                spent = per_chunk(before, thread_cpu(router.pid), chunks)
                total = sum(spent.values())
                print(f"run {run}: {chunks} chunks ({chunks / a.seconds:.0f}/s), router {total * chunks / 1e6:.2f} CPU s = "
                      f"{total:.1f} µs/chunk")
                print_kinds(spent)
        finally:
            up.send_signal(signal.SIGTERM)
            try:
                up.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(up.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
