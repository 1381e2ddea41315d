"""The SQLite write driver: one thread, one sqlite3 connection, queued operations committed in batches."""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
import time
from typing import Any

from .faults import one_line, unavailable
from .queries import ALL, ONE, Operation, Query, T, drive

log = logging.getLogger("deltarelay.store")


def use_wal(connection: sqlite3.Connection, timeout: float = 10.0) -> None:
    """Put the file in WAL mode (it stays so), waiting up to `timeout` seconds for other connections' writes.

    Changing the journal mode takes no busy wait: while another connection holds a transaction (a second
    store's migration on the same new file) it fails at once with `database is locked`, so this retries.

    Raises:
        sqlite3.OperationalError: still locked after `timeout` seconds, or any other error at once.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            if connection.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                connection.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.02)


class SQLiteWriter:
    """A thread with one sqlite3 connection: each batch of queued operations is one transaction.

    Group commit: while writes keep coming (a batch within the last 10 x `group_commit` seconds), the thread
    waits `group_commit` seconds after the first queued operation so that those arriving meanwhile share its
    transaction. A commit, the thread's wake-up and the event loop's wake-up cost about as much as the
    statements of a stream's start, and 500 starts a second otherwise come one per batch. An operation
    after a quiet spell runs at once.
    """

    def __init__(self, path: str, group_commit: float = 0.0) -> None:
        self.path = path
        self.group_commit = group_commit
        self.healthy = True  # the last batch was written (False: the file could not take it, e.g. a full disk)
        self.last_ok = 0.0  # time.monotonic() of the last batch written
        self._sleep = time.sleep  # tests replace it
        self._jobs: queue.SimpleQueue[tuple[Operation[Any], asyncio.Future[Any]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(target=self._main, args=(ready,), name="sqlite-writer", daemon=True)
        self._thread.start()
        await ready

    async def stop(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    def run(self, operation: Operation[T]) -> asyncio.Future[T]:
        assert self._loop is not None
        done: asyncio.Future[T] = self._loop.create_future()
        self._jobs.put((operation, done))
        return done

    def _main(self, ready: asyncio.Future[None]) -> None:
        assert self._loop is not None
        try:
            connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10)
            # WAL: readers never wait for the writer. NORMAL: no fsync per commit, still crash-safe.
            use_wal(connection)
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute("PRAGMA foreign_keys=ON")
            # A batch's savepoints journal in memory: past 64 KB SQLite would open a temporary file, which fails
            # (`unable to open database file`) when sockets hold every file descriptor the process may have.
            connection.execute("PRAGMA temp_store=MEMORY")
        except sqlite3.Error as exc:
            self._loop.call_soon_threadsafe(_settle_error, ready, exc)
            return
        started: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = [(ready, None, None)]
        self._loop.call_soon_threadsafe(_settle, started)
        busy_until = 0.0
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    return
                batch = [job]
                if self.group_commit and time.monotonic() < busy_until:
                    self._sleep(self.group_commit)
                while len(batch) < 500:
                    try:
                        more = self._jobs.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        self._jobs.put(None)
                        break
                    batch.append(more)
                self._loop.call_soon_threadsafe(_settle, self._run_batch(connection, batch))
                busy_until = time.monotonic() + 10 * self.group_commit
        finally:
            connection.close()

    def _run_batch(
        self, connection: sqlite3.Connection, batch: list[tuple[Operation[Any], asyncio.Future[Any]]]
    ) -> list[tuple[asyncio.Future[Any], Any, BaseException | None]]:
        outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        try:
            connection.execute("BEGIN IMMEDIATE")
            for operation, done in batch:
                connection.execute("SAVEPOINT op")
                try:
                    result = drive(operation, lambda q: _sqlite_query(connection, q))
                except Exception as exc:
                    if isinstance(exc, sqlite3.Error) and unavailable(exc):
                        raise  # the file cannot take this batch (SQLite may have rolled it back already)
                    connection.execute("ROLLBACK TO op")
                    outcomes.append((done, None, exc))
                else:
                    outcomes.append((done, result, None))
                connection.execute("RELEASE op")
            connection.execute("COMMIT")
        except sqlite3.Error as exc:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            if not unavailable(exc):
                log.exception("SQLite write batch failed")
            elif self.healthy:
                self.healthy = False
                log.warning("SQLite writes fail (%s): answers are kept and saved when the file takes writes"
                            " again", one_line(exc))
            return [(done, None, exc) for _, done in batch]
        if not self.healthy:
            self.healthy = True
            log.warning("SQLite writes work again")
        self.last_ok = time.monotonic()
        return outcomes


def _sqlite_query(connection: sqlite3.Connection, query: Query) -> Any:
    cursor = connection.execute(query.sql, query.params)
    if query.fetch == ONE:
        return cursor.fetchone()
    if query.fetch == ALL:
        return cursor.fetchall()
    return None



def _settle(outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for done, result, error in outcomes:
        if done.cancelled():
            continue
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)


def _settle_error(done: asyncio.Future[Any], error: BaseException) -> None:
    if not done.cancelled():
        done.set_exception(error)


