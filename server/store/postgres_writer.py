"""The PostgreSQL write driver: a task holding one `databases` connection, reconnecting by itself."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from databases import Database
from databases.core import Connection

from ..errors import StorageUnavailableError
from .faults import one_line, unavailable
from .leases import LEASE_KEY
from .queries import ALL, ONE, Operation, Query, T

log = logging.getLogger("deltarelay.store")


class PostgresWriter:
    """One task holding one `databases` connection (PostgreSQL): an operation per transaction.

    A lost connection (a restart, a cut network) is replaced, with backoff up to RECONNECT_MAX_DELAY apart.
    While there is none, an operation fails at once with StorageUnavailableError instead of waiting: a
    request gets its 503 now, and the core retries an answer's save by itself. A connection found closed
    before an operation starts is replaced first, so the first write after a restart succeeds. The
    instance lease (an advisory lock of the writer's session) is taken again on every new connection.
    """

    RECONNECT_FIRST_DELAY = 0.05
    RECONNECT_MAX_DELAY = 1.0

    def __init__(self, db: Database) -> None:
        self.db = db
        self.healthy = False  # a connection is open (False: every operation fails at once until there is one)
        self.last_ok = 0.0  # time.monotonic() of the last operation written
        self.instance_id: str | None = None
        self._jobs: collections.deque[tuple[Operation[Any], asyncio.Future[Any]]] = collections.deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        ready = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._main(ready), name="store-writer")
        await ready  # the first connection must work: a server that cannot reach its database does not start

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self._fail_waiting(StorageUnavailableError("the store is closed"))

    def run(self, operation: Operation[T]) -> asyncio.Future[T]:
        done: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        if not self.healthy:
            done.set_exception(StorageUnavailableError("the database is not reachable; try again shortly",
                                                       retry_after=1.0))
            return done
        self._jobs.append((operation, done))
        self._wake.set()
        return done

    async def hold_lease(self, instance_id: str) -> None:
        """Take `instance_id`'s advisory lock on the writer's session, now and after every reconnect."""
        self.instance_id = instance_id

        def take() -> Operation[bool]:
            row = yield Query(f"SELECT pg_try_advisory_lock({LEASE_KEY})", {"instance": instance_id}, ONE)
            return bool(row[0])

        if not await self.run(take()):
            log.warning("the lease of instance %s is held by another session", instance_id)

    def _fail_waiting(self, error: Exception) -> None:
        while self._jobs:
            _, done = self._jobs.popleft()
            if not done.done():
                done.set_exception(error)

    async def _main(self, ready: asyncio.Future[None]) -> None:
        delay = self.RECONNECT_FIRST_DELAY
        while True:
            try:
                async with self.db.connection() as connection:
                    try:
                        if self.instance_id is not None:
                            if not await connection.fetch_val(f"SELECT pg_try_advisory_lock({LEASE_KEY})",
                                                              {"instance": self.instance_id}):
                                log.warning("the lease of instance %s is held by another session", self.instance_id)
                        else:
                            await connection.execute("SELECT 1")
                        if ready.done() and not self.healthy:
                            log.warning("PostgreSQL writes work again")
                        self.healthy = True
                        if not ready.done():
                            ready.set_result(None)
                        delay = self.RECONNECT_FIRST_DELAY
                        await self._serve(connection)
                    except BaseException:
                        _terminate(connection)  # so that releasing it has nothing left to reset
                        raise
                continue  # the connection was found closed before an operation: replace it at once
            except Exception as exc:
                if not ready.done():
                    ready.set_exception(exc)
                    return
                if not unavailable(exc):
                    log.exception("the PostgreSQL writer's connection failed")
                if self.healthy:
                    log.warning("PostgreSQL writes fail (%s): reconnecting; answers are kept and saved when it is"
                                " back", one_line(exc))
                self.healthy = False
                self._fail_waiting(StorageUnavailableError("the database is not reachable; try again shortly",
                                                           retry_after=1.0))
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.RECONNECT_MAX_DELAY)

    async def _serve(self, connection: Connection) -> None:
        """Run operations until the connection is lost: return when it was found closed before one (which
        waits for the next connection), raise when it failed during one (which has failed)."""
        while True:
            while not self._jobs:
                self._wake.clear()
                await self._wake.wait()
            operation, done = self._jobs[0]
            if done.cancelled():
                self._jobs.popleft()
                continue
            if _closed(connection):
                return
            self._jobs.popleft()
            try:
                async with connection.transaction():
                    result = await _drive_async(operation, connection)
            except Exception as exc:
                if not done.cancelled():
                    done.set_exception(exc)
                # A full disk fails the write but leaves the connection usable; anything else needs a new one.
                full = isinstance(exc, asyncpg.InsufficientResourcesError)
                if unavailable(exc) and (_closed(connection) or not full):
                    raise
            else:
                self.last_ok = time.monotonic()
                if not done.cancelled():
                    done.set_result(result)


def _closed(connection: Connection) -> bool:
    try:
        return bool(connection.raw_connection.is_closed())
    except (asyncpg.InterfaceError, AssertionError):  # released back to the pool: closed under us
        return True


def _terminate(connection: Connection) -> None:
    try:
        connection.raw_connection.terminate()
    except (asyncpg.InterfaceError, AssertionError):
        pass


async def _drive_async(operation: Operation[T], connection: Connection) -> T:
    try:
        query = next(operation)
        while True:
            if query.fetch == ONE:
                rows: Any = await connection.fetch_one(query.sql, query.params)
            elif query.fetch == ALL:
                rows = await connection.fetch_all(query.sql, query.params)
            else:
                rows = await connection.execute(query.sql, query.params or None)
            query = operation.send(rows)
    except StopIteration as stop:
        result: T = stop.value
        return result
