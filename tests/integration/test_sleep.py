"""Swaps through vLLM's real sleep / wake_up, on CPU engines (`swap: sleep`).

Two tiny models and a budget that holds one ready model plus a sleeping one's residue; the host
lends its sleepers room for one model's weights. Real nats-server, router, manager (in this
process) and one vLLM worker process per model.

What runs here is vLLM's own sleep path: `AsyncLLM.sleep` pauses the scheduler and clears the
prefix cache, `wake_up` resumes it. vLLM's CPU worker frees no memory when asleep (its
`sleep` is a no-op), so what this measures is the cost of the control path and of the wake
check, not a weight transfer; the CUDA tiers are in tests/gpu (marked `gpu`).
"""
from __future__ import annotations

import asyncio
import os
import pathlib

import grpc
import psutil
import pytest
import pytest_asyncio
import yaml

from manager_svc.config import ManagerConfig
from manager_svc.service import ManagerService
from protos.v1 import common_pb2, manager_pb2, manager_pb2_grpc, router_pb2, router_pb2_grpc, worker_pb2
from roundhouse import catalogue, natsd, stack
from router_svc.config import RouterConfig
from router_svc.server import Router
from tests.conftest import TEST_ACK_WAIT_S, collect, eventually, kinds_of, tokens_of

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

MiB = 2**20
A, B = "sl-0", "sl-1"
SLEEPING = worker_pb2.ENGINE_STATE_SLEEPING
READY = worker_pb2.ENGINE_STATE_READY


@pytest.fixture(scope="module")
def sleep_yaml(session_dir) -> pathlib.Path:
    """Footprint per model ≈ 1.7 MiB weights + 64 MiB KV + 32 MiB overhead (kept while asleep):
    150 MiB hold one ready model and one sleeper, not two ready ones."""
    path = stack.write_tiny_catalogue(
        session_dir, 2, prefix="sl",
        gpus=(catalogue.GpuSpec(id="cpu", budget_bytes=150 * MiB, engine_overhead_bytes=32 * MiB, swap="sleep"),),
        manager=catalogue.ManagerSpec(drain_timeout_s=30, load_backoff_s=1, report_interval_s=1, queue_poll_s=0.25),
        kv_cache_bytes=64 * MiB, max_num_seqs=8, min_resident_s=0, default_max_tokens=16,
    )
    raw = yaml.safe_load(path.read_text())
    one = catalogue.weight_bytes(str(session_dir / "models" / A))
    raw["hosts"] = [{"id": "local", "sleep_budget_bytes": int(one * 1.5)}]   # room for one sleeper's weights
    # "auto" requests with pick=a go to A, or to B when A would take over 10 s to serve.
    raw["routing"] = {"fallback": B, "max_swap_wait_s": 10,
                      "rules": [{"name": "pick-a", "model": A, "metadata": {"pick": "a"}, "fallbacks": [B]}]}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


class Stack:
    def __init__(self):
        self.manager: ManagerService | None = None
        self.router: Router | None = None
        self.workers: dict[str, stack.WorkerProcess] = {}
        self.channels = []

    def stub(self, cls, port: int):
        ch = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.channels.append(ch)
        return cls(ch)

    async def residency(self) -> dict[str, manager_pb2.ModelResidency]:
        resp = await self.admin.ListResidency(manager_pb2.ListResidencyRequest(), timeout=10)
        self.gpu = resp.gpus[0]
        return {m.model: m for m in resp.models}

    async def generate(self, model: str, prompt: str = "sleep and wake", n: int = 12) -> list[int]:
        return tokens_of(await self.call(model, prompt, n))

    async def call(self, model: str, prompt: str = "sleep and wake", n: int = 12, **metadata) -> list:
        req = router_pb2.GenerateRequest(model=model, prompt=prompt, metadata=metadata, sampling=common_pb2.SamplingParams(
            max_tokens=n, temperature=0.0, ignore_eos=True))
        events = await collect(self.router_stub.Generate(req, timeout=300))
        assert kinds_of(events)[-1] == "finished", events[-1]
        return events


@pytest_asyncio.fixture(scope="module")
async def sl(sleep_yaml, nats_server, session_dir):
    cat = catalogue.load(sleep_yaml)
    s = Stack()
    try:
        port = natsd.free_port()
        s.manager = ManagerService(ManagerConfig(catalogue=cat, nats_url=nats_server.url, port=port))
        await s.manager.start()
        s.admin = s.stub(manager_pb2_grpc.ManagerStub, port)
        s.router = Router(RouterConfig(catalogue=cat, nats_url=nats_server.url, port=0, http_port=-1))
        await s.router.start()
        s.router_stub = s.stub(router_pb2_grpc.RouterStub, s.router.port)
        for m in (A, B):
            s.workers[m] = await stack.start_worker(sleep_yaml, m, nats_server.url, session_dir / "run-sleep",
                                                    "--ack-wait", str(TEST_ACK_WAIT_S), "--manager", f"127.0.0.1:{port}")
        await eventually(lambda: _reported(s), 60, "both workers registered with the manager")
        yield s
    finally:
        await stack.stop_all(list(s.workers.values()), timeout=15)
        if s.router is not None:
            await s.router.stop(grace=1)
        if s.manager is not None:
            await s.manager.stop()
        for ch in s.channels:
            await ch.close()


async def _reported(s: Stack) -> bool:
    r = await s.residency()
    return all(r[m].worker_id for m in (A, B))


def _engine_processes(worker: stack.WorkerProcess) -> list[psutil.Process]:
    """The worker's vLLM engine processes (titled VLLM::EngineCore, VLLM::Worker...)."""
    out = []
    for p in psutil.Process(worker.process.pid).children(recursive=True):
        try:
            if " ".join(p.cmdline()).startswith("VLLM::"):
                out.append(p)
        except psutil.Error:
            pass
    return out


