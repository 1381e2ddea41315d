"""The PostgreSQL write driver: each operation on a pooled connection in its own transaction, concurrently."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import time
from collections.abc import Iterator
from decimal import Decimal
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
    """Operations run at once, each on a connection of asyncpg's pool and in a transaction of its own.

    Operations run concurrently: PostgreSQL's row locks order the ones that touch the same rows, and each
    commits or rolls back alone. One session of the writer's own holds the instance lease (an advisory lock,
    taken again on every new session) and stands for the database's health: when an operation finds the
    database gone, the session checks its own connection and, if it is lost too, is replaced with backoff up to
    RECONNECT_MAX_DELAY apart. While there is none, an operation fails at once with StorageUnavailableError
    instead of waiting: a request gets its 503 now, and the core retries an answer's save by itself. The pool
    replaces the connections it finds closed, so the first write after a restart succeeds.
    """

    RECONNECT_FIRST_DELAY = 0.05
    RECONNECT_MAX_DELAY = 1.0

    def __init__(self, db: Database, sessions_commit_synchronously: bool = True) -> None:
        self.db = db
        # The pool's sessions start with this synchronous_commit (Store sets it in the connection's settings);
        # an operation that asks for the other one sets it for its own transaction.
        self.sessions_commit_synchronously = sessions_commit_synchronously
        self.healthy = False  # the session is open (False: every operation fails at once until it is again)
        self.last_ok = 0.0  # time.monotonic() of the last operation written
        self.instance_id: str | None = None
        self._session: Connection | None = None
        self._lost = asyncio.Event()  # an operation found the database unreachable: the session checks itself
        self._running: dict[asyncio.Task[None], asyncio.Future[Any]] = {}
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
        running, self._running = self._running, {}
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        for done in running.values():
            if not done.done():
                done.set_exception(StorageUnavailableError("the store is closed"))

    def run(self, operation: Operation[T], synchronous_commit: bool = True) -> asyncio.Future[T]:
        """Start `operation` now; its future is settled when it has committed (or failed, having written
        nothing). Cancelling the future does not stop an operation that has started. With
        `synchronous_commit` False its commit does not wait for the WAL to reach the disk (see
        Store.answer_write for what that gives up)."""
        done: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        if not self.healthy:
            done.set_exception(StorageUnavailableError("the database is not reachable; try again shortly",
                                                       retry_after=1.0))
            return done
        task = asyncio.create_task(self._run(operation, done, synchronous_commit), name="store-write")
        self._running[task] = done
        task.add_done_callback(self._finished)
        return done

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.pop(task, None)

    async def _run(self, operation: Operation[T], done: asyncio.Future[T], synchronous_commit: bool) -> None:
        try:
            async with self.db.connection() as connection:
                try:
                    raw = connection.raw_connection
                    setting = None if synchronous_commit == self.sessions_commit_synchronously else (
                        "SET LOCAL synchronous_commit = " + ("on" if synchronous_commit else "off"))
                    try:
                        query = next(operation)
                    except StopIteration as stop:
                        result = stop.value  # nothing to write
                    else:
                        if query.alone and setting is None:
                            # One statement commits by itself: no BEGIN and COMMIT round trips.
                            result = await _drive_async(operation, query, raw)
                        else:
                            async with raw.transaction():
                                if setting is not None:
                                    await raw.execute(setting)
                                result = await _drive_async(operation, query, raw)
                except BaseException as exc:
                    if not isinstance(exc, Exception) or unavailable(exc):
                        _terminate(connection)  # so that releasing it has nothing left to reset
                    raise
        except Exception as exc:
            # A full disk fails the write but leaves connections usable; anything else may be a lost database.
            if unavailable(exc) and not isinstance(exc, asyncpg.InsufficientResourcesError):
                self._lost.set()
            if not done.done():
                done.set_exception(exc)
        else:
            self.last_ok = time.monotonic()
            if not done.done():
                done.set_result(result)

    async def hold_lease(self, instance_id: str) -> None:
        """Take `instance_id`'s advisory lock on the writer's session, now and after every reconnect."""
        self.instance_id = instance_id
        session = self._session
        if session is None:
            raise StorageUnavailableError("the database is not reachable; try again shortly", retry_after=1.0)
        if not await session.fetch_val(f"SELECT pg_try_advisory_lock({LEASE_KEY})", {"instance": instance_id}):
            log.warning("the lease of instance %s is held by another session", instance_id)

    async def _main(self, ready: asyncio.Future[None]) -> None:
        delay = self.RECONNECT_FIRST_DELAY
        while True:
            try:
                async with self.db.connection() as session:
                    try:
                        if self.instance_id is not None:
                            if not await session.fetch_val(f"SELECT pg_try_advisory_lock({LEASE_KEY})",
                                                           {"instance": self.instance_id}):
                                log.warning("the lease of instance %s is held by another session", self.instance_id)
                        else:
                            await session.execute("SELECT 1")
                        if ready.done() and not self.healthy:
                            log.warning("PostgreSQL writes work again")
                        self._session = session
                        self.healthy = True
                        if not ready.done():
                            ready.set_result(None)
                        delay = self.RECONNECT_FIRST_DELAY
                        await self._watch(session)
                    except BaseException:
                        self._session = None
                        _terminate(session)  # so that releasing it has nothing left to reset
                        raise
            except Exception as exc:
                if not ready.done():
                    ready.set_exception(exc)
                    return
                if not unavailable(exc):
                    log.exception("the PostgreSQL writer's session failed")
                if self.healthy:
                    log.warning("PostgreSQL writes fail (%s): reconnecting; answers are kept and saved when it is"
                                " back", one_line(exc))
                self.healthy = False
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.RECONNECT_MAX_DELAY)

    async def _watch(self, session: Connection) -> None:
        """Return never; raise when the session is lost: checked each time an operation found the database
        unreachable, and looked at every second (a restart closes it; its lease goes with it)."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._lost.wait()
            if _closed(session):
                raise ConnectionError("the writer's session was closed")
            if self._lost.is_set():
                self._lost.clear()
                await session.execute("SELECT 1")


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


