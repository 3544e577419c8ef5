"""roundhouse.tasks.cancel_all: a task whose cancel asyncio.wait_for dropped still ends."""
from __future__ import annotations

import asyncio
import sys

import pytest

from roundhouse import tasks

pytestmark = pytest.mark.unit


def _publish_then_wait(reply: asyncio.Future, after: list) -> asyncio.Task:
    """A task shaped like a job's run: a request through wait_for (as nats-py's), then a wait
    for events that never come."""
    async def run() -> None:
        after.append(await asyncio.wait_for(reply, 10))
        await asyncio.Event().wait()
    return asyncio.create_task(run())


async def _cancelled_as_its_reply_lands(recancel: bool) -> asyncio.Task:
    reply, after = asyncio.get_running_loop().create_future(), []
    task = _publish_then_wait(reply, after)
    await asyncio.sleep(0)          # the task is now inside wait_for
    reply.set_result("ack")         # the reply and the cancel in one loop turn
    if recancel:
        async with asyncio.timeout(5):
            await tasks.cancel_all([task], recancel_s=0.05)
    else:
        task.cancel()
        await asyncio.wait([task], timeout=0.2)
    return task


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="wait_for keeps the cancel from 3.12 on")
async def test_one_cancel_is_lost_when_it_lands_with_the_reply():
    task = await _cancelled_as_its_reply_lands(recancel=False)
    assert not task.done(), "the premise: wait_for returned the reply and dropped the cancel"
    task.cancel()
    await asyncio.wait([task], timeout=5)
    assert task.cancelled()


async def test_cancel_all_ends_it_anyway():
    task = await _cancelled_as_its_reply_lands(recancel=True)
    assert task.cancelled()


async def test_cancel_all_leaves_finished_tasks_and_their_errors_alone():
    async def fails() -> None:
        raise ValueError("boom")

    done, failed = asyncio.create_task(asyncio.sleep(0)), asyncio.create_task(fails())
    await asyncio.wait([done, failed])
    async with asyncio.timeout(5):
        await tasks.cancel_all([done, failed, asyncio.create_task(asyncio.sleep(60))])
    assert not done.cancelled() and isinstance(failed.exception(), ValueError)
