"""What the store saves and returns: statuses, ids, times, a turn, a reply, usage sums.

Pure: no I/O.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any


class Status(StrEnum):
    STREAMING = "streaming"
    COMPLETE = "complete"
    ERROR = "error"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"


def now() -> str:
    """UTC time as ISO 8601 text with microseconds: sorts as text, portable across databases."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_id() -> str:
    """32 random hex digits: uuid4().hex's form, without building a UUID (five ids each stream start)."""
    return secrets.token_hex(16)


def storable_id(value: str) -> bool:
    """An id that may reach a query: ours are hex; anything else from a URL is simply not found."""
    return 0 < len(value) <= 200 and value.isprintable()


NANOS_PER_USD = 9  # SQLite stores a cost as whole nano-dollars (10 ** -9 USD); see migration 0005


def cost_nanos(cost: Decimal) -> int:
    """A cost as whole nano-dollars, exactly.

    Raises:
        ValueError: the cost is finer than a nano-dollar (no published price makes one; it is never rounded).
    """
    units = cost.scaleb(NANOS_PER_USD)
    if units != units.to_integral_value():
        raise ValueError(f"the cost {cost} is finer than a nano-dollar")
    return int(units)


def cost_of_nanos(nanos: int) -> Decimal:
    """Whole nano-dollars as USD, without trailing zeros ("0.000015")."""
    return Decimal(nanos).scaleb(-NANOS_PER_USD).normalize()


class FinishedElsewhereError(Exception):
    """A save found its message already finished (by another process, or a survivor instance): nothing written."""


# SQLite result codes (the low byte of an extended code) that say the file cannot take the write now, as

@dataclass(frozen=True, slots=True)
class Turn:
    """What the core needs to run one answer: ids and the history to send upstream."""

    conversation_id: str
    user_message_id: str
    assistant_message_id: str
    history: list[dict[str, Any]]
    trace_session_id: str = ""
    parent_id: str | None = None  # the answer's parent: its user message
    base: Reply | None = None  # a continued answer as it was: the new text and usage are added to it
    # The newest answer in the history that the upstream counted: (messages of `history` before it, the input
    # tokens its request had: input + cache writes + cache reads). None: no such answer.
    counted: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class Reply:
    """The final state of an assistant message, saved once when its stream ends."""

    content: str
    thinking: str
    model: str
    status: Status
    stop_reason: str | None
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int
    cost: Decimal | None
    cost_estimated: bool = False
    error_code: str | None = None
    # When it was finished (see now()), fixed once per answer: a save retried after a commit whose reply was
    # lost finds its own earlier write by it, and counts as done rather than as finished elsewhere.
    finished_at: str | None = None
    # The API messages this answer stands for in later requests (every round's assistant content and tool
    # results, thinking with its signature); None: `content` alone (see migration 0008).
    blocks: list[dict[str, Any]] | None = None


@dataclass(slots=True)
class UsageRow:
    """Sums over a group of answers; cost is exact, over the answers that have a price."""

    key: str
    messages: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cost: Decimal = field(default_factory=Decimal)
    unpriced: int = 0  # answers of a model without a price: counted, not costed
    # What the cache reads saved against uncached input: cache read tokens x (input - cache read price).
    cache_savings: Decimal = field(default_factory=Decimal)

    def merge(self, other: UsageRow) -> None:
        self.messages += other.messages
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cache_creation_input_tokens += other.cache_creation_input_tokens
        self.cache_read_input_tokens += other.cache_read_input_tokens
        self.cost += other.cost
        self.unpriced += other.unpriced
        self.cache_savings += other.cache_savings

