"""vLLM's own serving benchmark against `vllm serve` and against Roundhouse, on the same tiny model.

    .venv/bin/python -m tests.bench.bench_openai [--num-prompts 200] [--concurrency 32]

One run, one model, the same load for both: vLLM's OpenAI server (`vllm.entrypoints.openai.
api_server`, what `vllm serve` runs) first, then Roundhouse (`roundhouse up --config` with that
model: nats-server, manager, router, one worker), each driven by `vllm.benchmarks.serve` with
`--backend openai` (/v1/completions) and `--backend openai-chat` (/v1/chat/completions), random
prompts of --input-len tokens, --output-len tokens out (ignore_eos). Prints output tokens/s and
TTFT p50 / p99 for both, Roundhouse / vLLM as a ratio and a difference. Asserts nothing.
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
            "completed": result["completed"], "failed": a.num_prompts - result["completed"]}


def cpu_by_process(root_pid: int) -> dict[str, float]:
    """CPU seconds (user + system) so far of a server process and its descendants, by role."""
    import psutil

    out: dict[str, float] = {}
    root = psutil.Process(root_pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            cmd = " ".join(p.cmdline())
            t = p.cpu_times()
        except psutil.Error:
            continue
        role = ("nats-server" if "nats-server" in cmd else "worker " + cmd.split("--model ")[1].split()[0] if "worker_svc" in cmd
                else "api_server" if "api_server" in cmd else "roundhouse up (router+manager)" if "roundhouse.cli" in cmd
                else p.name())
        out[role] = out.get(role, 0.0) + t.user + t.system
    return out


def measured(proc: subprocess.Popen, base: str, backend: str, model: str, tokenizer: str, a) -> dict:
    """bench() plus the CPU seconds each server process spent during it."""
    before = cpu_by_process(proc.pid)
    result = bench(base, backend, model, tokenizer, a)
    after = cpu_by_process(proc.pid)
    result["cpu"] = {k: after[k] - before.get(k, 0.0) for k in after if after[k] - before.get(k, 0.0) > 0.05}
    return result


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_vllm(model_dir: pathlib.Path, a, work: pathlib.Path) -> dict:
    port = free_port()
    log = open(work / "vllm-serve.log", "wb")
    proc = subprocess.Popen([
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--served-model-name", "tiny-0",
        "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "1024", "--max-num-seqs", "64",
        "--dtype", "float32", "--kv-cache-memory-bytes", str(128 * 2**20), "--seed", "0", "--disable-log-stats",
    ], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/health", 300, proc)
        warm(base, "tiny-0")
        return {b: measured(proc, base, b, "tiny-0", str(model_dir), a) for b in BACKENDS}
    finally:
        stop(proc)


def run_roundhouse(config: pathlib.Path, model_dir: pathlib.Path, a, work: pathlib.Path) -> dict:
    port = free_port()
    log = open(work / "roundhouse-up.log", "wb")
    proc = subprocess.Popen([
        sys.executable, "-m", "roundhouse.cli", "up", "--config", str(config), "--var", str(work / "var"),
        "--port", "0", "--manager-port", "0", "--http-port", str(port), "--log-level", "warning",
    ], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while b"ready. gRPC" not in (work / "roundhouse-up.log").read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("roundhouse up did not start; see " + str(work / "roundhouse-up.log"))
            time.sleep(0.5)  # another process's stdout: nothing to await
        warm(base, "tiny-0")
        return {b: measured(proc, base, b, "tiny-0", str(model_dir), a) for b in BACKENDS}
    finally:
        stop(proc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=32)
    a = p.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix="rh-bench-openai-"))
    config = stack.write_tiny_catalogue(work, 1, kv_cache_bytes=128 * 2**20, max_num_seqs=64, max_tokens_limit=1000)
    model_dir = work / "models" / "tiny-0"
    vllm_res = run_vllm(model_dir, a, work)
    rh_res = run_roundhouse(config, model_dir, a, work)
    print(f"\n{a.num_prompts} prompts, {a.input_len} in / {a.output_len} out tokens, concurrency {a.concurrency}, tiny Llama on CPU")
    print(f"{'backend':12} {'server':10} {'out tok/s':>10} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12} {'failed':>6}")
    for b in BACKENDS:
        v, r = vllm_res[b], rh_res[b]
        for name, x in (("vllm serve", v), ("roundhouse", r)):
            print(f"{b:12} {name:10} {x['tok_s']:>10.1f} {x['ttft_p50']:>12.2f} {x['ttft_p99']:>12.2f} {x['failed']:>6}")
        print(f"{b:12} {'ratio':10} {r['tok_s'] / v['tok_s']:>10.2%} {r['ttft_p50'] - v['ttft_p50']:>+12.2f} "
              f"{r['ttft_p99'] - v['ttft_p99']:>+12.2f}")
    print("\nserver CPU seconds during each run, by process")
    for b in BACKENDS:
        for name, x in (("vllm serve", vllm_res[b]), ("roundhouse", rh_res[b])):
            parts = ", ".join(f"{k} {v:.2f}" for k, v in sorted(x["cpu"].items(), key=lambda kv: -kv[1]))
            print(f"{b:12} {name:10} total {sum(x['cpu'].values()):.2f}: {parts}")


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    main()
