import pytest

from protos import gen
from protos.v1 import queue_pb2

pytestmark = pytest.mark.unit


def test_committed_stubs_match_the_proto_files():
    assert gen.main(["--check"]) == 0, "run `python -m protos.gen` and commit the stubs"


def test_queued_request_round_trips():
    q = queue_pb2.QueuedRequest(request_id="r", model="a/b", prompt="hi", deadline_unix_ms=5, reply_to="h:1")
    q.sampling.max_tokens = 3
    assert queue_pb2.QueuedRequest.FromString(q.SerializeToString()) == q
