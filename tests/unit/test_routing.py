"""Classification: the rules' semantics, their parsing errors, and `roundhouse classify` on examples."""
import json
import pathlib
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protos.v1 import router_pb2
from roundhouse import catalogue, routing, stack
from roundhouse.catalogue import ConfigError
from roundhouse.errors import InvalidRequest
from router_svc.validate import resolve_route

pytestmark = pytest.mark.unit

EXAMPLES = pathlib.Path(__file__).parent.parent / "data" / "classify_examples.jsonl"
MODELS = [{"name": n, "path": f"m/{n}", "max_model_len": 512} for n in ("chat", "code", "reasoning")]


def _cat(rules, **routing_kw) -> catalogue.Catalogue:
    return catalogue.from_mapping({"models": MODELS, "routing": {"fallback": "chat", "rules": rules, **routing_kw}})


def _view(text="hello", endpoint="chat", **metadata) -> routing.RequestView:
    return routing.RequestView(endpoint, (text,), metadata)


def test_first_matching_rule_wins_and_says_why():
    cat = _cat([
        {"name": "fence", "model": "code", "patterns": ["```"]},
        {"name": "anything-long", "model": "reasoning", "min_chars": 10},
    ])
    assert routing.classify(cat.routing, _view("```x``` and more text")) == routing.Route("code", "rule fence: content matches /```/")
    assert routing.classify(cat.routing, _view("a long plain sentence")).model == "reasoning"
    assert routing.classify(cat.routing, _view("hi")) == routing.Route("chat", "no rule matched: fallback")


def test_every_condition_of_a_rule_must_hold():
    cat = _cat([{"name": "r", "model": "code", "endpoint": "completions", "metadata": {"quality": ["high", "max"]}}])
    assert routing.classify(cat.routing, _view(endpoint="completions", quality="High")).model == "code"  # values ignore case
    assert routing.classify(cat.routing, _view(endpoint="chat", quality="high")).model == "chat"
    assert routing.classify(cat.routing, _view(endpoint="completions", quality="standard")).model == "chat"
    assert routing.classify(cat.routing, _view(endpoint="completions")).model == "chat"


def test_metadata_star_means_present_with_any_value():
    cat = _cat([{"name": "lang", "model": "code", "metadata": {"code_language": "*"}}])
    route = routing.classify(cat.routing, _view(code_language="zig"))
    assert route == routing.Route("code", "rule lang: metadata code_language=zig")


