"""The schema: migrations in migrations/, applied in order at start, and what `deltarelay check` reports."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .queries import ALL, ONE, Operation, Query
from .records import now

log = logging.getLogger("deltarelay.store")

MIGRATIONS = Path(__file__).with_name("migrations")


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


def migration_versions() -> list[int]:
    """The versions of the migrations in migrations/, in order."""
    return sorted(int(path.name.split("_", 1)[0]) for path in MIGRATIONS.glob("*.sql"))


SCHEMA_MIGRATIONS = ("CREATE TABLE IF NOT EXISTS schema_migrations"
                      " (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)")


def migrate(postgresql: bool = False) -> Operation[None]:
    """Apply the migrations not applied yet, in one transaction.

    On PostgreSQL, instances that start together take turns (a transaction-scoped advisory lock): two
    processes creating the same tables at once would otherwise collide in the catalogue.
    """
    if postgresql:
        yield Query("SELECT pg_advisory_xact_lock(hashtext('deltarelay-migrations'))", {}, ONE)
    yield Query(SCHEMA_MIGRATIONS)
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


