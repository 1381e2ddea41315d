"""Stopping background tasks for certain, even when a library swallows a cancel.

redis-py's connection code can absorb a `CancelledError` that lands inside its own timeout
(redis/redis-py#2028, #2551): the task then goes on with its loop and a plain `cancel(); await` waits
forever. `stop_tasks` cancels again until every task has ended.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

log = logging.getLogger("deltarelay.tasks")

RECANCEL_SECONDS = 0.5


async def stop_tasks(given: Iterable[asyncio.Task[object]], *, give_up_after: float = 30.0) -> None:
    """Cancel `given` and return once each has ended, cancelling again every RECANCEL_SECONDS a task runs on.

    A task still running after `give_up_after` seconds is logged and left behind (the caller is shutting
    down; it must not hang). What the tasks raised is not re-raised: it was theirs to log.
    """
    tasks = list(given)  # read twice below: a generator would be empty the second time
    pending = {task for task in tasks if not task.done()}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + give_up_after
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=min(RECANCEL_SECONDS, max(0.0, deadline - loop.time())))
        if pending and loop.time() >= deadline:
            log.error("%d background tasks did not stop when cancelled: %s",
                      len(pending), ", ".join(sorted(task.get_name() for task in pending)))
            return
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: no "exception was never retrieved" at exit
