"""Persistence: conversations and messages through `databases` (SQLite or PostgreSQL).

Writes go through one writer that holds one connection: SQLite allows one writer
at a time, so serialising writes here means concurrent streams never meet
`database is locked`, and no stream opens a connection of its own. Reads go through
a bounded pool: for SQLite a fixed set of connections opened at start, for PostgreSQL
asyncpg's pool. Schema changes are the ordered SQL files in migrations/.

A database that cannot be reached or cannot take writes (a restart, a full disk) is
StorageUnavailableError (503, retryable) on every read and write, never a driver's
own exception; the PostgreSQL writer reconnects by itself. Each process holds an
instance lease in the database's own terms (a locked file beside a SQLite file, an
advisory lock on PostgreSQL), so a starting process leaves alone the answers of any
other process still alive.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import logging
import os
import queue
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import aiosqlite
import asyncpg  # type: ignore[import-untyped]
from databases import Database
from databases.core import Connection

from .config import database_url
from .errors import NotFoundError, StorageUnavailableError, TooLargeError

log = logging.getLogger("deltarelay.store")

MIGRATIONS = Path(__file__).with_name("migrations")
T = TypeVar("T")


class Status(StrEnum):
    STREAMING = "streaming"
    COMPLETE = "complete"
    ERROR = "error"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"


def now() -> str:
    """UTC time as ISO 8601 text with microseconds: sorts as text, portable across databases."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_id() -> str:
    """32 random hex digits: uuid4().hex's form, without building a UUID (five ids each stream start)."""
    return secrets.token_hex(16)


def storable_id(value: str) -> bool:
    """An id that may reach a query: ours are hex; anything else from a URL is simply not found."""
    return 0 < len(value) <= 200 and value.isprintable()


class FinishedElsewhereError(Exception):
    """A save found its message already finished (by another process, or a survivor instance): nothing written."""


# SQLite result codes (the low byte of an extended code) that say the file cannot take the write now, as
# opposed to a wrong statement: busy or locked past the timeout, out of memory, read-only, I/O, full, unopenable.
_SQLITE_UNAVAILABLE = {5, 6, 7, 8, 10, 13, 14}


def unavailable(exc: BaseException) -> bool:
    """Whether `exc` says the database cannot be reached or cannot take writes now (retrying later may work)."""
    if isinstance(exc, StorageUnavailableError):
        return True
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        return code is not None and code & 0xFF in _SQLITE_UNAVAILABLE
    # PostgreSQL: class 08 (connection), 53 (disk full, out of memory, too many connections), 57 (shutting
    # down, starting up); asyncpg's InterfaceError is a connection it has closed; OSError a refused connect.
    return isinstance(exc, (asyncpg.PostgresConnectionError, asyncpg.InsufficientResourcesError,
                            asyncpg.OperatorInterventionError, asyncpg.InterfaceError, OSError, TimeoutError))


def storage_error(exc: BaseException) -> StorageUnavailableError:
    """The user-facing error for a database that cannot be used now; the cause stays in the logs."""
    if isinstance(exc, StorageUnavailableError):
        return exc
    return StorageUnavailableError("the database cannot take this request now; try again shortly",
                                   retry_after=1.0)


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:200]


@contextlib.contextmanager
def _as_storage_errors() -> Iterator[None]:
    """A database that cannot be used now raises StorageUnavailableError out of this block; other errors pass."""
    try:
        yield
    except Exception as exc:
        if unavailable(exc):
            raise storage_error(exc) from exc
        raise


def databases_url(url: str) -> str:
    """The `databases` URL for a DATABASE_URL: SQLite through aiosqlite, PostgreSQL through asyncpg.

    `databases` hands asyncpg the host, port, user, password and database of the URL and, of its
    parameters, only `ssl`, `min_size` and `max_size`: libpq's `sslmode` goes to it as `ssl`.
    """
    url = database_url(url)
    if url.startswith("sqlite:"):
        return "sqlite+aiosqlite:" + url[len("sqlite:"):]
    parts = urlsplit(url)
    query = [("ssl" if name == "sslmode" else name, value) for name, value in parse_qsl(parts.query)]
    return urlunsplit(parts._replace(scheme="postgresql+asyncpg", query=urlencode(query)))


def asyncpg_dsn(url: str) -> str:
    """A PostgreSQL DATABASE_URL as `asyncpg.connect()` reads it (libpq's form: the pool sizes dropped)."""
    parts = urlsplit(database_url(url))
    query = [(name, value) for name, value in parse_qsl(parts.query) if name == "sslmode"]
    return urlunsplit(parts._replace(query=urlencode(query)))


@dataclass(frozen=True, slots=True)
class Turn:
    """What the core needs to run one answer: ids and the history to send upstream."""

    conversation_id: str
    user_message_id: str
    assistant_message_id: str
    history: list[dict[str, str]]
    trace_session_id: str = ""


