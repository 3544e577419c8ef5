"""A gRPC caller's request through router → JetStream → vLLM worker → gRPC, on real parts."""
from __future__ import annotations

import asyncio
import json
import sys
import time

import grpc
import pytest

from protos.v1 import common_pb2, router_pb2
from roundhouse import subjects
from tests import slow_steps
from tests.conftest import SLOW_MAX_TOKENS, SLOW_MODEL, TEST_CONTEXT, TEST_MAX_TOKENS, abort_observed, assert_quiescent, collect, eventually, kinds_of, tokens_of

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

PROMPTS = ["Hello world", "The quick brown fox", "def fibonacci(n):", "A roundhouse is"]


def greedy(max_tokens: int, ignore_eos: bool = True) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos)


async def test_tokens_equal_the_same_engine_called_directly(router, router_stub, chat_worker, models, js):
    spec = models.get("tiny-0")
    # 1. Through the whole system: completion prompts and one chat request.
    requests = [router_pb2.GenerateRequest(model="chat", prompt=p, sampling=greedy(24)) for p in PROMPTS]
    chat = router_pb2.GenerateRequest(model="tiny-0", sampling=greedy(24))
    chat.chat.messages.add(role="user", content="Hello, how are you today?")
    requests.append(chat)
    routed = [await collect(router_stub.Generate(r, timeout=120)) for r in requests]
    # 2. The same engine, called directly (in a process of its own) with the same greedy parameters.
    lines = "".join(json.dumps({"prompt": r.prompt, "messages": [{"role": m.role, "content": m.content} for m in r.chat.messages],
                                "sampling": {"max_tokens": 24, "temperature": 0.0, "ignore_eos": True}}) + "\n"
                    for r in requests)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.direct_engine", spec.path, str(spec.max_model_len), str(spec.kv_cache_bytes),
        "1" if spec.enforce_eager else "0",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    out, _ = await asyncio.wait_for(proc.communicate(lines.encode()), 240)
    assert proc.returncode == 0, "the direct engine ran"
    direct = [json.loads(line[4:]) for line in out.decode().splitlines() if line.startswith("IDS ")]
    assert len(direct) == len(requests)
    for events, expected in zip(routed, direct):
        assert kinds_of(events)[0] == "queued"
        assert kinds_of(events)[-1] == "finished"
        # One tokenization: the count the router admitted by is the count the engine saw.
        assert events[0].queued.prompt_tokens == events[-1].finished.usage.prompt_tokens > 0
        assert tokens_of(events) == expected
        assert len(expected) == 24
    assert len({tuple(d) for d in direct}) == len(direct), "different prompts should give different tokens"
    await assert_quiescent(router, js, [chat_worker])


async def test_32_concurrent_streams_each_get_exactly_max_tokens(router, router_stub, chat_worker, js):
    wanted = [8 + i for i in range(32)]
    calls = [
        collect(router_stub.Generate(router_pb2.GenerateRequest(model="chat", prompt=f"stream {i}", sampling=greedy(n)), timeout=180))
        for i, n in enumerate(wanted)
    ]
    results = await asyncio.gather(*calls)
    for n, events in zip(wanted, results):
        kinds = kinds_of(events)
        assert kinds[0] == "queued" and kinds.count("finished") == 1 and kinds[-1] == "finished"
        assert "error" not in kinds
        fin = events[-1].finished
        assert len(tokens_of(events)) == n
        assert fin.usage.completion_tokens == n
        assert fin.finish_reason == common_pb2.FINISH_REASON_LENGTH
        text = "".join(ev.delta.text for ev in events if ev.WhichOneof("event") == "delta")
        assert text, "detokenized text streams along with the ids"
    await assert_quiescent(router, js, [chat_worker])


