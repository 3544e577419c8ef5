"""Is the router's event loop still responsive while it relays long, fast streams?

    .venv/bin/python -m tests.bench.bench_loop_lag [--streams 4] [--tokens 8000] [--rounds 2]

One tiny model (8,192-token context), served by `vllm serve` (vLLM's own OpenAI server) and by
Roundhouse (`roundhouse up --config`: nats-server, manager, router, one worker), alternated
A B A B so drift cancels. For each server: first the idle figure (TTFT of a short streamed
request, 8 tokens out, on an idle server), then `--streams` streamed completions of `--tokens`
tokens each (ignore_eos) and, while they run, a probe process that every 50 ms sends
`GET /health` or `GET /v1/models` (alternately) and every second a short streamed request.

Printed: the probe's latency percentiles (p50 / p99 / max, ms) and the short request's TTFT
(time to the first SSE data chunk that carries generated text, the first token a user sees)
idle and under load, and the probe's own oversleep (how late its 50 ms sleep woke: a stall of
the whole machine, which no server can be blamed for, shows there). The probe and the long streams each run in their own process, so the
client's own loop is not what is measured. Asserts nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import multiprocessing
import pathlib
import statistics
import tempfile
import time

from tests.bench.bench_openai import start_roundhouse, start_vllm, stop

MODEL = "tiny-0"


def short_ttft(host: str, port: int, timeout: float = 60.0) -> float:
    """Seconds from sending a short streamed completion to the first data chunk with text."""
    body = json.dumps({"model": MODEL, "prompt": "The roundhouse", "max_tokens": 8, "temperature": 0,
                       "ignore_eos": True, "stream": True})
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        t0 = time.perf_counter()
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        first = None
        for raw in resp:
            line = raw.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if first is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                first = time.perf_counter() - t0
        if first is None:
            raise RuntimeError("the short request produced no text")
        return first
    finally:
        conn.close()


def probe(host: str, port: int, window: float, out) -> None:
    """Runs in its own process: probes every 50 ms, a short request every second, for `window` s."""
    until = time.monotonic() + window
    lat: list[float] = []
    ttft: list[float] = []
    self_lag: list[float] = []   # the probe's own oversleep: a stall of the machine, not of the server
    conn = http.client.HTTPConnection(host, port, timeout=60)
    n = 0
    next_short = time.monotonic() + 1.0
    while time.monotonic() < until:
        path = "/health" if n % 2 == 0 else "/v1/models"
        t0 = time.perf_counter()
        try:
            conn.request("GET", path)
            r = conn.getresponse()
            r.read()
        except (http.client.HTTPException, ConnectionError):  # the server closed a kept-alive connection
            conn.close()
            conn = http.client.HTTPConnection(host, port, timeout=60)
            continue
        lat.append(time.perf_counter() - t0)
        n += 1
        if time.monotonic() >= next_short:
            ttft.append(short_ttft(host, port))
            next_short = time.monotonic() + 1.0
        pause = max(0.0, 0.05 - (time.perf_counter() - t0))
        t1 = time.perf_counter()
        time.sleep(pause)  # the probe's period, not a synchronisation
        self_lag.append(time.perf_counter() - t1 - pause)
    conn.close()
    out.put({"lat": lat, "ttft": ttft, "self_lag": self_lag})


def long_stream(host: str, port: int, tokens: int, started, out) -> None:
    """Runs in its own process: one long streamed completion, read to the end."""
    body = json.dumps({"model": MODEL, "prompt": "Once upon a time", "max_tokens": tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True})
    conn = http.client.HTTPConnection(host, port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    chunks = 0
    for raw in resp:
        line = raw.strip()
        if line.startswith(b"data:") and line != b"data: [DONE]":
            if chunks == 0:
                started.release()
            chunks += 1
    out.put({"seconds": time.perf_counter() - t0, "chunks": chunks})


def measure(host: str, port: int, a) -> dict:
    idle = [short_ttft(host, port) for _ in range(5)]
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    started = ctx.Semaphore(0)
    streams = [ctx.Process(target=long_stream, args=(host, port, a.tokens, started, out)) for _ in range(a.streams)]
    for p in streams:
        p.start()
    for _ in streams:
        if not started.acquire(timeout=120):
            raise RuntimeError("a long stream did not start within 120 s")
    prober = ctx.Process(target=probe, args=(host, port, a.window, out))
    prober.start()
    results = [out.get(timeout=900) for _ in range(a.streams + 1)]
    for p in (*streams, prober):
        p.join(60)
    probe_res = next(r for r in results if "lat" in r)
    stream_res = [r for r in results if "seconds" in r]
    return {"idle_ttft": idle, **probe_res,
            "stream_tok_s": sum(a.tokens / r["seconds"] for r in stream_res)}


@contextlib.contextmanager
def server(start):
    proc, base = start()
    try:
        yield int(base.rsplit(":", 1)[1])
    finally:
        stop(proc)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--tokens", type=int, default=8000)
    p.add_argument("--window", type=float, default=20.0, help="seconds of probing while the streams run")
    p.add_argument("--rounds", type=int, default=2, help="A B pairs")
    p.add_argument("--only", choices=("vllm", "roundhouse"), help="run one server only")
    a = p.parse_args()
    from roundhouse import stack  # here, not at the top: the probe processes need not import it

    context = 8192
    work = pathlib.Path(tempfile.mkdtemp(prefix="rh-bench-lag-"))
    config = stack.write_tiny_catalogue(work, 1, kv_cache_bytes=128 * 2**20, max_num_seqs=64, max_tokens_limit=a.tokens,
                                        context=context)
    model_dir = work / "models" / MODEL
    servers = {"vllm serve": lambda: server(lambda: start_vllm(model_dir, work, context)),
               "roundhouse": lambda: server(lambda: start_roundhouse(config, work))}
    if a.only:
        servers = {k: v for k, v in servers.items() if k.startswith(a.only)}
    rows = []
    for r in range(a.rounds):
        for name, start in servers.items():
            with start() as port:
                res = measure("127.0.0.1", port, a)
            rows.append((r + 1, name, res))
            print(f"round {r + 1} {name}: done", flush=True)
            print(row(r + 1, name, res), flush=True)
    print(f"\n{a.streams} streams x {a.tokens} tokens, probe every 50 ms for {a.window:.0f} s; tiny Llama on CPU; ms")
    print(f"{'round':>5} {'server':10} {'probes':>6} {'p50':>7} {'p99':>8} {'max':>8} {'idle TTFT':>10} "
          f"{'load TTFT p50':>13} {'load TTFT max':>13} {'streams tok/s':>13} {'probe oversleep max':>19}")
    for r, name, x in rows:
        print(row(r, name, x))


def row(r: int, name: str, x: dict) -> str:
    return (f"{r:>5} {name:10} {len(x['lat']):>6} {pct(x['lat'], 50):>7.2f} {pct(x['lat'], 99):>8.2f} {pct(x['lat'], 100):>8.2f} "
            f"{statistics.median(x['idle_ttft']) * 1000:>10.2f} {pct(x['ttft'], 50):>13.2f} {pct(x['ttft'], 100):>13.2f} "
            f"{x['stream_tok_s']:>13.1f} {pct(x['self_lag'], 100):>19.2f}")


if __name__ == "__main__":
    main()