@dataclass(frozen=True, slots=True)
class Reply:
    """The final state of an assistant message, saved once when its stream ends."""

    content: str
    thinking: str
    model: str
    status: Status
    stop_reason: str | None
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int
    cost: Decimal | None
    cost_estimated: bool = False
    error_code: str | None = None
    # When it was finished (see now()), fixed once per answer: a save retried after a commit whose reply was
    # lost finds its own earlier write by it, and counts as done rather than as finished elsewhere.
    finished_at: str | None = None


@dataclass(slots=True)
class UsageRow:
    """Sums over a group of answers; cost is exact, over the answers that have a price."""

    key: str
    messages: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cost: Decimal = field(default_factory=Decimal)
    unpriced: int = 0  # answers of a model without a price: counted, not costed

    def add(self, input_tokens: int, output_tokens: int, cache_write: int, cache_read: int, cost: str | None) -> None:
        self.messages += 1
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens
        self.cache_creation_input_tokens += cache_write
        self.cache_read_input_tokens += cache_read
        if cost is None:
            self.unpriced += 1
        else:
            self.cost += Decimal(cost)

    def merge(self, other: UsageRow) -> None:
        self.messages += other.messages
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cache_creation_input_tokens += other.cache_creation_input_tokens
        self.cache_read_input_tokens += other.cache_read_input_tokens
        self.cost += other.cost
        self.unpriced += other.unpriced