def _check_runner_forked_and_bound(worker: stack.WorkerProcess) -> None:
    """The engine's model-runner was forked from the worker's runner server (not spawned, not
    forked from its EngineCore) and vLLM's OpenMP binding holds in it: every thread on the same
    cores, not all of them (vLLM keeps one for the EngineCore)."""
    runners = [p for p in _engine_processes(worker) if p.cmdline()[0].startswith("VLLM::Worker")]
    assert len(runners) == 1, runners
    server = runners[0].parent()
    assert server.ppid() == worker.process.pid and "forkserver" in " ".join(server.cmdline()), server.cmdline()
    cores = {frozenset(os.sched_getaffinity(t.id)) for t in runners[0].threads()}
    assert len(cores) == 1 and (os.cpu_count() == 1 or len(next(iter(cores))) < os.cpu_count()), cores


async def test_an_evicted_model_sleeps_and_wakes_with_the_same_output_and_a_dead_sleeper_restarts(sl):
    # 1. Cold loads: A, then B, which puts A to sleep at level 1 (the host has room for its weights).
    a_tokens = await sl.generate(A)
    b_tokens = await sl.generate(B)
    r = await sl.residency()
    assert r[A].state == SLEEPING and r[A].sleep_level == 1 and r[A].host_bytes > 0, r[A]
    assert not r[A].sleep_frees_memory, "status says a CPU sleep frees nothing"
    assert r[B].state == READY and (r[A].loads, r[B].loads) == (1, 1)
    assert sl.gpu.used_bytes == r[B].footprint_bytes + 32 * MiB, "a sleeper's bytes count as freed, but its residue"
    assert sl.gpu.host_sleep_used_bytes == r[A].host_bytes
    a_engine = {p.pid for p in _engine_processes(sl.workers[A])}
    assert a_engine, "A's engine processes live on while it sleeps"
    _check_runner_forked_and_bound(sl.workers[A])

    # 2. A again: B sleeps, at level 2 (A's level-1 sleep held the host's room when B was chosen),
    #    and A wakes: the same engine processes, the same greedy tokens, no cold load.
    assert await sl.generate(A) == a_tokens
    r = await sl.residency()
    assert r[A].state == READY and (r[A].loads, r[A].wakes) == (1, 1), r[A]
    assert r[B].state == SLEEPING and r[B].sleep_level == 2 and r[B].host_bytes == 0, r[B]
    assert {p.pid for p in _engine_processes(sl.workers[A])} == a_engine
    status = await sl.workers[A].status()
    assert status.wakes == 1 and status.restart_reason == ""
    assert status.wake_seconds < status.load_seconds / 3, (status.wake_seconds, status.load_seconds)
    print(f"CPU, vLLM sleep/wake_up: wake + probe {status.wake_seconds:.2f} s vs cold load {status.load_seconds:.2f} s")

    # 3. B's engine dies while it sleeps: its wake fails its check and it starts cold, saying why;
    #    its caller is served all the same.
    for p in _engine_processes(sl.workers[B]):
        p.kill()
    assert await sl.generate(B) == b_tokens
    status = await sl.workers[B].status()
    assert "died while asleep" in status.restart_reason, status
    _check_runner_forked_and_bound(sl.workers[B])   # its second runner, from the same server
    r = await sl.residency()
    assert r[B].state == READY and (r[B].loads, r[B].wakes) == (2, 0), r[B]
    assert r[A].state == SLEEPING and r[A].sleep_level == 1

    # Its worker has learned how long a request takes in its engine (for the queue-ahead part of
    # the routing estimate) and reported it.
    await eventually(lambda: sl.manager.manager.entries[B].request_s > 0, 10, "B's request time reached the manager")

    # 4. Residency-aware routing: an "auto" request for A, asleep with a wake learned at well
    #    under max_swap_wait_s, goes to A (which wakes).
    await eventually(lambda: sl.router.readiness.view.get(A) is not None and sl.router.readiness.view[A].wait_s < 10, 10,
                     "the router knows A's wake is short")
    started = _started(await sl.call("auto", pick="a"))
    assert started.model == A and "rule pick-a" in started.route_reason and "fallback" not in started.route_reason, started

    # 5. By hand: evicting a model sleeps it; evicting a sleeper stops it (its processes go).
    await sl.admin.EvictModel(manager_pb2.ModelRequest(model=A), timeout=60)
    assert (await sl.residency())[A].state == SLEEPING
    await sl.admin.EvictModel(manager_pb2.ModelRequest(model=A), timeout=60)
    r = await sl.residency()
    assert r[A].state == worker_pb2.ENGINE_STATE_UNLOADED and r[A].host_bytes == 0
    await eventually(lambda: not _engine_processes(sl.workers[A]), 15, "A's engine processes are gone")

    # 6. Now A would need a cold load (learned: ~28 s, over max_swap_wait_s 10): the same "auto"
    #    request goes to its fallback B at once, the reason says so, and A is not loaded for it.
    await eventually(lambda: sl.router.readiness.view[A].wait_s > 10, 10, "the router knows A would need a cold load")
    started = _started(await sl.call("auto", pick="a"))
    assert started.model == B and f"fallback {B}" in started.route_reason, started
    r = await sl.residency()
    assert r[A].state == worker_pb2.ENGINE_STATE_UNLOADED and r[A].loads == 1, "nothing loaded A for it"
    print(f"routed around a cold model: {started.route_reason}")


def _started(events) -> router_pb2.Started:
    return next(ev.started for ev in events if ev.WhichOneof("event") == "started")
