"""Request classification: which model serves a request sent to model "auto".

Rules come from the `routing:` section of the models YAML; the first rule whose every condition
holds wins. Nothing here calls a model or does I/O: a request is classified in microseconds, and
`roundhouse classify` runs the same function offline.

    routing:
      default_model: auto          # what a request naming no model gets ("" = model required)
      fallback: chat               # when no rule matches
      max_swap_wait_s: 10          # 0: only the request's deadline bounds the wait for a swap
      rules:
        - name: code-language      # every condition given must hold
          model: code
          metadata: {code_language: "*"}          # key present (any value)
          fallbacks: [chat]        # when code would take longer than max_swap_wait_s (or the
                                   # request's deadline) to load or wake: the first of these
                                   # that would not (resident, or asleep with a short wake)
        - name: high-quality
          model: reasoning
          metadata: {quality: high}               # a value, or a list of values
        - name: long-conversation
          model: reasoning
          min_chars: 6000                         # also: max_chars, min_messages
        - name: code-in-content
          model: code
          patterns: ['```', 'Traceback \\(most recent call last\\)']   # any matches (ignores case)
        - name: raw-completions
          model: code
          endpoint: completions                   # chat | completions
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Protocol

import re2

AUTO = "auto"
ENDPOINTS = ("chat", "completions")


class RoutingError(ValueError):
    """The routing section is wrong; the message names the key."""


# What a rule's patterns look at of a request's content: the latest messages first, a message
# longer than what is left by its head and its tail, this many characters in all. Together with
# RE2 (time linear in the text, whatever the pattern) it bounds a classification, which runs on
# the router's event loop: with Python's backtracking `re` and the whole content, a body of
# 8,000 newlines took 3.7 s against the default rules and `"select " * 4000` 1.4 s, freezing
# every stream on that router meanwhile.
SCAN_CHARS = 16384


@dataclasses.dataclass(frozen=True)
class Pattern:
    """A rule's regular expression (case ignored, ^ and $ at line ends), run by RE2: no
    backreferences or lookaround, and no backtracking."""
    source: str
    compiled: Any = dataclasses.field(compare=False, repr=False)

    @classmethod
    def compile(cls, source: str) -> "Pattern":
        options = re2.Options()
        options.log_errors = False   # the error reaches the config check instead of stderr
        return cls(source, re2.compile("(?im)" + source, options))

    def search(self, text: str) -> bool:
        return self.compiled.search(text) is not None


def scanned(texts: tuple[str, ...], limit: int = SCAN_CHARS) -> list[str]:
    """The parts of `texts` patterns look at (see SCAN_CHARS)."""
    out: list[str] = []
    for text in reversed(texts):
        if limit <= 0:
            break
        if len(text) > limit:
            head = limit // 2
            text = text[:head] + "\n" + text[len(text) - (limit - head):]
        out.append(text)
        limit -= len(text)
    return out


@dataclasses.dataclass(frozen=True)
class Rule:
    name: str
    model: str
    endpoint: tuple[str, ...] = ()
    metadata: tuple[tuple[str, tuple[str, ...]], ...] = ()   # key -> accepted values; ("*",) any
    min_messages: int = 0
    min_chars: int = 0
    max_chars: int = 0                                         # 0: no limit
    patterns: tuple[Pattern, ...] = ()
    fallbacks: tuple[str, ...] = ()                            # when its model is far from serving


@dataclasses.dataclass(frozen=True)
class ClassifierSpec:
    """`routing.classifier`: the router's learned classifier, asked after the rules that read
    metadata and before the others."""
    model_file: str = ""                                       # "": the model the router ships with
    min_confidence: float = 0.5                                # below it, the other rules decide
    labels: tuple[tuple[str, str], ...] = ()                   # its label -> a model (default: the same name)
    fallbacks: tuple[tuple[str, tuple[str, ...]], ...] = ()    # its label -> fallbacks (as a rule's)

    def model_for(self, label: str) -> str:
        return dict(self.labels).get(label, label)


@dataclasses.dataclass(frozen=True)
class RoutingSpec:
    fallback: str
    rules: tuple[Rule, ...] = ()
    default_model: str = AUTO
    max_swap_wait_s: float = 0.0                               # 0: the request's deadline only
    classifier: ClassifierSpec | None = None


class Predictor(Protocol):
    """A learned classifier (router_svc.classifier): (label, confidence 0-1, why)."""

    def predict(self, view: "RequestView") -> tuple[str, float, str]: ...


@dataclasses.dataclass(frozen=True)
class RequestView:
    """What classification looks at: no tokenizer, no model."""
    endpoint: str                      # "chat" or "completions"
    texts: tuple[str, ...]             # the prompt, or every message's content
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def chars(self) -> int:
        return sum(len(t) for t in self.texts)


@dataclasses.dataclass(frozen=True)
class Route:
    model: str
    reason: str
    fallbacks: tuple[str, ...] = ()
    # What decided it, for metrics (bounded: a rule's name, "classifier" or "fallback"); the
    # reason says the rest.
    rule: str = dataclasses.field(default="", compare=False)


@dataclasses.dataclass(frozen=True)
class Readiness:
    """How soon a request sent to a model now would start, as the manager last said: the load or
    wake it would take (learned from its own past transitions; none when it is ready), plus
    `queue_s` for the requests queued ahead of it."""
    ready: bool
    wait_s: float
    queue_s: float = 0.0


def classify(spec: RoutingSpec, req: RequestView, predictor: Predictor | None = None) -> Route:
    """The model for `req` and why. Without a classifier: the first rule that holds, else the
    fallback. With one (`spec.classifier` and its `predictor`): the rules that read metadata
    first (what the caller says beats any guess), then the classifier when it is at least
    `min_confidence` sure, then the other rules, then the fallback."""
    texts = scanned(req.texts)
    rules, unsure = spec.rules, ""
    if predictor is not None and spec.classifier is not None:
        for rule in (r for r in rules if r.metadata):
            why = _holds(rule, req, texts)
            if why is not None:
                return Route(rule.model, f"rule {rule.name}: {why}", rule.fallbacks, rule.name)
        learned = spec.classifier
        label, confidence, why = predictor.predict(req)
        if confidence >= learned.min_confidence:
            because = f"; {why}" if why else ""
            return Route(learned.model_for(label), f"classifier: {label} ({confidence:.0%} sure{because})",
                         dict(learned.fallbacks).get(label, ()), "classifier")
        rules, unsure = tuple(r for r in rules if not r.metadata), f"; classifier unsure ({label} {confidence:.0%})"
    for rule in rules:
        why = _holds(rule, req, texts)
        if why is not None:
            return Route(rule.model, f"rule {rule.name}: {why}{unsure}", rule.fallbacks, rule.name)
    return Route(spec.fallback, f"no rule matched: fallback{unsure}", rule="fallback")


def prefer_resident(route: Route, readiness: Mapping[str, Readiness], budget_s: float) -> Route:
    """`route` as it is when its model is ready, unknown, or would serve within `budget_s`;
    else the first of its fallbacks that would, its queue included (a model's wait unknown
    counts as too long), the reason saying so. No fallback fits: `route` as it is (the request
    waits)."""
    chosen = readiness.get(route.model)
    if not route.fallbacks or chosen is None or chosen.ready or chosen.wait_s <= budget_s:
        return route
    for name in route.fallbacks:
        r = readiness.get(name)
        if r is not None and r.wait_s <= budget_s:
            now = "resident" if r.ready else f"~{r.wait_s - r.queue_s:.1f} s to wake"
            if r.queue_s >= 0.5:
                now += f", ~{r.queue_s:.0f} s of queue"
            queue = f", ~{chosen.queue_s:.0f} s of it for the requests queued ahead" if chosen.queue_s >= 0.5 else ""
            return Route(name, f"{route.reason}; {route.model} would take ~{chosen.wait_s:.0f} s to serve{queue} "
                               f"(over {budget_s:.0f} s): fallback {name} ({now})", rule=route.rule)
    return route


def _holds(rule: Rule, req: RequestView, texts: list[str]) -> str | None:
    """Why `rule` holds for `req` (its conditions, in words), or None."""
    because: list[str] = []
    if rule.endpoint:
        if req.endpoint not in rule.endpoint:
            return None
        because.append(f"endpoint {req.endpoint}")
    for key, accepted in rule.metadata:
        value = req.metadata.get(key)
        if value is None or (accepted != ("*",) and value.lower() not in accepted):
            return None
        because.append(f"metadata {key}={value}")
    if rule.min_messages:
        if len(req.texts) < rule.min_messages:
            return None
        because.append(f"{len(req.texts)} messages")
    if rule.min_chars or rule.max_chars:
        chars = req.chars
        if chars < rule.min_chars or (rule.max_chars and chars > rule.max_chars):
            return None
        because.append(f"{chars} characters")
    if rule.patterns:
        hit = next((p for p in rule.patterns for t in texts if p.search(t)), None)
        if hit is None:
            return None
        because.append(f"content matches /{hit.source}/")
    return ", ".join(because) or "always"


# ---- parsing (called by the catalogue loader) ------------------------------------------------

_RULE_KEYS = {"name", "model", "endpoint", "metadata", "min_messages", "min_chars", "max_chars", "patterns", "fallbacks"}


def parse(raw: Any, resolve) -> RoutingSpec:
    """A RoutingSpec from the YAML mapping; `resolve(name)` maps a model name or alias to its
    configured name, or None. Model names in rules are stored resolved."""
    where = "routing"
    if not isinstance(raw, Mapping):
        raise RoutingError(f"{where}: must be a mapping")
    unknown = set(raw) - {"default_model", "fallback", "rules", "max_swap_wait_s", "classifier"}
    if unknown:
        raise RoutingError(f"{where}.{sorted(unknown)[0]}: unknown key "
                           "(known: classifier, default_model, fallback, max_swap_wait_s, rules)")
    max_wait = raw.get("max_swap_wait_s", 0.0)
    if isinstance(max_wait, bool) or not isinstance(max_wait, (int, float)) or max_wait < 0:
        raise RoutingError(f"{where}.max_swap_wait_s: must be a number of seconds >= 0, got {max_wait!r}")

    def model(key: str, value: Any) -> str:
        if not isinstance(value, str) or resolve(value) is None:
            raise RoutingError(f"{key}: {value!r} is not a configured model name or alias")
        return resolve(value)

    if "fallback" not in raw:
        raise RoutingError(f"{where}.fallback: required (the model for requests no rule matches)")
    fallback = model(f"{where}.fallback", raw["fallback"])
    default = raw.get("default_model", AUTO)
    if default is None:
        default = ""
    if default not in ("", AUTO):
        default = model(f"{where}.default_model", default)
    rules_raw = raw.get("rules") or []
    if not isinstance(rules_raw, list):
        raise RoutingError(f"{where}.rules: must be a list")
    rules, names = [], set()
    for i, r in enumerate(rules_raw):
        w = f"{where}.rules[{i}]"
        if not isinstance(r, Mapping):
            raise RoutingError(f"{w}: must be a mapping")
        bad = set(r) - _RULE_KEYS
        if bad:
            raise RoutingError(f"{w}.{sorted(bad)[0]}: unknown key (known: {', '.join(sorted(_RULE_KEYS))})")
        name = r.get("name")
        if not isinstance(name, str) or not name:
            raise RoutingError(f"{w}.name: required, a non-empty string")
        if name in names:
            raise RoutingError(f"{w}.name: {name!r} is used twice")
        names.add(name)
        rules.append(Rule(
            name=name,
            model=model(f"{w}.model", r.get("model")),
            endpoint=_endpoints(f"{w}.endpoint", r.get("endpoint")),
            metadata=_metadata(f"{w}.metadata", r.get("metadata")),
            min_messages=_count(f"{w}.min_messages", r.get("min_messages", 0)),
            min_chars=_count(f"{w}.min_chars", r.get("min_chars", 0)),
            max_chars=_count(f"{w}.max_chars", r.get("max_chars", 0)),
            patterns=_patterns(f"{w}.patterns", r.get("patterns")),
            fallbacks=_fallbacks(f"{w}.fallbacks", r.get("fallbacks"), model),
        ))
    return RoutingSpec(fallback=fallback, rules=tuple(rules), default_model=default, max_swap_wait_s=float(max_wait),
                       classifier=_classifier(f"{where}.classifier", raw.get("classifier"), model))


_CLASSIFIER_KEYS = {"model_file", "min_confidence", "labels", "fallbacks"}


def _classifier(where: str, value: Any, model) -> ClassifierSpec | None:
    """`routing.classifier`: absent or false for none; true or a mapping for the learned one."""
    if value is None or value is False:
        return None
    if value is True:
        value = {}
    if not isinstance(value, Mapping):
        raise RoutingError(f"{where}: must be true, false or a mapping (keys: {', '.join(sorted(_CLASSIFIER_KEYS))})")
    bad = set(value) - _CLASSIFIER_KEYS
    if bad:
        raise RoutingError(f"{where}.{sorted(bad)[0]}: unknown key (known: {', '.join(sorted(_CLASSIFIER_KEYS))})")
    path = value.get("model_file", "")
    if not isinstance(path, str):
        raise RoutingError(f"{where}.model_file: must be a path")
    confidence = value.get("min_confidence", 0.5)
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 <= confidence <= 1:
        raise RoutingError(f"{where}.min_confidence: must be a number from 0 to 1, got {confidence!r}")
    labels = value.get("labels") or {}
    if not isinstance(labels, Mapping):
        raise RoutingError(f"{where}.labels: must map the classifier's labels to model names")
    fallbacks = value.get("fallbacks") or {}
    if not isinstance(fallbacks, Mapping):
        raise RoutingError(f"{where}.fallbacks: must map the classifier's labels to lists of models")
    return ClassifierSpec(
        model_file=path, min_confidence=float(confidence),
        labels=tuple((str(k), model(f"{where}.labels.{k}", v)) for k, v in labels.items()),
        fallbacks=tuple((str(k), _fallbacks(f"{where}.fallbacks.{k}", v, model)) for k, v in fallbacks.items()),
    )


def _fallbacks(where: str, value: Any, model) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not value:
        raise RoutingError(f"{where}: must be a non-empty list of model names or aliases")
    return tuple(model(f"{where}[{i}]", v) for i, v in enumerate(value))


def _endpoints(where: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or any(v not in ENDPOINTS for v in values):
        raise RoutingError(f"{where}: must be one of {', '.join(ENDPOINTS)} (or a list of them)")
    return tuple(values)


def _metadata(where: str, value: Any) -> tuple[tuple[str, tuple[str, ...]], ...]:
    if value is None:
        return ()
    if not isinstance(value, Mapping) or not value:
        raise RoutingError(f"{where}: must be a mapping of key to a value, a list of values, or '*'")
    out = []
    for key, accepted in value.items():
        values = [accepted] if isinstance(accepted, (str, int, float, bool)) else accepted
        if not isinstance(key, str) or not isinstance(values, list) or not values:
            raise RoutingError(f"{where}.{key}: must be a value, a list of values, or '*'")
        out.append((key, tuple(str(v).lower() for v in values)))
    return tuple(out)


def _count(where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RoutingError(f"{where}: must be an integer >= 0, got {value!r}")
    return value


def _patterns(where: str, value: Any) -> tuple[Pattern, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise RoutingError(f"{where}: must be a non-empty list of regular expressions")
    out = []
    for i, v in enumerate(value):
        try:
            out.append(Pattern.compile(v))
        except re2.error as e:
            why = e.args[0].decode() if e.args and isinstance(e.args[0], bytes) else str(e)
            raise RoutingError(f"{where}[{i}]: {v!r} cannot be used: {why} (patterns run on RE2, in time "
                               "linear in the text: no backreferences or lookaround)") from e
    return tuple(out)

