"""DATABASE_URL in the forms the databases library and hosting providers write, on real server processes.

The PostgreSQL cases need a server in TEST_DATABASE_URLS (.ci/run sets it); each test gets a new database
on it and drops it after.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from .conftest import SERVER_CWD, SERVER_PYTHON, _clean_env, _on_postgresql, free_port, new_postgresql_database
from .relay_clients import demo_answer, sse_stream, ws_stream

POSTGRES_URLS = [url.strip() for url in os.environ.get("TEST_DATABASE_URLS", "").split(",")
                 if url.strip().startswith(("postgresql:", "postgres:"))]
needs_postgresql = pytest.mark.skipif(
    not POSTGRES_URLS, reason="set TEST_DATABASE_URLS=postgresql://postgres@127.0.0.1:5432/test to run on PostgreSQL")


@pytest.fixture
def postgresql_database() -> Iterator[str]:
    """A new database on the PostgreSQL server of TEST_DATABASE_URLS (user@host:port/name), dropped after.

    Ask for it before make_server: fixtures end in reverse order, so the servers stop before the DROP.
    """
    url, drop = new_postgresql_database(POSTGRES_URLS[0])
    yield urlsplit(url).netloc + urlsplit(url).path
    _on_postgresql(POSTGRES_URLS[0], drop)


async def answer_is_saved(relay: Any, message: str) -> None:
    """A streamed answer over each transport, saved complete with the exact text streamed."""
    for events in (await sse_stream(relay.url, {"message": message}),
                   await ws_stream(relay.ws_url, {"message": message})):
        done = events[-1][2]
        assert events[-1][1] == "done", events
        saved = relay.rows("SELECT content, status FROM messages WHERE id = ?", done["messageId"])
        assert saved == [(demo_answer(message), "complete")]


async def test_a_server_on_sqlite_aiosqlite_serves_and_saves(make_server: Callable[..., Any], tmp_path):
    """Fails before the fix: `sqlite+aiosqlite:///` stopped the server at start (DATABASE_URL must start with...)."""
    relay = make_server({"DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'aio.db'}"})
    await answer_is_saved(relay, "saved through sqlite+aiosqlite")
    assert (tmp_path / "aio.db").exists()


@needs_postgresql
@pytest.mark.parametrize("scheme", ["postgres", "postgresql+asyncpg"])
async def test_a_server_on_postgres_or_postgresql_asyncpg_serves_and_saves(postgresql_database, make_server, scheme):
    """Fails before the fix for postgresql+asyncpg:// (refused at start); postgres:// started already, and
    the test keeps it working. sslmode=disable is what Fly.io's URLs carry, and asyncpg honours it."""
    relay = make_server({"DATABASE_URL": f"{scheme}://{postgresql_database}?sslmode=disable"})
    await answer_is_saved(relay, f"saved through {scheme}")
    assert relay.count("SELECT COUNT(*) FROM alembic_version") == 1


@needs_postgresql
def test_sslmode_require_is_honoured_not_ignored(postgresql_database):
    """A server without TLS refuses `sslmode=require`, so the relay must not start. Fails before the fix: the
    databases library ignores sslmode (it reads only ssl=), so the relay connected in plain text."""
    if _on_postgresql(POSTGRES_URLS[0], "SHOW ssl")[0][0] != "off":
        pytest.skip("this PostgreSQL server has TLS on: sslmode=require would succeed")
    result = subprocess.run([SERVER_PYTHON, "-m", "server", "--port", str(free_port())], cwd=SERVER_CWD,
                            env=_clean_env({"DATABASE_URL": f"postgres://{postgresql_database}?sslmode=require"}),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "cannot open the database" in result.stderr and "SSL" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
