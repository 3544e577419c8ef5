"""The vLLM engine behind a small interface. The only module in Roundhouse that imports vllm.

`Engine.start()` builds an `AsyncLLM` (EngineCore in its own process) off the event loop, so the
worker's gRPC server keeps answering while a model loads; `generate()` yields one `Step` per
engine step (DELTA output); `abort()` and `shutdown()` are safe to call at any time.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from collections.abc import AsyncIterator, Sequence

from protos.v1 import common_pb2
from roundhouse.errors import EngineDead, GenerationFailed, InvalidRequest


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """What an engine is started with (parsed by the worker's config, passed down)."""

    model_path: str
    served_name: str
    max_model_len: int
    max_num_seqs: int = 64
    kv_cache_bytes: int = 2**30
    gpu_memory_utilization: float = 0.85
    dtype: str = "auto"
    enforce_eager: bool = False        # False: torch.compile on CPU, CUDA graphs on GPU
    logits_processors: tuple[str, ...] = ()   # qualified class names, imported by vLLM
    seed: int = 0
    adapters: tuple[tuple[str, str], ...] = ()   # LoRA (name, path); any enables LoRA in the engine
    max_loras: int = 4
    max_lora_rank: int = 16


@dataclasses.dataclass(slots=True)
class Step:
    """What one engine step produced for one request."""

    token_ids: Sequence[int]
    text: str
    finished: bool
    finish_reason: int            # common_pb2.FinishReason
    prompt_tokens: int
    completion_tokens: int


_FINISH = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "abort": common_pb2.FINISH_REASON_ABORTED,
}


_NULL_ADAPTER = "roundhouse-null-adapter"


def _null_adapter(like: str) -> str:
    """Writes a LoRA adapter shaped like the one at `like` with every weight zero; returns its path.

    vLLM's CPU LoRA ops gather each token's adapter weights with its slot index, and a base-model
    token's index is -1, which selects the last slot: a base request batched beside an adapter
    request silently gets that adapter's delta (vllm-project/vllm#48421, open). On CPU every
    base-model request therefore runs through this adapter: a real slot, a delta of exactly 0.
    """
    import pathlib
    import shutil
    import tempfile

    import torch
    from safetensors.torch import load_file, save_file

    src, out = pathlib.Path(like), pathlib.Path(tempfile.mkdtemp(prefix="roundhouse-null-lora-"))
    shutil.copy(src / "adapter_config.json", out / "adapter_config.json")
    tensors = load_file(str(src / "adapter_model.safetensors"))
    save_file({k: torch.zeros_like(v) for k, v in tensors.items()}, str(out / "adapter_model.safetensors"))
    return str(out)


def _remove(path: str) -> None:
    if path:
        import shutil

        shutil.rmtree(path, ignore_errors=True)


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