async def test_stream_interval_sends_the_first_token_alone_then_chunks_of_that_many(router, router_stub, slow_worker, js):
    """vLLM's per-request `stream_interval`: the first token at once (time to first token is
    unchanged), then one chunk per 4 tokens, the last chunk when it finishes; the same tokens as
    the request without it. On the slow model (a step of 20 ms or more) chunks are 80 ms apart.
    The router merges chunks its caller has not taken yet (this process's loop, which runs the
    router, can stall for longer under a full suite), never splits one: every chunk must end at
    token 1, 5, 9 or 10, and a run with all ten in one chunk says nothing, so it runs again."""
    plain = await collect(router_stub.Generate(
        router_pb2.GenerateRequest(model=SLOW_MODEL, prompt="chunks of four", sampling=greedy(10)), timeout=120))
    sampling = greedy(10)
    sampling.stream_interval = 4
    for attempt in range(3):
        chunked = await collect(router_stub.Generate(
            router_pb2.GenerateRequest(model=SLOW_MODEL, prompt="chunks of four", sampling=sampling), timeout=120))
        assert kinds_of(chunked)[-1] == "finished" and tokens_of(chunked) == tokens_of(plain) and len(tokens_of(plain)) == 10
        ends, n = [], 0
        for ev in chunked:
            if ev.WhichOneof("event") == "delta":
                n += len(ev.delta.token_ids)
                ends.append(n)
        assert set(ends) <= {1, 5, 9, 10}, ends
        if len(ends) > 1:
            break
        print(f"attempt {attempt + 1}: the router merged every chunk (its loop stalled); again")
    else:
        pytest.fail("in 3 runs the router's loop merged every chunk into one")
    bad = router_pb2.GenerateRequest(model=SLOW_MODEL, prompt="x", sampling=common_pb2.SamplingParams(stream_interval=0))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await collect(router_stub.Generate(bad, timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "stream_interval" in e.value.details()
    await assert_quiescent(router, js, [slow_worker], models=(SLOW_MODEL,))


async def test_cancelled_stream_leaves_nothing_in_the_engine_within_a_second(router, router_stub, slow_worker, js):
    t = time.monotonic()
    paced = await collect(router_stub.Generate(router_pb2.GenerateRequest(model="slow", prompt="pace", sampling=greedy(25)), timeout=60))
    assert len(tokens_of(paced)) == 25 and time.monotonic() - t >= 25 * slow_steps.STEP_S, "the slow model is slow"

    async def attempt() -> float:
        call = router_stub.Generate(router_pb2.GenerateRequest(model="slow", prompt="cancel me", sampling=greedy(SLOW_MAX_TOKENS)), timeout=120)
        async for ev in call:
            if ev.WhichOneof("event") == "started":
                break  # the engine has just begun a generation of seconds
        call.cancel()
        return time.monotonic()

    ms = await abort_observed(slow_worker, attempt, within_s=1.0)
    print(f"engine empty {ms:.0f} ms after the cancel")
    await assert_quiescent(router, js, [slow_worker], models=(SLOW_MODEL,))


def _bad(**kw) -> router_pb2.GenerateRequest:
    kw.setdefault("model", "chat")
    sampling = kw.pop("sampling", None)
    req = router_pb2.GenerateRequest(**kw)
    if sampling is not None:
        req.sampling.CopyFrom(sampling)
    return req


def _no_messages() -> router_pb2.GenerateRequest:
    req = router_pb2.GenerateRequest(model="chat")
    req.chat.SetInParent()
    return req


LONG_PROMPT = " ".join(f"word{i}" for i in range(TEST_CONTEXT // 2))

BAD_INPUTS = [
    ("unknown model", _bad(model="no-such-model", prompt="hi"), grpc.StatusCode.NOT_FOUND, "no-such-model"),
    ("no model", _bad(model="", prompt="hi"), grpc.StatusCode.INVALID_ARGUMENT, "model"),
    ("empty prompt", _bad(prompt=""), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    ("no input", _bad(), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    ("no messages", _no_messages(), grpc.StatusCode.INVALID_ARGUMENT, "messages"),
    ("max_tokens 0", _bad(prompt="hi", sampling=common_pb2.SamplingParams(max_tokens=0)), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    ("max_tokens < 0", _bad(prompt="hi", sampling=common_pb2.SamplingParams(max_tokens=-5)), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    ("max_tokens above limit", _bad(prompt="hi", sampling=common_pb2.SamplingParams(max_tokens=TEST_MAX_TOKENS + 1)), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    ("temperature < 0", _bad(prompt="hi", sampling=common_pb2.SamplingParams(temperature=-0.5)), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    ("top_p 0", _bad(prompt="hi", sampling=common_pb2.SamplingParams(top_p=0.0)), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    ("top_p > 1", _bad(prompt="hi", sampling=common_pb2.SamplingParams(top_p=1.5)), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    ("prompt longer than context", _bad(prompt=LONG_PROMPT), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    ("prompt + max_tokens over context", _bad(prompt=" ".join(["hello"] * 300), sampling=common_pb2.SamplingParams(max_tokens=TEST_MAX_TOKENS)), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
]


async def test_bad_input_gets_its_status_and_touches_nothing(router, router_stub, chat_worker, js):
    # A healthy long stream runs the whole time: bad requests beside it must not touch it.
    engine_before = await chat_worker.status()
    good_call = router_stub.Generate(
        router_pb2.GenerateRequest(model="chat", prompt="a healthy neighbour", sampling=greedy(300)), timeout=180)
    first = await good_call.read()
    assert first.WhichOneof("event") == "queued"

    async def rest() -> list:
        out = []
        while (ev := await good_call.read()) is not grpc.aio.EOF:
            out.append(ev)
        return out

    good = asyncio.ensure_future(rest())
    seq_before = (await js.stream_info(subjects.STREAM)).state.last_seq
    for name, req, code, field in BAD_INPUTS:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await collect(router_stub.Generate(req, timeout=10))
        assert info.value.code() == code, name
        assert field in info.value.details(), f"{name}: {info.value.details()!r} should name {field!r}"
        assert info.value.details().startswith("roundhouse: "), name
    # An expired deadline: the router refuses it before anything is queued.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await collect(router_stub.Generate(_bad(prompt="late"), timeout=0.000001))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # Nothing was published (the good stream was, before seq_before), nothing reached the engine.
    assert (await js.stream_info(subjects.STREAM)).state.last_seq == seq_before
    events = [first, *await good]
    assert len(tokens_of(events)) == 300 and kinds_of(events)[-1] == "finished"
    after = await chat_worker.status()
    assert after.completed == engine_before.completed + 1 and after.aborted == engine_before.aborted
    # The router is still up and serving.
    events = await collect(router_stub.Generate(_bad(prompt="still here", sampling=greedy(4)), timeout=60))
    assert len(tokens_of(events)) == 4
    await assert_quiescent(router, js, [chat_worker])


async def test_list_models_names_aliases_and_limits(router_stub, models):
    resp = await router_stub.ListModels(router_pb2.ListModelsRequest(), timeout=10)
    by_name = {m.name: m for m in resp.models}
    assert set(by_name) == {"tiny-0", "tiny-1", "tiny-2"}
    assert list(by_name["tiny-0"].aliases) == ["chat"]
    assert by_name["tiny-0"].max_model_len == TEST_CONTEXT and by_name["tiny-0"].max_tokens_limit == TEST_MAX_TOKENS


async def test_health_and_reflection_are_served(router):
    """On the public port and on the internal delivery port; Delivery is only on the internal one,
    so a caller of the public API cannot write into another caller's stream."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    for address, service, absent in ((f"127.0.0.1:{router.port}", "roundhouse.v1.Router", "roundhouse.v1.Delivery"),
                                     (router.delivery_address, "roundhouse.v1.Delivery", "roundhouse.v1.Router")):
        async with grpc.aio.insecure_channel(address) as ch:
            resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
            names = [s.name async for r in responses for s in r.list_services_response.service]
            assert service in names and absent not in names, (address, names)
