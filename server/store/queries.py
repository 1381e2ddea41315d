"""An operation: a generator of queries that a write driver runs in one transaction.

Pure: no I/O; the drivers (sqlite_writer.py, postgres_writer.py) run the queries.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

ONE, ALL, NONE = "one", "all", "none"


@dataclass(frozen=True, slots=True)
class Query:
    """One statement of an operation, with :named parameters; `fetch` says what comes back.

    `alone`: the operation promises this is its first and only statement, so a driver may run it without an
    explicit transaction (one statement is atomic by itself): on PostgreSQL one round trip instead of three.
    """

    sql: str
    params: dict[str, Any] = field(default_factory=dict)
    fetch: str = NONE
    alone: bool = False


# An operation yields Queries, receives each one's rows (a row, a list of rows, or None), returns its result.
Operation = Generator[Query, Any, T]


def drive(operation: Operation[T], run: Callable[[Query], Any]) -> T:
    """Run a generator operation to its end with a synchronous query runner."""
    try:
        query = next(operation)
        while True:
            query = operation.send(run(query))
    except StopIteration as stop:
        result: T = stop.value
        return result