class Engine:
    def __init__(self, llm, spec: EngineSpec, null_adapter: str = ""):
        from vllm.lora.request import LoRARequest

        self._llm = llm
        self.spec = spec
        self._tokenizer = llm.get_tokenizer()
        self._loras = {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(spec.adapters)}
        self._null_adapter = null_adapter
        # Base-model requests: no adapter, or (CPU) the all-zero one, see _null_adapter.
        self._base_lora = LoRARequest(_NULL_ADAPTER, len(spec.adapters) + 1, null_adapter) if null_adapter else None

    @classmethod
    async def start(cls, spec: EngineSpec) -> "Engine":
        """Builds the engine (tens of seconds on CPU) and runs one token through it."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        on_cpu = await asyncio.to_thread(_on_cpu)
        null_adapter = await asyncio.to_thread(_null_adapter, spec.adapters[0][1]) if on_cpu and spec.adapters else ""
        # The legacy CPU variable (whole GiB) would override the exact byte budget below.
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
        args = AsyncEngineArgs(
            model=spec.model_path,
            served_model_name=[spec.served_name],
            max_model_len=spec.max_model_len,
            max_num_seqs=spec.max_num_seqs,
            dtype="float32" if on_cpu and spec.dtype == "auto" else spec.dtype,
            enforce_eager=spec.enforce_eager,
            **({"logits_processors": list(spec.logits_processors)} if spec.logits_processors else {}),
            gpu_memory_utilization=spec.gpu_memory_utilization,
            seed=spec.seed,
            kv_cache_memory_bytes=spec.kv_cache_bytes,
            disable_log_stats=True,
            enable_lora=bool(spec.adapters),
            **({"max_loras": spec.max_loras + bool(null_adapter), "max_lora_rank": spec.max_lora_rank} if spec.adapters else {}),
        )
        try:
            llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        except BaseException:
            _remove(null_adapter)
            raise
        engine = cls(llm, spec, null_adapter)
        try:
            async for _ in engine.generate("warmup", [], "roundhouse-warmup", {"max_tokens": 1, "temperature": 0.0}):
                pass
        except BaseException:
            await engine.shutdown()
            raise
        return engine

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The model's chat template applied to `messages` and tokenized (no special tokens added
        beyond what the template writes, as vLLM's OpenAI server does)."""
        return list(self._tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False))

    async def generate(
        self, prompt: str, chat: list[dict[str, str]], request_id: str, sampling: dict, adapter: str = "",
        prompt_token_ids: Sequence[int] = (),
    ) -> AsyncIterator[Step]:
        """Streams one request; `sampling` holds SamplingParams fields (max_tokens, temperature, ...);
        `adapter` names one of the engine's LoRA adapters ("" = the base model). Given
        `prompt_token_ids` (the router's rendering and tokenization), the engine takes them as they
        are; else it renders `chat` with the model's template, or tokenizes `prompt`."""
        from vllm.inputs import TokensPrompt
        # Not `from vllm import SamplingParams`: vllm's lazy __getattr__ imports on every call.
        from vllm.sampling_params import RequestOutputKind, SamplingParams
        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

        if self._llm is None:
            raise EngineDead("engine is shut down")
        if prompt_token_ids:
            engine_prompt = TokensPrompt(prompt_token_ids=list(prompt_token_ids))
        elif chat:
            engine_prompt = TokensPrompt(prompt_token_ids=self.chat_ids(chat))
        else:
            engine_prompt = prompt
        lora = self._base_lora
        if adapter:
            lora = self._loras.get(adapter)
            if lora is None:
                raise InvalidRequest("model", f"adapter {adapter!r} is not configured on model {self.spec.served_name}")
        try:
            params = SamplingParams(output_kind=RequestOutputKind.DELTA, **sampling)
        except (ValueError, TypeError) as e:
            raise InvalidRequest("sampling", str(e)) from e
        completion = 0
        try:
            async for out in self._llm.generate(engine_prompt, params, request_id, lora_request=lora):
                o = out.outputs[0]
                completion += len(o.token_ids)
                yield Step(
                    token_ids=o.token_ids,
                    text=o.text,
                    finished=out.finished,
                    finish_reason=_FINISH.get(o.finish_reason or "", common_pb2.FINISH_REASON_UNSPECIFIED),
                    prompt_tokens=len(out.prompt_token_ids or ()),
                    completion_tokens=completion,
                )
        except EngineDeadError as e:
            raise EngineDead(f"engine died: {e}") from e
        except EngineGenerateError as e:
            raise GenerationFailed(f"generation failed: {e}") from e
        except ValueError as e:  # vLLM's input checks (prompt too long for the context, ...)
            raise InvalidRequest("prompt", str(e)) from e

    async def abort(self, request_ids: Sequence[str]) -> None:
        if request_ids and self._llm is not None:
            await self._llm.abort(list(request_ids))

    def unfinished(self) -> int:
        """Requests the engine still holds (vLLM's own bookkeeping, not ours); 0 once shut down."""
        return self._llm.output_processor.get_num_unfinished_requests() if self._llm else 0

    @property
    def dead(self) -> bool:
        return self._llm is None or bool(self._llm.errored)

    async def shutdown(self) -> None:
        """Stops the EngineCore process; idempotent."""
        llm, self._llm = self._llm, None
        if llm is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(llm.shutdown)
            _remove(self._null_adapter)
