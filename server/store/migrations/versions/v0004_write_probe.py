"""One row that readiness checks rewrite: a write that succeeds proves the database takes writes now.

A ping only proves it answers reads; a full disk or a lost writer connection still answers them.
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE TABLE write_probe (id INTEGER PRIMARY KEY, written_at TEXT NOT NULL)")
    op.execute("INSERT INTO write_probe (id, written_at) VALUES (1, '')")


def downgrade() -> None:
    op.execute("DROP TABLE write_probe")
