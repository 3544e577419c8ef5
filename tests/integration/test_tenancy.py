"""Tenants on the real stack: API keys at every front door, a tenant's models, limits that hold
across two routers and a router restart (counters in NATS KV), priority classes under saturation;
the manager's admin and worker keys.

Its own nats-server and tiny-0 worker: routers with tenants must not share a jobs stream with the
session's router, which has none. Here tiny-0 has one slot and slow steps (tests/slow_steps.py),
so that a single request saturates it."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import pathlib
import time

import aiohttp
import grpc
import nats
import pytest
import pytest_asyncio
import yaml

from manager_svc.config import ManagerConfig
from manager_svc.service import ManagerService
from protos.v1 import common_pb2, manager_pb2, manager_pb2_grpc, router_pb2, router_pb2_grpc, worker_pb2
from roundhouse import catalogue, jetstream, natsd, stack, subjects, tenancy
from router_svc import limits
from router_svc.config import RouterConfig
from router_svc.server import Router
from tests.conftest import SLOW_STEPS, TEST_ACK_WAIT_S, eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

KEYS = {name: f"rh-test-key-{name}-0123456789" for name in ("open", "rpm", "conc", "tpd", "other", "vip", "batch")}
TENANTS = [
    {"name": "open", "keys": [{"sha256": tenancy.digest(KEYS["open"])}], "models": ["chat"]},
    {"name": "other", "keys": [{"sha256": tenancy.digest(KEYS["other"])}]},
    {"name": "rpm", "keys": [{"sha256": tenancy.digest(KEYS["rpm"])}], "limits": {"requests_per_minute": 3}},
    {"name": "conc", "keys": [{"sha256": tenancy.digest(KEYS["conc"])}], "limits": {"concurrent_requests": 1}},
    {"name": "tpd", "keys": [{"sha256": tenancy.digest(KEYS["tpd"])}], "limits": {"tokens_per_day": 5}},
    {"name": "vip", "keys": [{"sha256": tenancy.digest(KEYS["vip"])}], "priority": "high"},
    {"name": "batch", "keys": [{"sha256": tenancy.digest(KEYS["batch"])}], "priority": "low"},
]


def _one_slow_slot(models_yaml, d) -> pathlib.Path:
    """The session catalogue with tiny-0 given one slot and slow steps (paths made absolute)."""
    raw = yaml.safe_load(models_yaml.read_text())
    for m in raw["models"]:
        m["path"] = str(models_yaml.parent / m["path"])
        if m["name"] == "tiny-0":
            m.update(max_num_seqs=1, logits_processors=list(SLOW_STEPS["logits_processors"]))
    path = d / "models.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@dataclasses.dataclass
class Stack:
    nats_url: str
    config: RouterConfig
    a: Router
    b: Router


@pytest_asyncio.fixture(scope="module")
async def tenancy_stack(tmp_path_factory, models_yaml):
    d = tmp_path_factory.mktemp("tenancy")
    server = await natsd.start_async(d / "js")
    models_yaml = _one_slow_slot(models_yaml, d)
    cat = dataclasses.replace(catalogue.load(models_yaml), tenants=tenancy.parse(TENANTS))
    config = RouterConfig(catalogue=cat, nats_url=server.url, port=0, http_port=0, publish_timeout_s=30.0,
                          job_ack_wait_s=TEST_ACK_WAIT_S)
    routers = [Router(config), Router(config)]
    worker = None
    try:
        for r in routers:
            await r.start()
        worker = await stack.start_worker(models_yaml, "tiny-0", server.url, d / "run", "--ack-wait", str(TEST_ACK_WAIT_S))
        await worker.load()
        yield Stack(server.url, config, *routers)
    finally:
        for r in routers:
            await r.stop(grace=1)
        if worker is not None:
            worker.stop(timeout=15)
        server.stop()


def _auth(name: str | None) -> dict:
    return {"Authorization": f"Bearer {KEYS[name]}"} if name else {}


async def _post(router: Router, tenant: str | None, body: dict, path: str = "chat/completions", **headers):
    """(status, headers, JSON body) of one whole HTTP call."""
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{router.http_port}/v1/{path}", json=body,
                          headers={**_auth(tenant), **headers}, timeout=aiohttp.ClientTimeout(total=120)) as r:
            return r.status, r.headers, await r.json()


def _chat(model: str = "chat", text: str = "hello", max_tokens: int = 2) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "temperature": 0}


async def test_keys_are_required_and_a_tenant_sees_and_uses_only_its_models(tenancy_stack, capfd):
    a = tenancy_stack.a
    for tenant, headers in ((None, {}), (None, {"Authorization": "Bearer rh-not-a-key-0000000000"})):
        status, _, body = await _post(a, tenant, _chat(), **headers)
        assert status == 401 and body["error"]["type"] == "authentication_error", body
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{a.http_port}/v1/models", headers=_auth("open")) as r:
            listed = {m["id"] for m in (await r.json())["data"]}
        async with s.get(f"http://127.0.0.1:{a.http_port}/v1/models") as r:
            assert r.status == 401
    assert listed == {"tiny-0", "chat", "auto"}, "only the models its key may use (and auto)"

    status, headers, body = await _post(a, "open", _chat())
    assert status == 200 and body["usage"]["completion_tokens"] == 2
    status, _, body = await _post(a, "open", _chat("code"))
    assert status == 403 and body["error"]["type"] == "permission_error" and "tiny-1" in body["error"]["message"]
    # The test routing sends plain text to tiny-1 (code); this tenant may not use it: auto picks among its own.
    status, headers, body = await _post(a, "open", _chat("auto"))
    assert status == 200 and headers["x-roundhouse-model"] == "tiny-0"
    assert "not among tenant open's models" in headers["x-roundhouse-route-reason"]

    async with grpc.aio.insecure_channel(f"127.0.0.1:{a.port}") as ch:
        stub = router_pb2_grpc.RouterStub(ch)
        req = router_pb2.GenerateRequest(model="chat", prompt="hi", sampling=common_pb2.SamplingParams(max_tokens=2))
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.ListModels(router_pb2.ListModelsRequest(), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for _ in stub.Generate(req, timeout=60, metadata=(("authorization", "Bearer rh-wrong-000000000000"),)):
                pass
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        listed = await stub.ListModels(router_pb2.ListModelsRequest(), timeout=10, metadata=(("authorization", KEYS["open"]),))
        assert [m.name for m in listed.models] == ["tiny-0"]
        events = [ev async for ev in stub.Generate(req, timeout=60, metadata=(("authorization", f"Bearer {KEYS['open']}"),))]
        assert events[-1].WhichOneof("event") == "finished"

        # A job belongs to the tenant that submitted it (NATS, key in a header); another cannot see it.
        # Its events go to its tenant's subject (NATS lets only that tenant's job clients follow it).
        nc = await nats.connect(tenancy_stack.nats_url)
        followed: list[dict] = []

        async def on_event(msg) -> None:
            followed.append(json.loads(msg.data))
        try:
            await nc.subscribe(subjects.job_events_subject("tenant-job-1", "open"), cb=on_event)
            refused = json.loads((await nc.request(subjects.JOBS_SUBMIT, json.dumps(_chat()).encode(), timeout=60)).data)
            assert refused["error"]["code"] == "UNAUTHENTICATED"
            reply = json.loads((await nc.request(subjects.JOBS_SUBMIT, json.dumps({**_chat(), "job_id": "tenant-job-1"}).encode(),
                                                 timeout=60, headers=_auth("open"))).data)
            assert reply["tenant"] == "open", reply
            job = router_pb2.JobRequest(job_id=reply["job_id"])
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.GetJob(job, timeout=10, metadata=(("authorization", KEYS["other"]),))
            assert e.value.code() == grpc.StatusCode.NOT_FOUND

            async def succeeded() -> bool:
                got = await stub.GetJob(job, timeout=10, metadata=(("authorization", KEYS["open"]),))
                return got.state == router_pb2.JOB_STATE_SUCCEEDED
            await eventually(succeeded, 120, "the job ran as its tenant")
            await eventually(lambda: any(ev.get("job", {}).get("state") == "JOB_STATE_SUCCEEDED" for ev in followed), 30,
                             "its events came on its tenant's subject")
        finally:
            await nc.close()

    logs = capfd.readouterr()
    assert "auth.refused" in logs.err
    for key in KEYS.values():
        assert key not in logs.out + logs.err, "an API key was logged"
    assert "rh-not-a-key" not in logs.err and "rh-wrong" not in logs.err


async def test_limits_hold_across_routers_and_a_router_restart(tenancy_stack):
    s = tenancy_stack
    # requests_per_minute 3: two through one router, one through the other, the fourth refused by either.
    for router in (s.a, s.a, s.b):
        status, _, body = await _post(router, "rpm", _chat())
        assert status == 200, body
    status, headers, body = await _post(s.b, "rpm", _chat())
    assert status == 429 and body["error"]["type"] == "rate_limit_error" and "3 requests per minute" in body["error"]["message"]
    assert 1 <= int(headers["Retry-After"]) <= 120
    # The count lives in NATS: a router started now (as one restarted would be) sees it too.
    fresh = Router(s.config)
    await fresh.start()
    try:
        status, _, body = await _post(fresh, "rpm", _chat())
        assert status == 429, body
    finally:
        await fresh.stop(grace=1)

    # concurrent_requests 1: a request waiting for a model nobody serves (tiny-1) holds the slot.
    async def held() -> None:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"http://127.0.0.1:{s.a.http_port}/v1/chat/completions", headers=_auth("conc"),
                                    json={**_chat("code"), "stream": True}) as r:
                await r.content.read()
    holder = asyncio.create_task(held())
    await eventually(lambda: any(f.model == "tiny-1" for f in s.a.tracker.flights()), 30, "the held request is in flight")
    status, headers, body = await _post(s.b, "conc", _chat())
    assert status == 429 and "requests in flight" in body["error"]["message"] and headers["Retry-After"] == "1"
    holder.cancel()
    await asyncio.gather(holder, return_exceptions=True)

    async def admitted_again() -> bool:
        status, _, _ = await _post(s.b, "conc", _chat())
        return status == 200
    await eventually(admitted_again, 30, "the slot came back when the held request's caller left")

    # tokens_per_day 5: one request of a prompt and 4 generated tokens uses it up (charged as it ends).
    status, _, body = await _post(s.b, "tpd", _chat(max_tokens=4))
    assert status == 200 and body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"] > 5

    async def refused_for_the_day() -> bool:
        status, headers, body = await _post(s.a, "tpd", _chat())
        return status == 429 and "tokens for today" in body["error"]["message"] \
            and abs(int(headers["Retry-After"]) - (86400 - time.time() % 86400)) < 60
    await eventually(refused_for_the_day, 30, "the day's tokens are used up, on the other router too")

    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{s.b.http_port}/metrics") as r:
            text = await r.text()
    assert 'roundhouse_rate_limited_total{limit="requests_per_minute",tenant="rpm"}' in text
    assert 'roundhouse_tenant_requests_total{status="ok",tenant="tpd"}' in text


async def test_under_saturation_a_higher_class_starts_before_earlier_lower_ones(tenancy_stack):
    """tiny-0 has one slot. While a low-class request holds it, a high tenant's request that
    lowered itself to low queues, then three low ones, a normal one and a high one; when the slot
    frees they start high, normal, then the lows in their order. (That no class waits forever is
    tests/unit/test_lanes.py's.)"""
    s = tenancy_stack
    started: list[str] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{s.a.port}") as ch:
        stub = router_pb2_grpc.RouterStub(ch)
        queued = {name: asyncio.Event() for name in ("blocker", "vip-lowered", "low-1", "low-2", "low-3", "normal", "high")}

        async def run(tenant: str, name: str, max_tokens: int, priority: str = "") -> str:
            req = router_pb2.GenerateRequest(model="chat", prompt="hi", priority=priority, sampling=common_pb2.SamplingParams(
                max_tokens=max_tokens, temperature=0, ignore_eos=True))
            async for ev in stub.Generate(req, timeout=180, metadata=(("authorization", KEYS[tenant]),)):
                kind = ev.WhichOneof("event")
                if kind == "queued":
                    queued[name].set()
                elif kind == "started":
                    started.append(name)
                elif kind in ("finished", "error"):
                    return kind
            return "ended"

        blocker = asyncio.create_task(run("batch", "blocker", 1500))   # ~30 s at 20 ms a step; cancelled
        await eventually(lambda: started == ["blocker"], 60, "the low-class blocker holds the one slot")
        rest = []
        for tenant, name, priority in (("vip", "vip-lowered", "low"), ("batch", "low-1", ""), ("batch", "low-2", ""),
                                       ("batch", "low-3", ""), ("open", "normal", ""), ("vip", "high", "")):
            rest.append(asyncio.create_task(run(tenant, name, 6, priority)))
            async with asyncio.timeout(30):
                await queued[name].wait()          # in its class's queue (JetStream acked it) before the next
        assert started == ["blocker"], "one slot: nothing else started"
        blocker.cancel()                           # the caller leaves: its engine stops, the slot frees
        await asyncio.gather(blocker, return_exceptions=True)
        assert await asyncio.gather(*rest) == ["finished"] * 6
    assert started == ["blocker", "high", "normal", "vip-lowered", "low-1", "low-2", "low-3"]

    # The manager's view of a queue: each class's depth, and the highest class waiting.
    nc = await nats.connect(s.nats_url)
    try:
        js = nc.jetstream()
        await jetstream.ensure_consumers(js, "nobody-serves-this", 30.0, 5)
        for priority in ("low", "high", "low"):
            await js.publish(subjects.request_subject("nobody-serves-this", priority), b"x")
        # A consumer counts a stored message a moment after the PubAck (nats-server signals its
        # consumers apart from the store): a full run read (1, 0, 1) at once.
        async def all_counted() -> bool:
            return (await jetstream.depth(js, "nobody-serves-this")).total >= 3
        await eventually(all_counted, 5, "the consumers count all three messages")
        depth = await jetstream.depth(js, "nobody-serves-this")
        assert depth.pending == (1, 0, 2) and depth.total == 3 and depth.top() == 0 and depth.acked == (0, 0, 0)
        await js.purge_stream(subjects.STREAM, subject=subjects.request_subject("nobody-serves-this", "low"))
        await js.purge_stream(subjects.STREAM, subject=subjects.request_subject("nobody-serves-this", "high"))
    finally:
        await nc.close()


def test_retry_after_covers_the_sliding_window():
    # 3 this minute, none before, 20 s in: the fourth fits once this minute's weight has shrunk enough.
    assert limits.seconds_until_room(3, 0, 20, 3) == pytest.approx(40 + 20)


ADMIN_KEY, WORKER_KEY = "rh-test-admin-key-0123456789", "rh-test-worker-key-0123456789"


async def test_the_managers_admin_calls_and_reports_need_their_keys(tmp_path, models_yaml):
    """A worker reports with the worker key it reads from its environment; a report or an admin
    call without the right key is refused; the admin key pins."""
    config = models_yaml.with_name("admin-models.yaml")
    config.write_text(models_yaml.read_text() + f"\nadmin:\n  keys: [{{sha256: {tenancy.digest(ADMIN_KEY)}}}]\n"
                                                "  worker_key: {env: RH_TEST_WORKER_KEY}\n")
    cat = catalogue.load(config)
    server = await natsd.start_async(tmp_path / "js")
    manager = ManagerService(ManagerConfig(catalogue=cat, nats_url=server.url, port=0,
                                           credentials=tenancy.AdminCredentials.of(cat.admin, {"RH_TEST_WORKER_KEY": WORKER_KEY})))
    worker = None
    try:
        await manager.start()
        worker = await stack.start_worker(config, "tiny-0", server.url, tmp_path / "run", "--manager", manager.address,
                                          env={**os.environ, "RH_TEST_WORKER_KEY": WORKER_KEY})
        await eventually(lambda: manager.manager.entries["tiny-0"].address == worker.address, 60,
                         "the worker's report, with its key, was taken")
        async with grpc.aio.insecure_channel(manager.address) as ch:
            stub = manager_pb2_grpc.ManagerStub(ch)
            forged = manager_pb2.WorkerReport(worker_id="intruder", model="tiny-1", address="10.9.9.9:1",
                                              gpu="cpu", state=worker_pb2.ENGINE_STATE_READY)
            for metadata in ((), (("authorization", f"Bearer {ADMIN_KEY}"),)):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.Report(forged, timeout=10, metadata=metadata)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "worker key" in e.value.details()
            assert manager.manager.entries["tiny-1"].address != "10.9.9.9:1"
            for metadata in ((), (("authorization", f"Bearer {WORKER_KEY}"),)):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.Pin(manager_pb2.ModelRequest(model="tiny-1"), timeout=10, metadata=metadata)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "admin key" in e.value.details()
            assert not manager.manager.entries["tiny-1"].pinned
            got = await stub.Pin(manager_pb2.ModelRequest(model="tiny-1"), timeout=10,
                                 metadata=(("authorization", f"Bearer {ADMIN_KEY}"),))
            assert got.pinned
            assert (await stub.ListResidency(manager_pb2.ListResidencyRequest(), timeout=10)).models  # read only: open
    finally:
        if worker is not None:
            worker.stop(timeout=15)
        await manager.stop()
        server.stop()
