"""Money and tokens: the usage report and what a budget has spent."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from .base import StoreBase
from .records import UsageRow


class UsageQueries(StoreBase):
    """Sums of tokens and costs."""

    async def spent_since(self, owner_id: str | None, since: str) -> Decimal:
        """The exact sum of the costs of owner_id's answers finished at or after `since`."""
        owner_clause = "c.owner_id IS NULL" if owner_id is None else "c.owner_id = :owner"
        params: dict[str, Any] = {"since": since}
        if owner_id is not None:
            params["owner"] = owner_id
        rows = await self._fetch_all(
            "SELECT m.cost FROM messages m JOIN conversations c ON c.id = m.conversation_id"
            f" WHERE {owner_clause} AND m.cost IS NOT NULL AND m.completed_at >= :since", params
        )
        return sum((Decimal(row[0]) for row in rows), Decimal(0))


    async def usage(self, start: str, end: str, group_by: str, owner_id: str | None = None,
                    every_owner: bool = False) -> list[UsageRow]:
        """Token and cost sums of the answers finished in [start, end), grouped by day, model, agent or user.

        Costs are summed as Decimal in Python: SQL SUM over decimal text would go through floats.
        """
        params: dict[str, Any] = {"start": start, "end": end}
        where = "m.role = 'assistant' AND m.completed_at >= :start AND m.completed_at < :end"
        if not every_owner:
            if owner_id is None:
                where += " AND c.owner_id IS NULL"
            else:
                where += " AND c.owner_id = :owner"
                params["owner"] = owner_id
        rows = await self._fetch_all(
            "SELECT m.completed_at, m.model, c.agent_id, COALESCE(u.name, 'anonymous'), m.input_tokens,"
            " m.output_tokens, m.cache_creation_input_tokens, m.cache_read_input_tokens, m.cost"
            " FROM messages m JOIN conversations c ON c.id = m.conversation_id"
            f" LEFT JOIN users u ON u.id = c.owner_id WHERE {where}", params)
        column = {"day": 0, "model": 1, "agent": 2, "user": 3}[group_by]
        groups: dict[str, UsageRow] = {}
        for row in rows:
            key = str(row[0])[:10] if column == 0 else str(row[column] or "unknown")
            group = groups.get(key)
            if group is None:
                group = groups[key] = UsageRow(key)
            group.add(row[4], row[5], row[6], row[7], row[8])
        return [groups[key] for key in sorted(groups)]
