"""The splice guard: after a redelivery the caller's stream continues only if it repeats exactly."""
import pytest

from protos.v1 import common_pb2, worker_pb2
from router_svc.tracker import Action, Delta, Tracker, as_event

pytestmark = pytest.mark.unit


def started(delivery):
    return worker_pb2.RequestChunk(request_id="r", delivery=delivery, started=True)


def delta(delivery, ids, text=None):
    text = "".join(f"<{i}>" for i in ids) if text is None else text
    return worker_pb2.RequestChunk(request_id="r", delivery=delivery, delta=worker_pb2.RequestDelta(token_ids=ids, text=text))


def finished(delivery, n):
    return worker_pb2.RequestChunk(
        request_id="r", delivery=delivery,
        finished=worker_pb2.RequestFinished(finish_reason=common_pb2.FINISH_REASON_LENGTH, usage=common_pb2.Usage(completion_tokens=n)),
    )


def drain(flight):
    out = []
    while not flight.events.empty():
        out.append(as_event(flight.events.get_nowait()))  # a Delta as the gRPC front door sends it
    return out


def streamed(events):
    return [t for e in events if e.WhichOneof("event") == "delta" for t in e.delta.token_ids]


def text(events):
    return "".join(e.delta.text for e in events if e.WhichOneof("event") == "delta")


def test_first_delivery_streams_through():
    t = Tracker()
    f = t.open("r", "m")
    for c in (started(1), delta(1, [1, 2]), delta(1, [3]), finished(1, 3)):
        assert t.on_chunk(c, "w1") is Action.OK
    ev = drain(f)
    assert [e.WhichOneof("event") for e in ev] == ["started", "delta", "delta", "finished"]
    assert streamed(ev) == [1, 2, 3]


def test_redelivery_that_repeats_the_prefix_continues_seamlessly():
    t = Tracker()
    f = t.open("r", "m")
    for c in (started(1), delta(1, [1, 2]), delta(1, [3])):
        t.on_chunk(c, "w1")
    # worker w1 dies; the request is generated again from the start on w2, in other step sizes
    for c in (started(2), delta(2, [1]), delta(2, [2, 3, 4]), delta(2, [5]), finished(2, 5)):
        assert t.on_chunk(c, "w2") is Action.OK
    ev = drain(f)
    assert streamed(ev) == [1, 2, 3, 4, 5]
    assert text(ev) == "<1><2><3><4><5>"
    assert [e.WhichOneof("event") for e in ev].count("started") == 1
    assert ev[-1].WhichOneof("event") == "finished"


def test_redelivery_that_differs_ends_with_a_retryable_error_and_no_splice():
    t = Tracker()
    f = t.open("r", "m")
    for c in (delta(1, [1, 2, 3]),):
        t.on_chunk(c, "w1")
    assert t.on_chunk(delta(2, [1, 9]), "w2") is Action.CANCEL
    ev = drain(f)
    assert streamed(ev) == [1, 2, 3]
    assert ev[-1].error.code == "UNAVAILABLE" and ev[-1].error.retryable
    assert t.on_chunk(delta(2, [3]), "w2") is Action.CANCEL  # nothing more reaches the caller
    assert streamed(drain(f)) == []


def test_redelivery_that_finishes_short_is_an_error():
    t = Tracker()
    f = t.open("r", "m")
    t.on_chunk(delta(1, [1, 2, 3]), "w1")
    t.on_chunk(delta(2, [1, 2]), "w2")
    assert t.on_chunk(finished(2, 2), "w2") is Action.CANCEL
    assert drain(f)[-1].WhichOneof("event") == "error"


def test_late_chunks_of_an_older_delivery_are_ignored():
    t = Tracker()
    f = t.open("r", "m")
    t.on_chunk(delta(2, [1]), "w2")
    assert t.on_chunk(delta(1, [7, 7]), "w1") is Action.OK
    assert streamed(drain(f)) == [1]


def test_chunks_for_unknown_or_closed_requests_ask_for_a_cancel():
    t = Tracker()
    assert t.on_chunk(started(1), "w") is Action.CANCEL
    f = t.open("r", "m")
    t.close(f)
    assert t.on_chunk(delta(1, [1]), "w") is Action.CANCEL
    assert len(t) == 0


def test_text_that_lags_its_tokens_is_not_duplicated():
    t = Tracker()
    f = t.open("r", "m")
    t.on_chunk(delta(1, [1, 2], "ab"), "w1")
    # the regeneration holds back text for an incomplete character, then catches up
    t.on_chunk(delta(2, [1, 2], "a"), "w2")
    t.on_chunk(delta(2, [3], "bc"), "w2")
    ev = drain(f)
    assert streamed(ev) == [1, 2, 3] and text(ev) == "abc"


