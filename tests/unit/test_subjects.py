import re

import pytest

from roundhouse import subjects

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("name", ["tiny-0", "Qwen/Qwen2.5-0.5B", "meta-llama/Llama-3.1-8B-Instruct", "a b*c>d", "ünïcode"])
def test_tokens_are_single_safe_subject_tokens(name):
    token = subjects.model_token(name)
    assert re.fullmatch(r"[A-Za-z0-9_-]+", token)
    assert subjects.request_subject(name) == f"rh.req.{token}"
    assert subjects.model_token(name) == token  # stable


def test_names_that_slug_alike_get_different_tokens():
    assert subjects.model_token("a/b") != subjects.model_token("a.b")
    assert subjects.consumer_name("a/b") != subjects.consumer_name("a.b")


def test_empty_name_is_refused():
    with pytest.raises(ValueError):
        subjects.model_token("")
