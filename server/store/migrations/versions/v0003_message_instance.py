"""Which server instance generates a message while it is `streaming`.

With several instances sharing the database, a starting or surviving instance interrupts only the answers
of instances that are gone. NULL for answers written before this revision (they count as gone).
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE messages ADD COLUMN instance_id TEXT")


def downgrade() -> None:
    op.execute("ALTER TABLE messages DROP COLUMN instance_id")
