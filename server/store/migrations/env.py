"""Alembic's environment: runs the revisions in versions/ on the connection `schema.run_alembic` hands it.

It opens no connection of its own: the caller holds the transaction (and, on PostgreSQL, the migration lock),
so every revision applied at once commits or rolls back together.
"""

from __future__ import annotations

from alembic import context

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with `deltarelay db upgrade` or a server start, not the alembic command")
context.configure(connection=connection, transactional_ddl=True)
with context.begin_transaction():
    context.run_migrations()
