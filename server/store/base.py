"""The store's core: connecting, the write driver and the read pool, readiness, leases and the check's probe."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Generator, Sequence
from decimal import Decimal
from typing import Any

from databases import Database

from ..config import database_url
from ..errors import StorageUnavailableError
from . import schema
from .faults import as_storage_errors
from .leases import LEASE_KEY, LockFiles
from .postgres_writer import PostgresWriter
from .queries import ONE, Operation, Query, T
from .reads import Reads, SQLiteReaders
from .records import cost_nanos, cost_of_nanos, new_id, now
from .schema import Probe, RolledBack, migration_versions
from .sqlite_writer import SQLiteWriter
from .urls import databases_url, sqlite_path


class StoreBase:
    """The store's connections: one write driver, a bounded read pool, and what readiness and check ask of them.

    Writes are operations written once as generators of queries (see `Query`) and run
    by a driver: for SQLite a writer thread with its own sqlite3 connection that runs
    every queued operation in one transaction (one savepoint each); for PostgreSQL each
    operation at once on a connection of the pool, in a transaction of its own (see PostgresWriter).
    Through `databases`, a stream's start
    cost 2.7 ms of CPU in SQLAlchemy and driver hops; batched in the thread it costs
    about 0.06 ms (measured with 1,000 concurrent starts). Reads go through `reads`, at
    most `pool_size` at once: for SQLite that many connections opened at connect() (see
    `SQLiteReaders`), for PostgreSQL `databases` over asyncpg's pool of that size.
    """

    def __init__(self, url: str, group_commit: float = 0.0, pool_size: int = 10,
                 synchronous_answers: bool = True) -> None:
        self.url = database_url(url)
        self.group_commit = group_commit
        self.synchronous_answers = synchronous_answers  # PostgreSQL: answer_write() waits for the WAL flush
        self.is_sqlite = self.url.startswith("sqlite:")
        # PostgreSQL: asyncpg's pool holds pool_size connections for reads and one more, the writer's.
        options: dict[str, Any] = {} if self.is_sqlite else {"min_size": min(pool_size + 1, 10),
                                                              "max_size": pool_size + 1}
        if not self.is_sqlite:
            options["reset"] = _keep_session
        if not self.is_sqlite and not synchronous_answers:
            # Sessions start with the answers' setting: their writes, nearly all of them, need no SET (see
            # answer_write); every other write turns the flush back on for its own transaction.
            options["server_settings"] = {"synchronous_commit": "off"}
        self.db = Database(databases_url(self.url), **options)
        # SQLite: `databases` would open a connection, with a thread of its own, for every task that reads.
        self.reads: Reads = SQLiteReaders(sqlite_path(self.url), pool_size) if self.is_sqlite else self.db
        self._writer: SQLiteWriter | PostgresWriter | None = None
        self._locks = LockFiles(sqlite_path(url) + "-instances") if self.is_sqlite else None

    async def connect(self, migrate: bool = True) -> None:
        """Open the writer, apply the migrations not applied yet on a connection of their own (unless `migrate`
        is False: `deltarelay check` looks and changes nothing), then open the read pool."""
        await self.db.connect()
        if self.is_sqlite:
            self._writer = SQLiteWriter(sqlite_path(self.url), self.group_commit)
        else:
            self._writer = PostgresWriter(self.db,
                                          sessions_commit_synchronously=self.synchronous_answers)
        await self._writer.start()
        if migrate:
            with as_storage_errors():
                if not await self._writer.run(schema.at_head(self.is_sqlite)):
                    await schema.run_on(self.url, schema.upgrade)
        if isinstance(self.reads, SQLiteReaders):
            await self.reads.connect()  # after the writer made the file and its WAL

    async def disconnect(self) -> None:
        if isinstance(self.reads, SQLiteReaders):
            await self.reads.disconnect()
        if self._writer is not None:
            await self._writer.stop()
            self._writer = None
        if self._locks is not None:
            self._locks.release()
        await self.db.disconnect()

    async def write(self, operation: Operation[T]) -> T:
        """Run one operation (a generator of queries) in a transaction of its own.

        Raises:
            StorageUnavailableError: the database cannot take writes now; nothing of the operation is written.
        """
        if self._writer is None:
            raise RuntimeError("store is not connected")
        with as_storage_errors():
            return await self._writer.run(operation)

    async def answer_write(self, operation: Operation[T]) -> T:
        """Run one of an answer's own writes (a turn's start, its progress, its final save) like write().

        On PostgreSQL, unless `synchronous_answers`, its commit does not wait for the WAL flush
        (`synchronous_commit = off` for that transaction): the promise SQLite's synchronous=NORMAL makes. A
        crash of the relay loses nothing committed; a crash of the PostgreSQL server or its machine may undo
        the answers' writes of its last few hundred milliseconds (3 x wal_writer_delay), never half of one,
        and no other write (users, tokens, sessions, budgets, leases) ever. The flush costs 2-3 ms a commit
        on this project's test machine, and the start of every stream waits for one.

        Raises:
            StorageUnavailableError: as write().
        """
        if self._writer is None:
            raise RuntimeError("store is not connected")
        with as_storage_errors():
            if isinstance(self._writer, PostgresWriter) and not self.synchronous_answers:
                return await self._writer.run(operation, synchronous_commit=False)
            return await self._writer.run(operation)

    def _cost_param(self, cost: Decimal | None) -> Decimal | int | None:
        """A cost as the `cost` column takes it: NUMERIC USD on PostgreSQL, whole nano-dollars on SQLite.

        Raises:
            ValueError: finer than a nano-dollar, on either database (so both keep the same costs).
        """
        if cost is None:
            return None
        nanos = cost_nanos(cost)
        return nanos if self.is_sqlite else cost

    def _cost_value(self, value: Any) -> Decimal | None:
        """A `cost` column's value, or a SUM of it, as exact USD (None stays None)."""
        if value is None:
            return None
        if self.is_sqlite:
            return cost_of_nanos(int(value))
        # NUMERIC keeps the scale it was given: the same value reads the same on both databases.
        return Decimal(value).normalize() if value else Decimal(0)

    async def _fetch_all(self, sql: str, params: dict[str, Any] | None = None) -> Sequence[Any]:
        with as_storage_errors():
            return await self.reads.fetch_all(sql, params)

    async def _fetch_one(self, sql: str, params: dict[str, Any] | None = None) -> Any:
        with as_storage_errors():
            return await self.reads.fetch_one(sql, params)

    async def _fetch_val(self, sql: str, params: dict[str, Any] | None = None) -> Any:
        with as_storage_errors():
            return await self.reads.fetch_val(sql, params)

    async def ping(self) -> None:
        await self._fetch_val("SELECT 1")

    async def writable(self, within: float = 2.0) -> bool:
        """Whether a write can be made now: the writer wrote within the last second, or a probe write succeeds.

        What readiness reports: a ping only proves that reads work, and the writer holds a connection (and
        a disk) of its own.
        """
        writer = self._writer
        if writer is None:
            return False
        if writer.healthy and time.monotonic() - writer.last_ok < 1.0:
            return True

        def probe() -> Operation[None]:
            yield Query("UPDATE write_probe SET written_at = :t WHERE id = 1", {"t": now()})

        try:
            async with asyncio.timeout(within):
                await self.write(probe())
        except (StorageUnavailableError, TimeoutError):
            return False
        return True

    async def hold_instance(self, instance_id: str) -> None:
        """Take this process's instance lease, held until disconnect(): while it is held, no other process
        counts `instance_id`'s answers as left behind (see interrupt_unfinished)."""
        if self._locks is not None:
            self._locks.hold(instance_id)
        else:
            assert isinstance(self._writer, PostgresWriter)
            await self._writer.hold_lease(instance_id)

    def _lease_held(self, instance_id: str) -> Generator[Query, Any, bool]:
        """Whether some live process holds `instance_id`'s lease (a step of an operation)."""
        if self._locks is not None:
            return self._locks.held(instance_id)
        row = yield Query(f"SELECT pg_try_advisory_xact_lock({LEASE_KEY})", {"instance": instance_id}, ONE)
        # Taken: nobody held it. The lock is this transaction's and goes with it.
        return not row[0]

    async def probe(self) -> Probe:
        """Prove the writer can write what the server will write next, and leave no trace.

        In one transaction of the writer, rolled back at the end: with the schema up to date, a conversation
        is inserted, updated and deleted (what a stream start needs); with migrations pending, a table is
        created and written (what applying them at start needs). It also reads which migrations are applied.

        Raises:
            Exception: the driver's error for the first statement that failed.
        """
        sqlite = self.is_sqlite

        def operation() -> Operation[Probe]:
            version = yield Query("SELECT sqlite_version()" if sqlite else "SHOW server_version", {}, ONE)
            server = f"{'SQLite' if sqlite else 'PostgreSQL'} {str(version[0]).split()[0]}"
            applied = yield from schema.read_applied(sqlite)
            known = migration_versions()
            # Before the migration that makes it, there is no users table: after it, there are no users.
            tables = yield Query(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'users'" if sqlite else
                "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = current_schema()"
                " AND table_name = 'users'", {}, ONE)
            users = 0
            if tables[0]:
                counted = yield Query("SELECT COUNT(*) FROM users WHERE revoked_at IS NULL", {}, ONE)
                users = int(counted[0])
            if set(known) <= applied:
                wrote = "inserted, updated and deleted a conversation"
                stamp, conversation = now(), "deltarelay-check-" + new_id()
                yield Query("INSERT INTO conversations (id, agent_id, title, created_at, updated_at, owner_id)"
                            " VALUES (:id, 'check', 'check', :t, :t, NULL)", {"id": conversation, "t": stamp})
                yield Query("UPDATE conversations SET updated_at = :t WHERE id = :id",
                            {"id": conversation, "t": now()})
                yield Query("DELETE FROM conversations WHERE id = :id", {"id": conversation})
            else:
                wrote = "created a table and wrote a row"
                yield Query("CREATE TABLE deltarelay_check (id TEXT PRIMARY KEY)")
                yield Query("INSERT INTO deltarelay_check (id) VALUES (:id)", {"id": new_id()})
            probe = Probe(applied, known, users, server, wrote)
            raise RolledBack(probe)

        try:
            await self.write(operation())
        except RolledBack as done:
            return done.probe
        raise AssertionError("the probe always rolls back")


async def _keep_session(connection: Any) -> None:
    """What a pooled PostgreSQL connection needs on release beyond asyncpg's own rollback of an open
    transaction: nothing. No statement of the store SETs a session setting, LISTENs, keeps a cursor past its
    transaction or takes a session advisory lock, but the writer's own session, which is terminated, never
    released. asyncpg's default reset (advisory unlock, CLOSE ALL, UNLISTEN, RESET ALL) is one more round
    trip for every operation, a stream's start and its save among them."""

