"""The router's learned request classifier: a linear model over hashed words, word pairs and
character pairs, in pure Python (no model call, no numpy on the routing path).

`Classifier.load(path)` reads a model file written by `router_svc.train_classifier`;
`predict(view)` returns (label, confidence, the words that weighed most). The labels are the
kinds of model a request needs (`chat`, `code`, `reasoning` in the shipped model), which the
routing config maps to model names (`routing.classifier.labels`).

What it looks at (`features`) is bounded, like the rules' patterns: the last message's first
FIRST_CHARS and last LAST_CHARS characters, and a few facts of the whole request (endpoint,
number of messages, length, code fences, line count). A decision costs well under a
millisecond for any body (tests/bench/bench_classify).

Written by hand rather than with scikit-learn: the router would carry scikit-learn and scipy
for one dot product, and the hashing trick plus a softmax are twenty lines.
"""
from __future__ import annotations

import json
import math
import pathlib
import re
import zlib
from collections.abc import Sequence

from roundhouse.routing import RequestView

SHIPPED = pathlib.Path(__file__).with_name("classifier_model.json")
FIRST_CHARS = 1000   # of the last message, what the model reads from its start...
LAST_CHARS = 300     # ...and from its end
_TOKEN = re.compile(r"[^\W\d_]+|\d+|[^\w\s]")          # words, numbers, single punctuation marks
_WIDE = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]")   # kana, CJK, hangul: no spaces


def _bucket(n: int, edges: Sequence[int]) -> int:
    return next((i for i, e in enumerate(edges) if n < e), len(edges))


def head_and_tail(text: str) -> str:
    """What the model reads of a message: its first FIRST_CHARS and last LAST_CHARS characters."""
    return text if len(text) <= FIRST_CHARS + LAST_CHARS else text[:FIRST_CHARS] + "\n" + text[-LAST_CHARS:]


def features(view: RequestView) -> set[str]:
    """The request's features, as strings (hashed by the model)."""
    texts = view.texts or ("",)
    last = head_and_tail(texts[-1])
    out = {
        f"ep={view.endpoint}",
        f"msgs={_bucket(len(texts), (2, 4, 8))}",
        f"len={_bucket(len(texts[-1]), (40, 200, 1000, 4000))}",
        f"lines={_bucket(last.count(chr(10)), (1, 3, 10, 40))}",
    }
    if "```" in last:
        out.add("fence")
    tokens = _TOKEN.findall(last.lower())
    out.update(tokens)
    out.update(f"{a} {b}" for a, b in zip(tokens, tokens[1:]))
    out.update(f"{w[:5]}-" for w in tokens if len(w) > 6)   # a stem: probabilità, probabilidad, probability
    numbers = sum(t.isdigit() for t in tokens)
    symbols = sum(len(t) == 1 and not t.isalnum() for t in tokens)
    out.add(f"nums={_bucket(numbers, (1, 3, 8, 20))}")
    out.add(f"syms={_bucket(10 * symbols // max(1, len(tokens)), (1, 2, 3, 5))}")
    for word in tokens:   # text without spaces (Chinese, Japanese, Korean): character pairs
        if len(word) > 1 and _WIDE.match(word):
            out.update(word[i:i + 2] for i in range(len(word) - 1))
    return out


def hashed(feature: str, buckets: int) -> int:
    return zlib.crc32(feature.encode()) % buckets


class Classifier:
    def __init__(self, labels: Sequence[str], buckets: int, weights: dict[int, Sequence[float]],
                 bias: Sequence[float], meta: dict | None = None):
        self.labels = tuple(labels)
        self.buckets = buckets
        self.weights = weights
        self.bias = tuple(bias)
        self.meta = meta or {}

    @classmethod
    def load(cls, path: str | pathlib.Path = SHIPPED) -> "Classifier":
        data = json.loads(pathlib.Path(path).read_text())
        return cls(data["labels"], data["buckets"], {int(k): v for k, v in data["weights"].items()},
                   data["bias"], data.get("meta"))

    def save(self, path: str | pathlib.Path) -> None:
        pathlib.Path(path).write_text(json.dumps({
            "labels": self.labels, "buckets": self.buckets, "bias": [round(b, 5) for b in self.bias],
            "meta": self.meta,
            "weights": {str(k): [round(x, 4) for x in v] for k, v in sorted(self.weights.items())},
        }, separators=(",", ":")) + "\n")

    def scores(self, feats: set[str]) -> list[float]:
        return self._scores(self._found(feats))

    def _found(self, feats: set[str]) -> list[tuple[str, Sequence[float]]]:
        """The features the model has weights for, with them (each hashed once)."""
        get, buckets = self.weights.get, self.buckets
        return [(f, w) for f in feats if (w := get(zlib.crc32(f.encode()) % buckets)) is not None]

    def _scores(self, found: list[tuple[str, Sequence[float]]]) -> list[float]:
        s = list(self.bias)
        n = len(s)
        for _, w in found:
            for i in range(n):
                s[i] += w[i]
        return s

    def predict(self, view: RequestView) -> tuple[str, float, str]:
        """The label, its probability, and the words that pushed it most (for the reason)."""
        found = self._found(features(view))
        s = self._scores(found)
        top = max(range(len(s)), key=s.__getitem__)
        exp = [math.exp(x - s[top]) for x in s]
        confidence = exp[top] / sum(exp)
        return self.labels[top], confidence, self._why(found, top)

    @staticmethod
    def _why(found: list[tuple[str, Sequence[float]]], label: int) -> str:
        lifts = [(w[label] - max(x for i, x in enumerate(w) if i != label), f) for f, w in found if "=" not in f]
        best = sorted((x for x in lifts if x[0] > 0), reverse=True)[:3]
        return ", ".join(repr(f) for _, f in best)

def for_routing(spec, resolve) -> Classifier | None:
    """The classifier `spec` (a RoutingSpec, or None) asks for, loaded, or None; ConfigError
    when its file cannot be read or one of its labels names no configured model."""
    from roundhouse.catalogue import ConfigError

    learned = spec.classifier if spec is not None else None
    if learned is None:
        return None
    path = learned.model_file or SHIPPED
    try:
        model = Classifier.load(path)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"routing.classifier.model_file: cannot read a classifier from {path}: {e}") from e
    for label in model.labels:
        if resolve(learned.model_for(label)) is None:
            raise ConfigError(f"routing.classifier: its label {label!r} names no configured model; "
                              f"map it to one in routing.classifier.labels")
    return model
