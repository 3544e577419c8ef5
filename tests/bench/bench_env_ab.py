"""Roundhouse against itself with a runtime setting changed: two stacks up at once, alternated.

    .venv/bin/python -m tests.bench.bench_env_ab --env-b KEY=VALUE [--env-b ...] [--rounds 8] [--requests 100]
        [--concurrency 1] [--max-tokens 64] [--endpoint completions]

Starts two `roundhouse up` stacks on one tiny model (as bench_openai does, engine statistics
off): A with this environment, B with each --env-b on top of it (any setting a service reads
from the environment: `ROUNDHOUSE_WORKER_EVENT_LOOP=uvloop`, `GRPC_EXPERIMENTS=...`). Both stay
up; each round sends --requests streamed requests of --max-tokens tokens (ignore_eos) at
--concurrency to one, then the other, in the order A B, then B A, so drift on the machine falls
on both alike. Every run begins once both stacks are idle (bench_openai.wait_quiet: a vLLM
engine busy-polls for about a second after its last request). Prints each run's output tokens/s,
the client's time to the first data chunk (p50; Roundhouse sends none before the first
generated token) and the CPU seconds per 1,000 tokens of the router and the worker; then the
medians and B's tokens/s over A's, round by round. Asserts nothing.

For changes to the router's code rather than its settings, `bench_router_relay --compare`.
On the 2-vCPU test machine one run's tokens/s at concurrency 1 moves by up to a quarter from
the one before it: read the medians and the ratios over 8 rounds or more.
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import tempfile

from roundhouse import stack
from tests.bench import bench_openai
from tests.bench.bench_per_request import measured_run


def env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"must be KEY=VALUE, got {text!r}")
    return key, value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env-b", type=env_pair, action="append", required=True, metavar="KEY=VALUE")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--endpoint", choices=("chat", "completions"), default="completions")
    a = p.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix="rh-bench-env-ab-"))
    config = stack.write_tiny_catalogue(work, 1, kv_cache_bytes=128 * 2**20, max_num_seqs=64, max_tokens_limit=1000,
                                        engine_metrics=False)
    envs = {"A": {}, "B": dict(a.env_b)}
    print(f"B: {' '.join(f'{k}={v}' for k, v in envs['B'].items())}; {a.requests} requests of {a.max_tokens} tokens "
          f"at concurrency {a.concurrency} on {a.endpoint} per run", flush=True)
    stacks: dict[str, tuple] = {}
    try:
        for name in ("A", "B"):
            (work / name).mkdir()
            stacks[name] = bench_openai.start_roundhouse(config, work / name, env=envs[name])
        rows: dict[str, list[tuple[float, float, float, float]]] = {"A": [], "B": []}
        tokens = a.requests * a.max_tokens
        for rnd in range(a.rounds):
            for name in ("A", "B") if rnd % 2 == 0 else ("B", "A"):
                proc, base = stacks[name]
                bench_openai.wait_quiet([s[0] for s in stacks.values()])
                wall, ttfts, spent = measured_run(proc, base, a.endpoint, a.requests, a.concurrency, a.max_tokens)
                per = {k: 1000 * v / tokens for k, v in spent.items()}
                row = (tokens / wall, ttfts[len(ttfts) // 2], per.get("worker", 0.0), per.get("router", 0.0))
                rows[name].append(row)
                print(f"round {rnd + 1} {name}: {row[0]:7.0f} tok/s, first data chunk p50 {row[1]:5.1f} ms, CPU s per "
                      f"1,000 tokens: worker {row[2]:.3f}, router {row[3]:.3f}", flush=True)
        for name, got in rows.items():
            cols = list(zip(*got))
            print(f"median {name}: {statistics.median(cols[0]):7.0f} tok/s, first data chunk p50 "
                  f"{statistics.median(cols[1]):5.1f} ms, worker {statistics.median(cols[2]):.3f}, "
                  f"router {statistics.median(cols[3]):.3f}")
        print("B/A tok/s by round: " + " ".join(f"{b[0] / x[0]:.2f}" for x, b in zip(rows["A"], rows["B"])))
    finally:
        for proc, _ in stacks.values():
            bench_openai.stop(proc)


if __name__ == "__main__":
    main()
