"""The OpenAI-compatible HTTP API, called with the official `openai` client, on the real stack."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import aiohttp
import nats
import openai
import pytest

from protos.v1 import common_pb2, manager_pb2, router_pb2, worker_pb2
from roundhouse import subjects
from router_svc.config import RouterConfig
from router_svc.server import Router
from tests.conftest import SLOW_MAX_TOKENS, SLOW_MODEL, abort_observed, assert_quiescent, collect, eventually, tokens_of

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def client(router):
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{router.http_port}/v1", api_key="unused", max_retries=0, timeout=120)


async def _grpc_text(router_stub, model: str, max_tokens: int, *, prompt=None, messages=None) -> str:
    req = router_pb2.GenerateRequest(model=model, sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    if prompt is not None:
        req.prompt = prompt
    else:
        for m in messages:
            req.chat.messages.add(**m)
    events = await collect(router_stub.Generate(req, timeout=120))
    return "".join(ev.delta.text for ev in events if ev.WhichOneof("event") == "delta")


async def test_chat_completion_whole_and_streamed_equal_the_grpc_stream(client, router, router_stub, chat_worker, js):
    messages = [{"role": "user", "content": "Tell me about the roundhouse"}]
    want = await _grpc_text(router_stub, "chat", 12, messages=messages)

    whole = await client.chat.completions.create(model="chat", messages=messages, max_tokens=12, **GREEDY)
    assert whole.choices[0].message.content == want and whole.choices[0].message.role == "assistant"
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 12 and whole.usage.prompt_tokens > 0
    assert whole.model == "tiny-0", "the resolved model name comes back"

    stream = await client.chat.completions.create(model="chat", messages=messages, max_tokens=12, stream=True,
                                                  stream_options={"include_usage": True}, **GREEDY)
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    await assert_quiescent(router, js, [chat_worker])


async def test_completions_whole_and_streamed(client, router, router_stub, chat_worker, js):
    want = await _grpc_text(router_stub, "chat", 10, prompt="The railway")
    whole = await client.completions.create(model="tiny-0", prompt="The railway", max_tokens=10, **GREEDY)
    assert whole.choices[0].text == want and whole.usage.completion_tokens == 10
    stream = await client.completions.create(model="tiny-0", prompt="The railway", max_tokens=10, stream=True, **GREEDY)
    assert "".join([c.choices[0].text async for c in stream if c.choices]) == want
    await assert_quiescent(router, js, [chat_worker])


async def test_model_auto_is_classified_and_says_why(client, chat_worker):
    raw = await client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "fix this\n```py\nprint(x)\n```"}], max_tokens=4, **GREEDY)
    assert raw.headers["x-roundhouse-model"] == "tiny-0"
    assert raw.headers["x-roundhouse-route-reason"] == "rule code-fence: content matches /```/"
    done = raw.parse()
    assert done.model == "tiny-0" and done.usage.completion_tokens == 4


async def test_grpc_started_event_names_the_classified_model(router_stub, chat_worker):
    req = router_pb2.GenerateRequest(model="auto", prompt="```sh\nls\n```", sampling=common_pb2.SamplingParams(max_tokens=3, temperature=0))
    events = await collect(router_stub.Generate(req, timeout=60))
    started = next(ev.started for ev in events if ev.WhichOneof("event") == "started")
    assert started.model == "tiny-0" and started.route_reason.startswith("rule code-fence")
    assert events[0].queued.route_reason == started.route_reason


async def test_models_and_health(client, router):
    ids = {m.id for m in (await client.models.list()).data}
    assert {"tiny-0", "chat", "tiny-1", "code", "auto"} <= ids
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{router.http_port}/health") as r:
            assert r.status == 200 and (await r.json())["status"] == "ok"


async def test_bad_requests_get_openai_errors_and_the_right_status(client, router, chat_worker):
    with pytest.raises(openai.NotFoundError) as nf:
        await client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert "no-such-model" in nf.value.message
    with pytest.raises(openai.BadRequestError) as br:
        await client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "x"}], max_tokens=10**6)
    assert br.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as nn:
        await client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "x"}], n=3)
    assert nn.value.body["param"] == "n"
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{router.http_port}/v1/chat/completions", data=b"{nope") as r:
            assert r.status == 400 and "JSON" in (await r.json())["error"]["message"]
    ok = await client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "still up?"}], max_tokens=2)
    assert ok.choices[0].finish_reason in ("length", "stop"), "the router keeps serving"


async def test_a_client_that_disconnects_aborts_its_generation(router, slow_worker, js):
    body = {"model": "slow", "prompt": "go on and on", "max_tokens": SLOW_MAX_TOKENS, "ignore_eos": True, "temperature": 0,
            "stream": True}

    async def attempt() -> float:
        async with aiohttp.ClientSession() as s:
            resp = await s.post(f"http://127.0.0.1:{router.http_port}/v1/completions", json=body)
            assert resp.status == 200
            async for line in resp.content:
                if line.startswith(b"data: ") and b'"text": ""' not in line:
                    break  # tokens are flowing
            resp.close()  # the client goes away mid-stream
        return time.monotonic()

    ms = await abort_observed(slow_worker, attempt, within_s=2.0)
    print(f"engine empty {ms:.0f} ms after the disconnect")
    await assert_quiescent(router, js, [slow_worker], models=(SLOW_MODEL,))


@pytest.fixture
async def ghost_router(nats_server, models):
    """A second router whose catalogue has a model `ghost` that no worker serves, admitting 1 waiter."""
    spec = dataclasses.replace(models.get("tiny-0"), name="ghost", aliases=(), max_queued=1)
    cat = dataclasses.replace(models, models=(spec,), routing=None)
    r = Router(RouterConfig(catalogue=cat, nats_url=nats_server.url, port=0, http_port=0))
    await r.start()
    yield r
    await r.stop(grace=1)


async def test_queue_full_is_429_and_a_model_that_cannot_load_is_503(ghost_router, nats_server):
    url = f"http://127.0.0.1:{ghost_router.http_port}/v1/chat/completions"
    body = {"model": "ghost", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    async with aiohttp.ClientSession() as s:
        waiting = asyncio.create_task(s.post(url, json=body))
        await eventually(lambda: ghost_router.tracker.waiting("ghost") == 1, 10, "the first request waits in the queue")
        async with s.post(url, json=body) as full:
            assert full.status == 429
            assert int(full.headers["Retry-After"]) >= 1
            assert (await full.json())["error"]["type"] == "rate_limit_error"
        # The manager says the model cannot load: the waiting request gets 503 with the reason.
        nc = await nats.connect(nats_server.url)
        event = manager_pb2.ModelEvent(model="ghost", state=worker_pb2.ENGINE_STATE_FAILED, error="needs 80 GiB, budget 8 GiB")
        await nc.publish(subjects.model_event_subject("ghost"), event.SerializeToString())
        await nc.close()
        async with await asyncio.wait_for(waiting, 10) as failed:
            assert failed.status == 503
            assert "needs 80 GiB" in (await failed.json())["error"]["message"]
        async with s.post(url, json=body, headers={"x-request-timeout": "0.5"}) as late:
            assert late.status == 504
    assert len(ghost_router.tracker) == 0


async def _sse_lines(resp) -> list[bytes]:
    """The raw SSE lines of a response (blank separators dropped), up to and including [DONE]."""
    lines = []
    async for raw in resp.content:
        line = raw.rstrip(b"\n")
        if line:
            lines.append(line)
        if line == b"data: [DONE]":
            break
    return lines


async def test_streams_send_no_data_chunk_before_the_first_generated_token(router, chat_worker, js):
    """TTFT as a client measures it is the real one: at most comments while waiting, then generated text."""
    cases = [
        ("chat/completions", {"messages": [{"role": "user", "content": "Hello there"}]}, lambda c: c["choices"][0]["delta"].get("content")),
        ("completions", {"prompt": "Hello there"}, lambda c: c["choices"][0]["text"]),
    ]
    async with aiohttp.ClientSession() as s:
        for path, body, text_of in cases:
            body = {**body, "model": "chat", "max_tokens": 6, "temperature": 0, "ignore_eos": True, "stream": True}
            async with s.post(f"http://127.0.0.1:{router.http_port}/v1/{path}", json=body) as resp:
                assert resp.status == 200
                lines = await _sse_lines(resp)
            first_data = next(i for i, line in enumerate(lines) if line.startswith(b"data: "))
            assert all(line.startswith(b":") for line in lines[:first_data]), f"only comments before: {lines[:first_data]}"
            first = json.loads(lines[first_data][6:])
            assert text_of(first), f"{path}: the first data chunk carries generated text: {first}"
            if path.startswith("chat"):
                assert first["choices"][0]["delta"]["role"] == "assistant"
            chunks = [json.loads(line[6:]) for line in lines[first_data:-1]]
            assert all(text_of(c) for c in chunks[:-1]), "no empty chunks before the last (finish) chunk"
            assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    await assert_quiescent(router, js, [chat_worker])


async def test_a_stream_waiting_for_its_model_gets_comments_then_the_outcome(ghost_router, nats_server):
    url = f"http://127.0.0.1:{ghost_router.http_port}/v1/completions"
    body = {"model": "ghost", "prompt": "hello", "max_tokens": 4, "stream": True}
    nc = await nats.connect(nats_server.url)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(url, json=body) as resp:
                assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
                # Said once the request has waited QUEUED_COMMENT_AFTER_S (no worker serves ghost).
                assert (await asyncio.wait_for(resp.content.readline(), 10)).rstrip() == b": queued"
                loading = manager_pb2.ModelEvent(model="ghost", state=worker_pb2.ENGINE_STATE_LOADING, estimate_s=19.6)
                await nc.publish(subjects.model_event_subject("ghost"), loading.SerializeToString())
                line = b""
                while not line.strip():
                    line = await asyncio.wait_for(resp.content.readline(), 10)
                assert line.rstrip() == b": loading ghost, about 20 s"
                failed = manager_pb2.ModelEvent(model="ghost", state=worker_pb2.ENGINE_STATE_FAILED, error="does not fit")
                await nc.publish(subjects.model_event_subject("ghost"), failed.SerializeToString())
                rest = await asyncio.wait_for(_sse_lines(resp), 10)
    finally:
        await nc.close()
    data = [json.loads(line[6:]) for line in rest if line.startswith(b"data: ") and line != b"data: [DONE]"]
    assert len(data) == 1 and "does not fit" in data[0]["error"]["message"], "the only data chunk is the error"
    assert rest[-1] == b"data: [DONE]"
