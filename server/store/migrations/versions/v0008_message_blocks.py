"""Messages keep their content blocks (issue 19): `messages.blocks`, the API messages a row stands for.

NULL for a plain message (its `content` is the whole of it, as before). Otherwise JSON text: a user row holds
`[{"role": "user", "content": [...]}]` (its attachments as references, then its text); an assistant row holds
the assistant and tool-result messages of every upstream round of its answer, in order. TEXT, not JSONB, on
both databases: a thinking block's signature must go back to the API byte for byte.
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE messages ADD COLUMN blocks TEXT")


def downgrade() -> None:
    op.execute("ALTER TABLE messages DROP COLUMN blocks")
