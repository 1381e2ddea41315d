"""DATABASE_URL in the forms each driver reads: `databases`, asyncpg, a SQLite file path.

Pure: no I/O.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from ..config import database_url


def databases_url(url: str) -> str:
    """The `databases` URL for a DATABASE_URL: SQLite through aiosqlite, PostgreSQL through asyncpg.

    `databases` hands asyncpg the host, port, user, password and database of the URL and, of its
    parameters, only `ssl`, `min_size` and `max_size`: libpq's `sslmode` goes to it as `ssl`.
    """
    url = database_url(url)
    if url.startswith("sqlite:"):
        return "sqlite+aiosqlite:" + url[len("sqlite:"):]
    parts = urlsplit(url)
    query = [("ssl" if name == "sslmode" else name, value) for name, value in parse_qsl(parts.query)]
    return urlunsplit(parts._replace(scheme="postgresql+asyncpg", query=urlencode(query)))


def asyncpg_dsn(url: str) -> str:
    """A PostgreSQL DATABASE_URL as `asyncpg.connect()` reads it (libpq's form: the pool sizes dropped)."""
    parts = urlsplit(database_url(url))
    query = [(name, value) for name, value in parse_qsl(parts.query) if name == "sslmode"]
    return urlunsplit(parts._replace(query=urlencode(query)))



def sqlite_path(url: str) -> str:
    """The file of sqlite:///relative.db or sqlite:////absolute.db, percent-decoded as `databases` does."""
    return unquote(database_url(url)[len("sqlite:///"):])