class Store:
    """Conversations and messages.

    Writes are operations written once as generators of queries (see `Query`) and run
    by a driver: for SQLite a writer thread with its own sqlite3 connection that runs
    every queued operation in one transaction (one savepoint each); for PostgreSQL the
    `databases` connection of one writer task. Through `databases`, a stream's start
    cost 2.7 ms of CPU in SQLAlchemy and driver hops; batched in the thread it costs
    about 0.06 ms (measured with 1,000 concurrent starts). Reads go through `reads`, at
    most `pool_size` at once: for SQLite that many connections opened at connect() (see
    `_SQLiteReaders`), for PostgreSQL `databases` over asyncpg's pool of that size.
    """

    def __init__(self, url: str, group_commit: float = 0.0, pool_size: int = 10) -> None:
        self.url = database_url(url)
        self.group_commit = group_commit
        self.is_sqlite = self.url.startswith("sqlite:")
        # PostgreSQL: asyncpg's pool holds pool_size connections for reads and one more, the writer's.
        sizes: dict[str, Any] = {} if self.is_sqlite else {"min_size": min(pool_size + 1, 10),
                                                            "max_size": pool_size + 1}
        self.db = Database(databases_url(self.url), **sizes)
        # SQLite: `databases` would open a connection, with a thread of its own, for every task that reads.
        self.reads: Reads = _SQLiteReaders(sqlite_path(self.url), pool_size) if self.is_sqlite else self.db
        self._writer: _SQLiteWriter | _AsyncWriter | None = None
        self._locks = _LockFiles(sqlite_path(url) + "-instances") if self.is_sqlite else None

    async def connect(self, migrate: bool = True) -> None:
        """Open the read pool and the writer, then apply the migrations not applied yet (unless `migrate` is
        False: `deltarelay check` looks and changes nothing)."""
        await self.db.connect()
        if self.is_sqlite:
            self._writer = _SQLiteWriter(sqlite_path(self.url), self.group_commit)
        else:
            self._writer = _AsyncWriter(self.db)
        await self._writer.start()
        if migrate:
            await self.write(_migrate(postgresql=not self.is_sqlite))
        if isinstance(self.reads, _SQLiteReaders):
            await self.reads.connect()  # after the writer made the file and its WAL

    async def disconnect(self) -> None:
        if isinstance(self.reads, _SQLiteReaders):
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
        with _as_storage_errors():
            return await self._writer.run(operation)

    async def _fetch_all(self, sql: str, params: dict[str, Any] | None = None) -> Sequence[Any]:
        with _as_storage_errors():
            return await self.reads.fetch_all(sql, params)

    async def _fetch_one(self, sql: str, params: dict[str, Any] | None = None) -> Any:
        with _as_storage_errors():
            return await self.reads.fetch_one(sql, params)

    async def _fetch_val(self, sql: str, params: dict[str, Any] | None = None) -> Any:
        with _as_storage_errors():
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
            assert isinstance(self._writer, _AsyncWriter)
            await self._writer.hold_lease(instance_id)

    def _lease_held(self, instance_id: str) -> Generator[Query, Any, bool]:
        """Whether some live process holds `instance_id`'s lease (a step of an operation)."""
        if self._locks is not None:
            return self._locks.held(instance_id)
        row = yield Query(f"SELECT pg_try_advisory_xact_lock({_LEASE_KEY})", {"instance": instance_id}, ONE)
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
            yield Query(_SCHEMA_MIGRATIONS)
            rows = yield Query("SELECT version FROM schema_migrations", {}, ALL)
            applied = frozenset(int(row[0]) for row in rows)
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
            raise _RolledBack(probe)

        try:
            await self.write(operation())
        except _RolledBack as done:
            return done.probe
        raise AssertionError("the probe always rolls back")

    async def begin_turn(
        self,
        *,
        conversation_id: str | None,
        agent_id: str,
        user_text: str,
        model: str,
        stream_id: str,
        task_trace_id: str,
        trace_session_id: str | None = None,
        owner_id: str | None = None,
        max_history: int | None = None,
        instance_id: str | None = None,
    ) -> Turn:
        """Save the user's message and an empty assistant message; return the history to send.

        `instance_id` names the server instance that generates the answer (see interrupt_unfinished).

        Raises:
            NotFoundError: conversation_id names no conversation of owner_id; nothing is saved.
            TooLargeError: the conversation already holds max_history messages; nothing is saved.
        """

        def operation() -> Operation[Turn]:
            stamp = now()
            history: list[dict[str, str]] = []
            if conversation_id is None:
                conv_id = new_id()
                title = " ".join(user_text.split())[:80] or "New conversation"
                yield Query(
                    "INSERT INTO conversations (id, agent_id, title, created_at, updated_at, owner_id)"
                    " VALUES (:id, :agent, :title, :t, :t, :owner)",
                    {"id": conv_id, "agent": agent_id, "title": title, "t": stamp, "owner": owner_id},
                )
                seq = 0
            else:
                conv_id = conversation_id
                found = yield Query("SELECT owner_id FROM conversations WHERE id = :id", {"id": conv_id}, ONE)
                # Another user's conversation is "not found": its existence is not theirs to learn.
                if found is None or found[0] != owner_id:
                    raise NotFoundError(f"conversation {conv_id} not found")
                rows = yield Query(
                    "SELECT role, content, seq FROM messages WHERE conversation_id = :id ORDER BY seq",
                    {"id": conv_id}, ALL,
                )
                if max_history is not None and len(rows) + 2 > max_history:
                    raise TooLargeError(
                        f"this conversation has {len(rows)} messages and the limit is {max_history};"
                        " start a new conversation", code="history_too_long")
                history = _history([(row[0], row[1]) for row in rows])
                seq = (rows[-1][2] + 1) if rows else 0
                yield Query("UPDATE conversations SET updated_at = :t WHERE id = :id", {"t": stamp, "id": conv_id})
            user_id, assistant_id = new_id(), new_id()
            insert = (
                "INSERT INTO messages (id, conversation_id, seq, role, content, model, status, stream_id,"
                " trace_session_id, task_trace_id, created_at, completed_at, instance_id)"
                " VALUES (:id, :conv, :seq, :role, :content, :model, :status, :stream, :ts, :tt, :t, :done, :instance)"
            )
            # One trace session per conversation unless the caller names one.
            trace_session = trace_session_id or conv_id
            common = {"conv": conv_id, "stream": stream_id, "ts": trace_session, "tt": task_trace_id,
                      "t": stamp, "instance": instance_id}
            yield Query(
                insert,
                {**common, "id": user_id, "seq": seq, "role": "user", "content": user_text, "model": None,
                 "status": Status.COMPLETE.value, "done": stamp},
            )
            yield Query(
                insert,
                {**common, "id": assistant_id, "seq": seq + 1, "role": "assistant", "content": "", "model": model,
                 "status": Status.STREAMING.value, "done": None},
            )
            history.append({"role": "user", "content": user_text})
            return Turn(conv_id, user_id, assistant_id, _history([(m["role"], m["content"]) for m in history]),
                        trace_session)

        return await self.write(operation())

    async def save_reply(self, message_id: str, reply: Reply) -> None:
        """Write an assistant message's final state; a message is finished exactly once.

        RETURNING makes the check and the write one atomic statement. A retry of a save whose commit went
        through (its reply lost with the connection) matches its own write by `reply.finished_at`.

        Raises:
            FinishedElsewhereError: the message was already finished (by another process perhaps); nothing
                is written.
            StorageUnavailableError: the database cannot take the write now; retrying later may work.
        """
        finished_at = reply.finished_at or now()

        def operation() -> Operation[bool]:
            rows = yield Query(
                "UPDATE messages SET content = :content, thinking = :thinking, model = :model, status = :status,"
                " stop_reason = :stop, input_tokens = :inp, output_tokens = :out,"
                " cache_creation_input_tokens = :cw, cache_read_input_tokens = :cr, cost = :cost,"
                " cost_estimated = :est, error_code = :err, completed_at = :t"
                " WHERE id = :id AND (status = :streaming OR (status = :status AND completed_at = :t)) RETURNING id",
                {
                    "content": reply.content, "thinking": reply.thinking, "model": reply.model,
                    "status": reply.status.value, "stop": reply.stop_reason, "inp": reply.input_tokens,
                    "out": reply.output_tokens, "cw": reply.cache_creation_input_tokens,
                    "cr": reply.cache_read_input_tokens,
                    "cost": None if reply.cost is None else format(reply.cost, "f"),
                    "est": 1 if reply.cost_estimated else 0, "err": reply.error_code, "t": finished_at,
                    "id": message_id, "streaming": Status.STREAMING.value,
                },
                ALL,
            )
            return bool(rows)

        if not await self.write(operation()):
            raise FinishedElsewhereError(f"message {message_id} was already finished")

    async def save_progress(self, replies: Collection[tuple[str, Reply]]) -> None:
        """Write the text and usage so far of answers still `streaming` (a crash then loses only what came
        since); a message already finished is left as it is. The status stays `streaming`.

        Raises:
            StorageUnavailableError: the database cannot take the write now.
        """

        def operation() -> Operation[None]:
            for message_id, reply in replies:
                yield Query(
                    "UPDATE messages SET content = :content, thinking = :thinking, model = :model,"
                    " input_tokens = :inp, output_tokens = :out, cache_creation_input_tokens = :cw,"
                    " cache_read_input_tokens = :cr, cost = :cost, cost_estimated = :est"
                    " WHERE id = :id AND status = :streaming",
                    {
                        "content": reply.content, "thinking": reply.thinking, "model": reply.model,
                        "inp": reply.input_tokens, "out": reply.output_tokens,
                        "cw": reply.cache_creation_input_tokens, "cr": reply.cache_read_input_tokens,
                        "cost": None if reply.cost is None else format(reply.cost, "f"),
                        "est": 1 if reply.cost_estimated else 0, "id": message_id,
                        "streaming": Status.STREAMING.value,
                    },
                )

        await self.write(operation())

    async def interrupt_unfinished(self, live_instances: Collection[str] = ()) -> int:
        """Mark messages left `streaming` by instances that are gone as `interrupted`, keeping their text.

        Gone: not in `live_instances` (what the hub knows is alive) and holding no instance lease (see
        hold_instance), or named by no instance at all (an answer from before instances were recorded).
        The check and the update are one transaction, so an instance that starts meanwhile is never touched.
        """
        live = set(live_instances)

        def operation() -> Operation[int]:
            params: dict[str, Any] = {"s": Status.STREAMING.value}
            rows = yield Query("SELECT DISTINCT instance_id FROM messages WHERE status = :s", params, ALL)
            gone: list[str] = []
            for row in rows:
                instance = row[0]
                if instance is None or instance in live:
                    continue
                if not (yield from self._lease_held(instance)):
                    gone.append(instance)
            named = {f"i{n}": instance for n, instance in enumerate(gone)}
            clause = "instance_id IS NULL" + (f" OR instance_id IN ({', '.join(f':{k}' for k in named)})"
                                              if named else "")
            params.update(named)
            found = yield Query(f"SELECT COUNT(*) FROM messages WHERE status = :s AND ({clause})", params, ONE)
            if found[0]:
                yield Query(f"UPDATE messages SET status = :i, completed_at = :t WHERE status = :s AND ({clause})",
                            {"i": Status.INTERRUPTED.value, "t": now(), **params})
            return int(found[0])

        return await self.write(operation())

    async def interrupt_instance(self, instance_id: str) -> int:
        """Mark the `streaming` messages of an instance that is gone as `interrupted` (what Redis did not know).

        An instance whose lease is still held is alive whatever Redis says: nothing of it is touched.
        """

        def operation() -> Operation[int]:
            if (yield from self._lease_held(instance_id)):
                return 0
            params = {"s": Status.STREAMING.value, "instance": instance_id}
            rows = yield Query("SELECT id FROM messages WHERE status = :s AND instance_id = :instance", params,
                               ALL)
            yield Query(
                "UPDATE messages SET status = :i, completed_at = :t"
                " WHERE status = :s AND instance_id = :instance",
                {"i": Status.INTERRUPTED.value, "t": now(), **params},
            )
            return len(rows)

        return await self.write(operation())

    async def list_conversations(self, owner_id: str | None = None, limit: int = 100,
                                 every_owner: bool = False) -> list[dict[str, Any]]:
        """The most recent conversations of owner_id (None: made in open mode), or of everyone."""
        select = (
            "SELECT c.id, c.agent_id, c.title, c.created_at, c.updated_at, c.owner_id,"
            " (SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id) AS message_count"
            " FROM conversations c"
        )
        order = " ORDER BY c.updated_at DESC, c.id LIMIT :limit"
        if every_owner:
            rows = await self._fetch_all(select + order, {"limit": limit})
        elif owner_id is None:
            rows = await self._fetch_all(select + " WHERE c.owner_id IS NULL" + order, {"limit": limit})
        else:
            rows = await self._fetch_all(select + " WHERE c.owner_id = :owner" + order,
                                           {"limit": limit, "owner": owner_id})
        conversations = [dict(row._mapping) for row in rows]
        costs: dict[str, Decimal] = {}
        if conversations:
            ids = {f"c{i}": c["id"] for i, c in enumerate(conversations)}
            cost_rows = await self._fetch_all(
                "SELECT conversation_id, cost FROM messages WHERE cost IS NOT NULL AND conversation_id IN ("
                + ", ".join(f":{key}" for key in ids) + ")",
                ids,
            )
            for row in cost_rows:
                costs[row[0]] = costs.get(row[0], Decimal(0)) + Decimal(row[1])
        for conversation in conversations:
            conversation["total_cost"] = costs.get(conversation["id"])
        return conversations

    async def get_conversation(self, conversation_id: str) -> dict[str, Any]:
        if not storable_id(conversation_id):
            raise NotFoundError("conversation not found")
        row = await self._fetch_one(
            "SELECT c.id, c.agent_id, c.title, c.created_at, c.updated_at, c.owner_id,"
            " (SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id) AS message_count"
            " FROM conversations c WHERE c.id = :id",
            {"id": conversation_id},
        )
        if row is None:
            raise NotFoundError(f"conversation {conversation_id} not found")
        conversation = dict(row._mapping)
        conversation["total_cost"] = await self._conversation_cost(conversation_id)
        return conversation

    async def _conversation_cost(self, conversation_id: str) -> Decimal | None:
        # Costs are exact decimal text: sum them as Decimal, never as SQL floats.
        rows = await self._fetch_all(
            "SELECT cost FROM messages WHERE conversation_id = :id AND cost IS NOT NULL", {"id": conversation_id}
        )
        return sum((Decimal(row[0]) for row in rows), Decimal(0)) if rows else None

    async def list_messages(self, conversation_id: str) -> list[dict[str, Any]]:
        await self.get_conversation(conversation_id)
        rows = await self._fetch_all(
            "SELECT id, conversation_id, seq, role, content, thinking, model, status, stop_reason, input_tokens,"
            " output_tokens, cache_creation_input_tokens, cache_read_input_tokens, cost, cost_estimated,"
            " error_code, stream_id, trace_session_id, task_trace_id, created_at, completed_at"
            " FROM messages WHERE conversation_id = :id ORDER BY seq",
            {"id": conversation_id},
        )
        return [dict(row._mapping) for row in rows]

    async def answer_of_stream(self, stream_id: str) -> str | None:
        """The id of the assistant message a stream produced, if any."""
        if not storable_id(stream_id):
            return None
        row = await self._fetch_one(
            "SELECT id FROM messages WHERE stream_id = :s AND role = 'assistant'", {"s": stream_id}
        )
        return None if row is None else str(row[0])

    async def get_message(self, message_id: str) -> dict[str, Any] | None:
        row = await self._fetch_one("SELECT * FROM messages WHERE id = :id", {"id": message_id})
        return None if row is None else dict(row._mapping)

    async def owner_of_stream(self, stream_id: str) -> tuple[bool, str | None]:
        """(whether the stream is known, the id of the user whose conversation it answers)."""
        if not storable_id(stream_id):
            return False, None
        row = await self._fetch_one(
            "SELECT c.owner_id FROM messages m JOIN conversations c ON c.id = m.conversation_id"
            " WHERE m.stream_id = :s AND m.role = 'assistant'", {"s": stream_id}
        )
        return (False, None) if row is None else (True, row[0])

    async def spent_since(self, owner_id: str | None, since: str) -> Decimal:
        """The exact sum of the costs of owner_id's answers finished at or after `since`."""
        owner_clause = "c.owner_id IS NULL" if owner_id is None else "c.owner_id = :owner"
        params: dict[str, Any] = {"since": since}
        if owner_id is not None:
            params["owner"] = owner_id
        rows = await self._fetch_all(
            "SELECT m.cost FROM messages m JOIN conversations c ON c.id = m.conversation_id"
            f" WHERE {owner_clause} AND m.cost IS NOT NULL AND m.completed_at >= :since", params
        )
        return sum((Decimal(row[0]) for row in rows), Decimal(0))

    async def history_bytes(self, conversation_id: str, owner_id: str | None) -> int:
        """The UTF-8 size of a conversation's messages, which an answer in it sends upstream (0: not owner_id's)."""
        if not storable_id(conversation_id):
            return 0
        size = "LENGTH(CAST(m.content AS BLOB))" if self.is_sqlite else "OCTET_LENGTH(m.content)"
        owner_clause = "c.owner_id IS NULL" if owner_id is None else "c.owner_id = :owner"
        params: dict[str, Any] = {"id": conversation_id}
        if owner_id is not None:
            params["owner"] = owner_id
        total = await self.reads.fetch_val(
            f"SELECT COALESCE(SUM({size}), 0) FROM messages m JOIN conversations c ON c.id = m.conversation_id"
            f" WHERE m.conversation_id = :id AND {owner_clause}", params)
        return int(total or 0)

    async def usage(self, start: str, end: str, group_by: str, owner_id: str | None = None,
                    every_owner: bool = False) -> list[UsageRow]:
        """Token and cost sums of the answers finished in [start, end), grouped by day, model, agent or user.

        Costs are summed as Decimal in Python: SQL SUM over decimal text would go through floats.
        """
        params: dict[str, Any] = {"start": start, "end": end}
        where = "m.role = 'assistant' AND m.completed_at >= :start AND m.completed_at < :end"
        if not every_owner:
            if owner_id is None:
                where += " AND c.owner_id IS NULL"
            else:
                where += " AND c.owner_id = :owner"
                params["owner"] = owner_id
        rows = await self._fetch_all(
            "SELECT m.completed_at, m.model, c.agent_id, COALESCE(u.name, 'anonymous'), m.input_tokens,"
            " m.output_tokens, m.cache_creation_input_tokens, m.cache_read_input_tokens, m.cost"
            " FROM messages m JOIN conversations c ON c.id = m.conversation_id"
            f" LEFT JOIN users u ON u.id = c.owner_id WHERE {where}", params)
        column = {"day": 0, "model": 1, "agent": 2, "user": 3}[group_by]
        groups: dict[str, UsageRow] = {}
        for row in rows:
            key = str(row[0])[:10] if column == 0 else str(row[column] or "unknown")
            group = groups.get(key)
            if group is None:
                group = groups[key] = UsageRow(key)
            group.add(row[4], row[5], row[6], row[7], row[8])
        return [groups[key] for key in sorted(groups)]

    # --- Users, tokens and sessions (only hashes of secrets are stored) ---

    async def add_user(self, name: str, token_hash: str, admin: bool = False) -> str:
        """A new user's id.

        Raises:
            ValueError: a user of that name exists (revoked or not).
        """

        def operation() -> Operation[str]:
            taken = yield Query("SELECT id FROM users WHERE name = :name", {"name": name}, ONE)
            if taken is not None:
                raise ValueError(f"a user named {name!r} already exists")
            user_id = new_id()
            yield Query(
                "INSERT INTO users (id, name, is_admin, token_hash, created_at) VALUES (:id, :name, :admin, :h, :t)",
                {"id": user_id, "name": name, "admin": 1 if admin else 0, "h": token_hash, "t": now()},
            )
            return user_id

        return await self.write(operation())

    async def list_users(self) -> list[dict[str, Any]]:
        rows = await self._fetch_all(
            "SELECT id, name, is_admin, created_at, revoked_at FROM users ORDER BY created_at, name")
        return [dict(row._mapping) for row in rows]

    async def revoke_user(self, name: str) -> bool:
        """Revoke a user's token and end their sessions; False if there is no such active user."""

        def operation() -> Operation[bool]:
            row = yield Query("SELECT id FROM users WHERE name = :name AND revoked_at IS NULL", {"name": name}, ONE)
            if row is None:
                return False
            yield Query("UPDATE users SET revoked_at = :t WHERE id = :id", {"t": now(), "id": row[0]})
            yield Query("DELETE FROM sessions WHERE user_id = :id", {"id": row[0]})
            return True

        return await self.write(operation())

    async def user_id_by_name(self, name: str) -> str | None:
        if not storable_id(name):
            return None
        row = await self._fetch_one("SELECT id FROM users WHERE name = :name", {"name": name})
        return None if row is None else str(row[0])

    async def active_user_count(self) -> int:
        return int(await self._fetch_val("SELECT COUNT(*) FROM users WHERE revoked_at IS NULL") or 0)

    async def user_by_token_hash(self, token_hash: str) -> dict[str, Any] | None:
        row = await self._fetch_one(
            "SELECT id, name, is_admin FROM users WHERE token_hash = :h AND revoked_at IS NULL", {"h": token_hash})
        return None if row is None else dict(row._mapping)

    async def user_by_session_hash(self, secret_hash: str) -> dict[str, Any] | None:
        row = await self._fetch_one(
            "SELECT u.id, u.name, u.is_admin FROM sessions s JOIN users u ON u.id = s.user_id"
            " WHERE s.secret_hash = :h AND s.expires_at > :t AND u.revoked_at IS NULL", {"h": secret_hash, "t": now()})
        return None if row is None else dict(row._mapping)

    async def create_session(self, secret_hash: str, user_id: str, expires_at: str) -> None:
        def operation() -> Operation[None]:
            # Expired sessions go when new ones come: the table stays the size of the live ones.
            yield Query("DELETE FROM sessions WHERE expires_at <= :t", {"t": now()})
            yield Query(
                "INSERT INTO sessions (secret_hash, user_id, created_at, expires_at) VALUES (:h, :u, :t, :e)",
                {"h": secret_hash, "u": user_id, "t": now(), "e": expires_at},
            )

        await self.write(operation())

    async def delete_session(self, secret_hash: str) -> None:
        def operation() -> Operation[None]:
            yield Query("DELETE FROM sessions WHERE secret_hash = :h", {"h": secret_hash})

        await self.write(operation())


