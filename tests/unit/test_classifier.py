"""The router's learned classifier: bounded features, a deterministic training, the shipped model
on the held-out set, its config errors, and `roundhouse classify --eval`."""
import json
import pathlib
import subprocess
import sys

import pytest

from roundhouse import catalogue, routing
from roundhouse.catalogue import ConfigError
from router_svc import classifier, train_classifier
from router_svc.evaluate import load_labelled

pytestmark = pytest.mark.unit

DATA = pathlib.Path(__file__).parent.parent / "data" / "routing"
DEFAULTS = pathlib.Path(routing.__file__).parent / "defaults" / "cpu.yaml"
HELD_OUT_FLOOR = 0.92   # the embedded routing measured 94.6% on the held-out set (README); a drop fails


def test_what_the_model_reads_is_bounded_whatever_the_body():
    huge = routing.RequestView("chat", ("word " * 2**20, "x = (" * 2**20), {})
    feats = classifier.features(huge)
    limit = 2 * (classifier.FIRST_CHARS + classifier.LAST_CHARS)   # words, pairs, stems, a few facts
    assert 0 < len(feats) <= limit, len(feats)


def test_text_without_spaces_gives_character_pairs():
    feats = classifier.features(routing.RequestView("chat", ("写一个函数",), {}))
    assert {"写一", "一个", "个函", "函数"} <= feats


def test_training_is_deterministic_and_learns_the_training_set():
    examples = [(view, label) for view, label, _ in load_labelled(DATA / "train.jsonl")[:60]]
    labels = sorted({label for _, label in examples})
    a, b = train_classifier.train(examples, labels), train_classifier.train(examples, labels)
    assert a.weights == b.weights and a.bias == b.bias, "the same data gives the same model"
    right = sum(a.predict(view)[0] == label for view, label in examples)
    assert right >= 0.95 * len(examples), f"{right}/{len(examples)} of what it was trained on"


def test_the_shipped_model_routes_the_held_out_set_as_the_readme_says():
    cat = catalogue.load(DEFAULTS)
    model = classifier.for_routing(cat.routing, cat.resolve)
    assert model is not None and model.labels == ("chat", "code", "reasoning")
    held = load_labelled(DATA / "heldout.jsonl")
    assert len(held) == 166, "the held-out split is fixed"
    right = sum(cat.resolve(routing.classify(cat.routing, view, model).model).name == label for view, label, _ in held)
    assert right / len(held) >= HELD_OUT_FLOOR, f"{right}/{len(held)}"


def test_a_confident_decision_says_how_sure_and_why():
    cat = catalogue.load(DEFAULTS)
    model = classifier.for_routing(cat.routing, cat.resolve)
    view = routing.RequestView("chat", ("Write a bash one-liner that deletes log files older than seven days",), {})
    route = routing.classify(cat.routing, view, model)
    assert route.model == "code" and route.reason.startswith("classifier: code (") and "sure; '" in route.reason, route


def test_a_label_with_no_model_or_an_unreadable_file_is_a_config_error(tmp_path):
    spec = routing.RoutingSpec(fallback="chat", classifier=routing.ClassifierSpec())
    with pytest.raises(ConfigError, match="label 'code' names no configured model"):
        classifier.for_routing(spec, lambda name: None if name == "code" else name)
    missing = routing.RoutingSpec(fallback="chat", classifier=routing.ClassifierSpec(model_file=str(tmp_path / "none.json")))
    with pytest.raises(ConfigError, match="routing.classifier.model_file"):
        classifier.for_routing(missing, lambda name: name)
    assert classifier.for_routing(routing.RoutingSpec(fallback="chat"), lambda name: name) is None, "not configured"


def test_classify_eval_prints_the_figures(tmp_path):
    lines = [{"id": "a", "expect": "code", "messages": [{"role": "user", "content": "Fix this:\n```py\nprint(x\n```"}]},
             {"id": "b", "expect": "chat", "prompt": "Dear Anna,\n\nThank you for", "endpoint": "completions"}]
    path = tmp_path / "l.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    done = subprocess.run([sys.executable, "-m", "roundhouse.cli", "classify", "--eval", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for part in ("accuracy", "precision", "recall", "confusion (rows: expected, columns: got)", "slowest"):
        assert part in done.stdout, done.stdout
    path.write_text(json.dumps(lines[0]) + "\n" + json.dumps({"prompt": "no label"}) + "\n")
    bad = subprocess.run([sys.executable, "-m", "roundhouse.cli", "classify", "--eval", str(path)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "line 2: \"expect\"" in bad.stderr, bad.stderr
