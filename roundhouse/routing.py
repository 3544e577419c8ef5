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
from typing import Annotated, Any, Literal, Protocol

import re2
from pydantic import AfterValidator, BeforeValidator, Field, PlainValidator, StrictFloat, StrictInt, StrictStr, WithJsonSchema
from pydantic.dataclasses import dataclass

from roundhouse import schema

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


def _compiled(value: Any) -> Pattern:
    if isinstance(value, Pattern):
        return value
    if not isinstance(value, str) or not value:
        raise ValueError("must be a non-empty regular expression")
    try:
        return Pattern.compile(value)
    except re2.error as e:
        why = e.args[0].decode() if e.args and isinstance(e.args[0], bytes) else str(e)
        raise ValueError(f"{value!r} cannot be used: {why} (patterns run on RE2, in time linear in the text: "
                         "no backreferences or lookaround)") from None


def _given(value: Any) -> Any:
    """A list written in the config holds something: an empty one is a slip (leave the key out).
    Only the YAML form is checked: the empty tuple that means "none" stays valid in code."""
    if isinstance(value, list) and not value:
        raise ValueError("must not be an empty list (leave the key out)")
    return value


def _listed(value: Any) -> Any:
    """One value where a list is accepted: the list of it."""
    return [value] if isinstance(value, str) else value


def _metadata_pairs(value: Any) -> Any:
    """`{key: value | [values] | "*"}` -> ((key, (values, lowercased)), ...)."""
    if isinstance(value, tuple):
        return value
    if not isinstance(value, Mapping) or not value:
        raise ValueError("must be a mapping of key to a value, a list of values, or '*'")
    out = []
    for key, accepted in value.items():
        values = [accepted] if isinstance(accepted, (str, int, float, bool)) else accepted
        if not isinstance(key, str) or not isinstance(values, list) or not values:
            raise ValueError(f"{key}: must be a value, a list of values, or '*'")
        out.append((key, tuple(str(v).lower() for v in values)))
    return tuple(out)


def _pairs(value: Any) -> Any:
    """A YAML mapping kept as its (key, value) pairs, in order."""
    return tuple((str(k), v) for k, v in value.items()) if isinstance(value, Mapping) else value


def _fallback_pairs(value: Any) -> Any:
    """`{label: [models]}` as pairs; each list holds something."""
    for k, v in value.items() if isinstance(value, Mapping) else ():
        if isinstance(v, list) and not v:
            raise ValueError(f"{k}: must be a non-empty list of model names or aliases")
    return _pairs(value)


_Scalar = {"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}]}
RegexField = Annotated[Pattern, PlainValidator(_compiled), WithJsonSchema(
    {"type": "string", "description": "a regular expression (RE2: no backreferences or lookaround); case is ignored"})]
ModelName = Annotated[StrictStr, Field(min_length=1, description="a configured model name, alias or adapter")]
ModelNames = Annotated[tuple[ModelName, ...], BeforeValidator(_given), Field(json_schema_extra={"minItems": 1})]


@dataclass(frozen=True, config=schema.DATA)
class Rule:
    name: ModelName = Field(description="unique among the rules")
    model: ModelName = Field(description="where a request it holds for goes")
    endpoint: Annotated[tuple[Literal["chat", "completions"], ...], BeforeValidator(_listed), BeforeValidator(_given), WithJsonSchema(
        {"anyOf": [{"enum": list(ENDPOINTS)}, {"type": "array", "items": {"enum": list(ENDPOINTS)}, "minItems": 1}],
         "description": "the front door: chat | completions (or a list of them)"})] = ()
    metadata: Annotated[tuple[tuple[str, tuple[str, ...]], ...], BeforeValidator(_metadata_pairs), WithJsonSchema(
        {"type": "object", "minProperties": 1, "additionalProperties": {"anyOf": [_Scalar, {"type": "array", "items": _Scalar}]},
         "description": "key -> accepted value(s), any case; '*': present with any value"})] = ()
    min_messages: Annotated[StrictInt, Field(ge=0)] = 0
    min_chars: Annotated[StrictInt, Field(ge=0)] = 0
    max_chars: Annotated[StrictInt, Field(ge=0, description="0: no limit")] = 0
    patterns: Annotated[tuple[RegexField, ...], BeforeValidator(_given),
                        Field(description="any matches", json_schema_extra={"minItems": 1})] = ()
    fallbacks: Annotated[ModelNames, Field(description="when its model is far from serving: the first of these that is not")] = ()


@dataclass(frozen=True, config=schema.DATA)
class ClassifierSpec:
    """`routing.classifier`: the router's learned classifier, asked after the rules that read
    metadata and before the others."""
    model_file: Annotated[StrictStr, AfterValidator(schema.relative_to_config)] = Field(
        "", description="a model `roundhouse train-classifier` wrote (default: the one the router ships with)")
    min_confidence: Annotated[StrictFloat, Field(ge=0, le=1, description="below it, the other rules decide")] = 0.5
    labels: Annotated[tuple[tuple[str, str], ...], BeforeValidator(_pairs), WithJsonSchema(
        {"type": "object", "additionalProperties": {"type": "string"},
         "description": "its label -> a model (default: the model of that name)"})] = ()
    fallbacks: Annotated[tuple[tuple[str, tuple[str, ...]], ...], BeforeValidator(_fallback_pairs), WithJsonSchema(
        {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "string"}, "minItems": 1},
         "description": "its label -> fallbacks (as a rule's)"})] = ()

    def model_for(self, label: str) -> str:
        return dict(self.labels).get(label, label)


