"""The read side: `databases` over asyncpg's pool for PostgreSQL, a fixed set of aiosqlite connections for SQLite."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from typing import Any, Protocol

import aiosqlite


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


class SQLiteReaders:
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
                await connection.execute_fetchall("SELECT COUNT(*) FROM sqlite_master")
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


