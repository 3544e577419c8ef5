"""Requests wait in their model's JetStream queue: across a load, and across a worker crash."""
from __future__ import annotations

import asyncio
import os

import grpc
import psutil
import pytest

from protos.v1 import common_pb2, router_pb2, worker_pb2
from tests.conftest import assert_quiescent, collect, eventually, kinds_of, queued_count, tokens_of

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

MODEL = "tiny-1"


def request(prompt: str, max_tokens: int) -> router_pb2.GenerateRequest:
    return router_pb2.GenerateRequest(
        model="code", prompt=prompt, sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    )


async def test_requests_wait_in_the_queue_until_load_and_none_is_lost(router, router_stub, start_worker, js):
    worker = await start_worker(MODEL, "--no-load")
    assert (await worker.status()).state == worker_pb2.ENGINE_STATE_UNLOADED
    # 1. Requests published while the model is not loaded wait in its subject.
    calls = [asyncio.ensure_future(collect(router_stub.Generate(request(f"queued {i}", 12 + i), timeout=300))) for i in range(6)]
    # One with a short deadline: it expires in the queue and must never be started.
    with pytest.raises(grpc.aio.AioRpcError) as expired:
        await collect(router_stub.Generate(request("too late", 8), timeout=1.5))
    assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await eventually(lambda: _queued_is(js, 6), 30, "six requests queued")
    assert not any(c.done() for c in calls)
    # 2. Load: every waiting request completes, in full.
    status = await worker.load()
    assert status.state == worker_pb2.ENGINE_STATE_READY
    # (This model's engine runs in SCHED_IDLE, `engine_sched_idle`: its model runner does, the worker not.)
    runners = [p for p in psutil.Process(worker.process.pid).children(recursive=True) if p.name() == "VLLM::Worker"]
    assert runners and {os.sched_getscheduler(t.id) for p in runners for t in p.threads()} == {os.SCHED_IDLE}
    assert os.sched_getscheduler(worker.process.pid) == os.SCHED_OTHER
    results = await asyncio.gather(*calls)
    for i, events in enumerate(results):
        assert kinds_of(events)[0] == "queued" and kinds_of(events)[-1] == "finished"
        assert len(tokens_of(events)) == 12 + i
    st = await worker.status()
    assert st.completed == 6, "the expired request was never started"
    await assert_quiescent(router, js, [worker], models=(MODEL,))
    await worker.astop()


async def _queued_is(js, n: int) -> bool:
    return await queued_count(js, MODEL) == n


async def test_worker_killed_mid_stream_the_caller_gets_one_whole_stream_or_a_retryable_error(router, router_stub, start_worker, js):
    worker = await start_worker(MODEL)
    await worker.load()
    # The reference: the same greedy request, uninterrupted.
    reference = tokens_of(await collect(router_stub.Generate(request("survive a crash", 400), timeout=300)))
    assert len(reference) == 400
    # 1. Kill the worker (and its engine) with SIGKILL while it streams.
    call = router_stub.Generate(request("survive a crash", 400), timeout=300)
    events = []
    async for ev in call:
        events.append(ev)
        if len(tokens_of(events)) >= 20:
            break
    worker.kill()
    # 2. A worker for the model comes back; JetStream delivers the request again.
    replacement = await start_worker(MODEL)
    failure = None
    try:
        async for ev in call:
            events.append(ev)
    except grpc.aio.AioRpcError as e:
        failure = e
    got = tokens_of(events)
    if failure is None:
        assert kinds_of(events).count("finished") == 1 and kinds_of(events)[-1] == "finished"
        assert got == reference, "one complete stream, identical to an uninterrupted one"
        assert events[-1].finished.usage.completion_tokens == 400
    else:
        assert failure.code() == grpc.StatusCode.UNAVAILABLE
        assert kinds_of(events)[-1] == "error" and events[-1].error.retryable
        assert got == reference[: len(got)], "never tokens from two generations spliced together"
    print(f"after SIGKILL: {'complete stream' if failure is None else 'retryable error'}, {len(got)} tokens")
    await replacement.load()
    await assert_quiescent(router, js, [replacement], models=(MODEL,))
    await replacement.astop()
