"""More models than fit: the manager swaps them on demand and no request is lost.

Three tiny models (res-0, res-1, res-2) and a budget that holds two, plus res-bad whose weights
are corrupt. Real nats-server, router, manager (in this process, so a test can kill and restart
it) and one vLLM worker process per model, registered with the manager.
"""
from __future__ import annotations

import asyncio
import pathlib
import time

import grpc
import pytest
import pytest_asyncio

from manager_svc.config import ManagerConfig
from manager_svc.service import ManagerService
from protos.v1 import common_pb2, manager_pb2, manager_pb2_grpc, router_pb2, router_pb2_grpc, worker_pb2
from roundhouse import catalogue, natsd, stack
from router_svc.config import RouterConfig
from router_svc.server import Router
from tests.conftest import SLOW_STEPS, TEST_ACK_WAIT_S, eventually, kinds_of, tokens_of

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

MiB = 2**20
MODELS = ("res-0", "res-1", "res-2")
READY = worker_pb2.ENGINE_STATE_READY
UNLOADED = worker_pb2.ENGINE_STATE_UNLOADED
# Every res model runs at the slow pace (tests/slow_steps.py, >= 20 ms a step), so a stream of
# LONG tokens is still in flight seconds after its first token, whatever the machine's speed.
LONG = 200


def _corrupt(model_dir: pathlib.Path) -> None:
    weights = model_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated mid-tensor


@pytest.fixture(scope="module")
def res_yaml(session_dir) -> pathlib.Path:
    """Footprint per model ≈ 1.7 MiB weights + 64 MiB KV + 32 MiB overhead; the budget holds two."""
    path = stack.write_tiny_catalogue(
        session_dir, 4, prefix="res",
        gpus=(catalogue.GpuSpec(id="cpu", budget_bytes=200 * MiB, engine_overhead_bytes=32 * MiB),),
        manager=catalogue.ManagerSpec(drain_timeout_s=60, load_backoff_s=5, report_interval_s=1, queue_poll_s=0.25, starvation_s=20),
        kv_cache_bytes=64 * MiB, max_num_seqs=32, min_resident_s=2, default_max_tokens=16,
        per_model={m: SLOW_STEPS for m in MODELS},
    )
    # the fourth model becomes res-bad: same files, weights cut in half
    text = path.read_text().replace("res-3", "res-bad")
    (session_dir / "models" / "res-3").rename(session_dir / "models" / "res-bad")
    _corrupt(session_dir / "models" / "res-bad")
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def res_catalogue(res_yaml) -> catalogue.Catalogue:
    return catalogue.load(res_yaml)