def _history(messages: list[tuple[str, str]]) -> list[dict[str, str]]:
    """The Messages API history: empty answers dropped, consecutive same-role turns merged.

    A failed or cancelled answer keeps what the user saw (its partial text); an answer
    with no text at all would be an empty turn, which the API rejects.
    """
    history: list[dict[str, str]] = []
    for role, content in messages:
        if not content:
            continue
        if history and history[-1]["role"] == role:
            history[-1] = {"role": role, "content": history[-1]["content"] + "\n\n" + content}
        else:
            history.append({"role": role, "content": content})
    return history


@dataclass(frozen=True, slots=True)
class Probe:
    """What Store.probe found: the migrations applied and known, and the active users."""

    applied: frozenset[int]
    known: list[int]
    users: int
    server: str  # the database's name and version
    wrote: str  # what the writer did before it rolled back

    @property
    def pending(self) -> list[int]:
        return [version for version in self.known if version not in self.applied]

    @property
    def unknown(self) -> list[int]:
        """Applied migrations this code does not have: a newer deltarelay migrated the database."""
        return sorted(self.applied.difference(self.known))


class _RolledBack(Exception):
    """Ends the probe's operation, so that the writer rolls back everything it did."""

    def __init__(self, probe: Probe) -> None:
        super().__init__("rolled back")
        self.probe = probe


