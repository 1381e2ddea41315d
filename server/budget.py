"""Budget reservations: what each user's running answers may still cost, held until each is saved.

A ledger holds one entry per answer of a user: running (its worst case, reserved at its start)
or settled at a time (its recorded cost, once the answer is saved). Limits admits an answer
when the user's spend read from the database, plus what the ledger holds, is under the budget
(see Limits.reserve for the exact rule). LocalLedger keeps entries in this process; with
REDIS_URL, RedisLedger keeps them in one Redis hash per user, which every instance checks and
changes atomically (a Lua script).

Money here is whole nano-dollars (an amount rounded up to the next one): every published price
is a whole number of nano-dollars per token, so costs convert exactly, and sums are exact
integers both in Python and in Redis's Lua, whose numbers are exact integers up to 2**53
(9 million dollars).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from decimal import Decimal
from typing import Any, Protocol

from redis.exceptions import RedisError

from .errors import RelayError
from .tasks import stop_tasks

log = logging.getLogger("deltarelay.budget")

NANO = Decimal("0.000000001")
# A settled entry is kept this long: longer than a spend read from the database is reused (limits.py), plus
# the read itself, so every read that started before the save counts it here and every later one in the database.
SETTLED_KEEP_SECONDS = 60.0
# The answers of an instance that died are saved by another one as `interrupted`, within seconds: until then,
# and for this long, each counts at its worst case.
DEAD_OWNER_SECONDS = 30.0
KEY_TTL_SECONDS = 2 * 24 * 3600  # a user's hash outlives any answer; an idle user's goes


def nanos(amount: Decimal) -> int:
    """An amount of dollars in whole nano-dollars, rounded up."""
    return math.ceil(amount / NANO)


def dollars(amount: int) -> Decimal:
    return Decimal(amount) * NANO


class Ledger(Protocol):
    """A user's entries: running answers at their worst case, saved ones at their cost for a while."""

    async def now(self) -> int:
        """The ledger's clock, in microseconds: settled times and `since` are on it."""

    async def reserve(self, user: str, answer: str, amount: int, room: int, since: int) -> tuple[bool, int, int]:
        """Atomically: if what the user's entries hold is less than `room`, add `answer` running at `amount`.

        An entry holds its amount while running, and once settled if it was settled at or after `since`
        (the spend read from the database before `since` cannot include it). Returns (admitted, running
        amount, settled amount), both sums without this answer.
        """

    def settle(self, user: str, answer: str, cost: int) -> None:
        """The answer is saved with `cost`: its entry holds that, settled now. Never blocks; applied in order."""

    def release(self, user: str, answer: str) -> None:
        """The answer never started: its entry goes."""

    async def aclose(self) -> None:
        """Finish the settles and releases still under way."""


class LocalLedger:
    """Entries in this process: for one instance. Every call's check and change happen in one step."""

    def __init__(self, clock: Callable[[], int] = lambda: time.monotonic_ns() // 1000) -> None:
        self._clock = clock
        self._entries: dict[str, dict[str, tuple[int, int]]] = {}  # user -> answer -> (amount, settled at; 0)
        self._settled: deque[tuple[int, str, str]] = deque()  # (settled at, user, answer), oldest first

    async def now(self) -> int:
        return self._clock()

    async def reserve(self, user: str, answer: str, amount: int, room: int, since: int) -> tuple[bool, int, int]:
        self._forget_old()
        entries = self._entries.setdefault(user, {})
        running = settled = 0
        for held, at in entries.values():
            if not at:
                running += held
            elif at >= since:
                settled += held
        if running + settled >= room:
            if not entries:
                del self._entries[user]
            return False, running, settled
        entries[answer] = (amount, 0)
        return True, running, settled

    def settle(self, user: str, answer: str, cost: int) -> None:
        moment = self._clock()
        self._entries.setdefault(user, {})[answer] = (cost, moment)
        self._settled.append((moment, user, answer))
        self._forget_old()

    def release(self, user: str, answer: str) -> None:
        entries = self._entries.get(user)
        if entries is not None:
            entries.pop(answer, None)
            if not entries:
                del self._entries[user]

    async def aclose(self) -> None:
        pass

    def _forget_old(self) -> None:
        oldest = self._clock() - int(SETTLED_KEEP_SECONDS * 1_000_000)
        while self._settled and self._settled[0][0] < oldest:
            at, user, answer = self._settled.popleft()
            entries = self._entries.get(user)
            if entries is not None and entries.get(answer, (0, 0))[1] == at:
                del entries[answer]
                if not entries:
                    del self._entries[user]


# KEYS[1]: the user's hash; field: answer id; value: "amount owner settled_at" (settled_at 0: running).
# ARGV: answer, amount, room, since, owner, the lease key of an instance minus its id, keep (µs), dead owner (µs),
# key TTL (s). An entry whose owner's lease is gone holds its amount, settled, for the dead-owner time.
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local since = tonumber(ARGV[4])
local keep = tonumber(ARGV[7])
local running, settled = 0, 0
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  local amount, owner, at = string.match(fields[i + 1], '^(%d+) (%S+) (%d+)$')
  local held = tonumber(amount)
  at = tonumber(at)
  if at == 0 and redis.call('EXISTS', ARGV[6] .. owner) == 0 then
    at = now + tonumber(ARGV[8])
    redis.call('HSET', KEYS[1], fields[i], amount .. ' ' .. owner .. ' ' .. string.format('%.0f', at))
  end
  if at ~= 0 and at + keep < now then
    redis.call('HDEL', KEYS[1], fields[i])
  elseif at == 0 then
    running = running + held
  elseif at >= since then
    settled = settled + held
  end
end
if running + settled < tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. ARGV[5] .. ' 0')
  redis.call('EXPIRE', KEYS[1], ARGV[9])
  return {1, running, settled}