def test_a_lost_link_requeues_what_sent_nothing_and_fails_what_streamed():
    from router_svc.tracker import MAX_REQUEUES, REQUEUE

    t = Tracker()
    quiet, talking, elsewhere = t.open("q", "m"), t.open("t", "m"), t.open("e", "m")
    t.on_chunk(worker_pb2.RequestChunk(request_id="q", delivery=1, started=True), "w1")
    t.on_chunk(worker_pb2.RequestChunk(request_id="t", delivery=1, delta=worker_pb2.RequestDelta(token_ids=[7], text="x")), "w1")
    t.on_chunk(worker_pb2.RequestChunk(request_id="e", delivery=1, started=True), "w2")
    drain(quiet), drain(talking), drain(elsewhere)

    requeued, failed = t.lost_link("w1")
    assert requeued == [quiet] and failed == [talking]
    assert drain(quiet) == [REQUEUE] and not quiet.done and quiet.link is None
    [err] = drain(talking)
    assert err.error.code == "UNAVAILABLE" and err.error.retryable and "after 1 tokens" in err.error.message
    assert talking.done and talking.link is None, "no link: the gateway deletes its message from the stream"
    assert drain(elsewhere) == [] and elsewhere.link == "w2", "another worker's flights are untouched"

    # The republished message counts deliveries from 1 again; a second `started` is not repeated.
    t.requeued(quiet)
    assert t.on_chunk(worker_pb2.RequestChunk(request_id="q", delivery=1, started=True), "w3") is Action.OK
    assert t.on_chunk(worker_pb2.RequestChunk(request_id="q", delivery=1, delta=worker_pb2.RequestDelta(token_ids=[5], text="y")),
                      "w3") is Action.OK
    assert quiet.delivery == 1 and quiet.link == "w3"
    assert [e.WhichOneof("event") for e in drain(quiet)] == ["delta"], "no second `started`; the new generation streams"

    # Lost again and again: after MAX_REQUEUES it fails instead of looping.
    q2 = t.open("q2", "m")
    for i in range(MAX_REQUEUES):
        link = object()
        t.on_chunk(worker_pb2.RequestChunk(request_id="q2", delivery=1, started=True), link)
        assert t.lost_link(link) == ([q2], [])
        t.requeued(q2)
    last = object()
    t.on_chunk(worker_pb2.RequestChunk(request_id="q2", delivery=1, started=True), last)
    assert t.lost_link(last) == ([], [q2])
    events = drain(q2)
    assert events[-1].error.code == "UNAVAILABLE" and f"{MAX_REQUEUES + 1} times" in events[-1].error.message


def test_a_message_jetstream_gave_up_on_fails_its_flight_at_once():
    t = Tracker()
    f = t.open("r", "m")
    f.seq = 42
    for c in (started(3), delta(3, [1, 2])):
        t.on_chunk(c, "w1")
    drain(f)

    assert t.gave_up("m", 42, 10) is f
    [err] = drain(f)
    assert err.error.code == "INTERNAL" and not err.error.retryable
    assert err.error.message.startswith("roundhouse: ")
    assert "delivered 10 times without finishing" in err.error.message and "not tried again" in err.error.message
    assert f.done
    assert t.on_chunk(delta(3, [3]), "w1") is Action.CANCEL, "a stalled worker that wakes up is told to stop"
    assert t.gave_up("m", 42, 10) is None and drain(f) == [], "a second advisory changes nothing"


def test_messages_of_other_routers_or_models_or_ended_flights_are_left_alone():
    t = Tracker()
    f = t.open("r", "m")
    f.seq = 42
    ended = t.open("e", "m")
    ended.seq = 43
    ended.done = True
    assert t.gave_up("other", 42, 10) is None, "another model's consumer"
    assert t.gave_up("m", 41, 10) is None, "another router's message"
    assert t.gave_up("m", 43, 10) is None, "over already"
    assert drain(f) == [] and drain(ended) == [] and not f.done


def test_a_hand_back_copy_is_matched_by_the_request_id_it_carries():
    t = Tracker()
    f = t.open("r", "m")
    f.seq = 42  # the original: a worker handed it back as message 57, which the flight never learns
    assert t.gave_up("m", 57, 10) is None
    assert t.gave_up("other", 57, 10, request_id="r") is None and t.gave_up("m", 57, 10, request_id="x") is None
    assert t.gave_up("m", 57, 10, request_id="r") is f
    [err] = drain(f)
    assert err.error.code == "INTERNAL" and "delivered 10 times" in err.error.message and f.done


def test_deltas_travel_as_plain_objects_and_merge_in_order():
    t = Tracker()
    f = t.open("r", "m")
    for c in (started(1), delta(1, [1, 2]), delta(1, [3])):
        t.on_chunk(c, "w1")
    raw = [f.events.get_nowait() for _ in range(3)]
    assert [type(e) is Delta for e in raw] == [False, True, True], "no protobuf message per token on the loop"
    merged = Delta.merged(raw[1:])
    assert merged.token_ids == [1, 2, 3] and merged.text == "".join(e.text for e in raw[1:])
    assert list(as_event(merged).delta.token_ids) == [1, 2, 3]


def test_a_sink_takes_deltas_it_accepts_and_the_events_get_the_rest_in_order():
    t = Tracker()
    f = t.open("r", "m")
    taken: list[tuple[list[int], str]] = []
    accept = True

    def sink(ids, text):
        if accept:
            taken.append((ids, text))
        return accept

    t.on_chunk(started(1), "w1")
    f.sink = sink
    t.on_chunk(delta(1, [1, 2]), "w1")
    t.on_chunk(delta(1, [3]), "w1")
    accept = False  # e.g. its caller reads slower than tokens come
    t.on_chunk(delta(1, [4]), "w1")
    t.on_chunk(finished(1, 4), "w1")
    assert taken == [([1, 2], "<1><2>"), ([3], "<3>")]
    ev = drain(f)
    assert [e.WhichOneof("event") for e in ev] == ["started", "delta", "finished"]
    assert streamed(ev) == [4]
    assert f.out_tokens == [1, 2, 3, 4]  # what the caller has, sink or not: the replay guard's reference