def _or_boolean(field_schema: dict) -> None:
    """The field's JSON Schema also takes true / false (see _classifier_switch)."""
    field_schema["anyOf"] = [{"type": "boolean"}, *field_schema.get("anyOf", [])]


def _classifier_switch(value: Any) -> Any:
    """`classifier: true` is the shipped classifier with its defaults; `false` is none."""
    return ClassifierSpec() if value is True else None if value is False else value


@dataclass(frozen=True, config=schema.DATA)
class RoutingSpec:
    fallback: ModelName = Field(description="the model for requests no rule matches")
    rules: tuple[Rule, ...] = Field((), description="the first whose every condition holds wins")
    default_model: Annotated[StrictStr, schema.none_is("")] = Field(
        AUTO, description='what a request naming no model gets ("": a model is required)')
    max_swap_wait_s: Annotated[StrictFloat, Field(ge=0, description="0: only the request's deadline bounds a wait for a swap")] = 0.0
    classifier: Annotated[ClassifierSpec | None, BeforeValidator(_classifier_switch)] = Field(
        None, description="true: the shipped classifier; a mapping: its settings", json_schema_extra=_or_boolean)


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

def resolved(spec: RoutingSpec, resolve) -> RoutingSpec:
    """`spec` with every model it names resolved by `resolve(name)` (a model name or alias to its
    configured name, an adapter to itself; None: unknown), and rule names checked unique.
    RoutingError names the key."""
    where = "routing"

    def model(key: str, value: str) -> str:
        name = resolve(value)
        if name is None:
            raise RoutingError(f"{key}: {value!r} is not a configured model name or alias")
        return name

    def all_of(key: str, values: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(model(f"{key}[{i}]", v) for i, v in enumerate(values))

    rules, names = [], set()
    for i, r in enumerate(spec.rules):
        w = f"{where}.rules[{i}]"
        if r.name in names:
            raise RoutingError(f"{w}.name: {r.name!r} is used twice")
        names.add(r.name)
        rules.append(dataclasses.replace(r, model=model(f"{w}.model", r.model), fallbacks=all_of(f"{w}.fallbacks", r.fallbacks)))
    c = spec.classifier
    if c is not None:
        c = dataclasses.replace(
            c, labels=tuple((k, model(f"{where}.classifier.labels.{k}", v)) for k, v in c.labels),
            fallbacks=tuple((k, all_of(f"{where}.classifier.fallbacks.{k}", v)) for k, v in c.fallbacks))
    default = spec.default_model
    if default not in ("", AUTO):
        default = model(f"{where}.default_model", default)
    return dataclasses.replace(spec, fallback=model(f"{where}.fallback", spec.fallback), rules=tuple(rules),
                               default_model=default, classifier=c)
