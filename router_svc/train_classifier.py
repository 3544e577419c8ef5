"""Trains the router's request classifier on labelled requests and prints how it does.

    python -m router_svc.train_classifier [--train FILE ...] [--eval FILE] [--out PATH]

Defaults: trains on tests/data/routing/train.jsonl and writes router_svc/classifier_model.json,
the model the router ships with. It evaluates only on a file named by --eval, so retraining
never shows held-out figures by accident (the project's fixed held-out split,
tests/data/routing/heldout.jsonl, is read once per shipped model: nothing is tuned on it). A team retrains on its own traffic with the same command:
`--train mine.jsonl --eval mine-heldout.jsonl --out mine.json`, then points
`routing.classifier.model_file` at the file. Lines are JSON: an OpenAI chat or completions body
(`messages` or `prompt`, optional `metadata`, `endpoint`) with `expect`, the label (see
tests/data/routing/README.md for the labelling policy).

Multinomial logistic regression over the hashed features of `router_svc.classifier.features`,
fitted by stochastic gradient descent with L2, SEEDS times over differently (but seeded)
shuffled orders, the fits averaged into one linear model (as cheap to run as one fit, and
steadier: a single fit on a few thousand examples depends on its order): the same data gives
the same file.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import random
import sys

from router_svc.classifier import SHIPPED, Classifier, features, hashed
from router_svc.evaluate import load_labelled, report

DATA = pathlib.Path(__file__).resolve().parent.parent / "tests" / "data" / "routing"
BUCKETS = 2**18
EPOCHS = 20
RATE = 0.5
L2 = 3e-4     # settings compared by --cv 5 on the training set only (12 fits, 2,012 examples: L2 1e-5 93.6%, 1e-4 93.9%,
              # 3e-4 94.4%; 2,063: 3e-4 94.1%, 6e-4 93.9%, 1e-3 93.7%; 20 epochs scored as 40 (6 fits); one fit on
              # 1,134: epochs 20-80, rate 0.2-1 within 1.6 points)
SEEDS = 12    # fits averaged, each over its own order of the examples (--cv 5 on the 1,134 examples of issue 10's
              # start: 1 fit 89.5%, 3 fits 91.9%, 6 fits 92.7%; on 1,833: 6 fits 93.0%, 12 fits 93.4%)
KEEP = 1e-3   # weights smaller than this (in every class) are left out of the file


def train(examples: list[tuple], labels: list[str], seed: int = 0) -> Classifier:
    """`examples`: (RequestView, label) pairs. SEEDS fits, each over its own (seeded) order of
    the examples, averaged into one linear model: the same data gives the same file."""
    index = {label: i for i, label in enumerate(labels)}
    rows = [(sorted({hashed(f, BUCKETS) for f in features(view)}), index[label]) for view, label in examples]
    n = len(labels)
    weights: dict[int, list[float]] = {}
    bias = [0.0] * n
    for k in range(SEEDS):
        w_k, b_k = _fit(rows, n, random.Random(seed * SEEDS + k))
        for f, w in w_k.items():
            total = weights.setdefault(f, [0.0] * n)
            for i in range(n):
                total[i] += w[i] / SEEDS
        for i in range(n):
            bias[i] += b_k[i] / SEEDS
    kept = {f: w for f, w in weights.items() if max(abs(x) for x in w) >= KEEP}
    return Classifier(labels, BUCKETS, kept, bias)


def _fit(rows: list[tuple[list[int], int]], n: int, rng: random.Random) -> tuple[dict[int, list[float]], list[float]]:
    """One fit: stochastic gradient descent on the softmax loss with L2, EPOCHS passes, each in
    an order drawn from `rng`."""
    weights: dict[int, list[float]] = {}
    bias = [0.0] * n
    order = list(range(len(rows)))
    step = 0
    for epoch in range(EPOCHS):
        rng.shuffle(order)
        for r in order:
            step += 1
            rate = RATE / (1 + step / len(rows) / 4)
            feats, y = rows[r]
            s = list(bias)
            for f in feats:
                w = weights.get(f)
                if w is not None:
                    for i in range(n):
                        s[i] += w[i]
            top = max(s)
            exp = [math.exp(x - top) for x in s]
            total = sum(exp)
            grad = [e / total - (1.0 if i == y else 0.0) for i, e in enumerate(exp)]
            for i in range(n):
                bias[i] -= rate * grad[i]
            for f in feats:
                w = weights.setdefault(f, [0.0] * n)
                for i in range(n):
                    w[i] -= rate * (grad[i] + L2 * w[i])
    return weights, bias


def cross_validate(examples: list[tuple], labels: list[str], folds: int, config: str | None) -> str:
    """K-fold figures of the whole routing (rules and classifier) on the training examples."""
    import zlib

    from roundhouse import routing, stack
    from roundhouse.catalogue import load

    cat = load(config or stack.DEFAULT_CONFIG)
    rows = []
    for k in range(folds):
        fold = [ex for ex in examples if zlib.crc32(f"cv:{ex[2]}".encode()) % folds == k]
        rest = [(view, label) for view, label, ident in examples if zlib.crc32(f"cv:{ident}".encode()) % folds != k]
        model = train(rest, labels)
        for view, label, ident in fold:
            rows.append((label, cat.resolve(routing.classify(cat.routing, view, model).model).name, ident, 0.0))
    return f"{folds}-fold cross-validation of the routing on {len(examples)} training requests:\n" + report(rows, labels, slowest=0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m router_svc.train_classifier", description=__doc__.split("\n\n")[0])
    p.add_argument("--train", nargs="+", default=[str(DATA / "train.jsonl")], help="labelled JSON lines to learn from")
    p.add_argument("--eval", default="", help="labelled JSON lines to report on (none by default: compare "
                                              "settings with --cv, read a held-out file once)")
    p.add_argument("--out", default=str(SHIPPED), help="where to write the model")
    p.add_argument("--cv", type=int, default=0, metavar="K",
                   help="only cross-validate on the training files (K folds), through the routing of --config: "
                        "how to compare settings without looking at the held-out set")
    p.add_argument("--config", default=None, help="models YAML whose routing --cv runs (default: the embedded one)")
    a = p.parse_args(argv)
    examples = [ex for path in a.train for ex in load_labelled(path)]
    labels = sorted({label for _, label, _ in examples})
    if a.cv:
        print(cross_validate(examples, labels, a.cv, a.config))
        return 0
    model = train([(view, label) for view, label, _ in examples], labels)
    model.meta = {"trained_on": [pathlib.Path(t).name for t in a.train], "examples": len(examples),
                  "epochs": EPOCHS, "seeds": SEEDS, "features": len(model.weights)}
    model.save(a.out)
    print(f"trained on {len(examples)} requests ({', '.join(a.train)}): {len(model.weights)} weights -> {a.out}")
    if a.eval:
        print(f"\nthe model alone on {a.eval}:")
        held = load_labelled(a.eval)
        predictions = [(label, model.predict(view)[0], ident, 0.0) for view, label, ident in held]
        print(report(predictions, labels, slowest=0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
