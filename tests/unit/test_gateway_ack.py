"""The gateway does not hold a worker's tokens back until JetStream's publish ack comes: a chunk
from a worker proves the message was stored. Without either, nothing goes to the caller, and a
publish NATS never acks still fails before any event (the HTTP API's 503)."""
from __future__ import annotations

import asyncio
import types

import pytest

from protos.v1 import common_pb2, router_pb2, worker_pb2
from roundhouse import catalogue, subjects, tinymodels
from roundhouse.errors import Unavailable
from router_svc.config import RouterConfig
from router_svc.gateway import Gateway
from router_svc.tracker import Delta, Tracker

pytestmark = pytest.mark.unit


class SlowAckJetStream:
    """Stores at once, acks when the test says (`ack`), or never (`fail`: the gateway's publish gives up)."""

    def __init__(self) -> None:
        self.released = asyncio.Event()
        self.called = asyncio.Event()
        self.result = types.SimpleNamespace(seq=7)
        self.published: list[str] = []
        self.deleted: list[int] = []

    async def publish(self, subject, payload, timeout, headers):
        self.published.append(subject)
        self.called.set()
        await self.released.wait()
        if self.result is None:
            raise asyncio.TimeoutError
        return self.result

    async def delete_msg(self, stream, seq):
        self.deleted.append(seq)


class FakeNats:
    def __init__(self) -> None:
        self.js = SlowAckJetStream()
        self.events: list[str] = []

    def jetstream(self):
        return self.js

    async def publish(self, subject, body):
        self.events.append(subject)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("gateway")
    tinymodels.write_models(root, [tinymodels.TinySpec(name="t", seed=1)])
    return str(root / "t")


def gateway(model_path: str) -> tuple[Gateway, Tracker, FakeNats]:
    spec = catalogue.ModelSpec(name="t", path=model_path, max_model_len=256)
    nc, tracker = FakeNats(), Tracker()
    config = RouterConfig(catalogue=catalogue.Catalogue(models=(spec,)), publish_timeout_s=0.1)
    return Gateway(config, nc, tracker, reply_to="127.0.0.1:1"), tracker, nc


async def booked(flight) -> None:
    while flight.seq == 0:  # a condition polled, under the caller's timeout
        await asyncio.sleep(0.001)


def chunk(rid: str, **kind) -> worker_pb2.RequestChunk:
    return worker_pb2.RequestChunk(request_id=rid, delivery=1, **kind)


async def test_tokens_reach_the_caller_before_the_ack_and_the_ack_is_booked_after(model_path):
    gw, tracker, nc = gateway(model_path)
    admitted = gw.admit(router_pb2.GenerateRequest(model="t", prompt="hi", sampling=common_pb2.SamplingParams(max_tokens=2)))
    rid = admitted.queued.request_id
    events = gw.stream(admitted)
    first = asyncio.ensure_future(anext(events))
    await asyncio.wait_for(nc.js.called.wait(), 5)
    assert nc.js.published == [subjects.request_subject("t", "normal")] and not first.done()
    flight = next(f for f in tracker.flights() if f.request_id == rid)
    tracker.on_chunk(chunk(rid, started=True), "w1")
    tracker.on_chunk(chunk(rid, delta=worker_pb2.RequestDelta(token_ids=[5], text="x")), "w1")
    got = [(await asyncio.wait_for(first, 5)).WhichOneof("event")]
    got.append((await asyncio.wait_for(anext(events), 5)).WhichOneof("event"))
    delta = await asyncio.wait_for(anext(events), 5)
    assert got == ["queued", "started"] and type(delta) is Delta and delta.token_ids == [5]
    assert not nc.js.released.is_set() and flight.seq == 0, "all of it before the ack"
    assert nc.events == [subjects.REQUEST_EVENTS], "the manager hears of the demand once the request is known stored"
    nc.js.released.set()  # the ack comes, and is booked: its sequence is what a cancel deletes
    last = asyncio.ensure_future(anext(events))
    await asyncio.wait_for(booked(flight), 5)
    tracker.on_chunk(chunk(rid, finished=worker_pb2.RequestFinished(
        finish_reason=common_pb2.FINISH_REASON_LENGTH, usage=common_pb2.Usage(completion_tokens=1))), "w1")
    assert (await asyncio.wait_for(last, 5)).WhichOneof("event") == "finished"
    assert nc.events == [subjects.REQUEST_EVENTS]
    await events.aclose()


async def test_without_a_worker_chunk_a_failed_publish_fails_before_any_event(model_path):
    gw, tracker, nc = gateway(model_path)
    admitted = gw.admit(router_pb2.GenerateRequest(model="t", prompt="hi", sampling=common_pb2.SamplingParams(max_tokens=2)))
    events = gw.stream(admitted)
    first = asyncio.ensure_future(anext(events))
    await asyncio.wait_for(nc.js.called.wait(), 5)
    tracker.on_model_event("t", worker_pb2.ENGINE_STATE_LOADING, 20.0, "")  # news of the model loading proves nothing was stored
    nc.js.result = None
    nc.js.released.set()
    with pytest.raises(Unavailable):
        await asyncio.wait_for(first, 5)
    assert nc.events == [], "no demand counted for a request that was never stored"
