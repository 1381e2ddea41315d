"""Shared fixtures: real server processes on free ports, temp SQLite files, recorded streams."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest

from server.config import database_url
from server.store import asyncpg_dsn, sqlite_path

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
STREAMS = DATA / "anthropic-streams"
# The server under test: the tree (the editable install), or with DELTARELAY_SERVER_PYTHON set (scripts/test sets it
# to a fresh venv outside the checkout where the built wheel is installed) that interpreter, started from a directory
# outside the checkout so that `-m server` imports the installed package and nothing of the tree.
SERVER_PYTHON = os.environ.get("DELTARELAY_SERVER_PYTHON") or sys.executable
SERVER_CWD = Path(os.environ.get("DELTARELAY_SERVER_CWD") or ROOT)
# Every table the migrations create (and the old runner's record), in an order that drops cleanly.
SCHEMA_TABLES = ("attachments", "usage", "messages", "sessions", "conversations", "users", "write_probe",
                 "alembic_version", "schema_migrations")


def stored_cost(value: Any) -> Decimal | None:
    """A `cost` column's value read straight from the database, as USD: whole nano-dollars on SQLite (an int,
    migration 0005), NUMERIC on PostgreSQL."""
    if value is None:
        return None
    if isinstance(value, int):
        return Decimal(value).scaleb(-9)
    return Decimal(value)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _clean_env(extra: dict[str, str]) -> dict[str, str]:
    # Proxy variables too: a developer's HTTP_PROXY would send the servers' loopback upstream traffic to it.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ANTHROPIC_", "RELAY_", "DATABASE_URL")) and not k.lower().endswith("_proxy")}
    env.update({"RELAY_OFFLINE_DELAY_MS": "0", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


class Process:
    """A real server process (uvicorn) on a free port, with its log kept for assertions."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path, port: int, ready_path: str,
                 cwd: Path = SERVER_CWD, preexec_fn: Callable[[], None] | None = None) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.ws_url = f"ws://127.0.0.1:{port}"
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     preexec_fn=preexec_fn)
        try:
            self._wait_ready(ready_path)
        except BaseException:
            self.stop(signal.SIGKILL)
            raise

    def _wait_ready(self, path: str) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited at start:\n{self.log()}")
            try:
                httpx.get(self.url + path, timeout=1)
                return
            except httpx.TransportError:
                time.sleep(0.05)  # waiting for a process to bind, not for test logic
        raise RuntimeError(f"server did not start:\n{self.log()}")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


# Set (scripts/test's second pass, which CI runs): every server process gets a new PostgreSQL database on
# this server instead of a SQLite file, so the end-to-end suites run on both databases.
SERVERS_ON_POSTGRESQL = os.environ.get("TEST_SERVERS_ON_POSTGRESQL", "")


def _on_postgresql(url: str, *statements: str) -> list[tuple[Any, ...]]:
    """Run statements on PostgreSQL from sync or async test code (a thread with its own event loop)."""
    async def run() -> list[tuple[Any, ...]]:
        connection = await asyncpg.connect(url)
        try:
            rows: list[tuple[Any, ...]] = []
            for statement in statements:
                rows = [tuple(row) for row in await connection.fetch(statement)]
            return rows
        finally:
            await connection.close()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, run()).result(timeout=60)


def new_postgresql_database(server_url: str) -> tuple[str, str]:
    """A new empty database on `server_url`'s PostgreSQL server: its URL (query kept) and the DROP that removes it."""
    name = f"relay_{uuid.uuid4().hex[:12]}"
    _on_postgresql(asyncpg_dsn(server_url), f"CREATE DATABASE {name}")
    url = urlunsplit(urlsplit(server_url)._replace(path="/" + name))
    return url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"


