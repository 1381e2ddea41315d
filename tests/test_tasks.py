"""stop_tasks: a background task that swallows a cancel is cancelled again, so shutdown never hangs."""

from __future__ import annotations

import asyncio
import logging

import pytest

from server.tasks import stop_tasks


async def test_a_task_that_swallows_its_first_cancel_is_cancelled_again_until_it_ends():
    """A plain `cancel(); await task` hangs forever on this task (what redis-py's timeouts can do)."""
    swallowed = 0

    async def loop_that_swallows_one_cancel() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1  # a library that turned our cancel into "try again"

    task = asyncio.create_task(loop_that_swallows_one_cancel())
    await asyncio.sleep(0)
    async with asyncio.timeout(5):
        await stop_tasks([task])
    assert task.cancelled() and swallowed == 1


async def test_a_task_that_never_stops_is_given_up_on_and_named_in_the_log(caplog: pytest.LogCaptureFixture):
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                pass

    task = asyncio.create_task(stubborn(), name="stubborn-task")
    await asyncio.sleep(0)
    with caplog.at_level(logging.ERROR, logger="deltarelay.tasks"):
        async with asyncio.timeout(5):
            await stop_tasks([task], give_up_after=1.0)
    assert not task.done()
    assert "stubborn-task" in caplog.text
    release.set()
    task.cancel()
    await task


async def test_tasks_that_end_with_an_error_are_stopped_without_raising_it():
    async def fails() -> None:
        raise ValueError("its own to log")

    task = asyncio.create_task(fails())
    await asyncio.sleep(0)
    await stop_tasks([task])
    assert isinstance(task.exception(), ValueError)
