"""Sleep tiers on a real engine: memory freed, wake time, the wake probe, LoRA after a wake.

Marked `gpu`: it needs CUDA (vLLM's sleep mode frees memory only there) and is skipped
elsewhere. Not run in CI, which has no GPU. On a CUDA machine with vLLM installed:

    .venv/bin/python -m pytest -m gpu tests/gpu -s

`ROUNDHOUSE_SLEEP_TEST_ON_CPU=1` runs the same steps on vLLM's CPU build, where the memory
checks are skipped (its sleep frees nothing) but the calls, the level-2 weight reload, the
probe and the adapters' registration all run for real.
"""
from __future__ import annotations

import os
import time

import pytest

from roundhouse import tinymodels
from worker_svc.engine import Engine, EngineSpec

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(600)]

MiB = 2**20
KV_BYTES = 256 * MiB


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.fixture(scope="module")
def device() -> str:
    if _cuda():
        return "cuda"
    if os.environ.get("ROUNDHOUSE_SLEEP_TEST_ON_CPU") == "1":
        return "cpu"
    pytest.skip("needs CUDA (or ROUNDHOUSE_SLEEP_TEST_ON_CPU=1 for the CPU path)")


def _free_bytes() -> int:
    import torch

    return torch.cuda.mem_get_info()[0]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("sleep-gpu")
    base = tinymodels.default_specs(1, "sleepy")[0]
    path = tinymodels.write_models(root / "models", [base])[0]
    adapter = tinymodels.write_lora(base, root / "adapters", "tone", 71)
    return str(path), str(adapter)


async def _tokens(engine: Engine, prompt: str, adapter: str = "") -> list[int]:
    out: list[int] = []
    async for step in engine.generate(prompt, [], f"t-{time.monotonic_ns()}", {"max_tokens": 16, "temperature": 0.0,
                                                                                "ignore_eos": True}, adapter=adapter):
        out.extend(step.token_ids)
    return out


@pytest.mark.parametrize("level", [1, 2])
async def test_sleep_frees_memory_and_a_wake_serves_the_same_tokens_with_its_adapters(device, model, level):
    path, adapter = model
    engine = await Engine.start(EngineSpec(model_path=path, served_name="sleepy", max_model_len=512,
                                           kv_cache_bytes=KV_BYTES, adapters=(("tone", adapter),), max_loras=1,
                                           max_lora_rank=8))
    try:
        base, tuned = await _tokens(engine, "hello there"), await _tokens(engine, "hello there", "tone")
        assert base != tuned, "the adapter changes the output"
        assert engine.can_sleep == (device == "cuda")
        free = _free_bytes() if device == "cuda" else 0
        t0 = time.perf_counter()
        await engine.sleep(level)
        slept = time.perf_counter() - t0
        if device == "cuda":
            freed = _free_bytes() - free
            assert freed >= KV_BYTES, f"level {level} freed {freed / MiB:.0f} MiB, less than the KV cache"
        t0 = time.perf_counter()
        reason = await engine.wake()
        woke = time.perf_counter() - t0
        assert reason == "", reason
        assert await _tokens(engine, "hello there") == base
        assert await _tokens(engine, "hello there", "tone") == tuned, "adapters apply after a wake (vLLM #53888)"
        print(f"{device}, level {level}: sleep {slept:.2f} s, wake + adapters + probe {woke:.2f} s")
    finally:
        await engine.shutdown()
