"""The prompt as the engine will see it, tokenized once, in the router.

The router renders the chat template and tokenizes here, admits by that count (an over-long
prompt never reaches NATS or a GPU), and queues the token ids: the worker hands them to vLLM as
they are, so the count admitted is the count the engine sees and nothing is tokenized twice.
Uses the model's own `tokenizer.json` (the `tokenizers` library) and its chat template (jinja2,
sandboxed, as transformers renders it; a test checks both against transformers). As vLLM's
OpenAI server does, a completion prompt gets the tokenizer's special tokens (BOS) and a rendered
chat prompt does not (its template writes them). A model directory without a tokenizer gets no
ids; the worker then renders and tokenizes, and the engine rejects an over-long prompt itself.
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

    def ids(self, prompt: str) -> list[int] | None:
        """A completion prompt's token ids, or None without a tokenizer."""
        if self._tokenizer is None:
            return None
        return self._tokenizer.encode(prompt, add_special_tokens=True).ids

    def render(self, messages: Sequence[dict[str, str]]) -> str | None:
        """The chat template applied to `messages`, ready for generation; None without one."""
        if self._template is None:
            return None
        return self._template.render(messages=list(messages), add_generation_prompt=True, **self._special)

    def chat_ids(self, messages: Sequence[dict[str, str]]) -> list[int] | None:
        """A chat's token ids (template rendered), or None without a tokenizer and template."""
        text = self.render(messages)
        if self._tokenizer is None or text is None:
            return None
        return self._tokenizer.encode(text, add_special_tokens=False).ids
