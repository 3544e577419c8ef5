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


def test_each_priority_class_has_its_own_subject_consumer_and_hand_back():
    names = {p: (subjects.request_subject("m", p), subjects.consumer_name("m", p), subjects.handback_subject("m", p))
             for p in subjects.PRIORITIES}
    assert names["normal"] == (subjects.request_subject("m"), subjects.consumer_name("m"), subjects.handback_subject("m")), \
        "normal keeps the subject and consumer a deployment without classes always used"
    assert len({n for triple in names.values() for n in triple}) == 9
    for p, (request, consumer, back) in names.items():
        assert subjects.handback_of(request) == back and subjects.handback_of(back) == back, "a copy keeps its class"
        assert subjects.model_of_consumer(consumer, ["other", "m"]) == "m"
        assert re.fullmatch(subjects.request_pattern(p).replace(".", r"\.").replace("*", r"[^.]+"), request)
        assert re.fullmatch(subjects.request_pattern(p, handback=True).replace(".", r"\.").replace("*", r"[^.]+"), back)
    with pytest.raises(ValueError, match="unknown priority"):
        subjects.request_subject("m", "urgent")