def migration_versions() -> list[int]:
    """The versions of the migrations in migrations/, in order."""
    return sorted(int(path.name.split("_", 1)[0]) for path in MIGRATIONS.glob("*.sql"))


_SCHEMA_MIGRATIONS = ("CREATE TABLE IF NOT EXISTS schema_migrations"
                      " (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)")


def _migrate(postgresql: bool = False) -> Operation[None]:
    """Apply the migrations not applied yet, in one transaction.

    On PostgreSQL, instances that start together take turns (a transaction-scoped advisory lock): two
    processes creating the same tables at once would otherwise collide in the catalogue.
    """
    if postgresql:
        yield Query("SELECT pg_advisory_xact_lock(hashtext('deltarelay-migrations'))", {}, ONE)
    yield Query(_SCHEMA_MIGRATIONS)
    rows = yield Query("SELECT version FROM schema_migrations", {}, ALL)
    applied = {row[0] for row in rows}
    for path in sorted(MIGRATIONS.glob("*.sql")):
        version = int(path.name.split("_", 1)[0])
        if version in applied:
            continue
        for statement in _statements(path.read_text(encoding="utf-8")):
            yield Query(statement)
        yield Query("INSERT INTO schema_migrations (version, applied_at) VALUES (:v, :t)", {"v": version, "t": now()})
        log.info("applied migration %s", path.name)


