"""Which database errors mean "cannot be used now", and their one user-facing form (StorageUnavailableError).

Pure: no I/O.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator

import asyncpg  # type: ignore[import-untyped]

from ..errors import StorageUnavailableError

# SQLite result codes (the low byte of an extended code) that say the file cannot take the write now, as
# opposed to a wrong statement: busy or locked past the timeout, out of memory, read-only, I/O, full, unopenable.
_SQLITE_UNAVAILABLE = {5, 6, 7, 8, 10, 13, 14}


def unavailable(exc: BaseException) -> bool:
    """Whether `exc` says the database cannot be reached or cannot take writes now (retrying later may work)."""
    if isinstance(exc, StorageUnavailableError):
        return True
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        return code is not None and code & 0xFF in _SQLITE_UNAVAILABLE
    # PostgreSQL: class 08 (connection), 53 (disk full, out of memory, too many connections), 57 (shutting
    # down, starting up); asyncpg's InterfaceError is a connection it has closed; OSError a refused connect.
    return isinstance(exc, (asyncpg.PostgresConnectionError, asyncpg.InsufficientResourcesError,
                            asyncpg.OperatorInterventionError, asyncpg.InterfaceError, OSError, TimeoutError))


def storage_error(exc: BaseException) -> StorageUnavailableError:
    """The user-facing error for a database that cannot be used now; the cause stays in the logs."""
    if isinstance(exc, StorageUnavailableError):
        return exc
    return StorageUnavailableError("the database cannot take this request now; try again shortly",
                                   retry_after=1.0)


def one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:200]


@contextlib.contextmanager
def as_storage_errors() -> Iterator[None]:
    """A database that cannot be used now raises StorageUnavailableError out of this block; other errors pass."""
    try:
        yield
    except Exception as exc:
        if unavailable(exc):
            raise storage_error(exc) from exc
        raise

