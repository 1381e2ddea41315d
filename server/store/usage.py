"""Money and tokens: the usage report and what a budget has spent."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from ..pricing import cache_read_savings
from .base import StoreBase
from .records import UsageRow


class UsageQueries(StoreBase):
    """Sums of tokens and costs."""

    async def spent_since(self, owner_id: str | None, since: str) -> Decimal:
        """The exact sum of the costs of owner_id's answers finished at or after `since` (one SQL SUM over the
        ledger: a deleted conversation's answers count)."""
        owner_clause = "u.owner_id IS NULL" if owner_id is None else "u.owner_id = :owner"
        params: dict[str, Any] = {"since": since}
        if owner_id is not None:
            params["owner"] = owner_id
        total = await self._fetch_val(
            f"SELECT SUM(u.cost) FROM usage u WHERE {owner_clause} AND u.completed_at >= :since", params)
        return self._cost_value(total) or Decimal(0)

    async def usage(self, start: str, end: str, group_by: str, owner_id: str | None = None,
                    every_owner: bool = False) -> list[UsageRow]:
        """Token and cost sums of the answers finished in [start, end), grouped by day, model, agent or user.

        One aggregate query over the ledger (one row per generation: a continued answer has two, and counts
        once): the database sums the costs exactly (NUMERIC, or whole nano-dollars on SQLite).
        """
        params: dict[str, Any] = {"start": start, "end": end}
        where = "u.completed_at >= :start AND u.completed_at < :end"
        if not every_owner:
            if owner_id is None:
                where += " AND u.owner_id IS NULL"
            else:
                where += " AND u.owner_id = :owner"
                params["owner"] = owner_id
        key = _GROUP_KEYS[group_by]
        rows = await self._fetch_all(
            f"SELECT {key} AS k, COUNT(DISTINCT u.message_id), SUM(u.input_tokens), SUM(u.output_tokens),"
            " SUM(u.cache_creation_input_tokens), SUM(u.cache_read_input_tokens), SUM(u.cost),"
            " COUNT(DISTINCT CASE WHEN u.cost IS NULL THEN u.message_id END)"
            f" FROM usage u LEFT JOIN users o ON o.id = u.owner_id WHERE {where} GROUP BY k", params)
        savings = await self._cache_savings(key, where, params)
        # Sorted here, by code point: PostgreSQL would order text by the database's collation.
        return sorted((UsageRow(str(row[0]), int(row[1]), int(row[2]), int(row[3]), int(row[4]), int(row[5]),
                                self._cost_value(row[6]) or Decimal(0), int(row[7]),
                                savings.get(str(row[0]), Decimal(0))) for row in rows),
                      key=lambda row: row.key)

    async def _cache_savings(self, key: str, where: str, params: dict[str, Any]) -> dict[str, Decimal]:
        """Per group, the exact money its cache reads saved: the database sums the read tokens per model, each
        sum is priced at that model's input less cache read price (pricing.cache_read_savings)."""
        rows = await self._fetch_all(
            f"SELECT {key} AS k, u.model, SUM(u.cache_read_input_tokens) FROM usage u"
            f" LEFT JOIN users o ON o.id = u.owner_id WHERE {where} AND u.cache_read_input_tokens > 0"
            " GROUP BY k, u.model", params)
        savings: dict[str, Decimal] = {}
        for row in rows:
            saved = cache_read_savings(int(row[2]), str(row[1] or ""))
            if saved is not None:
                savings[str(row[0])] = savings.get(str(row[0]), Decimal(0)) + saved
        return {group: saved.normalize() if saved else Decimal(0) for group, saved in savings.items()}


# What each grouping groups by; a missing or empty model or agent is "unknown", a conversation without an
# owner "anonymous". Days are the first ten characters of the ISO 8601 completion time.
_GROUP_KEYS = {
    "day": "SUBSTR(u.completed_at, 1, 10)",
    "model": "COALESCE(NULLIF(u.model, ''), 'unknown')",
    "agent": "COALESCE(NULLIF(u.agent_id, ''), 'unknown')",
    "user": "COALESCE(NULLIF(o.name, ''), 'anonymous')",
}
