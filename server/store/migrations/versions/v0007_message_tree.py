"""Conversations as trees of messages (issue 17), and a usage ledger that deleting a conversation leaves alone.

Each message gets `parent_id` (the message it answers or follows; NULL for a first user message), each
conversation `active_leaf_id` (the end of the path the model is sent). Today's linear conversations become
one chain: each message's parent is the message before it by `seq`, and the active leaf is the last one.

`usage` holds one row per generation of an answer (an answer, or one continuation of it): its owner, agent,
model, tokens and exact cost, written in the transaction that finishes it. Reports and budgets sum it, so a
conversation deleted later never changes what was spent. Its `cost` has the type `messages.cost` has since
0005 (NUMERIC USD on PostgreSQL, whole nano-dollars on SQLite): the rows are copied from every finished
answer with the values as they are, so every sum reads the same before and after.

The downgrade refuses (nothing changed) while any conversation has branches: 0006 has no way to tell them
apart. It drops the ledger; the messages keep their costs, as before.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_USAGE_COLUMNS = ("id, message_id, conversation_id, owner_id, agent_id, model, created_at, completed_at,"
                  " input_tokens, output_tokens, cache_creation_input_tokens, cache_read_input_tokens, cost,"
                  " cost_estimated")


def _usage_table(cost_type: str) -> str:
    return f"""CREATE TABLE usage (
    id TEXT PRIMARY KEY,
    message_id TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    owner_id TEXT REFERENCES users(id),
    agent_id TEXT NOT NULL,
    model TEXT,
    created_at TEXT NOT NULL,
    completed_at TEXT NOT NULL,
    input_tokens BIGINT NOT NULL DEFAULT 0,
    output_tokens BIGINT NOT NULL DEFAULT 0,
    cache_creation_input_tokens BIGINT NOT NULL DEFAULT 0,
    cache_read_input_tokens BIGINT NOT NULL DEFAULT 0,
    cost {cost_type},
    cost_estimated INTEGER NOT NULL DEFAULT 0
)"""


def upgrade() -> None:
    postgresql = op.get_bind().dialect.name == "postgresql"
    op.execute("ALTER TABLE messages ADD COLUMN parent_id TEXT REFERENCES messages(id)")
    op.execute("ALTER TABLE conversations ADD COLUMN active_leaf_id TEXT")
    op.execute("CREATE INDEX messages_parent ON messages (parent_id)")
    # One chain per conversation: each message follows the one before it by seq.
    op.execute("UPDATE messages SET parent_id = (SELECT p.id FROM messages p WHERE p.conversation_id ="
               " messages.conversation_id AND p.seq < messages.seq ORDER BY p.seq DESC LIMIT 1)")
    op.execute("UPDATE conversations SET active_leaf_id = (SELECT m.id FROM messages m WHERE m.conversation_id ="
               " conversations.id ORDER BY m.seq DESC LIMIT 1)")
    op.execute(_usage_table("NUMERIC" if postgresql else "INTEGER"))
    op.execute("CREATE INDEX usage_owner_completed ON usage (owner_id, completed_at)")
    op.execute("CREATE INDEX usage_completed ON usage (completed_at)")
    op.execute("CREATE INDEX usage_message ON usage (message_id)")
    # Every finished answer, as the reports counted it (an answer still streaming gets its row when it ends).
    op.execute(
        f"INSERT INTO usage ({_USAGE_COLUMNS}) SELECT m.id, m.id, m.conversation_id, c.owner_id, c.agent_id,"
        " m.model, m.created_at, m.completed_at, m.input_tokens, m.output_tokens, m.cache_creation_input_tokens,"
        " m.cache_read_input_tokens, m.cost, m.cost_estimated FROM messages m"
        " JOIN conversations c ON c.id = m.conversation_id"
        " WHERE m.role = 'assistant' AND m.completed_at IS NOT NULL")


def downgrade() -> None:
    branched = op.get_bind().execute(sa.text(
        "SELECT COUNT(*) FROM (SELECT parent_id FROM messages GROUP BY conversation_id, parent_id"
        " HAVING COUNT(*) > 1) AS siblings")).scalar()
    if branched:
        raise RuntimeError(f"{branched} messages have more than one child (edits or regenerated answers);"
                           " revision 0006 cannot hold branches (nothing changed)")
    op.execute("DROP TABLE usage")
    op.execute("DROP INDEX messages_parent")
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE conversations DROP COLUMN active_leaf_id")
        op.execute("ALTER TABLE messages DROP COLUMN parent_id")
    else:
        op.execute("ALTER TABLE conversations DROP COLUMN active_leaf_id")
        # SQLite cannot drop a column that references a table: batch mode copies the table without it.
        with op.batch_alter_table("messages") as batch:
            batch.drop_column("parent_id")
