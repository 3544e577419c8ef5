"""The router's delivery inbox: batches read on a stream's thread reach the loop in order, in bursts."""
from __future__ import annotations

import asyncio
import threading

import pytest

from router_svc.delivery import _Inbox

pytestmark = pytest.mark.unit


async def test_items_put_from_another_thread_arrive_in_order_and_coalesce():
    loop = asyncio.get_running_loop()
    calls: list[list[int]] = []
    done = asyncio.Event()

    def apply(items):
        calls.append(items)
        if sum(len(c) for c in calls) == 1000:
            done.set()

    inbox = _Inbox(loop, apply)
    gate = threading.Event()

    def producer():
        inbox.put(0)          # schedules the first callback...
        gate.wait(5)          # ...which cannot run before the loop is free again
        for i in range(1, 1000):
            inbox.put(i)

    t = threading.Thread(target=producer)
    t.start()
    await asyncio.sleep(0)
    gate.set()
    await asyncio.to_thread(t.join, 5)
    await asyncio.wait_for(done.wait(), 5)
    assert [i for c in calls for i in c] == list(range(1000))
    assert len(calls) < 1000 / 2, f"items that arrive while a callback is pending ride along ({len(calls)} calls)"
