"""The router's CPU per relayed token with the engine's pace taken out of the figure.

    .venv/bin/python -m tests.bench.bench_router_relay [--streams 32] [--max-tokens 256] [--step-ms 20] [--seconds 20] [--runs 3]

Why: with vLLM generating, the engine's pace on this 2-core machine moves from run to run, and
the router's cost per chunk moves with it (bench_relay on one unchanged router: 43-67 µs of its
event loop per chunk at 900-3,000 chunks/s), so two versions of the router cannot be told
apart. Here the router is the real one (`python -m router_svc`, its own process, a real
nats-server, the embedded `chat` model's tokenizer and template), and so are its callers
(streamed HTTP /v1/completions) and its Delivery stream (real gRPC), but the worker is this
process: it takes the router's queued requests from JetStream (the model's real consumer) and,
every --step-ms, sends one token to each request it runs in one DeliveryBatch, as a worker
does after each engine step; a request ends after --max-tokens tokens. Prints the router's CPU
per relayed SSE data chunk, by thread (bench_relay.thread_cpu). Asserts nothing.

A/B a change: `--compare DIR` starts a second router from another checkout (for example `git
worktree add /tmp/rh-base HEAD` before the change) beside this tree's, and the runs alternate
between the two (A B A B), so the machine's drift falls on both; it prints the ratio run by run.
Linux only (/proc).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import pathlib
import statistics
import sys
import tempfile
import time

import grpc
import nats

from protos.v1 import common_pb2, queue_pb2, worker_pb2, worker_pb2_grpc
from roundhouse import jetstream, natsd, stack, subjects
from tests.bench.bench_relay import load, per_chunk, print_kinds, thread_cpu

MODEL = "chat"


@dataclasses.dataclass
class _Running:
    msg: object            # its JetStream message, acked once its last token is sent
    delivery: int
    reply_to: str          # the router's Delivery address
    prompt_tokens: int
    max_tokens: int
    made: int = 0          # tokens sent so far


class PacedWorker:
    """Stands in for a worker whose engine makes one token per request every `step_s`."""

    def __init__(self, js, step_s: float) -> None:
        self._js = js
        self._step_s = step_s
        self._running: dict[str, _Running] = {}
        self._links: dict[str, asyncio.Queue] = {}
        self._tasks: list[asyncio.Task] = []
        self.steps = 0

    async def start(self) -> None:
        sub = await self._js.pull_subscribe_bind(durable=subjects.consumer_name(MODEL), stream=subjects.STREAM)
        self._tasks = [asyncio.create_task(self._take(sub)), asyncio.create_task(self._step())]
        for t in self._tasks:
            t.add_done_callback(_report)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(BaseException):
                await t

    def _link(self, address: str) -> asyncio.Queue:
        q = self._links.get(address)
        if q is None:
            q = self._links[address] = asyncio.Queue()
            self._tasks.append(asyncio.create_task(self._deliver(address, q)))
            self._tasks[-1].add_done_callback(_report)
        return q

    @staticmethod
    async def _deliver(address: str, q: asyncio.Queue) -> None:
        async def batches():
            while True:
                yield await q.get()

        async with grpc.aio.insecure_channel(address) as channel:
            async for _ in worker_pb2_grpc.DeliveryStub(channel).Deliver(batches()):
                pass  # cancels and receipts: every request here runs to its end

    async def _take(self, sub) -> None:
        while True:
            try:
                msgs = await sub.fetch(64, timeout=1.0)
            except (nats.errors.TimeoutError, TimeoutError):  # an empty pull (fetch raises either)
                continue
            for msg in msgs:
                q = queue_pb2.QueuedRequest.FromString(msg.data)
                delivery = msg.metadata.num_delivered
                self._running[q.request_id] = _Running(msg, delivery, q.reply_to, len(q.prompt_token_ids), q.sampling.max_tokens)
                self._link(q.reply_to).put_nowait(worker_pb2.DeliveryBatch(worker_id="paced", chunks=[
                    worker_pb2.RequestChunk(request_id=q.request_id, delivery=delivery, started=True)]))

    async def _step(self) -> None:
        loop = asyncio.get_running_loop()
        tick = loop.time()
        while True:
            tick += self._step_s
            await asyncio.sleep(max(0.0, tick - loop.time()))
            self.steps += 1
            out: dict[str, list] = {}
            done = []
            for rid, r in self._running.items():
                chunks = out.setdefault(r.reply_to, [])
                chunks.append(worker_pb2.RequestChunk(request_id=rid, delivery=r.delivery, delta=worker_pb2.RequestDelta(
                    token_ids=[100 + r.made % 50], text=" tok")))
                r.made += 1
                if r.made == r.max_tokens:
                    chunks.append(worker_pb2.RequestChunk(request_id=rid, delivery=r.delivery, finished=worker_pb2.RequestFinished(
                        finish_reason=common_pb2.FINISH_REASON_LENGTH,
                        usage=common_pb2.Usage(prompt_tokens=r.prompt_tokens, completion_tokens=r.made))))
                    done.append(rid)
            for reply_to, chunks in out.items():
                self._links[reply_to].put_nowait(worker_pb2.DeliveryBatch(worker_id="paced", chunks=chunks))
            for rid in done:
                await self._running.pop(rid).msg.ack()


def _report(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        print(f"paced worker: {task.get_name()} failed: {task.exception()!r}", file=sys.stderr, flush=True)


async def _measure(router, worker: PacedWorker, a) -> tuple[float, dict[str, float], str]:
    """One run of the load on one router: (CPU µs per chunk, by kind of thread, the run's pace)."""
    base = f"http://127.0.0.1:{router.info['http_port']}/v1"
    before, steps0, t0 = thread_cpu(router.process.pid), worker.steps, time.monotonic()
    chunks = await load(base, a.streams, a.max_tokens, a.seconds)
    after, steps, wall = thread_cpu(router.process.pid), worker.steps - steps0, time.monotonic() - t0
    spent = per_chunk(before, after, chunks)
    return sum(spent.values()), spent, f"{chunks} chunks, {chunks / wall:.0f}/s, {steps / wall:.1f} steps/s"


async def bench(a) -> None:
    trees = [("this tree", None)] + ([(f"--compare {a.compare}", a.compare)] if a.compare else [])
    with tempfile.TemporaryDirectory(prefix="rh-router-relay-") as tmp:
        var = pathlib.Path(tmp)
        config = stack.write_default(var)
        server = await natsd.start_async(var / "js")
        routers = []
        nc = None
        worker = None
        try:
            nc = await nats.connect(server.url)
            js = nc.jetstream()
            await jetstream.ensure_stream(js)
            await jetstream.ensure_consumers(js, MODEL, ack_wait_s=60, max_deliver=3)
            for name, tree in trees:
                # PYTHONSAFEPATH: `-m` would put the working directory (this tree) ahead of PYTHONPATH
                env = {"ROUNDHOUSE_ROUTER_NATS_URL": server.url, **({"PYTHONPATH": tree, "PYTHONSAFEPATH": "1"} if tree else {})}
                routers.append(await stack.start_service("router_svc", "router", var / "run", "--config", str(config),
                                                         "--host", "127.0.0.1", "--port", "0", "--http-port", "0",
                                                         "--log-level", "warning", env=env))
            worker = PacedWorker(js, a.step_ms / 1000)
            await worker.start()
            for router in routers:  # first requests (template, tokenizer) before the clock starts
                await load(f"http://127.0.0.1:{router.info['http_port']}/v1", 2, 8, 1)
            print(f"{a.streams} streams of {a.max_tokens} tokens, one token per stream every {a.step_ms} ms, "
                  f"{a.seconds:.0f} s per run; router CPU µs per relayed chunk" + (", routers alternating" if a.compare else ""))
            totals: dict[str, list[float]] = {name: [] for name, _ in trees}
            for run in range(1, a.runs + 1):
                for (name, _), router in zip(trees, routers):
                    total, spent, pace = await _measure(router, worker, a)
                    totals[name].append(total)
                    print(f"run {run}, {name}: {total:.1f} µs/chunk ({pace})")
                    print_kinds(spent)
            for name, xs in totals.items():
                print(f"{name}: median {statistics.median(xs):.1f} µs/chunk over {len(xs)} runs ({min(xs):.1f}-{max(xs):.1f})")
            if a.compare:
                ratios = [x / y for x, y in zip(*totals.values())]
                print(f"this tree / --compare, run by run: {', '.join(f'{r:.2f}' for r in ratios)}; median {statistics.median(ratios):.2f}")
        finally:
            if worker is not None:
                await worker.stop()
            await stack.stop_all(routers)
            if nc is not None:
                await nc.close()
            server.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--step-ms", type=float, default=20)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--compare", default="", help="another checkout (a git worktree of an older commit): its router runs "
                                                 "too, and the runs alternate between the two")
    asyncio.run(bench(p.parse_args()))


if __name__ == "__main__":
    main()