@pytest.mark.parametrize("rules, key", [
    ([{"name": "x", "model": "nope"}], "routing.rules[0].model"),
    ([{"name": "x", "model": "code", "patterns": ["("]}], "routing.rules[0].patterns[0]"),
    ([{"name": "x", "model": "code", "patterns": ["ok", r"(a)\1"]}], "routing.rules[0].patterns[1]"),   # RE2: no backreference
    ([{"name": "x", "model": "code", "endpoint": "embeddings"}], "routing.rules[0].endpoint"),
    ([{"name": "x", "model": "code", "colour": "red"}], "routing.rules[0].colour"),
    ([{"name": "x", "model": "code"}, {"name": "x", "model": "chat"}], "routing.rules[1].name"),
    ([{"model": "code"}], "routing.rules[0].name"),
    ([{"name": "x", "model": "code", "min_chars": -1}], "routing.rules[0].min_chars"),
    ([{"name": "x", "model": "code", "fallbacks": ["gpt-5"]}], "routing.rules[0].fallbacks[0]"),
    ([{"name": "x", "model": "code", "fallbacks": "chat"}], "routing.rules[0].fallbacks"),
    ([{"name": "x", "model": "code", "fallbacks": []}], "routing.rules[0].fallbacks"),    # an empty list is a slip
    ([{"name": "x", "model": "code", "patterns": []}], "routing.rules[0].patterns"),
    ([{"name": "x", "model": "code", "endpoint": []}], "routing.rules[0].endpoint"),
])
def test_bad_rules_are_refused_naming_the_key(rules, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        _cat(rules)


def test_fallback_is_required_and_must_exist():
    with pytest.raises(ConfigError, match="routing.fallback"):
        catalogue.from_mapping({"models": MODELS, "routing": {"rules": []}})
    with pytest.raises(ConfigError, match="routing.fallback"):
        catalogue.from_mapping({"models": MODELS, "routing": {"fallback": "gpt-5"}})


def test_auto_and_the_default_model_resolve_through_the_rules():
    cat = _cat([{"name": "fence", "model": "code", "patterns": ["```"]}])
    auto = router_pb2.GenerateRequest(model="auto", prompt="```py\n```")
    assert resolve_route(auto, cat) == ("code", "rule fence: content matches /```/")
    unnamed = router_pb2.GenerateRequest(prompt="hello")
    assert resolve_route(unnamed, cat) == ("chat", "no rule matched: fallback")
    named = router_pb2.GenerateRequest(model="reasoning", prompt="```")
    assert resolve_route(named, cat) == ("reasoning", "requested by name")
    required = _cat([], default_model="")
    with pytest.raises(InvalidRequest, match="model"):
        resolve_route(unnamed, required)


def test_auto_without_routing_is_a_clear_error():
    cat = catalogue.from_mapping({"models": MODELS})
    with pytest.raises(InvalidRequest, match="routing section"):
        resolve_route(router_pb2.GenerateRequest(model="auto", prompt="x"), cat)


def test_classify_command_routes_the_examples_as_written(tmp_path):
    """The embedded rules alone (the classifier off): what each rule does, in examples."""
    import yaml

    raw = yaml.safe_load(stack.DEFAULT_CONFIG.read_text())
    raw["routing"]["classifier"] = False
    for m in raw["models"]:   # relative model paths stay where the embedded config points
        m["path"] = str((stack.DEFAULT_CONFIG.parent / m["path"]).resolve())
    config = tmp_path / "rules-only.yaml"
    config.write_text(yaml.safe_dump(raw))
    lines = EXAMPLES.read_text().splitlines()
    done = subprocess.run([sys.executable, "-m", "roundhouse.cli", "classify", "--config", str(config)],
                          input="\n".join(lines) + "\nnot json\n", capture_output=True, text=True, timeout=60)
    out = [json.loads(x) for x in done.stdout.splitlines()]
    assert len(out) == len(lines) + 1
    for line, got in zip(lines, out):
        want = json.loads(line)
        assert (got["id"], got["model"]) == (want["id"], want["expect"]), got["reason"]
        assert got["reason"]
    assert "error" in out[-1] and out[-1]["line"] == len(lines) + 1
    assert done.returncode == 1, "a bad line makes the exit status say so"
    assert {json.loads(x)["expect"] for x in lines} == {"chat", "code", "reasoning"}


def test_max_swap_wait_must_be_seconds():
    with pytest.raises(ConfigError, match="routing.max_swap_wait_s"):
        _cat([], max_swap_wait_s=-1)


R = routing.Readiness
FENCE = [{"name": "fence", "model": "code", "patterns": ["```"], "fallbacks": ["reasoning", "chat"]}]
FAR = {"code": R(False, 28.0), "reasoning": R(False, 30.0), "chat": R(True, 0.0)}

RESIDENCY_CASES = [
    ("resident: as classified", {"code": R(True, 0.0), "chat": R(True, 0.0)}, 10, "code"),
    ("a short wake fits the budget: as classified", {"code": R(False, 0.4), "chat": R(True, 0.0)}, 10, "code"),
    ("a cold load over the budget: the first fallback that fits", FAR, 10, "chat"),
    ("an asleep fallback whose wake fits is taken before a resident one later in the list",
     {"code": R(False, 28.0), "reasoning": R(False, 0.5), "chat": R(True, 0.0)}, 10, "reasoning"),
    ("no fallback fits: the request waits for its model", {"code": R(False, 28.0), "reasoning": R(False, 30.0)}, 10, "code"),
    ("nothing known of the model: as classified", {"chat": R(True, 0.0)}, 10, "code"),
    ("a budget that holds the load: as classified", FAR, 60, "code"),
    ("a short wake, but the queue ahead makes it too long: a fallback",
     {"code": R(False, 28.0, queue_s=27.6), "reasoning": R(False, 30.0), "chat": R(True, 0.0)}, 10, "chat"),
    ("a resident fallback whose queue is over the budget is passed over for one that fits",
     {"code": R(False, 28.0), "reasoning": R(True, 12.0, queue_s=12.0), "chat": R(True, 0.0)}, 10, "chat"),
    ("every fallback's queue is over the budget: the request waits for its model",
     {"code": R(False, 28.0), "reasoning": R(True, 12.0, queue_s=12.0), "chat": R(True, 11.0, queue_s=11.0)}, 10, "code"),
]


@pytest.mark.parametrize("readiness, budget, model", [c[1:] for c in RESIDENCY_CASES], ids=[c[0] for c in RESIDENCY_CASES])
def test_residency_aware_fallbacks(readiness, budget, model):
    route = routing.prefer_resident(routing.classify(_cat(FENCE).routing, _view("```x```")), readiness, budget)
    assert route.model == model
    if model != "code":
        assert "fallback " + model in route.reason and "code would take ~28 s" in route.reason, route.reason
    if "code" in readiness and readiness["code"].queue_s and model != "code":
        assert "~28 s of it for the requests queued ahead" in route.reason, route.reason


def test_the_budget_is_the_smaller_of_max_swap_wait_and_the_time_left():
    cat = _cat(FENCE, max_swap_wait_s=60)
    req = router_pb2.GenerateRequest(model="auto", prompt="```x```")
    assert resolve_route(req, cat, FAR, time_left_s=600)[0] == "code", "28 s fits 60 s"
    assert resolve_route(req, cat, FAR, time_left_s=20)[0] == "chat", "28 s does not fit the 20 s left to its deadline"
    assert resolve_route(req, _cat(FENCE), FAR, time_left_s=600)[0] == "code", "max_swap_wait_s 0: the deadline only"
    named = router_pb2.GenerateRequest(model="code", prompt="```x```")
    assert resolve_route(named, cat, FAR, time_left_s=1)[0] == "code", "a model asked for by name is never replaced"


def test_a_pattern_re2_cannot_run_is_refused_saying_why():
    with pytest.raises(ConfigError, match=r"patterns\[0\].*RE2.*no backreferences or lookaround"):
        _cat([{"name": "x", "model": "code", "patterns": ["(?=lookahead)"]}])


DEFAULT_ROUTING = catalogue.load(pathlib.Path(routing.__file__).parent / "defaults" / "cpu.yaml").routing

# Bodies that made the backtracking patterns take seconds (issue 10), and bigger ones.
PATHOLOGICAL = [
    ("8,000 newlines", "\n" * 8000),
    ("'select ' x 4,000", "select " * 4000),
    ("stack-frame prefixes x 100,000", "  at x(" * 100_000),
    ("16 MiB of newlines", "\n" * 2**24),
    ("16 MiB on one line", "a (" * (2**24 // 3)),
]


@pytest.mark.parametrize("text", [t for _, t in PATHOLOGICAL], ids=[n for n, _ in PATHOLOGICAL])
def test_known_pathological_bodies_classify_in_milliseconds(text):
    req = routing.RequestView("chat", (text,), {})
    best = min(_timed(routing.classify, DEFAULT_ROUTING, req) for _ in range(3))  # best of 3: this VM stalls
    assert best < 0.010, f"{best * 1e3:.1f} ms (measured ~0.3 ms; issue 10's bound for a 16 MiB body is 10 ms)"


def _timed(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def test_a_long_conversation_is_scanned_latest_first_within_the_limit():
    texts = ("```old code```", *["plain words " * 100] * 20, "please prove this lemma")
    parts = routing.scanned(texts)
    assert parts[0] == "please prove this lemma" and "```old code```" not in parts, "the latest messages fill the limit"
    head_and_tail = routing.scanned(("```" + "x" * 50_000 + "Traceback (most recent call last)",))
    assert head_and_tail[0].startswith("```") and head_and_tail[0].endswith("last)"), "a long message: its head and tail"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=3000), max_size=30), st.integers(min_value=1, max_value=20_000))
def test_what_patterns_look_at_is_bounded(texts, limit):
    parts = routing.scanned(tuple(texts), limit)
    assert sum(len(p) for p in parts) <= limit + len(parts), "the limit, plus one joining newline per cut message"
    assert all(p in texts or "\n" in p for p in parts)


class _Fixed:
    """A stand-in for the learned classifier (this is a unit test of the precedence only)."""

    def __init__(self, label: str, confidence: float):
        self.answer = (label, confidence, "'x'")
        self.asked = 0

    def predict(self, view):
        self.asked += 1
        return self.answer


LEARNED_RULES = [
    {"name": "lang", "model": "code", "metadata": {"code_language": "*"}},
    {"name": "fence", "model": "code", "patterns": ["```"]},
]


def test_metadata_rules_come_before_the_classifier_which_comes_before_the_other_rules():
    cat = _cat(LEARNED_RULES, classifier={"min_confidence": 0.6, "fallbacks": {"reasoning": ["chat"]}})
    sure, unsure = _Fixed("reasoning", 0.9), _Fixed("reasoning", 0.4)
    route = routing.classify(cat.routing, _view("```x```", code_language="go"), sure)
    assert route.model == "code" and route.reason.startswith("rule lang") and sure.asked == 0, "what the caller says wins"
    route = routing.classify(cat.routing, _view("```x```"), sure)
    assert (route.model, route.fallbacks) == ("reasoning", ("chat",)) and "classifier: reasoning (90% sure" in route.reason
    route = routing.classify(cat.routing, _view("```x```"), unsure)
    assert route.model == "code" and route.reason == "rule fence: content matches /```/; classifier unsure (reasoning 40%)"
    route = routing.classify(cat.routing, _view("hello"), unsure)
    assert route.model == "chat" and "classifier unsure" in route.reason, "nothing sure and no rule: the fallback"
    assert routing.classify(_cat(LEARNED_RULES).routing, _view("```x```"), sure).model == "code", "not configured: not asked"


def test_classifier_labels_map_to_models():
    cat = _cat([], classifier={"labels": {"reasoning": "code"}})
    assert routing.classify(cat.routing, _view("hmm"), _Fixed("reasoning", 0.99)).model == "code"


@pytest.mark.parametrize("classifier, key", [
    ({"min_confidence": 2}, "routing.classifier.min_confidence"),
    ({"colour": "red"}, "routing.classifier.colour"),
    ({"labels": {"code": "nope"}}, "routing.classifier.labels.code"),
    ({"fallbacks": {"code": ["nope"]}}, "routing.classifier.fallbacks.code[0]"),
    ({"fallbacks": {"code": []}}, "routing.classifier.fallbacks.code"),
    ("yes", "routing.classifier"),
])
def test_classifier_config_errors_name_the_key(classifier, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        _cat([], classifier=classifier)


def test_a_classifier_model_file_is_relative_to_the_config_file_as_model_paths_are(tmp_path):
    raw = {"models": MODELS, "routing": {"fallback": "chat", "classifier": {"model_file": "mine.json"}}}
    cat = catalogue.from_mapping(raw, tmp_path / "conf")
    assert cat.routing.classifier.model_file == str((tmp_path / "conf" / "mine.json").resolve())
    assert cat.get("chat").path == str((tmp_path / "conf" / "m" / "chat").resolve())
    absolute = {"fallback": "chat", "classifier": {"model_file": str(tmp_path / "elsewhere.json")}}
    assert catalogue.from_mapping({**raw, "routing": absolute}, tmp_path).routing.classifier.model_file == \
        str(tmp_path / "elsewhere.json")
