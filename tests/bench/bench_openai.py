"""vLLM's own serving benchmark against `vllm serve` and against Roundhouse, on the same tiny model.

    .venv/bin/python -m tests.bench.bench_openai [--num-prompts 200] [--concurrency 32] [--rounds 2]

One model, the same load for both: vLLM's OpenAI server (`vllm.entrypoints.openai.api_server`,
what `vllm serve` runs) and Roundhouse (`roundhouse up --config` with that model: nats-server,
manager, router, one worker), alternated A B A B (--rounds pairs) so drift cancels, each driven
by `vllm.benchmarks.serve` with `--backend openai` (/v1/completions) and `--backend openai-chat`
(/v1/chat/completions), random prompts of --input-len tokens, --output-len tokens out
(ignore_eos). Both servers start once and stay up; each round runs both endpoints on each.
Prints output tokens/s and TTFT p50 / p99 per round and server, Roundhouse / vLLM as a ratio and
a difference, each server process's CPU seconds per 1,000 output tokens, and where a Roundhouse
request's time to first token went (means, from the services' own /metrics scraped around each
run: the engine, the hops around it with the publish ack and JetStream wait inside them, HTTP).
Each measured run begins once both servers are idle (`wait_quiet`). Asserts nothing.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from roundhouse import stack

BACKENDS = {"openai": "/v1/completions", "openai-chat": "/v1/chat/completions"}
METRICS: dict[str, str] = {}   # Roundhouse's base URL ("base") and /metrics URLs ("router", "worker")

# (label, histogram) whose means split a Roundhouse request's time to its first token: the
# router's admission -> first token at its gateway, of which the engine's part (in the worker)
# and the rest (admit, publish, JetStream, pull, the worker's in and out, delivery). The
# publish's ack and JetStream's stored -> taken lie inside the rest and overlap (a worker may
# take a message before its PubAck reaches the router): shown, not added. (The router's
# admission -> "started" is no split point: a worker's started and first token often travel in
# one delivery batch.)
TTFT_PARTS = (
    ("router: admit -> first token at the gateway", "roundhouse_time_to_first_token_seconds"),
    ("engine: request in -> first output", "roundhouse_worker_time_to_first_token_seconds"),
    ("router: admit -> JetStream's ack", "roundhouse_request_publish_seconds"),
    ("JetStream: stored -> worker took it", "roundhouse_worker_queue_wait_seconds"),
)
STEP_TOKENS = "vllm:iteration_tokens_total"   # vLLM's histogram of tokens per engine step


def histogram_totals(urls: list[str], names: set[str]) -> dict[str, tuple[float, float]]:
    """(sum, count) of each histogram in `names`, summed over labels and over the /metrics `urls`."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, tuple[float, float]] = {}
    for url in urls:
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                for suffix, i in (("_sum", 0), ("_count", 1)):
                    name = sample.name.removesuffix(suffix)
                    if sample.name.endswith(suffix) and name in names:
                        total = list(out.get(name, (0.0, 0.0)))
                        total[i] += sample.value
                        out[name] = (total[0], total[1])
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        time.sleep(0.5)  # polling another process's HTTP readiness: nothing to await
    raise RuntimeError(f"{url} not ready in {timeout}s")


