"""OpenAI JSON ↔ GenerateRequest / events: accepted fields, refusals naming the field, shapes."""
import pytest

from protos.v1 import common_pb2, router_pb2
from roundhouse.errors import InvalidRequest, PermissionDenied, QueueFull, Unauthenticated, Unavailable
from router_svc import openai_api

pytestmark = pytest.mark.unit


def test_chat_body_with_text_parts_and_vllm_extensions():
    body = {
        "model": "auto", "stream": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "system", "content": "be brief"},
                     {"role": "user", "content": [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]}],
        "max_completion_tokens": 7, "temperature": 0, "top_p": 0.5, "top_k": 3, "seed": 9, "stop": "\n",
        "ignore_eos": True, "metadata": {"quality": "high"}, "user": "ignored", "n": 1, "logprobs": False,
        "stream_interval": 4,
    }
    req, opts = openai_api.parse(body, "chat", "rid-1")
    assert req.model == "auto" and req.request_id == "rid-1"
    assert [(m.role, m.content) for m in req.chat.messages] == [("system", "be brief"), ("user", "hello")]
    s = req.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed, list(s.stop), s.ignore_eos) == (7, 0.0, 0.5, 3, 9, ["\n"], True)
    assert s.stream_interval == 4
    assert dict(req.metadata) == {"quality": "high"}
    assert opts == openai_api.Options("chat", stream=True, include_usage=True)


def test_completions_prompt_string_or_list_of_one():
    req, opts = openai_api.parse({"model": "m", "prompt": ["abc"], "max_tokens": 3}, "completions")
    assert req.prompt == "abc" and req.sampling.max_tokens == 3 and not opts.stream
    assert not req.sampling.HasField("temperature"), "unset stays unset: the model's default applies"


@pytest.mark.parametrize("body, field", [
    ({"model": "m", "messages": []}, "messages"),
    ({"model": "m", "messages": [{"content": "x"}]}, "messages[0]"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{}]}, "tools"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "presence_penalty": 0.5}, "presence_penalty"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": "10"}, "max_tokens"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": [1]}, "stop"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "metadata": ["a"]}, "metadata"),
    ({"model": 3, "messages": [{"role": "user", "content": "x"}]}, "model"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream_interval": 2.5}, "stream_interval"),
    # Past the request's int32 / int64 fields: a 400 naming the field, not protobuf's ValueError.
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2**40}, "max_tokens"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream_interval": 2**31}, "stream_interval"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "seed": 2**63}, "seed"),
])
def test_chat_refusals_name_the_field(body, field):
    with pytest.raises(InvalidRequest) as e:
        openai_api.parse(body, "chat")
    assert e.value.field == field


@pytest.mark.parametrize("prompt", [[1, 2, 3], ["a", "b"], None, 5])
def test_completions_refuses_token_ids_batches_and_non_strings(prompt):
    with pytest.raises(InvalidRequest, match="prompt"):
        openai_api.parse({"model": "m", "prompt": prompt}, "completions")


