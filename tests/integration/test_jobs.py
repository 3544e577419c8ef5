"""Async jobs over NATS: submitted, followed, fetched, cancelled, and run to the end across a router restart."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid

import grpc
import nats
import pytest

from protos.v1 import common_pb2, router_pb2, router_pb2_grpc
from roundhouse import natsd, stack, subjects
from router_svc.config import RouterConfig
from router_svc.jobs import PROTOBUF
from router_svc.server import Router
from tests.conftest import SLOW_MAX_TOKENS, SLOW_MODEL, TEST_ACK_WAIT_S, abort_observed, assert_quiescent, collect, eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
async def nc(nats_server):
    conn = await nats.connect(nats_server.url)
    yield conn
    await conn.close()


async def _follow(nc, job_id: str):
    """Subscribes to a job's events before it is submitted; returns (events list, done future)."""
    events, done = [], asyncio.get_running_loop().create_future()

    async def on(msg):
        ev = json.loads(msg.data)
        ev["_seen"] = time.monotonic()
        events.append(ev)
        if "job" in ev and not done.done():
            done.set_result(ev["job"])

    sub = await nc.subscribe(subjects.job_events_subject(job_id), cb=on)
    return events, done, sub


async def _grpc_text(router_stub, prompt: str, max_tokens: int) -> str:
    req = router_pb2.GenerateRequest(model="chat", prompt=prompt,
                                     sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    return "".join(ev.delta.text for ev in await collect(router_stub.Generate(req, timeout=180)) if ev.WhichOneof("event") == "delta")


async def test_json_job_is_submitted_followed_and_fetched(nc, router, router_stub, chat_worker, js):
    want = await _grpc_text(router_stub, "a job for later", 16)
    job_id = f"job-{uuid.uuid4().hex[:8]}"
    events, done, sub = await _follow(nc, job_id)
    body = {"job_id": job_id, "model": "chat", "prompt": "a job for later", "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    reply = json.loads((await nc.request(subjects.JOBS_SUBMIT, json.dumps(body).encode(), timeout=60)).data)
    assert reply["job_id"] == job_id and reply["state"] in ("JOB_STATE_QUEUED", "JOB_STATE_RUNNING")
    assert reply["model"] == "tiny-0"
    final = await asyncio.wait_for(done, 60)
    await sub.unsubscribe()
    kinds = [next(iter(e["event"])) for e in events if "event" in e]
    assert kinds[0] == "queued" and "started" in kinds and kinds[-1] == "finished"
    assert "".join(e["event"]["delta"].get("text", "") for e in events if "delta" in e.get("event", {})) == want
    assert final["state"] == "JOB_STATE_SUCCEEDED" and final["text"] == want and final["attempts"] == 1
    # The result is in the key-value bucket (JSON) and behind GetJob.
    stored = json.loads((await (await js.key_value(subjects.JOBS_BUCKET)).get(job_id)).value)
    assert stored["text"] == want and stored["usage"]["completion_tokens"] == 16
    got = await router_stub.GetJob(router_pb2.JobRequest(job_id=job_id), timeout=60)
    assert got.state == router_pb2.JOB_STATE_SUCCEEDED and got.text == want and len(got.token_ids) == 16
    assert got.finish_reason == common_pb2.FINISH_REASON_LENGTH
    await assert_quiescent(router, js, [chat_worker])


async def test_protobuf_job_with_model_auto_and_idempotent_resubmission(nc, router_stub, chat_worker):
    job_id = f"job-{uuid.uuid4().hex[:8]}"
    events, done, sub = await _follow(nc, job_id)
    req = router_pb2.GenerateRequest(model="auto", prompt="```c\nint main;\n```", request_id=job_id,
                                     sampling=common_pb2.SamplingParams(max_tokens=5, temperature=0))
    msg = await nc.request(subjects.JOBS_SUBMIT, req.SerializeToString(), timeout=10, headers={"Content-Type": PROTOBUF})
    job = router_pb2.Job.FromString(msg.data)
    assert job.job_id == job_id and job.model == "tiny-0" and job.route_reason.startswith("rule code-fence")
    await asyncio.wait_for(done, 60)
    await sub.unsubscribe()
    again = await router_stub.SubmitJob(req, timeout=60)
    assert again.state == router_pb2.JOB_STATE_SUCCEEDED and again.attempts == 1, "a resubmitted id returns the job, not a rerun"


async def test_a_bad_job_is_refused_at_once_and_nothing_is_stored(nc, router_stub):
    body = {"job_id": "job-bad-1", "model": "chat", "prompt": "x", "max_tokens": 0}
    reply = json.loads((await nc.request(subjects.JOBS_SUBMIT, json.dumps(body).encode(), timeout=60)).data)
    assert reply["error"]["code"] == "INVALID_ARGUMENT" and "max_tokens" in reply["error"]["message"]
    not_json = json.loads((await nc.request(subjects.JOBS_SUBMIT, b"{not json", timeout=60)).data)
    assert not_json["error"]["code"] == "INVALID_ARGUMENT" and "JSON" in not_json["error"]["message"]
    garbage = await nc.request(subjects.JOBS_SUBMIT, b"\xff\xff\xff", timeout=60, headers={"Content-Type": PROTOBUF})
    refused = router_pb2.Job.FromString(garbage.data)
    assert refused.error.code == "INVALID_ARGUMENT" and not refused.job_id
    with pytest.raises(grpc.aio.AioRpcError) as nf:
        await router_stub.GetJob(router_pb2.JobRequest(job_id="job-bad-1"), timeout=60)
    assert nf.value.code() == grpc.StatusCode.NOT_FOUND


async def test_cancel_job_aborts_its_generation(nc, router, router_stub, slow_worker, js):
    finals = []

    async def attempt() -> float:
        job_id = f"job-{uuid.uuid4().hex[:8]}"
        events, done, sub = await _follow(nc, job_id)
        await router_stub.SubmitJob(router_pb2.GenerateRequest(
            model="slow", prompt="a long job", request_id=job_id,
            sampling=common_pb2.SamplingParams(max_tokens=SLOW_MAX_TOKENS, temperature=0, ignore_eos=True)), timeout=60)

        def flowing() -> bool:  # the job's own events, not a poll of the worker that a stall can outlast
            return done.done() or any("delta" in ev.get("event", {}) for ev in events)

        await eventually(flowing, 60, "the job's tokens flow, or it ended before (abort_observed retries that)")
        await router_stub.CancelJob(router_pb2.JobRequest(job_id=job_id), timeout=60)
        cancelled_at = time.monotonic()
        finals.append(await asyncio.wait_for(done, 60))
        await sub.unsubscribe()
        return cancelled_at

    await abort_observed(slow_worker, attempt, within_s=2.0)
    assert finals[-1]["state"] == "JOB_STATE_CANCELLED", "the aborted run's job is recorded CANCELLED"
    assert all(f["state"] in ("JOB_STATE_CANCELLED", "JOB_STATE_SUCCEEDED") for f in finals)
    await assert_quiescent(router, js, [slow_worker], models=(SLOW_MODEL,))


async def test_a_job_survives_a_router_restart(tmp_path, models_yaml, models, router_stub, chat_worker):
    """Own nats-server: router A takes the job while no worker serves the model, stops; router B
    runs it again once a worker is up; the job ends SUCCEEDED on its second attempt."""
    want = await _grpc_text(router_stub, "survive the restart", 8)
    server = natsd.start(tmp_path / "js")
    config = RouterConfig(catalogue=models, nats_url=server.url, port=0, http_port=-1, job_ack_wait_s=TEST_ACK_WAIT_S)
    a, b, worker, conn = Router(config), Router(config), None, None
    try:
        await a.start()
        conn = await nats.connect(server.url)
        body = {"job_id": "survivor", "model": "chat", "prompt": "survive the restart", "max_tokens": 8, "temperature": 0,
                "ignore_eos": True}
        reply = json.loads((await conn.request(subjects.JOBS_SUBMIT, json.dumps(body).encode(), timeout=60)).data)
        assert reply["job_id"] == "survivor"
        kv = await conn.jetstream().key_value(subjects.JOBS_BUCKET)

        async def state() -> dict:
            return json.loads((await kv.get("survivor")).value)

        async def running_on_a() -> bool:
            return (await state())["state"] == "JOB_STATE_RUNNING" and len(a.tracker) == 1

        await eventually(running_on_a, 10, "router A runs the job (it waits in the model's queue)")
        await a.stop(grace=1)
        await b.start()
        worker = await stack.start_worker(models_yaml, "tiny-0", server.url, tmp_path / "run", "--ack-wait", str(TEST_ACK_WAIT_S))
        await worker.load()

        async def succeeded() -> bool:
            return (await state())["state"] == "JOB_STATE_SUCCEEDED"

        await eventually(succeeded, 60, "router B ran the job to the end")
        final = await state()
        assert final["text"] == want
        assert final["attempts"] == 2, "A handed the job back at once; B ran it once"
    finally:
        await b.stop(grace=1)
        await a.stop(grace=1)
        if conn is not None:
            await conn.close()
        if worker is not None:
            worker.stop(timeout=15)
        server.stop()


async def test_a_job_that_meets_a_full_queue_waits_and_runs_again(tmp_path, models):
    """Own nats-server and a router whose model `ghost` has no worker and room for 1 waiter: the
    first job waits in that queue, so the second meets a full queue when it runs. It goes back to
    QUEUED and is retried with backoff instead of failing."""
    server = natsd.start(tmp_path / "js")
    spec = dataclasses.replace(models.get("tiny-0"), name="ghost", aliases=(), max_queued=1)
    cat = dataclasses.replace(models, models=(spec,), routing=None)
    r = Router(RouterConfig(catalogue=cat, nats_url=server.url, port=0, http_port=-1, job_ack_wait_s=TEST_ACK_WAIT_S))
    conn = None
    try:
        await r.start()
        conn = await nats.connect(server.url)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{r.port}") as ch:
            stub = router_pb2_grpc.RouterStub(ch)

            async def submit(job_id: str) -> None:
                body = {"job_id": job_id, "model": "ghost", "prompt": "wait", "max_tokens": 2}
                reply = json.loads((await conn.request(subjects.JOBS_SUBMIT, json.dumps(body).encode(), timeout=60)).data)
                assert reply["job_id"] == job_id, reply

            async def job(job_id: str) -> router_pb2.Job:
                return await stub.GetJob(router_pb2.JobRequest(job_id=job_id), timeout=60)

            await submit("holds-the-queue")
            await eventually(lambda: _state_is(job("holds-the-queue"), router_pb2.JOB_STATE_RUNNING), 30, "the first job waits in the queue")
            await submit("meets-a-full-queue")

            async def retried() -> bool:
                j = await job("meets-a-full-queue")
                assert j.state != router_pb2.JOB_STATE_FAILED, j.error.message
                return j.state == router_pb2.JOB_STATE_QUEUED and j.attempts >= 2

            await eventually(retried, 60, "the second job ran, met the full queue, and went back to wait (twice)")
            for job_id in ("holds-the-queue", "meets-a-full-queue"):
                cancelled = await stub.CancelJob(router_pb2.JobRequest(job_id=job_id), timeout=60)
                assert cancelled.state == router_pb2.JOB_STATE_CANCELLED
    finally:
        if conn is not None:
            await conn.close()
        await r.stop(grace=1)
        server.stop()


async def _state_is(record, state) -> bool:
    return (await record).state == state
