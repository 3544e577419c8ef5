"""router_svc.demand: the manager hears of a model's requests at once, then at most once a period."""
from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from router_svc.demand import DemandSignal


class Clock:
    """A fake loop: `now` and `call_later`, with `advance` running what falls due."""

    def __init__(self) -> None:
        self.t = 0.0
        self.timers: list[tuple[float, object, str]] = []

    def now(self) -> float:
        return self.t

    def call_later(self, delay: float, fn, arg) -> None:
        assert delay >= 0
        self.timers.append((self.t + delay, fn, arg))

    def advance(self, to: float) -> None:
        while True:
            due = sorted((t for t in self.timers if t[0] <= to), key=lambda t: t[0])
            if not due:
                break
            self.timers.remove(due[0])
            self.t = due[0][0]
            due[0][1](due[0][2])
        self.t = to


def _signal(every_s: float = 0.05):
    clock, sent = Clock(), []
    return DemandSignal(lambda m: sent.append((clock.t, m)), clock.now, clock.call_later, every_s), clock, sent


def test_the_first_request_is_told_at_once_and_a_burst_once_more_at_the_periods_end():
    signal, clock, sent = _signal()
    signal.queued("chat")
    assert sent == [(0.0, "chat")]
    for t in (0.01, 0.02, 0.03):
        clock.advance(t)
        signal.queued("chat")
    assert sent == [(0.0, "chat")]           # held: one message will cover them
    clock.advance(0.2)
    assert sent == [(0.0, "chat"), (0.05, "chat")]


def test_models_are_paced_apart():
    signal, clock, sent = _signal()
    signal.queued("chat")
    signal.queued("code")
    assert [m for _, m in sent] == ["chat", "code"]


def test_a_request_after_a_quiet_period_is_told_at_once():
    signal, clock, sent = _signal()
    signal.queued("chat")
    clock.advance(1.0)
    signal.queued("chat")
    assert sent == [(0.0, "chat"), (1.0, "chat")]


@given(st.lists(st.floats(min_value=0, max_value=2, allow_nan=False), min_size=1, max_size=40))
def test_every_request_is_told_within_a_period_and_no_period_carries_more_than_one(times):
    every = 0.05
    signal, clock, sent = _signal(every)
    for t in sorted(times):
        clock.advance(t)
        signal.queued("chat")
        # told at or after the request: a message sent before it said nothing of it
        assert not clock.timers and sent[-1][0] == t or any(t <= due <= t + every + 1e-9 for due, _, _ in clock.timers)
    clock.advance(10)
    at = [t for t, _ in sent]
    assert all(b - a >= every - 1e-9 for a, b in zip(at, at[1:]))
    for t in times:
        assert any(t <= s <= t + every + 1e-9 for s in at)