def test_whole_response_and_chunks_have_openai_shapes():
    chat = openai_api.Options("chat")
    fin = router_pb2.Finished(finish_reason=common_pb2.FINISH_REASON_LENGTH, usage=common_pb2.Usage(prompt_tokens=3, completion_tokens=4))
    whole = openai_api.complete(chat, "chatcmpl-x", 1, "chat", "hi", fin)
    assert whole["object"] == "chat.completion" and whole["choices"][0]["message"] == {"role": "assistant", "content": "hi"}
    assert whole["choices"][0]["finish_reason"] == "length"
    assert whole["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    first = openai_api.chunk(chat, "id", 1, "chat", text="Hel", first=True)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "Hel"}, "the role rides on the first token"
    assert openai_api.chunk(chat, "id", 1, "chat", text="lo")["choices"][0]["delta"] == {"content": "lo"}
    last = openai_api.chunk(chat, "id", 1, "chat", finish=common_pb2.FINISH_REASON_STOP)
    assert last["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    text = openai_api.chunk(openai_api.Options("completions"), "id", 1, "m", text="ab")
    assert text["object"] == "text_completion" and text["choices"][0]["text"] == "ab"
    assert openai_api.usage_chunk(chat, "id", 1, "chat", fin.usage)["choices"] == []


@pytest.mark.parametrize("error, status", [
    (InvalidRequest("max_tokens", "too big"), 400),
    (QueueFull("full", retry_after_s=7.4), 429),
    (Unauthenticated("no key"), 401),
    (PermissionDenied("not yours"), 403),
    (Unavailable("down"), 503),
])
def test_errors_map_to_http_status_and_openai_error_json(error, status):
    got, body, headers = openai_api.error_from(error)
    assert got == status
    assert body["error"]["message"].startswith("roundhouse: ") and body["error"]["type"]
    if status == 429:
        assert headers == {"Retry-After": "8"}  # rounded up: at 7 s it would still be refused
    if status == 400:
        assert body["error"]["param"] == "max_tokens"
    assert openai_api.error("NOT_FOUND", "x")[0] == 404 and openai_api.error("DEADLINE_EXCEEDED", "x")[0] == 504


def test_waiting_is_reported_as_sse_comments_not_data():
    queued = router_pb2.GenerateEvent(queued=router_pb2.Queued(request_id="r", model="code"))
    loading = router_pb2.GenerateEvent(loading=router_pb2.Loading(model="code", estimate_s=19.6))
    assert openai_api.progress_comment(queued) == b": queued\n\n"
    assert openai_api.progress_comment(loading) == b": loading code, about 20 s\n\n"
    assert openai_api.progress_comment(router_pb2.GenerateEvent(started=router_pb2.Started())) == b""


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
@pytest.mark.parametrize("text", ["lo", "", 'quote " back\\slash', "ünï 🚂\n\t\x00", "\x00roundhouse-text\x00"])
def test_the_per_token_framer_writes_exactly_the_chunk(endpoint, text):
    import json

    opts = openai_api.Options(endpoint)
    frame = openai_api.text_framer(opts, "id-1", 7, "m/odel")
    raw = frame(text)
    assert raw.startswith(b"data: ") and raw.endswith(b"\n\n")
    assert json.loads(raw[6:]) == openai_api.chunk(opts, "id-1", 7, "m/odel", text=text)


def test_unknown_fields_are_refused_and_harmless_ones_accepted():
    with pytest.raises(InvalidRequest) as e:
        openai_api.parse({"model": "m", "prompt": "x", "prompt_embeds": "AAAA"}, "completions")
    assert e.value.field == "prompt_embeds" and "unknown field" in e.value.message
    req, _ = openai_api.parse({"model": "m", "messages": [{"role": "user", "content": "hi"}], "user": "u-1",
                               "store": False}, "chat")
    assert req.chat.messages[0].content == "hi"
    req, _ = openai_api.parse({"model": "m", "prompt": "x", "job_id": "j"}, "completions", also=frozenset({"job_id"}))
    assert req.prompt == "x"


def test_service_tier_flex_is_the_low_priority_class():
    base = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    assert openai_api.parse({**base, "service_tier": "flex"}, "chat")[0].priority == "low"
    for tier in ("auto", "default", "priority"):
        assert openai_api.parse({**base, "service_tier": tier}, "chat")[0].priority == "", "the tenant's own class"
    with pytest.raises(InvalidRequest, match="service_tier"):
        openai_api.parse({**base, "service_tier": "platinum"}, "chat")
    for bad in ([], {"tier": "flex"}, 1):  # not a string: the same clear error, not an unhashable-type crash
        with pytest.raises(InvalidRequest, match="service_tier"):
            openai_api.parse({**base, "service_tier": bad}, "chat")
