"""Metrics and traces of a real stack: `roundhouse up --config` with two tiny models and a budget
for one (so the second one's request swaps them) plus a model whose weights are corrupt (its load
fails). Real traffic goes through HTTP and gRPC; then each service's /metrics (router, manager,
both workers) is scraped and parsed with prometheus_client's own parser, and the counters and
histograms must have moved by exactly what was sent. A request sent with a W3C `traceparent`
keeps its trace id: in the response, in the router's and the worker's log lines, and in the spans
both export over OTLP to a collector this test serves (the real OTLP gRPC service)."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import pathlib
import re
import signal
import sys
import urllib.request

import grpc
import httpx
import psutil
import pytest
import pytest_asyncio
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from protos.v1 import common_pb2, router_pb2, router_pb2_grpc
from roundhouse import catalogue, natsd, stack
from tests.conftest import eventually, read_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

MiB = 2**20
GOOD, OTHER, BAD = "obs-0", "obs-1", "obs-bad"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
PARENT = f"00-{TRACE_ID}-{CALLER_SPAN}-01"


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OpenTelemetry collector's trace endpoint (OTLP over gRPC) that keeps what it gets."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, object]] = []   # (service.name, Span)

    async def Export(self, request, context):
        for rs in request.resource_spans:
            service = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "")
            self.spans.extend((service, span) for ss in rs.scope_spans for span in ss.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


def _corrupt(model_dir: pathlib.Path) -> None:
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # cut inside the header: it cannot load


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a /metrics page, parsed by prometheus_client: (name, labels) -> value."""
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain"), r.headers["Content-Type"]
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    """The sample `name` with exactly these labels among its labels summed (0 when absent)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


@dataclasses.dataclass
class Obs:
    proc: asyncio.subprocess.Process
    grpc: str
    http: str
    router_metrics: str
    manager_metrics: str
    worker_metrics: dict[str, str]
    run_dir: pathlib.Path
    seen: list[str]
    collector: Collector


@pytest_asyncio.fixture(scope="module")
async def obs(session_dir):
    root = session_dir / "obs"
    path = stack.write_tiny_catalogue(
        root, 3, prefix="obs",
        # footprint ≈ 1.7 MiB weights + 64 MiB KV + 32 MiB overhead: the budget holds one model
        gpus=(catalogue.GpuSpec(id="cpu", budget_bytes=130 * MiB, engine_overhead_bytes=32 * MiB),),
        manager=catalogue.ManagerSpec(report_interval_s=1, queue_poll_s=0.25, load_backoff_s=30, drain_timeout_s=30),
        kv_cache_bytes=64 * MiB, max_num_seqs=8, min_resident_s=0, default_max_tokens=16,
    )
    path.write_text(path.read_text().replace("obs-2", BAD))
    (root / "models" / "obs-2").rename(root / "models" / BAD)
    _corrupt(root / "models" / BAD)
    var = root / "var"
    collector, server = Collector(), grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    otlp_port = server.add_insecure_port(f"127.0.0.1:{natsd.free_port()}")
    await server.start()
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_port}", "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_BSP_SCHEDULE_DELAY": "200"}  # every service exports its spans, within 0.2 s
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "roundhouse.cli", "up", "--config", str(path), "--var", str(var),
        "--port", "0", "--http-port", "0", "--manager-port", "0", "--log-level", "info",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env={**os.environ, **otel})
    seen: list[str] = []
    try:
        workers = {}
        for _ in range(3):
            m = await read_until(proc.stdout, r"worker for (\S+) started .*metrics (http://\S+/metrics)", seen, 120)
            workers[m.group(1)] = m.group(2)
        ready = await read_until(proc.stdout, r"ready\. gRPC (\S+)\s+HTTP (http://\S+)/v1", seen, 60)
        urls = await read_until(proc.stdout, r"metrics: (http://\S+) \(router\), (http://\S+) \(manager\)", seen, 10)
        yield Obs(proc, ready.group(1), ready.group(2), urls.group(1), urls.group(2), workers, var / "run", seen,
                  collector)
    finally:
        await server.stop(0)
        if proc.returncode is None:
            family = psutil.Process(proc.pid).children(recursive=True)
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 90)
            except TimeoutError:
                for p in family:
                    p.kill()
                proc.kill()
                await proc.wait()


async def _complete(client: httpx.AsyncClient, model: str, max_tokens: int, **extra) -> httpx.Response:
    return await client.post("/v1/completions", json={"model": model, "prompt": "metrics please", "max_tokens": max_tokens,
                                                      "ignore_eos": True, "temperature": 0, **extra}, timeout=300)


async def test_metrics_move_by_what_was_sent_and_one_trace_crosses_the_services(obs):
    router_before = scrape(obs.router_metrics)
    assert ("roundhouse_requests_waiting", frozenset()) not in router_before  # only labelled series
    async with httpx.AsyncClient(base_url=obs.http) as client:
        # 1. obs-0 (its first load), three requests over HTTP: whole, streamed, and one with a traceparent.
        first = await _complete(client, GOOD, 5)
        assert first.status_code == 200, first.text
        streamed = await _complete(client, GOOD, 4, stream=True)
        assert streamed.status_code == 200 and "data: [DONE]" in streamed.text
        traced = await client.post("/v1/chat/completions", headers={"traceparent": PARENT}, timeout=300, json={
            "model": GOOD, "messages": [{"role": "user", "content": "trace me"}], "max_tokens": 3, "ignore_eos": True})
        assert traced.status_code == 200, traced.text
        assert traced.headers["traceparent"].split("-")[1] == TRACE_ID, "the caller's trace goes on, and comes back"
        # 2. One over gRPC: its trace id comes back in the initial metadata.
        async with grpc.aio.insecure_channel(obs.grpc) as ch:
            call = router_pb2_grpc.RouterStub(ch).Generate(router_pb2.GenerateRequest(
                model=GOOD, prompt="over grpc", sampling=common_pb2.SamplingParams(max_tokens=2, ignore_eos=True)), timeout=300)
            events = [ev async for ev in call]
            assert events[-1].WhichOneof("event") == "finished"
            returned = dict(await call.initial_metadata())["traceparent"]
            assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}", returned), returned
        # 3. A body that is not JSON: refused, counted under no model.
        bad_json = await client.post("/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"})
        assert bad_json.status_code == 400
        # 4. obs-1: the budget holds one model, so obs-0 is evicted for it (a swap).
        swapped = await _complete(client, OTHER, 6)
        assert swapped.status_code == 200, swapped.text
        # 5. obs-bad: its load fails; its caller is told.
        broken = await _complete(client, BAD, 2)
        assert broken.status_code >= 500 and "cannot be loaded" in broken.text, broken.text

    usage = [json.loads(r.text)["usage"] for r in (first, traced)]
    router = scrape(obs.router_metrics)

    def moved(name: str, **labels) -> float:
        return value(router, name, **labels) - value(router_before, name, **labels)

    # Router: requests by model, front door and outcome; tokens; latencies, one observation each.
    assert moved("roundhouse_requests_total", model=GOOD, endpoint="http", status="ok") == 3
    assert moved("roundhouse_requests_total", model=GOOD, endpoint="grpc", status="ok") == 1
    assert moved("roundhouse_requests_total", model=OTHER, endpoint="http", status="ok") == 1
    assert moved("roundhouse_requests_total", model=BAD, endpoint="http", status="unavailable") == 1
    assert moved("roundhouse_requests_total", model="(other)", endpoint="http", status="invalid_argument") == 1
    assert moved("roundhouse_generation_tokens_total", model=GOOD) == 5 + 4 + 3 + 2
    assert moved("roundhouse_generation_tokens_total", model=OTHER) == 6
    assert moved("roundhouse_prompt_tokens_total", model=GOOD) >= sum(u["prompt_tokens"] for u in usage) + 2
    assert moved("roundhouse_time_to_first_token_seconds_count", model=GOOD, endpoint="http") == 3
    assert moved("roundhouse_time_to_first_token_seconds_count", model=GOOD, endpoint="grpc") == 1
    assert moved("roundhouse_request_queue_seconds_count", model=GOOD) == 4
    # one per request of two or more tokens, also when all its tokens came in one batch (then a gap of 0)
    assert moved("roundhouse_inter_token_latency_seconds_count", model=GOOD) == 4
    assert moved("roundhouse_request_duration_seconds_count", model=BAD) == 1
    # the first request waited for obs-0's load: its queue wait and TTFT are over 1 s, the later ones not all
    assert moved("roundhouse_request_queue_seconds_bucket", model=GOOD, le="1.0") <= 3
    assert moved("roundhouse_request_queue_seconds_bucket", model=OTHER, le="+Inf") == 1
    assert value(router, "roundhouse_requests_waiting", model=GOOD) == 0  # nothing left queued

    # Manager: the swap (obs-0 evicted by the policy, obs-1 loaded), the failed load, the state now.
    manager = scrape(obs.manager_metrics)
    assert value(manager, "roundhouse_model_loads_total", model=GOOD, kind="load", reason="demand") == 1
    assert value(manager, "roundhouse_model_loads_total", model=OTHER, kind="load") == 1
    assert value(manager, "roundhouse_model_load_seconds_count", model=OTHER, kind="load") == 1
    assert value(manager, "roundhouse_model_evictions_total", model=GOOD, to="stop", reason="policy") == 1
    assert value(manager, "roundhouse_model_eviction_seconds_count", model=GOOD, to="stop") == 1
    assert value(manager, "roundhouse_model_load_failures_total", model=BAD) >= 1
    assert value(manager, "roundhouse_model_load_failures_total", model=GOOD) == 0
    assert value(manager, "roundhouse_model_state", model=OTHER, state="ready") == 1
    assert value(manager, "roundhouse_model_state", model=GOOD, state="unloaded") == 1
    assert value(manager, "roundhouse_model_tier", model=OTHER) == 2 and value(manager, "roundhouse_model_tier", model=GOOD) == 0
    assert value(manager, "roundhouse_gpu_used_bytes", gpu="cpu") == value(manager, "roundhouse_model_footprint_bytes", model=OTHER)
    assert value(manager, "roundhouse_gpu_budget_bytes", gpu="cpu") == 130 * MiB

    # Workers: each settled what it served; vLLM's own engine metrics pass through.
    good, other = scrape(obs.worker_metrics[GOOD]), scrape(obs.worker_metrics[OTHER])
    assert value(good, "roundhouse_worker_requests_total", model=GOOD, outcome="ack") == 4
    assert value(good, "roundhouse_worker_time_to_first_token_seconds_count", model=GOOD) == 4
    assert value(good, "roundhouse_worker_queue_wait_seconds_count", model=GOOD) == 4
    assert value(good, "roundhouse_worker_engine_state", model=GOOD, state="unloaded") == 1
    assert value(other, "roundhouse_worker_requests_total", model=OTHER, outcome="ack") == 1
    assert value(other, "roundhouse_worker_engine_state", model=OTHER, state="ready") == 1
    assert value(other, "roundhouse_worker_slots_free", model=OTHER) == 8
    # the engine's own count: the 6 tokens asked for, plus its warm-up probe's
    assert value(other, "vllm:generation_tokens_total", model_name=OTHER) >= 6
    assert value(other, "vllm:request_success_total", model_name=OTHER) >= 1

    # One trace id in the router's and the worker's lines about the traced request.
    def lines_with_trace(pattern: str) -> list[dict]:
        found = []
        for log in obs.run_dir.glob(pattern):
            for line in log.read_text(errors="replace").splitlines():
                if TRACE_ID in line and line.startswith("{"):
                    found.append(json.loads(line))
        return found

    await eventually(lambda: lines_with_trace("router-*.log") and lines_with_trace(f"{GOOD}-*.log"), 30,
                     "the traced request's lines in the router's and the worker's logs")
    router_lines, worker_lines = lines_with_trace("router-*.log"), lines_with_trace(f"{GOOD}-*.log")
    assert {ln["event"] for ln in router_lines} >= {"request.done"}
    assert all(ln["trace_id"] == TRACE_ID for ln in router_lines + worker_lines)
    assert {ln["request_id"] for ln in router_lines} == {ln["request_id"] for ln in worker_lines}
    assert any(ln["event"] == "request.settled" and ln["outcome"] == "ack" for ln in worker_lines)


async def test_the_traced_request_exports_one_trace_from_router_and_worker(obs):
    """Runs after the test above (file order), which sent the traced request: its spans reach the
    collector, from both services, under the caller's trace and linked parent to child."""
    tid = bytes.fromhex(TRACE_ID)

    def spans() -> dict[str, list]:
        out: dict[str, list] = {}
        for service, span in obs.collector.spans:
            if span.trace_id == tid:
                out.setdefault(span.name, []).append((service, span))
        return out

    await eventually(lambda: {"roundhouse.request", "roundhouse.generate", "roundhouse.worker.request"} <= set(spans()),
                     30, "the traced request's spans at the collector")
    got = spans()
    [(router_service, root)] = got["roundhouse.request"]
    assert router_service == "roundhouse-router" and root.parent_span_id == bytes.fromhex(CALLER_SPAN)
    for name in ("roundhouse.admit_and_publish", "roundhouse.queue_wait", "roundhouse.generate"):
        [(service, child)] = got[name]
        assert service == "roundhouse-router" and child.parent_span_id == root.span_id, name
        assert root.start_time_unix_nano <= child.start_time_unix_nano <= child.end_time_unix_nano <= root.end_time_unix_nano
    [(worker_service, worker)] = got["roundhouse.worker.request"]
    assert worker_service == "roundhouse-worker" and worker.parent_span_id == root.span_id, "one trace across NATS"
    [(_, generate)] = got["roundhouse.generate"]
    # The worker takes the message once JetStream stored it, which can be before the router has
    # the ack that starts its queue_wait; it is after the admission, and before the generation
    # the router saw start.
    assert root.start_time_unix_nano <= worker.start_time_unix_nano <= generate.start_time_unix_nano
    # The first request of the other test waited for obs-0's load: its own trace shows that wait.
    waits = [(svc, s) for svc, s in obs.collector.spans if s.name == "roundhouse.model_load_wait"]
    assert waits and all(svc == "roundhouse-router" for svc, _ in waits)
    assert max(s.end_time_unix_nano - s.start_time_unix_nano for _, s in waits) > 0.5e9, "a load takes seconds"
    attrs = {a.key: a.value for a in root.attributes}
    assert attrs["roundhouse.status"].string_value == "ok" and attrs["gen_ai.usage.output_tokens"].int_value == 3
