"""The schema: Alembic revisions in migrations/versions/, applied in order at start, and what `check` reports.

Each revision is named by its number ("0001"), and `migration_versions()` gives those numbers as ints. A database
made before Alembic (by the hand-made runner, which recorded its versions in `schema_migrations`) is
recognised: its last version is stamped as the Alembic revision and the old table dropped, in the same
transaction as the upgrade that follows, so no row is lost and no revision runs twice.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Generator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.pool import NullPool

if TYPE_CHECKING:
    from alembic.config import Config

from .queries import ALL, ONE, Query
from .sqlite_writer import use_wal
from .urls import asyncpg_dsn, sqlite_path

log = logging.getLogger("deltarelay.store")

MIGRATIONS = Path(__file__).with_name("migrations")
LEGACY_TABLE = "schema_migrations"  # the hand-made runner's record: one row per version applied
VERSION_TABLE = "alembic_version"
# Instances that start together take turns (a transaction-scoped advisory lock): two processes creating the
# same tables at once would otherwise collide in PostgreSQL's catalogue.
_PG_MIGRATION_LOCK = "SELECT pg_advisory_xact_lock(hashtext('deltarelay-migrations'))"
T = TypeVar("T")


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


class RolledBack(Exception):
    """Ends the probe's operation, so that the writer rolls back everything it did."""

    def __init__(self, probe: Probe) -> None:
        super().__init__("rolled back")
        self.probe = probe


def alembic_config() -> Config:
    """Alembic's configuration for migrations/, with no ini file (the database comes from the caller).

    Alembic is imported here, not at the module's top: a start that finds the database at the head revision
    never needs it, and importing it (with Mako and SQLAlchemy's ORM) adds about 18 MB to every process.
    """
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


@cache
def revisions() -> tuple[str, ...]:
    """The revisions in migrations/versions/, oldest first: each file `vNNNN_name.py` is revision "NNNN", whose
    parent is the one before (a test checks that Alembic walks the same line), read without importing Alembic."""
    names = (re.fullmatch(r"v(\d{4})_\w+\.py", path.name) for path in (MIGRATIONS / "versions").iterdir())
    return tuple(sorted(match.group(1) for match in names if match))


def migration_versions() -> list[int]:
    """The numbers of the revisions, in order."""
    return [int(revision) for revision in revisions()]


def applied_versions(revision: str | None, legacy: list[int]) -> frozenset[int]:
    """The versions a database has, from its Alembic revision or else the old runner's rows."""
    if revision is None:
        return frozenset(legacy)
    known = revisions()
    if revision in known:
        return frozenset(int(r) for r in known[:known.index(revision) + 1])
    return frozenset([*migration_versions(), int(revision) if revision.isdigit() else -1])


def read_applied(sqlite: bool) -> Generator[Query, Any, frozenset[int]]:
    """The versions applied (a step of a write operation: the probe reads them in its own transaction)."""
    tables = yield Query(
        f"SELECT name FROM sqlite_master WHERE type = 'table' AND name IN ('{VERSION_TABLE}', '{LEGACY_TABLE}')"
        if sqlite else
        "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
        f" AND table_name IN ('{VERSION_TABLE}', '{LEGACY_TABLE}')", {}, ALL)
    names = {row[0] for row in tables}
    if VERSION_TABLE in names:
        row = yield Query(f"SELECT version_num FROM {VERSION_TABLE}", {}, ONE)
        return applied_versions(None if row is None else str(row[0]), [])
    if LEGACY_TABLE in names:
        rows = yield Query(f"SELECT version FROM {LEGACY_TABLE}", {}, ALL)
        return applied_versions(None, [int(row[0]) for row in rows])
    return frozenset()


def at_head(sqlite: bool) -> Generator[Query, Any, bool]:
    """Whether the database has exactly this code's revisions (an operation: the start reads it through the
    writer, and runs Alembic only when it is False)."""
    applied = yield from read_applied(sqlite)
    return applied == frozenset(migration_versions())


# --- Running Alembic -----------------------------------------------------------------------------------


def current_revision(connection: sa.Connection) -> str | None:
    """The database's revision: Alembic's, else the old runner's last version as a revision, else None."""
    tables = set(sa.inspect(connection).get_table_names())
    if VERSION_TABLE in tables:
        return connection.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()
    if LEGACY_TABLE in tables:
        last = connection.execute(sa.text(f"SELECT MAX(version) FROM {LEGACY_TABLE}")).scalar()
        return None if last is None else f"{int(last):04d}"
    return None


def describe_current(connection: sa.Connection) -> str:
    """The database's revision in one line, for `deltarelay db current`."""
    tables = set(sa.inspect(connection).get_table_names())
    revision = current_revision(connection)
    head = revisions()[-1]
    if revision is None:
        return "none: an empty database (a start or `deltarelay db upgrade` creates the schema)"
    where = " (head)" if revision == head else f" (head is {head})" if revision in revisions() else (
        " (unknown to this version: a newer deltarelay migrated it)")
    if VERSION_TABLE not in tables:
        where += f"; recorded by the old migration runner in {LEGACY_TABLE}: the next upgrade stamps it"
    return revision + where