end
return {0, running, settled}
"""

# KEYS[1]: the user's hash. ARGV: answer, cost, owner, key TTL (s).
_SETTLE = """
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. ARGV[3] .. ' ' .. t[1] .. string.format('%06d', tonumber(t[2])))
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""

def _unavailable() -> RelayError:
    # Without Redis the budget cannot be held across instances: refuse new answers rather than overspend.
    return RelayError("the daily budget cannot be checked right now; try again", code="budget_unavailable",
                      status=503, retryable=True, retry_after=1.0)


# A settle or release that Redis did not take is tried again after each of these pauses (seconds).
RETRY_PAUSES = (0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class RedisLedger:
    """Entries in Redis, shared by every instance: `{prefix}:budget:{user}`, one field per answer.

    The clock is Redis's own (TIME), for every instance alike. An instance that dies leaves its
    running entries behind: once its lease (`alive_key(instance)`) is gone they hold their worst
    case for DEAD_OWNER_SECONDS, while another instance saves those answers, and then go.
    Settles and releases run in the background, in order, retried while Redis is away.
    """

    def __init__(self, redis: Any, prefix: str, instance_id: str, alive_key: Callable[[str], str]) -> None:
        self.redis = redis
        self.prefix = prefix
        self.instance_id = instance_id
        self.alive_prefix = alive_key("")
        self._reserve = redis.register_script(_RESERVE)
        self._settle = redis.register_script(_SETTLE)
        self._queue: deque[tuple[str, str, int | None]] = deque()  # (user, answer, cost; None: release)
        self._worker: asyncio.Task[None] | None = None

    def _key(self, user: str) -> str:
        return f"{self.prefix}:budget:{user or '-'}"

    async def now(self) -> int:
        try:
            seconds, micros = await self.redis.time()
        except (RedisError, OSError) as exc:
            raise _unavailable() from exc
        return int(seconds) * 1_000_000 + int(micros)

    async def reserve(self, user: str, answer: str, amount: int, room: int, since: int) -> tuple[bool, int, int]:
        try:
            admitted, running, settled = await self._reserve(
                keys=[self._key(user)],
                args=[answer, amount, room, since, self.instance_id, self.alive_prefix,
                      int(SETTLED_KEEP_SECONDS * 1_000_000), int(DEAD_OWNER_SECONDS * 1_000_000), KEY_TTL_SECONDS])
        except (RedisError, OSError) as exc:
            raise _unavailable() from exc
        return bool(admitted), int(running), int(settled)

    def settle(self, user: str, answer: str, cost: int) -> None:
        self._enqueue(user, answer, cost)

    def release(self, user: str, answer: str) -> None:
        self._enqueue(user, answer, None)

    def _enqueue(self, user: str, answer: str, cost: int | None) -> None:
        self._queue.append((user, answer, cost))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work(), name="budget-settle")

    async def _work(self) -> None:
        while self._queue:
            user, answer, cost = self._queue[0]
            for pause in (*RETRY_PAUSES, None):
                try:
                    if cost is None:
                        await self.redis.hdel(self._key(user), answer)
                    else:
                        await self._settle(keys=[self._key(user)], args=[answer, cost, self.instance_id,
                                                                         KEY_TTL_SECONDS])
                    break
                except Exception as exc:  # Redis away: the entry holds its worst case meanwhile (never less)
                    if pause is None:
                        log.error("could not settle the budget entry of answer %s in Redis: %s", answer, exc)
                        break
                    log.warning("could not settle the budget entry of answer %s in Redis (%s); trying again",
                                answer, exc)
                    await asyncio.sleep(pause)
            self._queue.popleft()

    async def aclose(self) -> None:
        if self._worker is not None:
            try:
                async with asyncio.timeout(10):
                    await self._worker
            except TimeoutError:
                log.error("gave up settling %d budget entries in Redis at shutdown", len(self._queue))
                await stop_tasks([self._worker])
