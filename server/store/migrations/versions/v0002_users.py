"""Users, their API tokens and browser sessions; every conversation gets an owner.

Only SHA-256 hashes of tokens and session secrets are stored: both are 256-bit random values.
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

UPGRADE = [
    """CREATE TABLE users (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    is_admin INTEGER NOT NULL DEFAULT 0,
    token_hash TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL,
    revoked_at TEXT
)""",
    """CREATE TABLE sessions (
    secret_hash TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(id),
    created_at TEXT NOT NULL,
    expires_at TEXT NOT NULL
)""",
    # NULL: made in open mode, before any user existed; only admins see those.
    "ALTER TABLE conversations ADD COLUMN owner_id TEXT REFERENCES users(id)",
    "CREATE INDEX conversations_owner ON conversations (owner_id, updated_at)",
    "CREATE INDEX messages_stream ON messages (stream_id)",
    "CREATE INDEX sessions_user ON sessions (user_id)",
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    op.execute("DROP INDEX sessions_user")
    op.execute("DROP INDEX messages_stream")
    op.execute("DROP INDEX conversations_owner")
    # SQLite cannot drop a column that references another table: batch mode copies the table without it.
    with op.batch_alter_table("conversations") as batch:
        batch.drop_column("owner_id")
    op.execute("DROP TABLE sessions")
    op.execute("DROP TABLE users")