def warm(base: str, model: str, timeout: float = 300) -> None:
    """One request, so the model is loaded (Roundhouse loads on demand) before the clock starts."""
    body = json.dumps({"model": model, "prompt": "warm up", "max_tokens": 2}).encode()
    req = urllib.request.Request(f"{base}/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        assert r.status == 200


def bench(base: str, backend: str, model: str, tokenizer: str, a: argparse.Namespace) -> dict:
    import vllm.benchmarks.serve as serve

    p = argparse.ArgumentParser()
    serve.add_cli_args(p)
    args = p.parse_args([
        "--backend", backend, "--base-url", base, "--endpoint", BACKENDS[backend], "--model", model,
        "--tokenizer", tokenizer, "--dataset-name", "random", "--random-input-len", str(a.input_len),
        "--random-output-len", str(a.output_len), "--num-prompts", str(a.num_prompts),
        "--max-concurrency", str(a.concurrency), "--ignore-eos", "--temperature", "0",
        "--percentile-metrics", "ttft,tpot,itl", "--metric-percentiles", "50,99", "--disable-tqdm", "--seed", "0",
    ])
    result = serve.main(args)
    return {"tok_s": result["output_throughput"], "ttft_p50": result["median_ttft_ms"], "ttft_p99": result["p99_ttft_ms"],
            "ttft_mean": result["mean_ttft_ms"], "tpot_mean": result["mean_tpot_ms"],
            "completed": result["completed"], "failed": a.num_prompts - result["completed"]}


def _family(root_pid: int) -> list:
    """A server's process and its descendants (psutil handles); raises if the server is gone."""
    import psutil

    root = psutil.Process(root_pid)
    return [root, *root.children(recursive=True)]


def cpu_by_process(root_pid: int) -> dict[str, float]:
    """CPU seconds (user + system) so far of a server process and its descendants, by role."""
    import psutil

    out: dict[str, float] = {}
    for p in _family(root_pid):
        try:
            cmd = " ".join(p.cmdline())
            t = p.cpu_times()
            forked = "worker_svc" in " ".join(p.parent().cmdline())
        except (psutil.Error, AttributeError):
            continue
        # The worker's EngineCore is forked from it, so it keeps the worker's command line (it
        # sets no VLLM::EngineCore title as `vllm serve`'s does): told apart by its parent.
        role = ("nats-server" if "nats-server" in cmd else "EngineCore" if "worker_svc" in cmd and forked
                else "worker" if "worker_svc" in cmd
                else "router" if "router_svc" in cmd else "manager" if "manager_svc" in cmd
                else "api_server" if "api_server" in cmd else "roundhouse up" if "roundhouse.cli" in cmd
                else p.name())
        out[role] = out.get(role, 0.0) + t.user + t.system
    return out


def measured(proc: subprocess.Popen, base: str, backend: str, model: str, tokenizer: str, a) -> dict:
    """bench() plus the CPU seconds each server process spent during it, Roundhouse's TTFT parts
    and (--engine-stats) the engine's steps."""
    roundhouse = base == METRICS.get("base")
    # Roundhouse's TTFT parts (router's and worker's /metrics) and, with --engine-stats, vLLM's
    # tokens per engine step (Roundhouse's worker exports it; vllm serve its own /metrics): each
    # exporter scraped once before and once after.
    urls = [METRICS[k] for k in ("router", "worker") if k in METRICS] if roundhouse else []
    if a.engine_stats and not roundhouse:
        urls.append(f"{base}/metrics")
    names = {h for _, h in TTFT_PARTS} | {STEP_TOKENS}
    histograms_before = histogram_totals(urls, names)
    before = cpu_by_process(proc.pid)
    result = bench(base, backend, model, tokenizer, a)
    after = cpu_by_process(proc.pid)
    result["cpu"] = {k: after[k] - before.get(k, 0.0) for k in after if after[k] - before.get(k, 0.0) > 0.05}
    delta = {}
    for name, (total, count) in histogram_totals(urls, names).items():
        t0, c0 = histograms_before.get(name, (0.0, 0.0))
        delta[name] = (total - t0, count - c0)
    if STEP_TOKENS in delta:
        total, count = delta.pop(STEP_TOKENS)
        result["steps"] = (count, total)
    if roundhouse:
        result["parts_ms"] = {name: 1000 * total / count for name, (total, count) in delta.items() if count > 0}
    return result


QUIET_CPU = 0.05      # both servers together below this share of one core ...
QUIET_WINDOW_S = 0.5  # ... over this window: the machine is quiet
QUIET_LIMIT_S = 15.0


def wait_quiet(procs: list[subprocess.Popen]) -> float | None:
    """Waits until every server is idle; returns how long it took, None if they never were
    within QUIET_LIMIT_S. vLLM's engine busy-polls for about a second after its last request
    (its shm_broadcast queue spins with sched_yield before it sleeps): measured right after the
    other server's run, a server shares the cores with that spin. Roundhouse's engine, in a
    session group at nice 10 (`roundhouse up`), yields to it: its completions rounds, which
    follow `vllm serve`'s chat rounds, had a time to first token of 17.4-17.6 ms against
    7.4-8.2 ms three seconds later (the engine's part 12.7-12.8 ms against 3.0-3.5). Gating
    every measured run on a quiet machine treats both servers alike."""
    started = time.monotonic()
    while time.monotonic() - started < QUIET_LIMIT_S:
        before = _cpu_by_pid(procs)
        time.sleep(QUIET_WINDOW_S)  # a CPU rate over a window: nothing to await
        after = _cpu_by_pid(procs)
        # Only processes alive at both readings: one that ended or began meanwhile says nothing.
        busy = sum(after[k] - before[k] for k in after.keys() & before.keys())
        if busy < QUIET_CPU * QUIET_WINDOW_S:
            return time.monotonic() - started
    return None


def _cpu_by_pid(procs: list[subprocess.Popen]) -> dict[tuple[int, float], float]:
    """CPU seconds so far of the servers' processes, keyed by (pid, start time)."""
    import psutil

    out = {}
    for root in procs:
        try:
            family = _family(root.pid)
        except psutil.Error:
            continue
        for p in family:
            try:
                t = p.cpu_times()
                out[(p.pid, p.create_time())] = t.user + t.system
            except psutil.Error:
                pass
    return out


def _quiet_summary(waited: list[float | None]) -> str:
    took = [w for w in waited if w is not None]
    said = f"; each run began once both servers were idle (waited {min(took):.1f}-{max(took):.1f} s)" if took else ""
    if len(took) < len(waited):
        said += f"; {len(waited) - len(took)} run(s) began on servers still busy after {QUIET_LIMIT_S:.0f} s"
    return said


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def start_vllm(model_dir: pathlib.Path, work: pathlib.Path, context: int = 1024,
               engine_stats: bool = False, stream_interval: int = 1) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = open(work / "vllm-serve.log", "ab")
    proc = subprocess.Popen([
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--served-model-name", "tiny-0",
        "--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(context), "--max-num-seqs", "64",
        "--dtype", "float32", "--kv-cache-memory-bytes", str(128 * 2**20), "--seed", "0",
        "--stream-interval", str(stream_interval),
        *([] if engine_stats else ["--disable-log-stats"]),
    ], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/health", 300, proc)
        warm(base, "tiny-0")
    except BaseException:
        stop(proc)
        raise
    return proc, base


def start_roundhouse(config: pathlib.Path, work: pathlib.Path, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """`roundhouse up` on `config`, warmed; `env`: variables its processes get on top of ours."""
    port = free_port()
    log_path = work / "roundhouse-up.log"
    log_path.write_bytes(b"")
    proc = subprocess.Popen([
        sys.executable, "-m", "roundhouse.cli", "up", "--config", str(config), "--var", str(work / "var"),
        "--port", "0", "--manager-port", "0", "--http-port", str(port), "--log-level", "warning",
    ], stdout=open(log_path, "ab"), stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, **env} if env else None)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while b"ready. gRPC" not in log_path.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"roundhouse up did not start; see {log_path}")
            time.sleep(0.5)  # another process's stdout: nothing to await
        worker = re.search(r"worker for tiny-0 started .*metrics (http://\S+/metrics)", log_path.read_text())
        METRICS.update(base=base, router=f"{base}/metrics", **({"worker": worker.group(1)} if worker else {}))
        warm(base, "tiny-0")
    except BaseException:
        stop(proc)
        raise
    return proc, base


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2, help="A B pairs")
    p.add_argument("--engine-stats", action="store_true",
                   help="both engines keep vLLM's statistics (vllm serve's default; Roundhouse's engine_metrics, its "
                        "default); without it neither does (--disable-log-stats; engine_metrics: false)")
    p.add_argument("--engine-sched-idle", action="store_true",
                   help="Roundhouse's engine in SCHED_IDLE (the model's engine_sched_idle; vllm serve has no such setting)")
    p.add_argument("--stream-interval", type=int, default=1,
                   help="tokens per streamed chunk in both servers (vllm serve --stream-interval; the model's "
                        "stream_interval in Roundhouse's catalogue)")
    a = p.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix="rh-bench-openai-"))
    config = stack.write_tiny_catalogue(work, 1, kv_cache_bytes=128 * 2**20, max_num_seqs=64, max_tokens_limit=1000,
                                        **({} if a.engine_stats else {"engine_metrics": False}),
                                        engine_sched_idle=a.engine_sched_idle, stream_interval=a.stream_interval)
    model_dir = work / "models" / "tiny-0"
    servers = {}
    try:
        servers["vllm serve"] = start_vllm(model_dir, work, engine_stats=a.engine_stats, stream_interval=a.stream_interval)
        servers["roundhouse"] = start_roundhouse(config, work)
        for name, (proc, base) in servers.items():  # one unmeasured pass each: compile and cache warm-up
            for b in BACKENDS:
                bench(base, b, "tiny-0", str(model_dir), argparse.Namespace(**{**vars(a), "num_prompts": a.concurrency}))
        rows = []
        everyone = [proc for proc, _ in servers.values()]
        waited = []
        for r in range(a.rounds):
            for name, (proc, base) in servers.items():
                runs = {}
                for b in BACKENDS:
                    waited.append(wait_quiet(everyone))
                    runs[b] = measured(proc, base, b, "tiny-0", str(model_dir), a)
                rows.append((r + 1, name, runs))
    finally:
        for proc, _ in servers.values():
            stop(proc)
    print(f"\n{a.num_prompts} prompts, {a.input_len} in / {a.output_len} out tokens, concurrency {a.concurrency}, "
          f"tiny Llama on CPU, {a.rounds} rounds A B, engine statistics {'on' if a.engine_stats else 'off'} in both"
          + (", Roundhouse's engine in SCHED_IDLE" if a.engine_sched_idle else "")
          + (f", stream interval {a.stream_interval} in both" if a.stream_interval > 1 else "")
          + _quiet_summary(waited))
    # A request's time is its first token plus (output tokens - 1) x TPOT: the mean columns say
    # which of the two a throughput difference came from.
    print(f"{'backend':12} {'round':>5} {'server':10} {'out tok/s':>10} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12} "
          f"{'TTFT mean':>10} {'TPOT mean':>10} {'failed':>6}")
    for b in BACKENDS:
        for r in range(a.rounds):
            v = next(x[b] for rr, n, x in rows if rr == r + 1 and n == "vllm serve")
            h = next(x[b] for rr, n, x in rows if rr == r + 1 and n == "roundhouse")
            for name, x in (("vllm serve", v), ("roundhouse", h)):
                print(f"{b:12} {r + 1:>5} {name:10} {x['tok_s']:>10.1f} {x['ttft_p50']:>12.2f} {x['ttft_p99']:>12.2f} "
                      f"{x['ttft_mean']:>10.2f} {x['tpot_mean']:>10.3f} {x['failed']:>6}")
            print(f"{b:12} {r + 1:>5} {'ratio':10} {h['tok_s'] / v['tok_s']:>10.2%} {h['ttft_p50'] - v['ttft_p50']:>+12.2f} "
                  f"{h['ttft_p99'] - v['ttft_p99']:>+12.2f} {h['ttft_mean'] - v['ttft_mean']:>+10.2f} "
                  f"{h['tpot_mean'] - v['tpot_mean']:>+10.3f}")
    print("\nserver CPU seconds per 1,000 output tokens, by process (all rounds)")
    out_tokens = a.num_prompts * a.output_len
    for b in BACKENDS:
        for name in ("vllm serve", "roundhouse"):
            cpu: dict[str, float] = {}
            runs = [x[b] for _, n, x in rows if n == name]
            for x in runs:
                for k, v in x["cpu"].items():
                    cpu[k] = cpu.get(k, 0.0) + v
            per = {k: v * 1000 / (out_tokens * len(runs)) for k, v in cpu.items()}
            parts = ", ".join(f"{k} {v:.3f}" for k, v in sorted(per.items(), key=lambda kv: -kv[1]))
            print(f"{b:12} {name:10} total {sum(per.values()):.3f}: {parts}")
    if a.engine_stats:
        print("\nengine steps (vLLM's vllm:iteration_tokens_total): how full each step's batch was; a server whose "
              "steps carry fewer tokens than the concurrency could have was not feeding its engine")
        for b in BACKENDS:
            for r, name, x in rows:
                if "steps" not in x[b] or not x[b]["steps"][0]:
                    continue
                count, tokens = x[b]["steps"]
                cpu = sum(v for k, v in x[b]["cpu"].items() if k in ("EngineCore", "VLLM::EngineCore", "VLLM::Worker"))
                print(f"{b:12} {r:>5} {name:10} {count:7.0f} steps, {tokens / count:5.1f} tokens per step, "
                      f"engine processes' CPU {1000 * cpu / count:.2f} ms per step")
    print("\nwhere a Roundhouse request's time to first token went (means over each run, ms; from its /metrics)")
    for b in BACKENDS:
        for r, name, x in rows:
            if name != "roundhouse" or not x[b].get("parts_ms"):
                continue
            ms = x[b]["parts_ms"]
            get = lambda metric: ms.get(metric, float("nan"))  # noqa: E731
            gateway, engine, acked, waited = (get(h) for _, h in TTFT_PARTS)
            print(f"{b:12} round {r}: client TTFT {x[b]['ttft_mean']:.1f} = engine {engine:.1f} + the hops {gateway - engine:.1f} "
                  f"(admit, publish, JetStream, pull, worker in/out, delivery; in them, overlapping: ack after "
                  f"{acked:.1f}, stored -> taken {waited:.1f}) + HTTP in and SSE out {x[b]['ttft_mean'] - gateway:.1f}")


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    main()
