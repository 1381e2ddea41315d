"""Persistence: conversations and messages through `databases` (SQLite or PostgreSQL).

SQLite writes go through one writer thread that holds one connection: SQLite allows one
writer at a time, so serialising writes here means concurrent streams never meet
`database is locked`, and no stream opens a connection of its own. PostgreSQL writes run
concurrently on the pool, each operation in a transaction of its own. Reads go through
a bounded pool: for SQLite a fixed set of connections opened at start, for PostgreSQL
asyncpg's pool. Schema changes are Alembic revisions in migrations/versions/, applied at start.

A database that cannot be reached or cannot take writes (a restart, a full disk) is
StorageUnavailableError (503, retryable) on every read and write, never a driver's
own exception; the PostgreSQL writer reconnects by itself. Each process holds an
instance lease in the database's own terms (a locked file beside a SQLite file, an
advisory lock on PostgreSQL), so a starting process leaves alone the answers of any
other process still alive.

One module per concern:

    records.py          statuses, ids, Turn, Reply, UsageRow (pure)
    queries.py          Query and Operation: a write as a generator of queries (pure)
    faults.py, urls.py  errors that mean "unavailable"; DATABASE_URL per driver (pure)
    schema.py           Alembic revisions (migrations/), the old runner's databases, the check's Probe
    base.py             StoreBase: connect, write, read, readiness, leases, probe
    conversations.py    turns (send, regenerate, continue) on a tree of messages, saves, interrupted answers,
                        conversation reads, branches, rename, delete
    attachments.py      attached files: upload, read, given to a message, resolved into history as base64
    users.py, usage.py  users and sessions; usage and budget sums over the usage ledger
    reads.py            the SQLite read pool
    sqlite_writer.py    the SQLite writer thread (group commit)
    postgres_writer.py  PostgreSQL writes on the pool; the lease session (reconnects)
    leases.py           instance lease files beside a SQLite file
"""

from __future__ import annotations

from .attachments import AttachmentQueries
from .base import StoreBase
from .conversations import ConversationQueries
from .faults import storage_error, unavailable
from .queries import ALL, NONE, ONE, Operation, Query
from .records import FinishedElsewhereError, Reply, Status, Turn, UsageRow, new_id, now, storable_id
from .schema import MIGRATIONS, Probe, migration_versions
from .urls import asyncpg_dsn, databases_url, sqlite_path
from .usage import UsageQueries
from .users import UserQueries


class Store(ConversationQueries, AttachmentQueries, UserQueries, UsageQueries, StoreBase):
    """Conversations, messages, attachments, users and usage on one database (see StoreBase for how it reads
    and writes)."""


__all__ = [
    "ALL", "MIGRATIONS", "NONE", "ONE", "FinishedElsewhereError", "Operation", "Probe", "Query", "Reply", "Status",
    "Store", "StoreBase", "Turn", "UsageRow", "asyncpg_dsn", "databases_url", "migration_versions",
    "new_id", "now", "sqlite_path", "storable_id", "storage_error", "unavailable",
]
