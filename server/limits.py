"""Per-user limits: requests per minute, concurrent streams, open connections, dollars per day.

Each refusal is a LimitError (429) or BudgetError (402) whose `limit` names the rule and
whose retry_after says when trying again can succeed. Counts live in this process: with
several instances each one applies them on its own, except the budget: the recorded
costs are in the database, and what running answers may still cost is in the ledger
(budget.py), which instances share through Redis.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from .auth import User
from .budget import NANO, Ledger, LocalLedger, dollars, nanos
from .config import Settings
from .errors import BudgetError, LimitError
from .flight import SingleFlight
from .store import Store

# How long a user's spend read from the database is reused (the ledger holds what was saved since).
_SPENT_CACHE_SECONDS = 10.0


def _key(user: User) -> str:
    return user.id or ""


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


@dataclass(frozen=True, slots=True)
class Reservation:
    """An answer's worst case, held in the ledger from its start until it is saved."""

    user: str
    answer: str
    amount: int  # nano-dollars


@dataclass(frozen=True, slots=True)
class _Spent:
    day: str  # UTC
    fetched: float  # time.monotonic()
    since: int  # the ledger's clock just before the read
    dollars: Decimal


class Limits:
    def __init__(self, settings: Settings, store: Store, ledger: Ledger | None = None) -> None:
        self.settings = settings
        self.store = store
        self.ledger: Ledger = ledger or LocalLedger()
        self._buckets: dict[str, _Bucket] = {}
        self._streams: dict[str, int] = {}
        self._connections: dict[str, int] = {}
        self._spent: dict[str, _Spent] = {}
        self._spent_reads: SingleFlight[str, _Spent] = SingleFlight()
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

    # --- the daily budget: costs recorded in the database, worst cases of running answers in the ledger ---

    @property
    def budgeted(self) -> bool:
        return self.settings.daily_budget is not None

    async def reserve(self, user: User, answer: str, worst_case: Decimal | None) -> Reservation | None:
        """Admit an answer under the user's daily budget and hold its worst case until settle() or release().

        Admitted while the user's spend today (the recorded costs, read from the database at most
        _SPENT_CACHE_SECONDS ago) plus what the ledger holds (the worst cases of their running answers, and
        the costs of answers saved since that read) is below the budget. Each answer admitted that way can
        take the day over the budget by at most its own worst case, so the day ends below the budget plus
        the worst case of the last answer admitted. None: no budget is set.

        Raises:
            BudgetError: the budget is spent (retry at 00:00 UTC) or held by running answers (retry soon).
        """
        budget = self.settings.daily_budget
        if budget is None:
            return None
        spent = await self.spent_today(user)
        if spent.dollars >= budget:
            raise self._spent_error(budget, spent.dollars)
        amount = nanos(worst_case) if worst_case else 0
        room = math.ceil((budget - spent.dollars) / NANO)
        admitted, running, settled = await self.ledger.reserve(_key(user), answer, amount, room, spent.since)
        if admitted:
            return Reservation(_key(user), answer, amount)
        total = (spent.dollars + dollars(settled)).normalize()
        if total >= budget:
            raise self._spent_error(budget, total)
        raise self._refuse(BudgetError(
            f"today's budget of ${format(budget, 'f')} is taken: ${format(total, 'f')} spent and"
            f" ${format(dollars(running).normalize(), 'f')} held by answers still running; try again when they end",
            retry_after=1.0, details={"limit": "budget_per_day", "spent": format(total, "f"),
                                      "reserved": format(dollars(running).normalize(), "f"),
                                      "budget": format(budget, "f")}))

    def settle(self, reservation: Reservation | None, cost: Decimal | None) -> None:
        """The answer is saved: its entry holds its recorded cost now (None: unknown, the worst case stays)."""
        if reservation is not None:
            amount = reservation.amount if cost is None else nanos(cost)
            self.ledger.settle(reservation.user, reservation.answer, amount)

    def release(self, reservation: Reservation | None) -> None:
        """The answer never started (nothing was saved): its entry goes."""
        if reservation is not None:
            self.ledger.release(reservation.user, reservation.answer)

    async def aclose(self) -> None:
        await self.ledger.aclose()

    def _spent_error(self, budget: Decimal, spent: Decimal) -> BudgetError | LimitError:
        tomorrow = (datetime.now(UTC) + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
        wait = math.ceil((tomorrow - datetime.now(UTC)).total_seconds())
        return self._refuse(BudgetError(
            f"today's budget of ${format(budget, 'f')} is spent (${format(spent, 'f')}); it renews at 00:00 UTC",
            retry_after=wait, details={"limit": "budget_per_day", "spent": format(spent, "f"),
                                       "budget": format(budget, "f")}))

    async def spent_today(self, user: User) -> _Spent:
        """The user's recorded spend today, and the ledger's time just before it was read."""
        day = datetime.now(UTC).strftime("%Y-%m-%d")
        key = _key(user)
        cached = self._spent.get(key)
        if cached is not None and cached.day == day and time.monotonic() - cached.fetched < _SPENT_CACHE_SECONDS:
            return cached

        async def read() -> _Spent:
            fetched = time.monotonic()
            since = await self.ledger.now()  # before the read: whatever is settled from now on, it may miss
            spent = await self.store.spent_since(user.id, day + "T00:00:00.000000Z")
            self._spent[key] = _Spent(day, fetched, since, spent)
            return self._spent[key]

        return await self._spent_reads.run(key + "/" + day, read)


def _give(counts: dict[str, int], key: str) -> None:
    held = counts.get(key, 0) - 1
    if held > 0:
        counts[key] = held
    else:
        counts.pop(key, None)
