"""Malformed input at every front door (Hypothesis): HTTP bodies, gRPC messages and bytes, NATS job
submissions. Every reply is a proper error (or a proper answer), nothing dies, and a normal request
served alongside is untouched.

The router runs on this process's event loop, so the generated calls are made from a thread with
blocking clients (Hypothesis drives a plain function there)."""
from __future__ import annotations

import asyncio
import json

import grpc
import httpx
import nats
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from protos.v1 import common_pb2, router_pb2, router_pb2_grpc
from roundhouse import subjects
from tests.conftest import assert_quiescent

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

# No shrinking: an example can take a request's whole timeout, and minutes of shrinking would
# outlast the test's own time limit; a failure is reported as generated.
FUZZ = settings(max_examples=120, deadline=None, database=None, suppress_health_check=list(HealthCheck),
                phases=(Phase.explicit, Phase.generate))

ERROR_STATUSES = {400, 401, 403, 404, 409, 413, 429, 503, 504}
GRPC_REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED,
                 grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.UNAVAILABLE}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "robot", 3]),
                                           "content": json_values | st.text(max_size=30)}), max_size=3) | json_values
bodies = st.one_of(
    st.fixed_dictionaries(
        {"model": st.sampled_from(["chat", "auto", "tiny-0", "nope", "", 7, None])},
        optional={"messages": messages, "prompt": st.text(max_size=30) | json_values,
                  "max_tokens": st.integers(-3, 12) | json_values, "stream": st.booleans() | json_values,
                  "temperature": st.floats(allow_nan=False) | json_values, "top_p": st.floats(-1, 2),
                  "stop": st.lists(st.text(max_size=4), max_size=20) | json_values, "metadata": json_values,
                  "n": st.integers(0, 3), "seed": json_values, "stream_options": json_values,
                  "prompt_embeds": json_values, "logprobs": json_values}),
    json_values,
)


def _check_http(r: httpx.Response) -> None:
    assert r.status_code == 200 or r.status_code in ERROR_STATUSES, (r.status_code, r.text[:300])
    if r.status_code != 200:
        err = r.json()["error"]
        assert err["message"].startswith("roundhouse: ") and err["type"], err
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.rstrip().endswith("data: [DONE]"), r.text[-300:]
    else:
        assert r.json()["choices"], r.text[:300]


