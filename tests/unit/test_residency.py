import asyncio

import pytest
from structlog.testing import capture_logs

from worker_svc.residency import IllegalTransition, Residency, State

pytestmark = pytest.mark.unit


async def test_transitions_follow_the_table_and_log_one_event_each():
    r = Residency("m")
    with capture_logs() as logs:
        await r.set(State.LOADING)
        await r.set(State.READY)
        await r.set(State.EVICTING)
        await r.set(State.UNLOADED)
    assert [(e["old"], e["new"]) for e in logs if e["event"] == "residency.changed"] == [
        ("UNLOADED", "LOADING"), ("LOADING", "READY"), ("READY", "EVICTING"), ("EVICTING", "UNLOADED")]
    with pytest.raises(IllegalTransition):
        await r.set(State.READY)


async def test_an_engine_death_unloads_with_its_reason_and_a_load_clears_it():
    r = Residency("m")
    await r.set(State.LOADING)
    await r.set(State.READY)
    await r.set(State.UNLOADED, error="roundhouse: engine died: boom")  # not FAILED: the files are fine
    assert r.error == "roundhouse: engine died: boom"
    await r.set(State.LOADING)
    assert r.error == ""


async def test_waiters_wake_on_the_state_they_wait_for():
    r = Residency("m")
    waiter = asyncio.ensure_future(r.ready())
    await r.set(State.LOADING)
    await asyncio.sleep(0)
    assert not waiter.done()
    await r.set(State.READY)
    await asyncio.wait_for(waiter, 1)


async def test_failed_keeps_the_reason_and_allows_a_retry():
    r = Residency("m")
    await r.set(State.LOADING)
    await r.set(State.FAILED, error="OSError: bad weights")
    assert r.error == "OSError: bad weights"
    await r.set(State.LOADING)
    assert r.error == ""
