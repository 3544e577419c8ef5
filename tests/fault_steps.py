"""A vLLM logits processor that crashes the engine on one kind of request: the fault tests'
model (catalogue `logits_processors: [tests.fault_steps:FaultSteps]`).

A request sampled with `seed == POISON_SEED` kills its engine once it has POISON_AFTER output
tokens: the processor raises inside the engine's step, as a bug in a kernel or a custom processor
would, and vLLM's EngineCore dies with every request it holds. Every other request is served as
by the slow model (tests/slow_steps.py: each step takes at least STEP_S, so a stream is still
running when a fault lands). Loaded inside vLLM's engine process.
"""
from __future__ import annotations

from vllm.v1.sample.logits_processor import BatchUpdate
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from tests.slow_steps import SlowSteps

POISON_SEED = 66_666
POISON_AFTER = 5     # tokens the caller has seen when the engine dies


class FaultSteps(SlowSteps):
    def __init__(self, vllm_config, device, is_pin_memory: bool) -> None:
        super().__init__(vllm_config, device, is_pin_memory)
        self._poisoned: dict[int, list[int]] = {}   # batch index -> the request's output tokens (live)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self._poisoned, batch_update,
                             lambda params, _prompt, output: output if params.seed == POISON_SEED else None)

    def apply(self, logits):
        if any(len(out) >= POISON_AFTER for out in self._poisoned.values()):
            raise RuntimeError("tests.fault_steps: a poisoned request reached its engine step (test fault)")
        return super().apply(logits)
