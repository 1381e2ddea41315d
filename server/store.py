"""Persistence: conversations and messages through `databases` (SQLite or PostgreSQL).

Writes go through one long-lived writer task that holds one connection: SQLite
allows one writer at a time, so serialising writes here means concurrent streams
never meet `database is locked`, and no stream opens a connection of its own.
Reads use the pool. Schema changes are the ordered SQL files in migrations/.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from databases import Database
from databases.core import Connection

from .errors import NotFoundError

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
    return uuid.uuid4().hex


def databases_url(url: str) -> str:
    """The `databases` URL for a user-facing DATABASE_URL (sqlite:// goes through aiosqlite)."""
    if url.startswith("sqlite:"):
        return "sqlite+aiosqlite:" + url[len("sqlite:"):]
    if url.startswith("postgres://"):
        return "postgresql+asyncpg://" + url[len("postgres://"):]
    if url.startswith("postgresql://"):
        return "postgresql+asyncpg://" + url[len("postgresql://"):]
    return url


@dataclass(frozen=True, slots=True)
class Turn:
    """What the core needs to run one answer: ids and the history to send upstream."""

    conversation_id: str
    user_message_id: str
    assistant_message_id: str
    history: list[dict[str, str]]


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


class Store:
    """Conversations and messages."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self.db = Database(databases_url(url))
        self._writes: asyncio.Queue[tuple[Callable[[Connection], Awaitable[Any]], asyncio.Future[Any]]] = (
            asyncio.Queue()
        )
        self._writer: asyncio.Task[None] | None = None
        self._writer_ready: asyncio.Event | None = None

    async def connect(self) -> None:
        await self.db.connect()
        self._writer_ready = asyncio.Event()
        self._writer = asyncio.create_task(self._write_loop(), name="store-writer")
        await self._writer_ready.wait()
        await self.write(self._migrate)

    async def disconnect(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
            try:
                await self._writer
            except asyncio.CancelledError:
                pass
            self._writer = None
        await self.db.disconnect()

    async def _write_loop(self) -> None:
        assert self._writer_ready is not None
        async with self.db.connection() as connection:
            if self.is_sqlite:
                # WAL: readers never wait for the writer. NORMAL: no fsync per commit, still crash-safe.
                await connection.execute("PRAGMA journal_mode=WAL")
                await connection.execute("PRAGMA synchronous=NORMAL")
                await connection.execute("PRAGMA busy_timeout=10000")
            self._writer_ready.set()
            while True:
                operation, done = await self._writes.get()
                if done.cancelled():
                    continue
                try:
                    async with connection.transaction():
                        result = await operation(connection)
                except Exception as exc:
                    if not done.cancelled():
                        done.set_exception(exc)
                else:
                    if not done.cancelled():
                        done.set_result(result)

    async def write(self, operation: Callable[[Connection], Awaitable[T]]) -> T:
        """Run `operation` in one transaction on the writer connection."""
        if self._writer is None or self._writer.done():
            raise RuntimeError("store is not connected")
        done: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._writes.put_nowait((operation, done))
        return await done

    async def _migrate(self, connection: Connection) -> None:
        await connection.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
        )
        rows = await connection.fetch_all("SELECT version FROM schema_migrations")
        applied = {row[0] for row in rows}
        for path in sorted(MIGRATIONS.glob("*.sql")):
            version = int(path.name.split("_", 1)[0])
            if version in applied:
                continue
            for statement in _statements(path.read_text(encoding="utf-8")):
                await connection.execute(statement)
            await connection.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (:v, :t)", {"v": version, "t": now()}
            )
            log.info("applied migration %s", path.name)

    async def ping(self) -> None:
        await self.db.fetch_val("SELECT 1")

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
    ) -> Turn:
        """Save the user's message and an empty assistant message; return the history to send.

        Raises:
            NotFoundError: conversation_id names no conversation; nothing is saved.
        """

        async def operation(connection: Connection) -> Turn:
            stamp = now()
            history: list[dict[str, str]] = []
            if conversation_id is None:
                conv_id = new_id()
                title = " ".join(user_text.split())[:80] or "New conversation"
                await connection.execute(
                    "INSERT INTO conversations (id, agent_id, title, created_at, updated_at)"
                    " VALUES (:id, :agent, :title, :t, :t)",
                    {"id": conv_id, "agent": agent_id, "title": title, "t": stamp},
                )
                seq = 0
            else:
                conv_id = conversation_id
                found = await connection.fetch_one(
                    "SELECT id FROM conversations WHERE id = :id", {"id": conv_id}
                )
                if found is None:
                    raise NotFoundError(f"conversation {conv_id} not found")
                rows = await connection.fetch_all(
                    "SELECT role, content, seq FROM messages WHERE conversation_id = :id ORDER BY seq",
                    {"id": conv_id},
                )
                history = _history([(row[0], row[1]) for row in rows])
                seq = (rows[-1][2] + 1) if rows else 0
                await connection.execute(
                    "UPDATE conversations SET updated_at = :t WHERE id = :id", {"t": stamp, "id": conv_id}
                )
            user_id, assistant_id = new_id(), new_id()
            insert = (
                "INSERT INTO messages (id, conversation_id, seq, role, content, model, status, stream_id,"
                " trace_session_id, task_trace_id, created_at, completed_at)"
                " VALUES (:id, :conv, :seq, :role, :content, :model, :status, :stream, :ts, :tt, :t, :done)"
            )
            # One trace session per conversation unless the caller names one.
            common = {"conv": conv_id, "stream": stream_id, "ts": trace_session_id or conv_id, "tt": task_trace_id,
                      "t": stamp}
            await connection.execute(
                insert,
                {**common, "id": user_id, "seq": seq, "role": "user", "content": user_text, "model": None,
                 "status": Status.COMPLETE.value, "done": stamp},
            )
            await connection.execute(
                insert,
                {**common, "id": assistant_id, "seq": seq + 1, "role": "assistant", "content": "", "model": model,
                 "status": Status.STREAMING.value, "done": None},
            )
            history.append({"role": "user", "content": user_text})
            return Turn(conv_id, user_id, assistant_id, _history([(m["role"], m["content"]) for m in history]))

        return await self.write(operation)

    async def save_reply(self, message_id: str, reply: Reply) -> None:
        """Write an assistant message's final state; a message is finished exactly once."""

        async def operation(connection: Connection) -> None:
            await connection.execute(
                "UPDATE messages SET content = :content, thinking = :thinking, model = :model, status = :status,"
                " stop_reason = :stop, input_tokens = :inp, output_tokens = :out,"
                " cache_creation_input_tokens = :cw, cache_read_input_tokens = :cr, cost = :cost,"
                " cost_estimated = :est, error_code = :err, completed_at = :t"
                " WHERE id = :id AND status = :streaming",
                {
                    "content": reply.content, "thinking": reply.thinking, "model": reply.model,
                    "status": reply.status.value, "stop": reply.stop_reason, "inp": reply.input_tokens,
                    "out": reply.output_tokens, "cw": reply.cache_creation_input_tokens,
                    "cr": reply.cache_read_input_tokens,
                    "cost": None if reply.cost is None else format(reply.cost, "f"),
                    "est": 1 if reply.cost_estimated else 0, "err": reply.error_code, "t": now(),
                    "id": message_id, "streaming": Status.STREAMING.value,
                },
            )

        await self.write(operation)

    async def interrupt_unfinished(self) -> int:
        """Mark messages left `streaming` by a previous process as `interrupted`."""

        async def operation(connection: Connection) -> int:
            rows = await connection.fetch_all(
                "SELECT id FROM messages WHERE status = :s", {"s": Status.STREAMING.value}
            )
            await connection.execute(
                "UPDATE messages SET status = :i, completed_at = :t WHERE status = :s",
                {"i": Status.INTERRUPTED.value, "t": now(), "s": Status.STREAMING.value},
            )
            return len(rows)

        return await self.write(operation)

    async def list_conversations(self, limit: int = 100) -> list[dict[str, Any]]:
        rows = await self.db.fetch_all(
            "SELECT c.id, c.agent_id, c.title, c.created_at, c.updated_at,"
            " (SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id) AS message_count"
            " FROM conversations c ORDER BY c.updated_at DESC, c.id LIMIT :limit",
            {"limit": limit},
        )
        conversations = [dict(row._mapping) for row in rows]
        for conversation in conversations:
            conversation["total_cost"] = await self._conversation_cost(conversation["id"])
        return conversations

    async def get_conversation(self, conversation_id: str) -> dict[str, Any]:
        row = await self.db.fetch_one(
            "SELECT c.id, c.agent_id, c.title, c.created_at, c.updated_at,"
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
        rows = await self.db.fetch_all(
            "SELECT cost FROM messages WHERE conversation_id = :id AND cost IS NOT NULL", {"id": conversation_id}
        )
        return sum((Decimal(row[0]) for row in rows), Decimal(0)) if rows else None

    async def list_messages(self, conversation_id: str) -> list[dict[str, Any]]:
        await self.get_conversation(conversation_id)
        rows = await self.db.fetch_all(
            "SELECT id, conversation_id, seq, role, content, thinking, model, status, stop_reason, input_tokens,"
            " output_tokens, cache_creation_input_tokens, cache_read_input_tokens, cost, cost_estimated,"
            " error_code, stream_id, trace_session_id, task_trace_id, created_at, completed_at"
            " FROM messages WHERE conversation_id = :id ORDER BY seq",
            {"id": conversation_id},
        )
        return [dict(row._mapping) for row in rows]

    async def get_message(self, message_id: str) -> dict[str, Any] | None:
        row = await self.db.fetch_one("SELECT * FROM messages WHERE id = :id", {"id": message_id})
        return None if row is None else dict(row._mapping)


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


def _statements(sql: str) -> list[str]:
    """Split a migration file into statements (no semicolons inside our SQL literals)."""
    lines = [line for line in sql.splitlines() if not line.lstrip().startswith("--")]
    return [statement.strip() for statement in "\n".join(lines).split(";") if statement.strip()]
