"""Stopping asyncio tasks for sure.

`task.cancel()` then `await gather(task)` can wait for ever on Python 3.11: `asyncio.wait_for`
drops a cancellation that arrives in the loop turn its inner future completes
(https://github.com/python/cpython/issues/86296, fixed in 3.12 by basing wait_for on
asyncio.timeout). nats-py awaits every request and JetStream publish through wait_for, so a
task cancelled while its PubAck is arriving runs on; a job cancelled that way at a router's stop
went on to wait for its tokens, and the stop with it (tests/integration/test_jobs.py, where the
test's own deadline found it). Here a task still running after a cancel is cancelled again.
"""
from __future__ import annotations

import asyncio
from collections.abc import Iterable

# How long a cancelled task gets to end before it is cancelled again: long enough for the
# cleanup a cancel starts (a job's nak, a worker's hand-back: one NATS round trip, which this
# machine can stall for a second or more) not to be cut short by the second cancel; a task whose
# cancel was dropped only holds its stop this much longer.
RECANCEL_S = 5.0


async def cancel_all(tasks: Iterable[asyncio.Future], recancel_s: float = RECANCEL_S) -> None:
    """Cancels `tasks` and returns once every one has ended, cancelling again those that
    outlive `recancel_s` after a cancel. Their results and exceptions are left unread (as
    gather(..., return_exceptions=True) would), apart from being retrieved so none is logged
    as never retrieved."""
    tasks = list(tasks)   # read twice below
    pending = {t for t in tasks if not t.done()}
    while pending:
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=recancel_s)
    for t in tasks:
        if t.done() and not t.cancelled():
            t.exception()
