"""Which delivery of a request this is, and how many real attempts it has had: pure functions.

JetStream counts every delivery of a message against the consumer's `max_deliver`, including
the ones a worker hands back through no fault of the request (its engine is not ready, it is
being evicted, the worker is shutting down). Counted that way, an innocent request could use up
its budget while models swapped and be dropped. So a hand-back does not `nak` the message: it
publishes a copy carrying two headers and `term`s the original, and the copy starts with a fresh
JetStream count:

  Rh-Deliveries-Before  deliveries of the earlier copies: `number` keeps increasing across
                        copies, which the router's splice guard needs (it accepts chunks only
                        from the newest generation);
  Rh-Attempts-Before    real attempts of the earlier copies. An earlier delivery of *this*
                        copy counts as a real attempt: a hand-back would have made a new copy,
                        so a redelivery means the worker died (or froze) while running it. A
                        worker that knows better (it held the request through a redelivery after
                        a late heartbeat, which is no attempt) writes its own count into the
                        copy; an engine death while a request ran alone is such a copy too.

A request is stopped after MAX_ATTEMPTS real attempts with an error that says why: it may be
what kills the engine, and retrying it forever would take every other request down with it.

An engine that dies running several requests does not say which one killed it, and counting the
death against all of them would let one poison request use up the budget of every request that
shared its batches. So such a death is no attempt: each request is handed back marked

  Rh-Suspect            it was in an engine that died with others. A worker runs a suspect
                        alone in its engine: if the engine dies then, the suspect killed it,
                        and that is a real attempt.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

DELIVERIES_BEFORE = "Rh-Deliveries-Before"
ATTEMPTS_BEFORE = "Rh-Attempts-Before"
SUSPECT = "Rh-Suspect"
MAX_ATTEMPTS = 3


@dataclasses.dataclass(frozen=True)
class Delivery:
    number: int      # this generation's number for the router, increasing across copies
    attempts: int    # real attempts before this one
    suspect: bool = False   # it was in an engine that died with others: run it alone

    @property
    def exhausted(self) -> bool:
        return self.attempts >= MAX_ATTEMPTS


def _count(headers: Mapping[str, str] | None, name: str) -> int:
    try:
        return max(0, int((headers or {}).get(name, 0)))
    except ValueError:  # not ours to trust blindly: a bad header counts as none
        return 0


def delivery(headers: Mapping[str, str] | None, num_delivered: int) -> Delivery:
    """The Delivery of a message with these headers, delivered `num_delivered` times (>= 1)."""
    n = max(1, num_delivered)
    return Delivery(number=_count(headers, DELIVERIES_BEFORE) + n, attempts=_count(headers, ATTEMPTS_BEFORE) + n - 1,
                    suspect=(headers or {}).get(SUSPECT) == "1")


def copy_headers(original: Mapping[str, str] | None, d: Delivery, stream_seq: int, suspect: bool = False) -> dict[str, str]:
    """Headers of the copy that replaces message `stream_seq`, handed back at delivery `d` (a
    hand-back is no attempt); `suspect`: its engine died with others in it (a suspect stays one).
    A message is handed back once (it is removed after), so its sequence makes the copy's id: a
    retried publish of the same copy is stored once."""
    headers = {**(original or {}), DELIVERIES_BEFORE: str(d.number), ATTEMPTS_BEFORE: str(d.attempts),
               "Nats-Msg-Id": f"rh-copy-of-{stream_seq}"}
    if suspect:
        headers[SUSPECT] = "1"
    return headers