class RelayServer(Process):
    """`python -m server` with a database of its own: a SQLite file, or a new PostgreSQL database.

    A DATABASE_URL in `env` (in any form the server accepts) is used instead, and `rows` reads it.

    `database_url` names the database instead (the test's own server, or a SQLite file where the test
    wants it); the test then owns it. `preexec_fn` runs in the server's process before it starts (tests lower
    its resource limits there).
    """

    def __init__(self, tmp: Path, env: dict[str, str] | None = None, database_url: str | None = None,
                 preexec_fn: Callable[[], None] | None = None) -> None:
        port = free_port()
        self.database_url = f"sqlite:///{tmp / 'relay.db'}"
        self._dropped_by = ""
        if database_url is not None:
            self.database_url = database_url
        elif env and "DATABASE_URL" in env:
            self.database_url = env["DATABASE_URL"]
        elif SERVERS_ON_POSTGRESQL:
            self.database_url, self._dropped_by = new_postgresql_database(SERVERS_ON_POSTGRESQL)
        full_env = _clean_env({"DATABASE_URL": self.database_url, **(env or {})})
        super().__init__([SERVER_PYTHON, "-m", "server", "--port", str(port)], full_env, tmp / "server.log",
                         port, "/healthz", preexec_fn=preexec_fn)

    @property
    def db_path(self) -> Path:
        """The SQLite file (for a server on SQLite)."""
        return Path(sqlite_path(self.database_url))

    def rows(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """A query on the server's database; `?` marks the parameters (literals only: tests, not input)."""
        if database_url(self.database_url).startswith("sqlite:"):
            with sqlite3.connect(self.db_path) as db:
                return [tuple(row) for row in db.execute(sql, params).fetchall()]
        for param in params:
            sql = sql.replace("?", "'" + str(param).replace("'", "''") + "'", 1)
        return _on_postgresql(asyncpg_dsn(self.database_url), sql)

    def count(self, sql: str, *params: Any) -> int:
        return int(self.rows(sql, *params)[0][0])

    def stop(self, sig: int = signal.SIGTERM) -> int:
        code = super().stop(sig)
        if self._dropped_by:
            _on_postgresql(asyncpg_dsn(SERVERS_ON_POSTGRESQL), self._dropped_by)
            self._dropped_by = ""
        return code


class MockUpstream(Process):
    """`python -m server.mock_upstream`: the offline model as an Anthropic-compatible server."""

    def __init__(self, tmp: Path, *args: str) -> None:
        port = free_port()
        super().__init__([SERVER_PYTHON, "-m", "server.mock_upstream", "--port", str(port), *args],
                         _clean_env({}), tmp / f"upstream-{port}.log", port, "/")


def assert_no_traceback(server: Process) -> None:
    log = server.log()
    assert "Traceback" not in log, log


# A JWT's header and payload are base64url JSON objects: both start with "eyJ" ('{"').
JWT_SHAPE = re.compile(r"eyJ[A-Za-z0-9_-]*\.eyJ[A-Za-z0-9_-]*\.")


def assert_no_secret_in_log(server: Process) -> None:
    """No API token, session secret or JWT reached the server's log."""
    log = server.log()
    assert "drt_" not in log and "drs_" not in log, "a token or session secret reached the log"
    assert JWT_SHAPE.search(log) is None, "a JWT reached the log"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayServer]:
    """One offline-model server for a test module; its log must end without a traceback."""
    relay = RelayServer(tmp_path_factory.mktemp("relay"))
    yield relay
    relay.stop()
    assert_no_traceback(relay)
    assert JWT_SHAPE.search(relay.log()) is None, "a JWT reached the log"


@pytest.fixture
def make_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """Start servers with custom settings; all stopped (and checked for tracebacks) after the test."""
    started: list[Process] = []

    def start(env: dict[str, str] | None = None, database_url: str | None = None,
              preexec_fn: Callable[[], None] | None = None) -> RelayServer:
        relay = RelayServer(tmp_path_factory.mktemp("relay"), env, database_url, preexec_fn)
        started.append(relay)
        return relay

    yield start
    for process in started:
        process.stop()
    for process in started:
        assert_no_traceback(process)
        assert JWT_SHAPE.search(process.log()) is None, "a JWT reached the log"


@pytest.fixture
def make_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    started: list[Process] = []

    def start(*args: str) -> MockUpstream:
        upstream = MockUpstream(tmp_path_factory.mktemp("upstream"), *args)
        started.append(upstream)
        return upstream

    yield start
    for process in started:
        process.stop()


def pytest_sessionstart(session: pytest.Session) -> None:
    """With DELTARELAY_SERVER_PYTHON set, the server processes must run the installed package, not the tree."""
    if SERVER_PYTHON == sys.executable:
        return
    found = subprocess.run([SERVER_PYTHON, "-c", "import server; print(server.__file__)"], cwd=SERVER_CWD,
                           env=_clean_env({}), capture_output=True, text=True, timeout=60)
    location = Path(found.stdout.strip() or "/nonexistent").resolve()
    if found.returncode != 0 or ROOT in location.parents:
        raise pytest.UsageError(f"DELTARELAY_SERVER_PYTHON={SERVER_PYTHON} does not import an installed server "
                                f"package from {SERVER_CWD}: {found.stdout.strip()} {found.stderr.strip()[-300:]}")
