"""How long routing takes a decision: the embedded rules against ordinary and hostile content.

    .venv/bin/python -m tests.bench.bench_classify [--runs 2000]

Runs `roundhouse.routing.classify` (what the router runs on its event loop for every `auto`
request) with the embedded routing (its rules and the shipped classifier) on: a 2,000-token chat conversation (~8,000 characters of
prose and code, then a question), a 2,000-token last message (the classifier reads the last
message), the same in Korean (character pairs), and bodies built to be hard for regular expressions (the shapes that took
Python's backtracking `re` seconds, and 16 MiB bodies). Prints p50 / p99 / max per input. Issue
10's bounds: 1 ms p99 for the conversation, 10 ms for a 16 MiB body. Asserts nothing.
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import time

from roundhouse import catalogue, routing
from router_svc import classifier

TURNS = [
    "Hi! I'm putting together a small inventory service for our warehouse team and want a sanity check.",
    "Sure, tell me about it: what does it store and who calls it?",
    "It stores items, their bins and counts. Pickers call it from handhelds; the ERP syncs nightly. "
    "Here is the current handler:\n```python\n@app.post('/items/{sku}/pick')\nasync def pick(sku: str, n: int):\n"
    "    item = await db.fetch_one('SELECT * FROM items WHERE sku = :sku', {'sku': sku})\n"
    "    if item is None:\n        raise HTTPException(404)\n    if item['count'] < n:\n        raise HTTPException(409)\n"
    "    await db.execute('UPDATE items SET count = count - :n WHERE sku = :sku', {'n': n, 'sku': sku})\n"
    "    return {'left': item['count'] - n}\n```",
    "Two pickers can read the same count and both succeed: the check and the update race. Make the "
    "UPDATE conditional (WHERE count >= :n) and look at the rows it changed, or lock the row.",
    "Makes sense. What about the nightly ERP sync overwriting counts that changed during the day?",
    "Sync deltas, not absolute counts: record each pick as an event with a sequence number, and have "
    "the ERP apply the events after its last acknowledged sequence. Then nothing the pickers did is lost.",
]


def conversation(tokens: int = 2000) -> tuple[str, ...]:
    """About `tokens` tokens (~4 characters each) of alternating turns."""
    out: list[str] = []
    while sum(len(t) for t in out) < 4 * tokens:
        out.extend(TURNS)
    return (*out, "So overall, is an event log the right design here, or is it overkill for a warehouse this size?")


HOSTILE = {
    "8,000 newlines": ("\n" * 8000,),
    "'select ' x 4,000": ("select " * 4000,),
    "stack-frame prefixes x 100,000": ("  at x(" * 100_000,),
    "'def ' x 50,000 lines": ("def \n" * 50_000,),
    "16 MiB of newlines": ("\n" * 2**24,),
    "16 MiB on one line": ("a (" * (2**24 // 3),),
    "16 MiB over 4,096 messages": tuple("x = (" * 800 for _ in range(4096)),
}


def timings(spec: routing.RoutingSpec, texts: tuple[str, ...], runs: int, predictor) -> list[float]:
    req = routing.RequestView("chat", texts, {})
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        routing.classify(spec, req, predictor)
        out.append(time.perf_counter() - t)
    return out


def main(a: argparse.Namespace) -> None:
    cat = catalogue.load(pathlib.Path(routing.__file__).parent / "defaults" / "cpu.yaml")
    spec, predictor = cat.routing, classifier.for_routing(cat.routing, cat.resolve)
    cases = {"2,000-token conversation": conversation(), "2,000-token last message": ("\n\n".join(TURNS) * 3,),
             "2,000-token message, Korean": ("이 코드의 동시성 문제를 분석해 주세요. 두 요청이 같은 재고를 읽으면 " * 100,),
             **HOSTILE}
    print("the embedded routing: metadata rules, the shipped classifier, content rules")
    print(f"{'input':<34} {'chars':>10} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}  model")
    for name, texts in cases.items():
        runs = a.runs if sum(map(len, texts)) < 2**20 else max(20, a.runs // 20)
        ts = sorted(timings(spec, texts, runs, predictor))
        model = routing.classify(spec, routing.RequestView("chat", texts, {}), predictor).model
        p99 = ts[min(len(ts) - 1, int(0.99 * len(ts)))]
        print(f"{name:<34} {sum(map(len, texts)):>10} {statistics.median(ts) * 1e3:>8.3f} {p99 * 1e3:>8.3f} "
              f"{ts[-1] * 1e3:>8.3f}  {model}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=2000)
    main(p.parse_args())