def _fuzz_http(base: str) -> None:
    with httpx.Client(base_url=base, timeout=60, headers={"x-request-timeout": "20"}) as client:
        @FUZZ
        @given(body=bodies, endpoint=st.sampled_from(["chat/completions", "completions"]))
        def bodies_get_answers(body, endpoint):
            body = {**body, "max_tokens": 4} if isinstance(body, dict) and body.get("max_tokens") is None else body
            _check_http(client.post(f"/v1/{endpoint}", content=json.dumps(body)))

        @FUZZ
        @given(raw=st.binary(max_size=300))
        def bytes_get_answers(raw):
            _check_http(client.post("/v1/chat/completions", content=raw))

        bodies_get_answers()
        bytes_get_answers()
        for raw in (b"[" * 100_000, b'{"a":' * 50_000, b'{"model": "chat", "prompt": "' + b"\xff" * 100 + b'"}'):
            r = client.post("/v1/completions", content=raw)
            assert r.status_code == 400 and r.json()["error"]["param"] == "body", r.text[:300]
        r = client.post("/v1/completions", content=b" " * (16 * 2**20 + 1))
        assert r.status_code == 413 and r.json()["error"]["message"].startswith("roundhouse: ")
        r = client.post("/v1/completions", json={"model": "chat", "prompt": "x"}, headers={"x-request-timeout": "soon"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "x-request-timeout"
        r = client.post("/v1/completions", json={"model": "chat", "prompt": "x"}, headers={"x-long": "a" * 20_000})
        assert r.status_code in (400, 431)


sampling = st.builds(common_pb2.SamplingParams, max_tokens=st.integers(-5, 12), temperature=st.floats(width=32),
                     top_p=st.floats(width=32), top_k=st.integers(-5, 5), seed=st.integers(-2**63, 2**63 - 1),
                     stop=st.lists(st.text(max_size=3), max_size=20))
requests = st.builds(router_pb2.GenerateRequest, model=st.sampled_from(["chat", "auto", "nope", ""]),
                     prompt=st.text(max_size=20), sampling=sampling, request_id=st.text(max_size=140),
                     metadata=st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3))


def _check_refusal(e: grpc.RpcError) -> None:
    assert e.code() in GRPC_REFUSALS, (e.code(), e.details())
    # A request for a model no worker serves ("auto" falls back to tiny-1) waits until its 30 s
    # deadline: then the router's DEADLINE_EXCEEDED and the caller's own gRPC deadline race
    # (both at the same instant), and under load the caller's wins with gRPC's own wording.
    if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and e.details() in ("Deadline Exceeded", "Stream removed (Deadline Exceeded)"):
        return
    assert e.details().startswith("roundhouse: "), e.details()


def _fuzz_grpc(address: str) -> None:
    with grpc.insecure_channel(address) as ch:
        stub = router_pb2_grpc.RouterStub(ch)
        raw_generate = ch.unary_stream("/roundhouse.v1.Router/Generate")

        @FUZZ
        @given(req=requests)
        def messages_get_answers(req):
            try:
                events = list(stub.Generate(req, timeout=30))
                assert events[-1].WhichOneof("event") == "finished", events[-1]
            except grpc.RpcError as e:
                _check_refusal(e)

        @FUZZ
        @given(raw=st.binary(max_size=200))
        def bytes_get_answers(raw):
            try:
                list(raw_generate(raw, timeout=30))
            except grpc.RpcError as e:
                _check_refusal(e)

        messages_get_answers()
        bytes_get_answers()


def _fuzz_jobs(nats_url: str) -> None:
    loop = asyncio.new_event_loop()
    nc = loop.run_until_complete(nats.connect(nats_url))
    try:
        @FUZZ
        @given(payload=st.binary(max_size=200) | bodies.map(lambda b: json.dumps(b).encode()),
               proto=st.booleans())
        def submissions_get_answers(payload, proto):
            headers = {"Content-Type": "application/x-protobuf"} if proto else None
            reply = loop.run_until_complete(nc.request(subjects.JOBS_SUBMIT, payload, timeout=30, headers=headers))
            if proto:
                job = router_pb2.Job.FromString(reply.data)
                assert job.job_id or job.error.message.startswith("roundhouse: "), job
                if job.job_id:
                    loop.run_until_complete(nc.publish(subjects.JOBS_CANCEL, job.job_id.encode()))
            else:
                got = json.loads(reply.data)
                assert "job_id" in got or got["error"]["message"].startswith("roundhouse: "), got
                if "job_id" in got:
                    loop.run_until_complete(nc.publish(subjects.JOBS_CANCEL, got["job_id"].encode()))

        submissions_get_answers()
    finally:
        loop.run_until_complete(nc.close())
        loop.close()


async def _normal(base: str) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        r = await client.post("/v1/completions", json={"model": "chat", "prompt": "steady", "max_tokens": 8,
                                                      "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8


async def test_malformed_input_at_every_front_door_gets_a_proper_error(router, chat_worker, nats_server, js):
    base = f"http://127.0.0.1:{router.http_port}"
    baseline = asyncio.create_task(_normal(base))  # a normal request in flight while the fuzz starts
    await asyncio.to_thread(_fuzz_http, base)
    await baseline
    await asyncio.to_thread(_fuzz_grpc, f"127.0.0.1:{router.port}")
    await asyncio.to_thread(_fuzz_jobs, nats_server.url)
    await _normal(base)  # the router serves on
    assert chat_worker.process.poll() is None, "the worker survived"