def history() -> list[str]:
    """One line per revision, oldest first: its id and the first line of its docstring."""
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory.from_config(alembic_config())
    lines = []
    for revision in revisions():
        script = scripts.get_revision(revision)
        doc = (script.module.__doc__ or "").strip().splitlines() if script is not None else []
        lines.append(f"{revision}  {doc[0] if doc else ''}".rstrip())
    return lines


def adopt_legacy(connection: sa.Connection, config: Config) -> None:
    """Stamp a database the old runner made with its last version, and drop the old runner's table.

    Raises:
        RuntimeError: its versions are not the first ones of this code's revisions (nothing is changed).
    """
    tables = set(sa.inspect(connection).get_table_names())
    if VERSION_TABLE in tables or LEGACY_TABLE not in tables:
        return
    versions = sorted(int(v) for v in connection.execute(sa.text(f"SELECT version FROM {LEGACY_TABLE}")).scalars())
    if versions != migration_versions()[:len(versions)]:
        raise RuntimeError(f"{LEGACY_TABLE} lists versions {versions}, which are not the first of this"
                           f" version's revisions {migration_versions()}: not migrating")
    if versions:
        from alembic import command

        command.stamp(config, f"{versions[-1]:04d}")
    connection.execute(sa.text(f"DROP TABLE {LEGACY_TABLE}"))
    log.info("recognised a database of the old migration runner at version %s", versions[-1] if versions else 0)


def in_migration_transaction(connection: sa.Connection, work: Callable[[Config], T]) -> T:
    """Run `work` with Alembic's configuration on `connection`, in one transaction that commits at the end.

    On PostgreSQL it first takes the migration lock; a database of the old runner is adopted first.
    """
    config = alembic_config()
    config.attributes["connection"] = connection
    with connection.begin():
        if connection.dialect.name == "postgresql":
            connection.execute(sa.text(_PG_MIGRATION_LOCK))
        adopt_legacy(connection, config)
        return work(config)


def upgrade(connection: sa.Connection, target: str = "head") -> list[str]:
    """Apply the revisions up to `target`; the revisions applied, in order (logged one line each)."""

    from alembic import command

    def work(config: Config) -> list[str]:
        before = current_revision(connection)
        command.upgrade(config, target)
        after = current_revision(connection)
        known = list(revisions())
        start = 0 if before is None else known.index(before) + 1
        applied = known[start:known.index(after) + 1] if after in known else []
        for revision in applied:
            log.info("applied migration %s", revision)
        return applied

    return in_migration_transaction(connection, work)


def downgrade(connection: sa.Connection, target: str) -> None:
    """Undo the revisions after `target` ("base": all of them)."""
    from alembic import command

    in_migration_transaction(connection, lambda config: command.downgrade(config, target))


def sqlalchemy_url(url: str) -> str:
    """The SQLAlchemy URL Alembic connects with: the stdlib sqlite3 driver, or asyncpg (`sslmode` as `ssl`)."""
    if url.startswith("sqlite:"):
        return "sqlite:///" + sqlite_path(url)
    dsn = asyncpg_dsn(url).replace("sslmode=", "ssl=")
    return "postgresql+asyncpg://" + dsn.split("://", 1)[1]


def _sqlite_engine(url: str) -> sa.Engine:
    engine = sa.create_engine(sqlalchemy_url(url), poolclass=NullPool, connect_args={"timeout": 10})

    # pysqlite begins transactions lazily, and not before DDL: let SQLAlchemy say when, and take the write
    # lock at once, so that two processes migrating one file take turns. WAL first, as the writer thread
    # sets it (waiting out another store's migration: two stores starting together on a new file).
    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None
        use_wal(dbapi_connection)

    @sa.event.listens_for(engine, "begin")
    def _begin(connection: sa.Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


async def run_on(url: str, work: Callable[[sa.Connection], T]) -> T:
    """Run `work` on a SQLAlchemy connection of its own to the database (a thread for SQLite, asyncpg for
    PostgreSQL), closed after.

    Raises:
        Exception: the driver's own error (sqlite3's, asyncpg's) where SQLAlchemy wrapped one.
    """
    try:
        return await _run_on(url, work)
    except sa.exc.DBAPIError as exc:
        raise _driver_error(exc) from exc


def _driver_error(exc: sa.exc.DBAPIError) -> BaseException:
    original: BaseException = exc.orig if isinstance(exc.orig, BaseException) else exc
    # asyncpg's errors reach SQLAlchemy's adapted ones as their cause.
    cause = original.__cause__
    if type(original).__module__.startswith("sqlalchemy") and cause is not None:
        return cause
    return original


async def _run_on(url: str, work: Callable[[sa.Connection], T]) -> T:
    if url.startswith("sqlite:"):
        def in_thread() -> T:
            engine = _sqlite_engine(url)
            try:
                with engine.connect() as connection:
                    return work(connection)
            finally:
                engine.dispose()

        return await asyncio.to_thread(in_thread)
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(sqlalchemy_url(url), poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(work)
    finally:
        await engine.dispose()
