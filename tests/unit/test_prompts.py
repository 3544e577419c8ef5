"""The router tokenizes each prompt once, and exactly as the engine would have (transformers)."""
from __future__ import annotations

import pytest

from roundhouse import tinymodels
from router_svc.prompts import PromptCounter

pytestmark = pytest.mark.unit

CHATS = [
    [{"role": "user", "content": "Hello, how are you today?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def fibonacci(n):"},
     {"role": "assistant", "content": "It recurses."}, {"role": "user", "content": "¿Y en español? ünïcödé 🚂"}],
]
PROMPTS = ["Hello world", "  leading spaces and\nnew lines\t", "ünïcödé 🚂 def f(x): return x"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompts")
    tinymodels.write_models(root, [tinymodels.TinySpec(name="t", seed=1)])
    return root / "t"


def test_ids_equal_what_transformers_gives_for_chat_and_completions(model_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(model_dir))
    counter = PromptCounter.for_model(str(model_dir))
    for messages in CHATS:
        want = list(hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False))
        assert counter.chat_ids(messages) == want
    for prompt in PROMPTS:
        assert counter.ids(prompt) == hf(prompt).input_ids, "completions get special tokens, as vLLM's server adds them"


def test_a_model_without_a_tokenizer_gets_no_ids(tmp_path):
    counter = PromptCounter.for_model(str(tmp_path))
    assert counter.ids("x") is None and counter.chat_ids([{"role": "user", "content": "x"}]) is None
