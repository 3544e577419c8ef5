"""`roundhouse classify`: which model each request would get, offline.

    python -m router_svc.classify [--config FILE] < requests.jsonl

JSON lines in, {"model", "reason"} lines out. A line is an OpenAI chat or completions body
(`messages` or `prompt`, optional `metadata`), optionally with `endpoint` and `id`; it is read by
the router's own parser and classified by the router's own rules, so what it prints is what the
router would do. Exit status 1 if any line was refused (its line says why), 2 for a bad config.
"""
from __future__ import annotations

import argparse
import json
import sys

from roundhouse import routing, stack
from roundhouse.catalogue import ConfigError, load
from roundhouse.errors import RoundhouseError
from router_svc import openai_api
from router_svc.validate import request_view

_ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="roundhouse classify", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="models YAML with a routing section (default: the embedded one)")
    a = p.parse_args(argv)
    try:
        cat = load(a.config or stack.DEFAULT_CONFIG)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cat.routing is None:
        print(f"error: {a.config}: no routing section", file=sys.stderr)
        return 2
    status = 0
    for n, line in enumerate(sys.stdin, 1):
        if not line.strip():
            continue
        try:
            body = json.loads(line)
            if not isinstance(body, dict):
                raise ValueError("each line must be a JSON object")
            endpoint = body.get("endpoint") or ("chat" if "messages" in body else "completions")
            endpoint = _ENDPOINTS.get(endpoint, endpoint)
            if endpoint not in routing.ENDPOINTS:
                raise ValueError(f"endpoint: must be one of {', '.join(routing.ENDPOINTS)}")
            request, _ = openai_api.parse(body, endpoint)
        except (ValueError, RoundhouseError) as e:
            print(json.dumps({"line": n, "error": str(e)}), flush=True)
            status = 1
            continue
        route = routing.classify(cat.routing, request_view(request))
        print(json.dumps({"model": route.model, "reason": route.reason, **({"id": body["id"]} if "id" in body else {})}),
              flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
