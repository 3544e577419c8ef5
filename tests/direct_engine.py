"""The reference: a model's engine called directly, in its own process, with no Roundhouse around it.

    python -m tests.direct_engine MODEL_DIR MAX_MODEL_LEN KV_BYTES EAGER(0|1) < requests.jsonl > token_ids.jsonl

Each request line: {"prompt": str, "messages": [...], "sampling": {...}}; each answer: a line "IDS" and the
token ids. A process of its own, so that vLLM's threads and GIL-heavy start never share the
event loop of the router under test.
"""
from __future__ import annotations

import asyncio
import json
import sys


async def main(model_dir: str, max_model_len: int, kv_bytes: int, eager: bool) -> None:
    from worker_svc.engine import Engine, EngineSpec

    requests = [json.loads(line) for line in sys.stdin if line.strip()]
    engine = await Engine.start(EngineSpec(model_path=model_dir, served_name="direct", max_model_len=max_model_len,
                                           kv_cache_bytes=kv_bytes, enforce_eager=eager))
    try:
        for i, r in enumerate(requests):
            ids: list[int] = []
            async for step in engine.generate(r.get("prompt", ""), r.get("messages", []), f"direct-{i}", r["sampling"]):
                ids.extend(step.token_ids)
            print("IDS", json.dumps(ids), flush=True)  # vLLM logs to stdout too
    finally:
        await engine.shutdown()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"))
