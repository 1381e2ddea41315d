"""Attachments (issue 19): the images and PDFs of users' messages, their bytes in the database.

One row per file: its owner, the conversation and message that use it (NULL until a message does: an upload
by POST /api/attachments waits for its message), its name, the media type its bytes name (checked at upload,
never the client's claim), its size, SHA-256 and bytes (BLOB on SQLite, BYTEA on PostgreSQL), and `tokens`:
the estimate of what it adds to a request's input (server/attachments.py file_tokens), which budgets count
instead of its bytes.

The bytes are in the database rather than in a directory because then (1) there is one place to back up:
a database backup holds every conversation with its files, never one without the other; (2) a conversation's
files are deleted in the transaction that deletes it, so a crash between the two cannot leave files behind
or messages pointing at files that are gone; (3) every instance of a scaled-out deployment reads them
from the database it already shares, with no shared volume to mount. The cost is database size: files are
bounded by RELAY_MAX_ATTACHMENT_BYTES (24 MiB by default), and uploads no message used are removed after a
day (see AttachmentQueries.add_attachment).
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    blob = "BYTEA" if op.get_bind().dialect.name == "postgresql" else "BLOB"
    op.execute(f"""CREATE TABLE attachments (
    id TEXT PRIMARY KEY,
    owner_id TEXT REFERENCES users(id),
    conversation_id TEXT,
    message_id TEXT,
    name TEXT NOT NULL,
    media_type TEXT NOT NULL,
    size BIGINT NOT NULL,
    tokens BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    data {blob} NOT NULL,
    created_at TEXT NOT NULL
)""")
    op.execute("CREATE INDEX attachments_conversation ON attachments (conversation_id)")
    op.execute("CREATE INDEX attachments_unused ON attachments (created_at) WHERE message_id IS NULL")


def downgrade() -> None:
    op.execute("DROP TABLE attachments")
