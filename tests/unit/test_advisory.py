"""JetStream's MAX_DELIVERIES advisory: parsed into (model, stream_seq, deliveries), and acted on by the router."""
import json
import types

import nats.js.errors
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protos.v1 import queue_pb2
from roundhouse import catalogue, subjects
from roundhouse.jetstream import MAX_DELIVER_TYPE, GaveUp, gave_up_on
from router_svc.config import RouterConfig
from router_svc.server import Router

pytestmark = pytest.mark.unit

MODELS = ["tiny-0", "Qwen/Qwen2.5-0.5B"]


def advisory(**over) -> bytes:
    """As nats-server sends it (JSConsumerDeliveryExceededAdvisory, compact JSON)."""
    body = {"type": MAX_DELIVER_TYPE, "id": "TMbth7XzlJOkyzkRhNWQTR", "timestamp": "2026-09-01T02:36:13.790078Z",
            "stream": subjects.STREAM, "consumer": subjects.consumer_name("Qwen/Qwen2.5-0.5B"), "stream_seq": 42,
            "deliveries": 10}
    body.update(over)
    return json.dumps({k: v for k, v in body.items() if v is not ...}, separators=(",", ":")).encode()


def test_an_advisory_names_the_model_message_and_deliveries():
    assert gave_up_on(advisory(), MODELS) == GaveUp("Qwen/Qwen2.5-0.5B", 42, 10)
    assert gave_up_on(advisory(domain="hub"), MODELS) == ("Qwen/Qwen2.5-0.5B", 42, 10), "a JetStream domain changes nothing"


def test_the_subject_covers_every_consumer_of_the_request_stream_only():
    assert subjects.max_deliveries_subject() == f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{subjects.STREAM}.*"
    assert subjects.model_of_consumer(subjects.consumer_name("tiny-0"), MODELS) == "tiny-0"
    assert subjects.model_of_consumer(subjects.JOBS_RUNNERS, MODELS) is None


@pytest.mark.parametrize("data", [
    b"", b"not json", b"\xff\xfe\x00", b"null", b"[]", b"42", b'"x"', b"[" * 100_000,
    advisory(type="io.nats.jetstream.advisory.v1.terminated"),
    advisory(stream=subjects.JOBS_STREAM, consumer=subjects.JOBS_RUNNERS),   # jobs keep their own way
    advisory(consumer=subjects.consumer_name("not-served-here")),
    advisory(consumer=7),
    advisory(stream_seq=...), advisory(deliveries=...), advisory(consumer=...), advisory(type=...),
    advisory(stream_seq="42"), advisory(stream_seq=0), advisory(stream_seq=-1), advisory(stream_seq=42.0),
    advisory(stream_seq=True), advisory(deliveries=None), advisory(deliveries=0),
])
def test_anything_else_is_ignored(data):
    assert gave_up_on(data, MODELS) is None


@given(st.binary())
def test_arbitrary_bytes_never_raise(data):
    assert gave_up_on(data, MODELS) is None


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                     lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner), max_leaves=10)


@given(stream_seq=_json | st.integers(), deliveries=_json | st.integers(), consumer=_json | st.sampled_from(MODELS).map(subjects.consumer_name))
def test_any_field_values_give_a_valid_result_or_none(stream_seq, deliveries, consumer):
    got = gave_up_on(advisory(stream_seq=stream_seq, deliveries=deliveries, consumer=consumer), MODELS)
    if got is not None:
        assert got.model in MODELS and got.stream_seq > 0 and got.deliveries > 0
        assert type(got.stream_seq) is int and type(got.deliveries) is int


class FakeJetStream:
    def __init__(self, stored: dict[int, bytes]):
        self.stored = stored
        self.deleted: list[int] = []

    async def get_msg(self, stream, seq):
        assert stream == subjects.STREAM
        if seq not in self.stored:
            raise nats.js.errors.NotFoundError()
        return types.SimpleNamespace(data=self.stored[seq])

    async def delete_msg(self, stream, seq):
        self.deleted.append(seq)
        return True


def router(stored: dict[int, bytes]) -> tuple[Router, FakeJetStream]:
    spec = catalogue.ModelSpec(name="Qwen/Qwen2.5-0.5B", path="/x", max_model_len=256)
    r = Router(RouterConfig(catalogue=catalogue.Catalogue(models=(spec,))))
    r._js = FakeJetStream(stored)
    return r, r._js


def msg(data: bytes):
    return types.SimpleNamespace(data=data, subject=subjects.max_deliveries_subject(consumer="c"))


async def test_the_router_fails_its_own_flight_and_removes_the_dead_message():
    r, js = router({})
    f = r.tracker.open("r", "Qwen/Qwen2.5-0.5B")
    f.seq = 42
    await r._on_max_deliveries(msg(advisory()))
    assert f.done and f.events.get_nowait().error.code == "INTERNAL"
    assert js.deleted == [42]


async def test_the_router_finds_a_hand_back_copy_by_reading_it_back():
    mine = queue_pb2.QueuedRequest(request_id="r", model="Qwen/Qwen2.5-0.5B")
    r, js = router({})
    mine.reply_to = r.delivery_address
    theirs = queue_pb2.QueuedRequest(request_id="r", model="Qwen/Qwen2.5-0.5B", reply_to="10.0.0.9:7000")
    js.stored = {57: mine.SerializeToString(), 58: theirs.SerializeToString(), 59: b"\xff not a request"}
    f = r.tracker.open("r", "Qwen/Qwen2.5-0.5B")
    f.seq = 42  # the original, handed back by a worker as message 57
    for seq in (58, 59, 60):  # another router's copy, garbage, and a message gone already
        await r._on_max_deliveries(msg(advisory(stream_seq=seq)))
    assert not f.done and js.deleted == []
    await r._on_max_deliveries(msg(advisory(stream_seq=57)))
    assert f.done and js.deleted == [57]


async def test_a_malformed_advisory_is_logged_and_ignored():
    r, js = router({})
    f = r.tracker.open("r", "Qwen/Qwen2.5-0.5B")
    f.seq = 42
    await r._on_max_deliveries(msg(b"{"))
    assert not f.done and js.deleted == []