async def _drive_async(operation: Operation[T], query: Query, connection: asyncpg.Connection) -> T:
    """Run `operation`'s queries, from its first one `query` on, on an asyncpg connection, as `databases`
    would run them: the same statements and parameters (:name becomes $n; Decimal is sent as its text, as
    `databases` sends it), rows by position, by name and through `_mapping`; a statement without rows gives
    its first value.

    Raises:
        RuntimeError: a statement marked `alone` was followed by another (which is not run).
    """
    try:
        while True:
            sql, names = positional(query.sql)
            args = [_argument(query.params[name]) for name in names]
            if query.fetch == ONE:
                row = await connection.fetchrow(sql, *args)
                rows: Any = None if row is None else Row(row)
            elif query.fetch == ALL:
                rows = [Row(row) for row in await connection.fetch(sql, *args)]
            else:
                rows = await connection.fetchval(sql, *args)
            alone = query.alone
            query = operation.send(rows)
            if alone:
                raise RuntimeError(f"a statement marked alone was followed by another: {query.sql[:60]}")
    except StopIteration as stop:
        result: T = stop.value
        return result


# `:name`, not the second colon of a `::type` cast: the rule of SQLAlchemy's text(), which ran these statements
# before (a `:word` inside a string literal is a parameter for both).
_NAMED = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


@functools.lru_cache(maxsize=1024)
def positional(sql: str) -> tuple[str, tuple[str, ...]]:
    """`sql` with each :name replaced by $n (the same n for the same name), and the names in $ order.

    Cached per statement: `databases` compiled every statement through SQLAlchemy on every call, which was
    about 12% of an instance's CPU in a burst of stream starts (bench.scaleout --profile)."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    return _NAMED.sub(number, sql), tuple(names)


def _argument(value: Any) -> Any:
    return str(value) if isinstance(value, Decimal) else value


class Row:
    """An asyncpg record read as `databases` gives rows: by position or name, and `_mapping`."""

    __slots__ = ("_record",)

    def __init__(self, record: asyncpg.Record) -> None:
        self._record = record

    def __getitem__(self, key: int | str) -> Any:
        return self._record[key]

    def __len__(self) -> int:
        return len(self._record)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._record.values())

    @property
    def _mapping(self) -> dict[str, Any]:
        return dict(self._record.items())
