"""Users of the embedding app (issue 16): a JWT's (issuer, sub), or a trusted proxy's header, names a user.

`issuer` and `subject` are NULL for the users `deltarelay users add` made, and unique together for the others.
Those have no API token (`token_hash` becomes nullable) and their names come from the app, so a name is unique
among the CLI's users only (the CLI names users; the app's names are labels).

SQLite cannot drop a NOT NULL or an unnamed UNIQUE in place: the table is copied into one of the new shape,
with legacy_alter_table on so that renaming the old table leaves the other tables' references on `users`.
The downgrade refuses (nothing changed) while any of the app's users exist: their conversations would lose
their owner.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_COLUMNS = "id, name, is_admin, token_hash, created_at, revoked_at"
_NEW_TABLE = """CREATE TABLE users (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    is_admin INTEGER NOT NULL DEFAULT 0,
    token_hash TEXT UNIQUE,
    created_at TEXT NOT NULL,
    revoked_at TEXT,
    issuer TEXT,
    subject TEXT
)"""
_OLD_TABLE = """CREATE TABLE users (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    is_admin INTEGER NOT NULL DEFAULT 0,
    token_hash TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL,
    revoked_at TEXT
)"""
_INDEXES = [
    "CREATE UNIQUE INDEX users_identity ON users (issuer, subject)",
    "CREATE UNIQUE INDEX users_cli_name ON users (name) WHERE issuer IS NULL",
]


def _copy_sqlite_table(create: str) -> None:
    op.execute("PRAGMA legacy_alter_table = ON")
    op.execute("ALTER TABLE users RENAME TO users_before")
    op.execute(create)
    op.execute(f"INSERT INTO users ({_COLUMNS}) SELECT {_COLUMNS} FROM users_before")
    op.execute("DROP TABLE users_before")
    op.execute("PRAGMA legacy_alter_table = OFF")


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE users ALTER COLUMN token_hash DROP NOT NULL")
        op.execute("ALTER TABLE users DROP CONSTRAINT users_name_key")
        op.execute("ALTER TABLE users ADD COLUMN issuer TEXT")
        op.execute("ALTER TABLE users ADD COLUMN subject TEXT")
    else:
        _copy_sqlite_table(_NEW_TABLE)
    for statement in _INDEXES:
        op.execute(statement)


def downgrade() -> None:
    others = op.get_bind().execute(sa.text("SELECT COUNT(*) FROM users WHERE issuer IS NOT NULL")).scalar()
    if others:
        raise RuntimeError(f"{others} users came from JWTs or a proxy header; revision 0005 cannot hold them"
                           " (nothing changed)")
    op.execute("DROP INDEX users_cli_name")
    op.execute("DROP INDEX users_identity")
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE users DROP COLUMN subject")
        op.execute("ALTER TABLE users DROP COLUMN issuer")
        op.execute("ALTER TABLE users ADD CONSTRAINT users_name_key UNIQUE (name)")
        op.execute("ALTER TABLE users ALTER COLUMN token_hash SET NOT NULL")
    else:
        _copy_sqlite_table(_OLD_TABLE)
