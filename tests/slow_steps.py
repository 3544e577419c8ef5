"""A vLLM logits processor that makes every engine step take at least STEP_S: the tests' slow
model (catalogue `logits_processors: [tests.slow_steps:SlowSteps]`).

Cancel tests need a request that is still being generated when the cancel arrives. On a tiny
model a step takes a millisecond or two, so they used to ask for 8,000 tokens, a flood that
stalled the test process's own router for seconds and still sometimes finished first. With a
step of STEP_S, a few hundred tokens last seconds and the router relays next to nothing. The
engine is real; only its pace changes (the processor leaves the logits as they are). Loaded
inside vLLM's engine process, so this test helper imports vLLM's interface itself.
"""
from __future__ import annotations

import time

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

STEP_S = 0.02   # 50 tokens/s per request at most


class SlowSteps(LogitsProcessor):
    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        pass

    def is_argmax_invariant(self) -> bool:
        return False  # applied to greedy requests too (argmax-invariant ones are skipped)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        time.sleep(STEP_S)  # the pace of a bigger model; logits unchanged
        return logits
