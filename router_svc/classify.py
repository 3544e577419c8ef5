"""`roundhouse classify`: which model each request would get, offline, and how often that is right.

    python -m router_svc.classify [--config FILE] < requests.jsonl
    python -m router_svc.classify [--config FILE] --eval labelled.jsonl

JSON lines in, {"model", "reason"} lines out. A line is an OpenAI chat or completions body
(`messages` or `prompt`, optional `metadata`), optionally with `endpoint` and `id`; it is read by
the router's own parser and classified by the router's own rules and classifier, so what it
prints is what the router would do. Exit status 1 if any line was refused (its line says why),
2 for a bad config. `--eval FILE`: lines that also carry `expect` (the right model); prints the
accuracy, per-model precision and recall, the confusion matrix and the slowest decisions.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from roundhouse import routing, stack
from roundhouse.catalogue import ConfigError, load
from roundhouse.errors import RoundhouseError
from router_svc import classifier
from router_svc.evaluate import load_labelled, parse_line, report
from router_svc.validate import request_view


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="roundhouse classify", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="models YAML with a routing section (default: the embedded one)")
    p.add_argument("--eval", metavar="FILE", help="labelled JSON lines (`expect`): print how the routing does on them")
    a = p.parse_args(argv)
    try:
        cat = load(a.config or stack.DEFAULT_CONFIG)
        if cat.routing is None:
            raise ConfigError(f"{a.config}: no routing section")
        predictor = classifier.for_routing(cat.routing, cat.resolve)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.eval:
        return _evaluate(cat, predictor, a.eval)
    status = 0
    for n, line in enumerate(sys.stdin, 1):
        if not line.strip():
            continue
        try:
            body = json.loads(line)
            request = parse_line(body)
        except (ValueError, RoundhouseError) as e:
            print(json.dumps({"line": n, "error": str(e)}), flush=True)
            status = 1
            continue
        route = routing.classify(cat.routing, request_view(request), predictor)
        print(json.dumps({"model": route.model, "reason": route.reason, **({"id": body["id"]} if "id" in body else {})}),
              flush=True)
    return status


def _evaluate(cat, predictor, path: str) -> int:
    try:
        labelled = load_labelled(path)
    except (OSError, ValueError) as e:
        print(f"error: {path}: {e}", file=sys.stderr)
        return 2
    rows = []
    for view, expected, ident in labelled:
        t = time.perf_counter()
        route = routing.classify(cat.routing, view, predictor)
        rows.append((expected, cat.resolve(route.model).name, ident, time.perf_counter() - t))
    what = "rules and classifier" if predictor is not None else "rules"
    print(f"{path}: {len(rows)} requests, routed by the {what}\n")
    print(report(rows, sorted({m.name for m in cat.models})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
