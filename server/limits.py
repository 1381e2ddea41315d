"""Per-user limits: requests per minute, concurrent streams, open connections, dollars per day.

Each refusal is a LimitError (429) or BudgetError (402) whose `limit` names the rule and
whose retry_after says when trying again can succeed. Counts live in this process: with
several instances each one applies them on its own, except the budget, which is read
from the recorded costs in the database.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from .auth import User
from .config import Settings
from .errors import BudgetError, LimitError
from .store import Store

# How long a user's spend read from the database is reused; answers finished here are added at once.
_SPENT_CACHE_SECONDS = 10.0


def _key(user: User) -> str:
    return user.id or ""


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class Limits:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self._buckets: dict[str, _Bucket] = {}
        self._streams: dict[str, int] = {}
        self._connections: dict[str, int] = {}
        self._spent: dict[str, tuple[str, float, Decimal]] = {}  # user -> (UTC day, read at, dollars)
        self.on_refusal: Callable[[str], None] = lambda limit: None  # metrics count refusals by limit

    def _refuse(self, error: LimitError | BudgetError) -> LimitError | BudgetError:
        self.on_refusal(str((error.details or {}).get("limit", error.code)))
        return error

    # --- requests per minute: a token bucket that refills limit/60 a second, bursts up to limit ---

    def request(self, user: User) -> None:
        limit = self.settings.limit_requests_per_minute
        if not limit:
            return
        moment = time.monotonic()
        key = _key(user)
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) > 100_000:
                self._forget_full_buckets(moment, limit)
            bucket = self._buckets[key] = _Bucket(float(limit), moment)
        rate = limit / 60.0
        bucket.tokens = min(float(limit), bucket.tokens + (moment - bucket.updated) * rate)
        bucket.updated = moment
        if bucket.tokens < 1.0:
            wait = math.ceil((1.0 - bucket.tokens) / rate * 10) / 10
            raise self._refuse(LimitError(f"too many requests: the limit is {limit} a minute", retry_after=wait,
                                          details={"limit": "requests_per_minute"}))
        bucket.tokens -= 1.0

    def _forget_full_buckets(self, moment: float, limit: int) -> None:
        rate = limit / 60.0
        self._buckets = {k: b for k, b in self._buckets.items() if b.tokens + (moment - b.updated) * rate < limit}

    # --- concurrent streams and open connections: counts taken and given back ---

    def take_stream(self, user: User) -> None:
        self._take(self._streams, _key(user), self.settings.limit_concurrent_streams, "concurrent_streams",
                   "answers streaming at once")

    def give_stream(self, user: User) -> None:
        _give(self._streams, _key(user))

    def take_connection(self, user: User) -> None:
        self._take(self._connections, _key(user), self.settings.limit_connections, "connections",
                   "open connections")

    def _take(self, counts: dict[str, int], key: str, limit: int, name: str, what: str) -> None:
        held = counts.get(key, 0)
        if limit and held >= limit:
            raise self._refuse(LimitError(f"too many {what}: the limit is {limit}", retry_after=1.0,
                                          details={"limit": name}))
        counts[key] = held + 1

    def give_connection(self, user: User) -> None:
        _give(self._connections, _key(user))

    def streams_of(self, user: User) -> int:
        return self._streams.get(_key(user), 0)

    # --- the daily budget, from the costs recorded in the database ---

    async def check_budget(self, user: User) -> None:
        budget = self.settings.daily_budget
        if budget is None:
            return
        spent = await self.spent_today(user)
        if spent >= budget:
            tomorrow = (datetime.now(UTC) + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
            wait = math.ceil((tomorrow - datetime.now(UTC)).total_seconds())
            raise self._refuse(BudgetError(
                f"today's budget of ${format(budget, 'f')} is spent (${format(spent, 'f')}); it renews at 00:00 UTC",
                retry_after=wait, details={"limit": "budget_per_day", "spent": format(spent, "f"),
                                           "budget": format(budget, "f")}))

    async def spent_today(self, user: User) -> Decimal:
        day = datetime.now(UTC).strftime("%Y-%m-%d")
        key = _key(user)
        cached = self._spent.get(key)
        moment = time.monotonic()
        if cached is not None and cached[0] == day and moment - cached[1] < _SPENT_CACHE_SECONDS:
            return cached[2]
        spent = await self.store.spent_since(user.id, day + "T00:00:00.000000Z")
        self._spent[key] = (day, moment, spent)
        return spent

    def record_cost(self, user: User, cost: Decimal | None) -> None:
        """An answer finished here: count its cost now rather than at the next database read."""
        cached = self._spent.get(_key(user))
        if cost and cached is not None and cached[0] == datetime.now(UTC).strftime("%Y-%m-%d"):
            self._spent[_key(user)] = (cached[0], cached[1], cached[2] + cost)


def _give(counts: dict[str, int], key: str) -> None:
    held = counts.get(key, 0) - 1
    if held > 0:
        counts[key] = held
    else:
        counts.pop(key, None)
