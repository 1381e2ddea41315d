"""Costs as exact numbers the database sums: NUMERIC (USD) on PostgreSQL, INTEGER nano-dollars on SQLite.

Until 0004 a cost was TEXT holding an exact decimal, summed in Python (SQL's SUM over text goes through floats).
PostgreSQL's NUMERIC is exact at any scale and takes the text as it is. SQLite has no exact decimal, so its
`cost` becomes a whole number of nano-dollars (USD 1e-9): every price in server/pricing.py is a whole number of
nano-dollars per token (tests/test_pricing.py checks it), and SQLite's SUM over integers is exact (it raises
on overflow, at 9.2 billion dollars). Each TEXT cost is converted with Decimal, never a float; a cost finer
than a nano-dollar stops the migration (nothing is changed) rather than being rounded.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_NANOS_PER_USD = 9  # a nano-dollar is 10 ** -9 USD


def _to_nanos(text: str) -> int:
    units = Decimal(text).scaleb(_NANOS_PER_USD)
    if units != units.to_integral_value():
        raise RuntimeError(f"the cost {text} is finer than a nano-dollar: not converting it (nothing changed)")
    return int(units)


def _from_nanos(nanos: int) -> str:
    return format(Decimal(nanos).scaleb(-_NANOS_PER_USD).normalize(), "f")


def _convert(new_type: str, convert: Callable[[Any], Any]) -> None:
    """SQLite: add the column of the new type, fill it row by row in Python, drop the old one, rename."""
    bind = op.get_bind()
    op.execute(f"ALTER TABLE messages ADD COLUMN cost_converted {new_type}")
    rows = bind.execute(sa.text("SELECT id, cost FROM messages WHERE cost IS NOT NULL")).all()
    updates = [{"id": row[0], "cost": convert(row[1])} for row in rows]
    if updates:
        bind.execute(sa.text("UPDATE messages SET cost_converted = :cost WHERE id = :id"), updates)
    op.execute("ALTER TABLE messages DROP COLUMN cost")
    op.execute("ALTER TABLE messages RENAME COLUMN cost_converted TO cost")


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE messages ALTER COLUMN cost TYPE NUMERIC USING cost::NUMERIC")
    else:
        _convert("INTEGER", lambda text: _to_nanos(str(text)))


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE messages ALTER COLUMN cost TYPE TEXT USING cost::TEXT")
    else:
        _convert("TEXT", lambda nanos: _from_nanos(int(nanos)))
