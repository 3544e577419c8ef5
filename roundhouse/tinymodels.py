"""Deterministic tiny Llama models, made offline (no hub): weights, tokenizer, chat template.

    roundhouse make-models DIR --count 3        # writes DIR/tiny-0 ... DIR/tiny-2

Same name and seed give byte-identical weights; vLLM's CPU backend accepts them (head_dim 64).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
# A small fixed corpus: the BPE merges depend only on it, so every tiny model shares one tokenizer.
_CORPUS = """
A roundhouse is the railway building where locomotives wait on their tracks and a turntable
brings the one that is needed onto the line. Roundhouse serves many language models from one
GPU behind one gateway. The router classifies each request and publishes it to the model's
queue; the manager decides which models are resident; workers run the engines and stream the
tokens back. Requests that arrive during a swap wait in their queue and nothing is dropped.
def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)
for i in range(10): print(i, i * i, "hello world")
The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) [ ] { } < > , . ; : ! ?
Hello, how are you today? I am fine, thank you. What is the capital of France? Paris.
"""


@dataclasses.dataclass(frozen=True)
class TinySpec:
    name: str
    seed: int
    hidden_size: int = 128
    num_attention_heads: int = 2        # head_dim 64: vLLM's CPU attention rejects 16
    num_key_value_heads: int = 1
    num_hidden_layers: int = 2
    intermediate_size: int = 256
    vocab_size: int = 512
    max_position_embeddings: int = 1024


def default_specs(count: int, prefix: str = "tiny", context: int = 1024) -> list[TinySpec]:
    return [TinySpec(name=f"{prefix}-{i}", seed=1000 + i, max_position_embeddings=context) for i in range(count)]


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    return tok


def write_model(spec: TinySpec, out_dir: pathlib.Path) -> pathlib.Path:
    """Writes one tiny model into out_dir/spec.name (skipped when already written for this spec)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    target = out_dir / spec.name
    marker = target / "roundhouse-tiny.json"
    fingerprint = hashlib.sha256(json.dumps(dataclasses.asdict(spec), sort_keys=True).encode()).hexdigest()
    if marker.exists() and json.loads(marker.read_text()).get("fingerprint") == fingerprint:
        return target
    target.mkdir(parents=True, exist_ok=True)

    tok = _train_tokenizer(spec.vocab_size)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = spec.max_position_embeddings
    fast.save_pretrained(target)

    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # default init is near-uniform logits; widen it so outputs differ per seed
        for p in model.parameters():
            p.normal_(0.0, 0.08)
    model.save_pretrained(target, safe_serialization=True)
    marker.write_text(json.dumps({"fingerprint": fingerprint, "spec": dataclasses.asdict(spec)}, indent=1))
    return target


def write_models(out_dir: pathlib.Path, specs: list[TinySpec]) -> list[pathlib.Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    return [write_model(s, out_dir) for s in specs]


def write_lora(base: TinySpec, out_dir: pathlib.Path, name: str, seed: int, rank: int = 8) -> pathlib.Path:
    """A deterministic PEFT LoRA adapter for a tiny model (q_proj and v_proj of every layer),
    strong enough that greedy outputs differ from the base model's."""
    import torch
    from safetensors.torch import save_file

    target = out_dir / name
    target.mkdir(parents=True, exist_ok=True)
    head_dim = base.hidden_size // base.num_attention_heads
    outs = {"q_proj": base.num_attention_heads * head_dim, "v_proj": base.num_key_value_heads * head_dim}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(base.num_hidden_layers):
        for module, out in outs.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, base.hidden_size, generator=gen) * 0.3
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out, rank, generator=gen) * 0.3
    save_file(tensors, str(target / "adapter_model.safetensors"))
    (target / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
        "target_modules": sorted(outs), "bias": "none", "fan_in_fan_out": False, "modules_to_save": None,
        "use_rslora": False, "use_dora": False, "base_model_name_or_path": base.name,
    }, indent=1))
    return target
