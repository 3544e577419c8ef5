"""LoRA adapters: requested by name like models, served by their base model's one engine,
mixed in one batch, each request getting exactly its own adapter's tokens."""
from __future__ import annotations

import asyncio

import grpc
import openai
import pytest

from protos.v1 import common_pb2, router_pb2, router_pb2_grpc
from roundhouse import catalogue, stack, tinymodels
from router_svc.config import RouterConfig
from router_svc.server import Router
from tests.conftest import TEST_ACK_WAIT_S, collect, tokens_of

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ADAPTERS = {"support-tone": 71, "legal-tone": 72}


@pytest.fixture(scope="module")
async def lora_stack(session_dir, nats_server, start_worker):
    root = session_dir / "lora"
    base = tinymodels.default_specs(1, "lora")[0]
    for name, seed in ADAPTERS.items():
        tinymodels.write_lora(base, root / "adapters", name, seed)
    yaml_path = stack.write_tiny_catalogue(
        root, 1, prefix="lora", kv_cache_bytes=64 * 2**20, max_num_seqs=16,
        adapters=tuple(catalogue.AdapterSpec(n, str(root / "adapters" / n)) for n in ADAPTERS), max_loras=2, max_lora_rank=8,
    )
    cat = catalogue.load(yaml_path)
    router = Router(RouterConfig(catalogue=cat, nats_url=nats_server.url, port=0, http_port=0))
    await router.start()
    worker = await stack.start_worker(yaml_path, "lora-0", nats_server.url, session_dir / "run", "--ack-wait", str(TEST_ACK_WAIT_S))
    try:
        await worker.load()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as ch:
            yield router, router_pb2_grpc.RouterStub(ch), worker
    finally:
        worker.stop(timeout=15)
        await router.stop(grace=1)


async def _tokens(stub, model: str, prompt: str = "The roundhouse", n: int = 16) -> list[int]:
    req = router_pb2.GenerateRequest(model=model, prompt=prompt,
                                     sampling=common_pb2.SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    events = await collect(stub.Generate(req, timeout=120))
    started = next(ev.started for ev in events if ev.WhichOneof("event") == "started")
    assert started.model == model
    return tokens_of(events)


async def test_each_adapter_changes_the_output_and_batches_stay_separate(lora_stack, router_stub, chat_worker):
    router, stub, worker = lora_stack
    alone = {m: await _tokens(stub, m) for m in ("lora-0", *ADAPTERS)}
    assert len({tuple(t) for t in alone.values()}) == 3, "base and two adapters give three different outputs"
    # lora-0 has tiny-0's weights (same seed): its base output is that of an engine without LoRA.
    assert alone["lora-0"] == await _tokens(router_stub, "tiny-0")
    # The same requests at once (one engine, one batch with two adapters and the base). On CPU
    # this needs the worker's null adapter for base requests (vllm-project/vllm#48421).
    together = await asyncio.gather(*(_tokens(stub, m) for m in alone for _ in range(3)))
    assert together == [alone[m] for m in alone for _ in range(3)]
    st = await worker.status()
    assert st.loads == 1, "one engine serves the base model and its adapters"


async def test_adapters_are_listed_and_served_over_http(lora_stack):
    router, stub, _ = lora_stack
    listed = await stub.ListModels(router_pb2.ListModelsRequest(), timeout=10)
    assert sorted(listed.models[0].adapters) == sorted(ADAPTERS)
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{router.http_port}/v1", api_key="unused", max_retries=0)
    ids = {m.id: m for m in (await client.models.list()).data}
    assert ids["support-tone"].model_extra["parent"] == "lora-0"
    done = await client.completions.create(model="legal-tone", prompt="The roundhouse", max_tokens=5, temperature=0)
    assert done.model == "legal-tone" and done.usage.completion_tokens >= 1
    with pytest.raises(openai.NotFoundError):
        await client.completions.create(model="no-such-tone", prompt="x", max_tokens=2)
