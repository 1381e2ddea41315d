"""Usage reports: tokens, exact costs and answer counts over a range of UTC days, grouped one way.

The API (`GET /api/usage`), the usage page and `deltarelay usage` all come through here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from .errors import BadRequestError
from .store import Store, UsageRow

GROUPS = ("day", "model", "agent", "user")
DEFAULT_DAYS = 30
MAX_DAYS = 1830  # five years: a day-by-day answer stays a few hundred KB


@dataclass(frozen=True, slots=True)
class UsageQuery:
    first_day: date
    last_day: date  # inclusive
    group_by: str

    @property
    def start(self) -> str:
        return self.first_day.isoformat() + "T00:00:00.000000Z"

    @property
    def end(self) -> str:
        """The exclusive end: the start of the day after the last one."""
        return (self.last_day + timedelta(days=1)).isoformat() + "T00:00:00.000000Z"


def _day(value: str | None, name: str) -> date | None:
    if value is None or value == "":
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise BadRequestError(f"{name} must be a date like 2026-11-24") from None


def parse_query(first: str | None, last: str | None, group_by: str | None, today: date | None = None) -> UsageQuery:
    """The report asked for: `from` and `to` are UTC days, both included; default the last 30 days.

    Raises:
        BadRequestError: a malformed date, an unknown grouping, or a range that is backwards or too long.
    """
    today = today or datetime.now(UTC).date()
    group = group_by or "day"
    if group not in GROUPS:
        raise BadRequestError(f"groupBy must be one of {', '.join(GROUPS)}")
    last_day = _day(last, "to") or today
    first_day = _day(first, "from") or last_day - timedelta(days=DEFAULT_DAYS - 1)
    if first_day > last_day:
        raise BadRequestError("from must not be after to")
    if (last_day - first_day).days >= MAX_DAYS:
        raise BadRequestError(f"the range may cover at most {MAX_DAYS} days")
    return UsageQuery(first_day, last_day, group)


async def usage_rows(store: Store, query: UsageQuery, owner_id: str | None, every_owner: bool) -> list[UsageRow]:
    rows = await store.usage(query.start, query.end, query.group_by, owner_id, every_owner)
    if query.group_by != "day":
        return rows
    # Every day of the range, quiet ones as zeros: a chart of the range needs no gaps filled by its reader.
    by_day = {row.key: row for row in rows}
    days = (query.last_day - query.first_day).days + 1
    keys = [(query.first_day + timedelta(days=n)).isoformat() for n in range(days)]
    return [by_day.get(key) or UsageRow(key) for key in keys]


def total_of(rows: list[UsageRow]) -> UsageRow:
    total = UsageRow("total")
    for row in rows:
        total.merge(row)
    return total


def row_json(row: UsageRow) -> dict[str, Any]:
    return {
        "key": row.key,
        "messages": row.messages,
        "inputTokens": row.input_tokens,
        "outputTokens": row.output_tokens,
        "cacheCreationInputTokens": row.cache_creation_input_tokens,
        "cacheReadInputTokens": row.cache_read_input_tokens,
        "cost": format(row.cost, "f"),  # exact decimal text
        "cacheSavings": format(row.cache_savings, "f"),
        "unpricedMessages": row.unpriced,
    }


def report_json(query: UsageQuery, rows: list[UsageRow], scope: str) -> dict[str, Any]:
    total = row_json(total_of(rows))
    del total["key"]
    return {
        "from": query.first_day.isoformat(),
        "to": query.last_day.isoformat(),
        "groupBy": query.group_by,
        "scope": scope,
        "rows": [row_json(row) for row in rows],
        "total": total,
    }