def _statements(sql: str) -> list[str]:
    """Split a migration file into statements (no semicolons inside our SQL literals)."""
    lines = [line for line in sql.splitlines() if not line.lstrip().startswith("--")]
    return [statement.strip() for statement in "\n".join(lines).split(";") if statement.strip()]


# --- Reads -------------------------------------------------------------------------------------


class Reads(Protocol):
    """What the store reads through: `databases.Database`, or the SQLite connections below."""

    async def fetch_all(self, query: str, values: dict[str, Any] | None = None) -> Sequence[Any]: ...

    async def fetch_one(self, query: str, values: dict[str, Any] | None = None) -> Any: ...

    async def fetch_val(self, query: str, values: dict[str, Any] | None = None) -> Any: ...


class _Row(sqlite3.Row):
    """A row as `databases` gives one: by position or name, and as a mapping through `_mapping`."""

    @property
    def _mapping(self) -> dict[str, Any]:
        return dict(zip(self.keys(), self, strict=True))


class _SQLiteReaders:
    """`size` aiosqlite connections, all opened at connect(): every read waits for an idle one.

    `databases` opens an aiosqlite connection (a thread and a file descriptor) for each task
    that reads and closes it after: 1,000 concurrent requests made 985 threads and ran the
    process out of file descriptors (`unable to open database file`). These connections are
    the only ones reads use, so a read never needs a new descriptor, even when sockets hold
    every other one. A read runs to its end even if its caller is cancelled, so a
    connection goes back to the pool only when it is idle.
    """

    def __init__(self, path: str, size: int) -> None:
        self.path = path
        self.size = size
        self._idle: asyncio.Queue[aiosqlite.Connection] = asyncio.Queue()
        self._connections: list[aiosqlite.Connection] = []

    async def connect(self) -> None:
        try:
            for _ in range(self.size):
                connection = await aiosqlite.connect(self.path, isolation_level=None)
                self._connections.append(connection)
                connection.row_factory = _Row
                await connection.execute("PRAGMA query_only=ON")
                # Sorts in memory, never in a temporary file: a read opens no file after this.
                await connection.execute("PRAGMA temp_store=MEMORY")
                # A first read opens the WAL file (and the shared memory), which the connection then keeps.
                await connection.execute_fetchall("SELECT COUNT(*) FROM schema_migrations")
                self._idle.put_nowait(connection)
        except BaseException:
            await self.disconnect()
            raise

    async def disconnect(self) -> None:
        connections, self._connections = self._connections, []
        self._idle = asyncio.Queue()
        for connection in connections:
            await connection.close()

    async def _read(self, query: str, values: dict[str, Any] | None) -> list[Any]:
        connection = await self._idle.get()
        try:
            return list(await connection.execute_fetchall(query, values or {}))
        finally:
            self._idle.put_nowait(connection)

    async def fetch_all(self, query: str, values: dict[str, Any] | None = None) -> list[Any]:
        return await asyncio.shield(self._read(query, values))

    async def fetch_one(self, query: str, values: dict[str, Any] | None = None) -> Any:
        rows = await self.fetch_all(query, values)
        return rows[0] if rows else None

    async def fetch_val(self, query: str, values: dict[str, Any] | None = None) -> Any:
        row = await self.fetch_one(query, values)
        return None if row is None else row[0]


