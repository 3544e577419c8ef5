"""Prompt length in tokens, counted in the router so an over-long prompt never reaches NATS or a GPU.

Uses the model's own `tokenizer.json` (the `tokenizers` library) and its chat template (jinja2,
sandboxed, as transformers renders it). A model directory without them gets no exact count;
the engine then rejects an over-long prompt itself.
"""
from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer


class PromptCounter:
    def __init__(self, tokenizer: Tokenizer | None, chat_template: jinja2.Template | None, special: dict[str, str]):
        self._tokenizer = tokenizer
        self._template = chat_template
        self._special = special

    @classmethod
    def for_model(cls, model_dir: str) -> "PromptCounter":
        root = pathlib.Path(model_dir)
        tok_file = root / "tokenizer.json"
        tokenizer = Tokenizer.from_file(str(tok_file)) if tok_file.exists() else None
        config = {}
        if (root / "tokenizer_config.json").exists():
            config = json.loads((root / "tokenizer_config.json").read_text())
        source = config.get("chat_template")
        if (root / "chat_template.jinja").exists():
            source = (root / "chat_template.jinja").read_text()
        template = None
        if isinstance(source, str):
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            template = env.from_string(source)
        special = {k: v for k, v in config.items() if k in ("bos_token", "eos_token") and isinstance(v, str)}
        return cls(tokenizer, template, special)

    def count(self, prompt: str) -> int | None:
        if self._tokenizer is None:
            return None
        return len(self._tokenizer.encode(prompt, add_special_tokens=True).ids)

    def count_chat(self, messages: Sequence[dict[str, str]]) -> int | None:
        if self._tokenizer is None or self._template is None:
            return None
        text = self._template.render(messages=list(messages), add_generation_prompt=True, **self._special)
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)
