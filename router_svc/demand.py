"""The router's word to the manager that requests for a model were queued (`rh.evt.request`).

The manager reads a model's queue when it hears this, so a cold model's load starts at once
rather than at its next poll. One message per request was more than that needs: each cost the
manager about 0.17 ms of CPU and this router a socket write of its own (bench_per_request:
manager 0.165-0.22 ms per request at 300 requests/s), while the manager reads one busy
queue at most every 0.1 s anyway (manager_svc READ_EVERY_S). So per model: the first request
after a quiet period is told at once; the requests within the next EVERY_S are told once, at
the end of that period. The manager never hears later than EVERY_S after a request, and always
after its JetStream ack (the callers call `queued` once the ack is in).
"""
from __future__ import annotations

from collections.abc import Callable

EVERY_S = 0.05   # at most one message per model per period (two at a period's edges)


class DemandSignal:
    """`send(model)` at most once per `every_s` per model, leading and trailing edge.

    `now()` and `call_later(delay, fn, arg)` are the event loop's in service (`loop.time`,
    `loop.call_later`); a test passes its own."""

    def __init__(self, send: Callable[[str], None], now: Callable[[], float],
                 call_later: Callable[..., object], every_s: float = EVERY_S) -> None:
        self._send = send
        self._now = now
        self._call_later = call_later
        self._every_s = every_s
        self._last: dict[str, float] = {}       # model -> when it was last sent
        self._due: set[str] = set()              # models with a send scheduled at their period's end

    def queued(self, model: str) -> None:
        """A request for `model` is in its queue (acked by JetStream)."""
        if model in self._due:
            return
        now = self._now()
        last = self._last.get(model)
        if last is None or now - last >= self._every_s:
            self._last[model] = now
            self._send(model)
            return
        self._due.add(model)
        self._call_later(last + self._every_s - now, self._trailing, model)

    def _trailing(self, model: str) -> None:
        self._due.discard(model)
        self._last[model] = self._now()
        self._send(model)
