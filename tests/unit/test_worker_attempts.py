"""A worker counts real attempts itself where JetStream's count is wrong (worker_svc.worker).

JetStream redelivers a message whose heartbeat came late (a worker starved of CPU for longer
than ack_wait / 3), and counts that delivery. A worker still holding the request adopts the
redelivery; the copy it hands back later must carry the attempts it counted, not JetStream's,
or a request that waited through a slow reload is failed for deaths that never happened.
Only NATS messages are faked here (the worker is the real one; it has no engine)."""
import asyncio
import types

import pytest

from protos.v1 import queue_pb2
from roundhouse import subjects
from roundhouse.catalogue import ModelSpec
from worker_svc import redelivery
from worker_svc.config import WorkerConfig
from worker_svc.worker import ModelWorker

pytestmark = pytest.mark.unit


class FakeMsg:
    def __init__(self, data: bytes, headers: dict, num_delivered: int, stream_seq: int):
        self.subject, self.data, self.headers = subjects.request_subject("m", "low"), data, headers
        self.metadata = types.SimpleNamespace(num_delivered=num_delivered, sequence=types.SimpleNamespace(stream=stream_seq))
        self.settled: list[str] = []

    async def term(self):
        self.settled.append("term")

    async def nak(self, delay=None):
        self.settled.append("nak")

    async def in_progress(self):
        pass


async def test_a_redelivery_adopted_while_a_suspect_waits_is_no_attempt(tmp_path):
    copies: list[dict] = []

    async def republish(subject, data, headers):
        assert subject == subjects.handback_subject("m", "low"), "a hand-back goes to its class's .back subject (natsauth)"
        copies.append(headers)

    worker = ModelWorker(WorkerConfig(model=ModelSpec(name="m", path=str(tmp_path), max_model_len=64, default_max_tokens=16)), republish)
    data = queue_pb2.QueuedRequest(request_id="r1", model="m", prompt="hi").SerializeToString()
    # A suspect that has had one real attempt, handed back twice (4 deliveries before).
    headers = {redelivery.ATTEMPTS_BEFORE: "1", redelivery.DELIVERIES_BEFORE: "4", redelivery.SUSPECT: "1"}
    first = FakeMsg(data, headers, num_delivered=1, stream_seq=10)
    again = FakeMsg(data, headers, num_delivered=2, stream_seq=10)   # its heartbeat came late

    await worker._alone.acquire()        # another suspect runs alone: this one waits
    serving = asyncio.create_task(worker._serve(first))
    async with asyncio.timeout(5):
        while "r1" not in worker.waiting:
            await asyncio.sleep(0)
    await worker._serve(again)           # adopted: the waiting request's newest handle
    assert worker.waiting["r1"] is again and not again.settled
    worker._alone.release()
    await asyncio.wait_for(serving, 5)   # no engine: handed back, not its fault

    assert again.settled == ["term"] and not first.settled, "the newest handle is the one removed"
    (copy,) = copies
    d = redelivery.delivery(copy, 1)
    assert d.attempts == 1, "the adopted redelivery was no attempt"
    assert d.number == 4 + 2 + 1, "numbers still increase past every delivery the router may have seen"
    assert d.suspect


def test_a_worker_learns_how_long_a_request_takes_in_its_engine():
    from worker_svc.worker import REQUEST_WEIGHT, Counters

    c = Counters()
    c.learn_request(4.0)
    assert c.request_s == 4.0, "the first completed request sets it"
    c.learn_request(9.0)
    assert c.request_s == pytest.approx(4.0 + REQUEST_WEIGHT * 5.0), "later ones move it part of the way"
