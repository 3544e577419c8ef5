"""Other model families against the shipped classifier, by 5-fold cross-validation on the
routing set's training file only (never the held-out split), through the embedded routing.

    pip install --target /tmp/skl scikit-learn
    PYTHONPATH=/tmp/skl .venv/bin/python -m tests.bench.compare_classifiers

scikit-learn is not a dependency of Roundhouse (the router's classifier is pure Python, see
router_svc/classifier.py): this bench asks whether a different linear model, or features the
shipped one does not use, would route better, before anyone ports one. Folds are the ones
`python -m router_svc.train_classifier --cv 5` uses (crc32 of "cv:<id>"), so the shipped
model's figure from that command compares directly. A request that names its model in
metadata is routed by the metadata rules, as in the router; the others by the model's label
(every prediction taken, with no `min_confidence` fallback to the other rules: the shipped
figure has that fallback, which can only help it).
"""
from __future__ import annotations

import zlib

import numpy as np
from scipy.sparse import hstack
from sklearn.feature_extraction import DictVectorizer
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.preprocessing import normalize
from sklearn.svm import LinearSVC

from roundhouse import routing, stack
from roundhouse.catalogue import load
from router_svc.classifier import features, head_and_tail
from router_svc.evaluate import load_labelled
from router_svc.train_classifier import DATA

FOLDS = 5


class _Named:
    """A predictor that names a label without looking (to see which rule routes a request)."""

    def __init__(self, label: str):
        self.label = label

    def predict(self, view):
        return self.label, 1.0, ""


def main() -> None:
    examples = load_labelled(DATA / "train.jsonl")
    labels = sorted({label for _, label, _ in examples})
    y = np.array([labels.index(label) for _, label, _ in examples])
    fold = np.array([zlib.crc32(f"cv:{ident}".encode()) % FOLDS for _, _, ident in examples])
    cat = load(stack.DEFAULT_CONFIG)
    # what the metadata rules decide (the same whatever the classifier says), else ""
    by_rules = []
    for view, _, _ in examples:
        route = routing.classify(cat.routing, view, _Named("?"))
        by_rules.append(cat.resolve(route.model).name if route.rule != "classifier" else "")
    model_of = {label: cat.resolve(cat.routing.classifier.model_for(label)).name for label in labels}

    def routed(pred: np.ndarray, name: str) -> None:
        got = [by_rules[j] or model_of[labels[pred[j]]] for j in range(len(y))]
        ok = np.array([g == labels[y[j]] for j, g in enumerate(got)])
        recall = "  ".join(f"{c} {ok[y == k].mean():.1%}" for k, c in enumerate(labels))
        print(f"{name:58} {ok.mean():6.1%} ({ok.sum()}/{len(ok)})  recall {recall}", flush=True)

    def cv(x, make, proba: bool = False) -> np.ndarray:
        out = np.zeros((len(y), len(labels))) if proba else np.zeros(len(y), int)
        for k in range(FOLDS):
            train, test = fold != k, fold == k
            model = make().fit(x[train], y[train])
            out[test] = model.predict_proba(x[test]) if proba else model.predict(x[test])
        return out

    def sgd(alpha: float):
        return lambda: SGDClassifier(loss="log_loss", alpha=alpha, max_iter=20, tol=None, average=True, random_state=0)

    last = [(view.texts or ("",))[-1] for view, _, _ in examples]
    feats = DictVectorizer().fit_transform([dict.fromkeys(features(view), 1) for view, _, _ in examples])
    chars = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2).fit_transform(
        [t[:400] for t in last])
    words = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, token_pattern=r"(?u)\b\w+\b").fit_transform(
        [head_and_tail(t) for t in last])
    both = hstack([chars, normalize(feats)]).tocsr()
    print(f"5-fold cross-validation through the embedded routing, {len(y)} training requests "
          f"({sum(bool(r) for r in by_rules)} routed by their metadata)")
    for c in (0.2, 4.0):
        routed(cv(feats, lambda: LogisticRegression(C=c, max_iter=3000)), f"shipped features, logistic regression C={c}")
    routed(cv(feats, lambda: LinearSVC(C=0.1)), "shipped features, linear SVM C=0.1")
    p_feats = cv(feats, sgd(1e-4), proba=True)
    routed(p_feats.argmax(1), "shipped features, averaged SGD")
    p_chars = cv(chars, sgd(1e-5), proba=True)
    routed(p_chars.argmax(1), "char 2-5-grams tf-idf (first 400 chars), averaged SGD")
    routed(cv(both, sgd(1e-5)), "char 2-5-grams + shipped features, averaged SGD")
    routed(cv(hstack([chars, words, normalize(feats)]).tocsr(), lambda: LinearSVC(C=1)),
           "char 2-5-grams + words 1-2 + shipped features, linear SVM")
    routed((0.3 * p_feats + 0.7 * p_chars).argmax(1), "ensemble: shipped features 0.3, char n-grams 0.7")
    chat, reasoning = labels.index("chat"), labels.index("reasoning")
    base = p_feats.argmax(1)
    pred = base.copy()
    for k in range(FOLDS):   # a chat-or-reasoning specialist, asked when the model says one of the two
        train = (fold != k) & np.isin(y, [chat, reasoning])
        test = (fold == k) & np.isin(base, [chat, reasoning])
        pred[test] = sgd(1e-5)().fit(both[train], y[train]).predict(both[test])
    routed(pred, "averaged SGD + a chat/reasoning specialist")
    print("the shipped model: .venv/bin/python -m router_svc.train_classifier --cv 5")


if __name__ == "__main__":
    main()