class Stack:
    def __init__(self, yaml: pathlib.Path, cat: catalogue.Catalogue, nats_url: str, run_dir: pathlib.Path):
        self.yaml, self.cat, self.nats_url, self.run_dir = yaml, cat, nats_url, run_dir
        self.manager_port = natsd.free_port()
        self.manager: ManagerService | None = None
        self.router: Router | None = None
        self.workers: dict[str, stack.WorkerProcess] = {}
        self._channels: list[grpc.aio.Channel] = []

    async def start_manager(self) -> None:
        self.manager = ManagerService(ManagerConfig(catalogue=self.cat, nats_url=self.nats_url, port=self.manager_port))
        await self.manager.start()

    def stub(self, cls, port: int):
        ch = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self._channels.append(ch)
        return cls(ch)

    @property
    def admin(self) -> manager_pb2_grpc.ManagerStub:
        return self.stub(manager_pb2_grpc.ManagerStub, self.manager_port)

    async def residency(self) -> dict[str, manager_pb2.ModelResidency]:
        resp = await self.admin.ListResidency(manager_pb2.ListResidencyRequest(), timeout=10)
        return {m.model: m for m in resp.models}

    async def generate(self, model: str, max_tokens: int = 8, prompt: str = "hello", timeout: float = 400,
                       first_token: asyncio.Event | None = None) -> list:
        """The stream's events; `first_token` is set when its first generated token arrives."""
        req = router_pb2.GenerateRequest(model=model, prompt=prompt, sampling=common_pb2.SamplingParams(
            max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
        events = []
        async for ev in self.router_stub.Generate(req, timeout=timeout):
            events.append(ev)
            if first_token is not None and ev.WhichOneof("event") == "delta":
                first_token.set()
        return events


@pytest_asyncio.fixture(scope="module")
async def res(res_yaml, res_catalogue, nats_server, session_dir):
    s = Stack(res_yaml, res_catalogue, nats_server.url, session_dir / "run-res")
    try:
        await s.start_manager()
        s.router = Router(RouterConfig(catalogue=res_catalogue, nats_url=nats_server.url, port=0, http_port=-1))
        await s.router.start()
        s.router_stub = s.stub(router_pb2_grpc.RouterStub, s.router.port)
        for m in (*MODELS, "res-bad"):
            s.workers[m] = await stack.start_worker(res_yaml, m, nats_server.url, s.run_dir, "--ack-wait", str(TEST_ACK_WAIT_S),
                                                    "--manager", f"127.0.0.1:{s.manager_port}")
        await eventually(lambda: _all_reported(s), 60, "every worker registered with the manager")
        yield s
    finally:  # also when the set-up itself failed: no worker process outlives the module
        await stack.stop_all(list(s.workers.values()), timeout=15)
        if s.router is not None:
            await s.router.stop(grace=1)
        if s.manager is not None:
            await s.manager.stop()
        for ch in s._channels:
            await ch.close()


def _ok(events, n) -> None:
    kinds = kinds_of(events)
    assert kinds[0] == "queued" and kinds[-1] == "finished" and "error" not in kinds, kinds
    assert len(tokens_of(events)) == n


async def test_traffic_to_a_third_model_evicts_the_right_one(res):
    # res-0 and res-1 become resident; res-0 is then used more, and more recently.
    _ok(await res.generate("res-0"), 8)
    _ok(await res.generate("res-1"), 8)
    for _ in range(3):
        _ok(await res.generate("res-0"), 8)
    await asyncio.sleep(2.1)  # past min_resident_s: a configured duration, not a synchronisation
    # Five requests for the cold third model queue up during its load.
    streams = await asyncio.gather(*(res.generate("res-2", 6 + i) for i in range(5)))
    for i, events in enumerate(streams):
        _ok(events, 6 + i)
        kinds = kinds_of(events)
        assert kinds.index("loading") < kinds.index("started"), "the caller saw the load"
        assert events[kinds.index("loading")].loading.model == "res-2"
    r = await res.residency()
    assert r["res-1"].state == UNLOADED and r["res-1"].evictions == 1, "the least used model was evicted"
    assert r["res-0"].state == READY and r["res-0"].evictions == 0
    assert r["res-2"].state == READY and r["res-2"].loads == 1


async def test_twenty_requests_for_a_cold_model_cause_exactly_one_load(res):
    before = (await res.residency())["res-1"].loads
    worker_loads = (await res.workers["res-1"].status()).loads
    assert (await res.residency())["res-1"].state == UNLOADED
    streams = await asyncio.gather(*(res.generate("res-1", 4, prompt=f"cold {i}") for i in range(20)))
    for events in streams:
        _ok(events, 4)
    assert (await res.residency())["res-1"].loads == before + 1
    assert (await res.workers["res-1"].status()).loads == worker_loads + 1


async def test_pinned_and_busy_models_are_not_evicted(res):
    r = await res.residency()
    resident = sorted(m for m in MODELS if r[m].state == READY)
    cold = next(m for m in MODELS if r[m].state != READY)
    pinned, busy = resident
    evictions = {m: r[m].evictions for m in MODELS}
    await res.admin.Pin(manager_pb2.ModelRequest(model=pinned), timeout=10)
    await asyncio.sleep(2.1)  # past min_resident_s
    # A long stream keeps `busy` in flight (LONG tokens at the slow pace: seconds); the cold
    # model's request, sent once the stream flows, must wait for it.
    flowing = asyncio.Event()
    long_stream = asyncio.ensure_future(res.generate(busy, LONG, prompt="keep me busy", first_token=flowing))
    await asyncio.wait_for(flowing.wait(), 60)
    assert await _in_flight(res, busy), f"{busy} has the stream in flight"
    cold_stream = asyncio.ensure_future(res.generate(cold, 4))
    long_events = await long_stream
    _ok(long_events, LONG)  # the busy model was not evicted under its stream: it finished whole
    _ok(await cold_stream, 4)
    r = await res.residency()
    assert r[pinned].state == READY and r[pinned].evictions == evictions[pinned] and r[pinned].pinned
    assert r[busy].state == UNLOADED and r[busy].evictions == evictions[busy] + 1, "evicted once its stream was done"
    assert r[cold].state == READY
    await res.admin.Unpin(manager_pb2.ModelRequest(model=pinned), timeout=10)


async def _in_flight(res, model: str) -> bool:
    return (await res.workers[model].status()).in_flight > 0


async def test_round_robin_over_three_models_with_room_for_two(res):
    before = await res.residency()
    rounds, per_round = 3, 2
    failures = 0
    for r in range(rounds):
        results = await asyncio.gather(
            *(res.generate(m, 4, prompt=f"round {r} {i}") for m in MODELS for i in range(per_round)),
            return_exceptions=True,
        )
        for events in results:
            if isinstance(events, BaseException) or kinds_of(events)[-1] != "finished":
                failures += 1
    after = await res.residency()
    swaps = sum(after[m].evictions - before[m].evictions for m in MODELS)
    requests = rounds * per_round * len(MODELS)
    print(f"round-robin: {requests} requests over 3 models, room for 2: {swaps} swaps, {failures} failures")
    assert failures == 0
    assert swaps <= rounds, "queued requests are grouped per model: at most one swap per round"


async def test_corrupt_weights_fail_their_waiters_and_leave_the_others_serving(res):
    before = await res.residency()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await res.generate("res-bad", 4, timeout=60)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "res-bad" in info.value.details() and "corrupt" in info.value.details()
    after = await res.residency()
    assert after["res-bad"].state == worker_pb2.ENGINE_STATE_FAILED
    assert after["res-bad"].backoff_until_unix > time.time(), "the manager backs off before retrying"
    for m in MODELS:  # nothing was evicted for it, and the resident ones still serve
        assert after[m].evictions == before[m].evictions and after[m].state == before[m].state
    for m in MODELS:
        if after[m].state == READY:
            _ok(await res.generate(m, 4), 4)


async def test_manager_restart_during_traffic_loses_nothing_and_loads_nothing_twice(res):
    r = await res.residency()
    resident = [m for m in MODELS if r[m].state == READY] or ["res-0"]
    for m in resident:
        _ok(await res.generate(m, 4), 4)
    r = await res.residency()
    loads_before = {m: (await res.workers[m].status()).loads for m in MODELS}
    stop = asyncio.Event()
    done, failed = [], []

    async def client(model: str) -> None:
        i = 0
        while not stop.is_set():
            try:
                _ok(await res.generate(model, 4, prompt=f"steady {i}", timeout=60), 4)
                done.append(model)
            except (grpc.aio.AioRpcError, AssertionError) as e:
                failed.append(repr(e))
            i += 1

    clients = [asyncio.ensure_future(client(m)) for m in resident]
    try:
        await eventually(lambda: len(done) >= 4, 60, "steady traffic flowing")
        t = time.monotonic()
        await res.manager.stop()          # the manager goes away mid-traffic...
        print(f"manager stopped in {time.monotonic() - t:.1f}s")
        res.manager = None
        await eventually(lambda: len(done) >= 10, 60, "traffic keeps flowing without a manager")
        t = time.monotonic()
        await res.start_manager()          # ...and comes back on the same address
        print(f"manager restarted in {time.monotonic() - t:.1f}s")
        await eventually(lambda: _all_reported(res), 30, "the new manager rebuilt its view from the workers")
        n = len(done)
        await eventually(lambda: len(done) >= n + 6, 60, "traffic flowing with the new manager")
    except BaseException:
        for c in clients:
            c.cancel()
        raise
    stop.set()
    await asyncio.gather(*clients)  # each client finishes the request it has under way
    assert failed == []
    r2 = await res.residency()
    for m in MODELS:
        assert r2[m].state == r[m].state, m
        assert r2[m].loads == 0, "the new manager loaded nothing: the models were already resident"
        assert (await res.workers[m].status()).loads == loads_before[m]


async def _all_reported(res) -> bool:
    r = await res.residency()
    return all(r[m].worker_id for m in res.workers)  # noqa: C419 - a list of strs, not awaitables