# --- Write drivers -------------------------------------------------------------------------------

ONE, ALL, NONE = "one", "all", "none"


@dataclass(frozen=True, slots=True)
class Query:
    """One statement of an operation, with :named parameters; `fetch` says what comes back."""

    sql: str
    params: dict[str, Any] = field(default_factory=dict)
    fetch: str = NONE


# An operation yields Queries, receives each one's rows (a row, a list of rows, or None), returns its result.
Operation = Generator[Query, Any, T]


# The PostgreSQL advisory lock that is an instance's lease: a 64-bit hash of its id, in a namespace of ours.
_LEASE_KEY = "hashtextextended('deltarelay-instance:' || :instance, 0)"
_LOCK_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class _LockFiles:
    """Instance leases beside a SQLite file: each live process holds an flock on `<dir>/<instance>.lock`.

    The kernel drops an flock when its process dies, however it dies (kill -9 included), so a file that
    can be locked belongs to a process that is gone; it is removed by whoever finds it so.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._held: tuple[int, str] | None = None  # (fd, path) of this process's own lease

    def _path(self, instance_id: str) -> str | None:
        return os.path.join(self.directory, instance_id + ".lock") if _LOCK_NAME.fullmatch(instance_id) else None

    def hold(self, instance_id: str) -> None:
        path = self._path(instance_id)
        if path is None:
            raise ValueError(f"an instance id is letters, digits, '_' or '-', got {instance_id!r}")
        os.makedirs(self.directory, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.release()
        self._held = (fd, path)
        for name in os.listdir(self.directory):  # what processes that died left behind
            if name.endswith(".lock") and name != instance_id + ".lock":
                self.held(name[:-5])

    def held(self, instance_id: str) -> bool:
        """Whether a live process holds this instance's lease; a lease nobody holds is removed."""
        path = self._path(instance_id)
        if path is None:
            return False
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        else:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            return False
        finally:
            os.close(fd)

    def release(self) -> None:
        if self._held is not None:
            fd, path = self._held
            self._held = None
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            os.close(fd)


def sqlite_path(url: str) -> str:
    """The file of sqlite:///relative.db or sqlite:////absolute.db, percent-decoded as `databases` does."""
    return unquote(database_url(url)[len("sqlite:///"):])


class _SQLiteWriter:
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
            connection.execute("PRAGMA journal_mode=WAL")
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
                    result = _drive(operation, lambda q: _sqlite_query(connection, q))
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
                            " again", _one_line(exc))
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


def _drive(operation: Operation[T], run: Callable[[Query], Any]) -> T:
    """Run a generator operation to its end with a synchronous query runner."""
    try:
        query = next(operation)
        while True:
            query = operation.send(run(query))
    except StopIteration as stop:
        result: T = stop.value
        return result


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


class _AsyncWriter:
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
            row = yield Query(f"SELECT pg_try_advisory_lock({_LEASE_KEY})", {"instance": instance_id}, ONE)
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
                            if not await connection.fetch_val(f"SELECT pg_try_advisory_lock({_LEASE_KEY})",
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
                                " back", _one_line(exc))
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
