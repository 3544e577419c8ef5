"""Labelled requests, read as the router reads requests, and the figures of a classification
run over them (accuracy, per-model precision and recall, the confusion matrix, the slowest
decisions). Used by `roundhouse classify --eval` and by `router_svc.train_classifier`."""
from __future__ import annotations

import json
import pathlib

from protos.v1 import router_pb2
from roundhouse import routing
from roundhouse.errors import RoundhouseError
from router_svc import openai_api
from router_svc.validate import request_view

_ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}


def parse_line(body: dict) -> router_pb2.GenerateRequest:
    """One JSON line (an OpenAI chat or completions body, optionally with `endpoint`) as the
    router's own parser reads it; ValueError / RoundhouseError when it would refuse it."""
    if not isinstance(body, dict):
        raise ValueError("each line must be a JSON object")
    endpoint = body.get("endpoint") or ("chat" if "messages" in body else "completions")
    endpoint = _ENDPOINTS.get(endpoint, endpoint)
    if endpoint not in routing.ENDPOINTS:
        raise ValueError(f"endpoint: must be one of {', '.join(routing.ENDPOINTS)}")
    fields = {k: v for k, v in body.items() if k not in ("endpoint", "expect", "id", "lang", "kind")}
    fields.setdefault("model", "auto")
    request, _ = openai_api.parse(fields, endpoint)
    return request


def load_labelled(path: str | pathlib.Path) -> list[tuple[routing.RequestView, str, str]]:
    """(view, expected label, id) for each line of a labelled file; ValueError naming the line
    for one that is not a labelled request."""
    out = []
    for n, line in enumerate(pathlib.Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            body = json.loads(line)
            view = request_view(parse_line(body))
            if not isinstance(body.get("expect"), str):
                raise ValueError('"expect" (the right model) is required')
        except (ValueError, RoundhouseError) as e:
            raise ValueError(f"line {n}: {e}") from e
        out.append((view, body["expect"], str(body.get("id", f"line {n}"))))
    return out


def report(rows: list[tuple[str, str, str, float]], labels: list[str], slowest: int = 5) -> str:
    """`rows`: (expected, got, id, seconds) per request."""
    n = len(rows)
    right = sum(e == g for e, g, _, _ in rows)
    lines = [f"accuracy {right}/{n} = {100 * right / max(1, n):.1f}%", "",
             f"{'model':<12} {'precision':>9} {'recall':>7} {'n':>5}"]
    names = sorted(set(labels) | {e for e, *_ in rows} | {g for _, g, *_ in rows})
    for name in names:
        tp = sum(e == g == name for e, g, _, _ in rows)
        predicted = sum(g == name for _, g, _, _ in rows)
        actual = sum(e == name for e, _, _, _ in rows)
        precision = f"{100 * tp / predicted:.1f}%" if predicted else "-"
        recall = f"{100 * tp / actual:.1f}%" if actual else "-"
        lines.append(f"{name:<12} {precision:>9} {recall:>7} {actual:>5}")
    lines += ["", "confusion (rows: expected, columns: got)", " " * 12 + "".join(f"{g:>11}" for g in names)]
    for e in names:
        lines.append(f"{e:<12}" + "".join(f"{sum(x == e and y == g for x, y, _, _ in rows):>11}" for g in names))
    wrong = [(i, e, g) for e, g, i, _ in rows if e != g]
    if wrong:
        lines += ["", "misses: " + ", ".join(f"{i} ({e} -> {g})" for i, e, g in wrong[:40])
                  + (f" and {len(wrong) - 40} more" if len(wrong) > 40 else "")]
    if slowest:
        times = sorted((s for *_, s in rows), reverse=True)
        p99 = times[min(len(times) - 1, len(times) // 100)] if times else 0.0
        lines += ["", f"decision time p50 {1e3 * times[len(times) // 2]:.3f} ms, p99 {1e3 * p99:.3f} ms; slowest:"]
        for e, g, i, s in sorted(rows, key=lambda r: r[3], reverse=True)[:slowest]:
            lines.append(f"  {1e3 * s:8.3f} ms  {i}")
    return "\n".join(lines)
