import pathlib

import pytest

from protos.v1 import common_pb2, router_pb2
from roundhouse import catalogue
from roundhouse.errors import DeadlineExpired, InvalidRequest, ModelNotFound
from router_svc.validate import admit

pytestmark = pytest.mark.unit

CAT = catalogue.from_mapping(
    {"models": [{"name": "m", "aliases": ["chat"], "path": "p", "max_model_len": 100, "max_tokens_limit": 80, "default_max_tokens": 30}]},
    pathlib.Path("/"),
)


def words(spec, req):  # a stand-in tokenizer: one token per word (its length as the id)
    if req.WhichOneof("input") == "chat":
        return [len(w) for m in req.chat.messages for w in ["<r>", *m.content.split(), "</r>"]]
    return [len(w) for w in req.prompt.split()]


def run(req, now=1_000, deadline=61_000, counter=words):
    return admit(req, CAT, counter, now_ms=now, deadline_ms=deadline, reply_to="r:1")


def req(**sampling):
    return router_pb2.GenerateRequest(model="chat", prompt="one two three", sampling=common_pb2.SamplingParams(**sampling))


def test_resolves_alias_applies_defaults_and_seeds_sampled_requests():
    a = run(req())
    q = a.queued
    assert q.model == "m" and q.reply_to == "r:1" and q.deadline_unix_ms == 61_000 and q.request_id
    assert q.sampling.max_tokens == 30 and q.sampling.temperature == 1.0 and q.sampling.HasField("seed")
    assert a.prompt_tokens == 3
    assert list(q.prompt_token_ids) == [3, 3, 5], "the ids counted are the ids queued for the engine"
    greedy = run(req(temperature=0.0)).queued.sampling
    assert not greedy.HasField("seed")


def test_default_max_tokens_is_clamped_to_the_room_left_in_the_context():
    r = router_pb2.GenerateRequest(model="m", prompt=" ".join(["w"] * 90))
    assert run(r).queued.sampling.max_tokens == 10


@pytest.mark.parametrize(
    "request_, error, field",
    [
        (router_pb2.GenerateRequest(model="", prompt="x"), InvalidRequest, "model"),
        (router_pb2.GenerateRequest(model="x", prompt="x"), ModelNotFound, "'x' not found"),
        (router_pb2.GenerateRequest(model="m"), InvalidRequest, "prompt"),
        (router_pb2.GenerateRequest(model="m", prompt="   "), InvalidRequest, "prompt"),
        (router_pb2.GenerateRequest(model="m", chat=router_pb2.ChatMessages()), InvalidRequest, "messages"),
        (router_pb2.GenerateRequest(model="m", chat=router_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role="robot", content="x")])), InvalidRequest, "messages[0].role"),
        (router_pb2.GenerateRequest(model="m", prompt="x", request_id="bad id!"), InvalidRequest, "request_id"),
        (req(max_tokens=0), InvalidRequest, "max_tokens"),
        (req(max_tokens=81), InvalidRequest, "max_tokens"),
        (req(temperature=-0.01), InvalidRequest, "temperature"),
        (req(temperature=float("nan")), InvalidRequest, "temperature"),
        (req(temperature=2.01), InvalidRequest, "temperature"),   # vLLM refuses above 2: refused here, not retried there
        (req(temperature=6.27e16), InvalidRequest, "temperature"),
        (req(top_p=0.0), InvalidRequest, "top_p"),
        (req(top_p=1.01), InvalidRequest, "top_p"),
        (req(top_k=-2), InvalidRequest, "top_k"),
        (req(stream_interval=0), InvalidRequest, "stream_interval"),
        (router_pb2.GenerateRequest(model="m", prompt=" ".join(["w"] * 100)), InvalidRequest, "prompt"),
        (router_pb2.GenerateRequest(model="m", prompt=" ".join(["w"] * 50), sampling=common_pb2.SamplingParams(max_tokens=60)), InvalidRequest, "max_tokens"),
        (router_pb2.GenerateRequest(model="m" * 257, prompt="x"), InvalidRequest, "257 characters; a model name has at most 256"),
        (router_pb2.GenerateRequest(model="m", prompt="x", metadata={f"k{i}": "v" for i in range(17)}), InvalidRequest, "metadata: 17 pairs"),
        (router_pb2.GenerateRequest(model="m", prompt="x", metadata={"k" * 65: "v"}), InvalidRequest, "metadata: a key of 65"),
        (router_pb2.GenerateRequest(model="m", prompt="x", metadata={"team": "v" * 513}), InvalidRequest, "metadata.team: 513"),
    ],
)
def test_bad_requests_name_the_field(request_, error, field):
    with pytest.raises(error) as info:
        run(request_)
    assert field in str(info.value) and str(info.value).startswith("roundhouse: ")


def test_fields_at_their_bounds_are_accepted():
    r = router_pb2.GenerateRequest(model="m", prompt="x", metadata={f"{i:064d}": "v" * 512 for i in range(16)})
    assert run(r).queued.model == "m"
    with pytest.raises(ModelNotFound):   # 256 characters is a name, looked up (and not found)
        run(router_pb2.GenerateRequest(model="m" * 256, prompt="x"))


def test_expired_deadline_is_refused_first():
    with pytest.raises(DeadlineExpired):
        run(router_pb2.GenerateRequest(model="x"), now=5_000, deadline=5_000)


def test_model_without_a_tokenizer_skips_the_length_check():
    a = run(router_pb2.GenerateRequest(model="m", prompt=" ".join(["w"] * 500)), counter=lambda s, r: None)
    assert a.prompt_tokens == 0 and a.queued.sampling.max_tokens == 30
    assert not a.queued.prompt_token_ids and a.queued.prompt, "no tokenizer: the worker gets the text"


def test_a_request_may_lower_its_priority_class_never_raise_it():
    from roundhouse.errors import PermissionDenied
    from router_svc.auth import ANYONE, Tenant

    def asking(priority, tenant=ANYONE):
        r = req()
        r.priority = priority
        return admit(r, CAT, words, now_ms=0, deadline_ms=60_000, reply_to="r", tenant=tenant).priority

    high = Tenant("vip", None, priority="high")
    assert asking("") == "normal" and asking("", high) == "high", "by default its tenant's class"
    assert asking("low") == "low" and asking("normal", high) == "normal", "lower is always allowed"
    with pytest.raises(PermissionDenied, match="priority 'high' is above what a caller without a tenant may use"):
        asking("high")
    with pytest.raises(InvalidRequest, match="priority"):
        asking("urgent")
