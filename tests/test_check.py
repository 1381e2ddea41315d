"""`deltarelay check` as an operator runs it: real processes, real databases, Redis and a mock upstream.

PostgreSQL cases need TEST_DATABASE_URLS (a new database each, dropped after); the Redis cases start a
redis-server of their own with a password. Read-only files are made read-only for root too: the check runs
without CAP_DAC_OVERRIDE (setpriv), as a service user would be refused.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from server.store import Store, migration_versions

from .conftest import SERVER_CWD, SERVER_PYTHON, _clean_env, _on_postgresql, free_port, new_postgresql_database
from .relay_clients import sse_stream

POSTGRES_URLS = [url.strip() for url in os.environ.get("TEST_DATABASE_URLS", "").split(",")
                 if url.strip().startswith(("postgresql:", "postgres:"))]
needs_postgresql = pytest.mark.skipif(
    not POSTGRES_URLS, reason="set TEST_DATABASE_URLS=postgresql://postgres@127.0.0.1:5432/test to run on PostgreSQL")
needs_redis_server = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")

API_KEY = "sk-ant-api03-CHECKtheKEYisRIGHT-7f3a9c"
WRONG_KEY = "sk-ant-api03-thisKEYisWRONG-b81e2d"
DB_PASSWORD = "dbPw-4c1d9e"
REDIS_PASSWORD = "redisPw-93ab7f"
LEGACY_MIGRATIONS = Path(__file__).parent / "data" / "legacy_migrations"  # the SQL files of the old runner
CHECK_NAMES = ["settings", "database", "redis", "upstream", "access"]


def run_check(env: dict[str, str], *args: str, unprivileged: bool = False,
              command: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m server check` with `env` on top of a clean environment (no REDIS_URL unless given)."""
    full_env = _clean_env(env)
    if "REDIS_URL" not in env:
        full_env.pop("REDIS_URL", None)
    argv = [*(command or [SERVER_PYTHON, "-m", "server"]), "check", "--timeout", "5", *args]
    if unprivileged and os.geteuid() == 0:
        # Root writes read-only files; without these capabilities it meets the permission bits as anyone does.
        argv = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--", *argv]
    return subprocess.run(argv, cwd=SERVER_CWD, env=full_env, capture_output=True, text=True, timeout=120)


def lines(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """Each check's line by name: `ok    database  ...`."""
    found = {}
    for line in result.stdout.splitlines():
        status, _, rest = line.partition(" ")
        name = rest.strip().split(" ", 1)[0]
        if status in ("ok", "FAIL") and name in CHECK_NAMES:
            found[name] = line
    assert list(found) == CHECK_NAMES or list(found) == ["settings"], result.stdout + result.stderr
    return found


def assert_no_secret(result: subprocess.CompletedProcess[str], *secrets: str) -> None:
    output = result.stdout + result.stderr
    for secret in secrets:
        assert secret not in output, f"{secret!r} printed:\n{output}"
    assert "Traceback" not in output, output


def migrate(url: str) -> None:
    """Apply every migration, as a server start does."""
    async def run() -> None:
        store = Store(url)
        await store.connect()
        await store.disconnect()

    asyncio.run(run())


@pytest.fixture
def fresh_postgresql() -> Iterator[str]:
    """A new database on the PostgreSQL server of TEST_DATABASE_URLS: user@host:port/name; dropped after."""
    from urllib.parse import urlsplit

    url, drop = new_postgresql_database(POSTGRES_URLS[0])
    parts = urlsplit(url)
    yield f"{parts.hostname}:{parts.port or 5432}{parts.path}"
    _on_postgresql(POSTGRES_URLS[0], drop)


@pytest.fixture
def redis_with_password(tmp_path: Path) -> Iterator[int]:
    """A redis-server of this test's own that asks for REDIS_PASSWORD: its port."""
    port = free_port()
    process = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no",
                                "--requirepass", REDIS_PASSWORD, "--dir", str(tmp_path)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, password=REDIS_PASSWORD, socket_connect_timeout=1)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise
            time.sleep(0.05)  # waiting for a process to bind, not for test logic
    yield port
    client.close()
    process.terminate()
    process.wait(timeout=30)


def test_a_fresh_offline_deployment_on_sqlite_is_ready(tmp_path):
    """The console script, as installed. Fails if any check fails on the defaults, or if the report stops
    printing the configuration the server would run with."""
    deltarelay = str(Path(SERVER_PYTHON).with_name("deltarelay"))
    result = run_check({"DATABASE_URL": f"sqlite:///{tmp_path / 'new.db'}"}, command=[deltarelay])
    assert result.returncode == 0, result.stdout
    found = lines(result)
    assert all(line.startswith("ok ") for line in found.values()), result.stdout
    assert "does not exist yet: the server creates it" in found["database"]
    assert "offline" in found["upstream"] and "open mode" in found["access"]
    assert "ANTHROPIC_API_KEY                unset (offline model)" in result.stdout
    assert "default  model deltarelay-offline, max_tokens 1024, prompt cache 5m" in result.stdout
    assert result.stdout.rstrip().endswith("\nready")
    assert not (tmp_path / "new.db").exists()  # check creates nothing


def test_an_up_to_date_sqlite_database_proves_its_writer_and_keeps_nothing(tmp_path):
    """Fails if the probe's conversation stays behind (its delete dropped, and committed). That the writer
    really writes is what the read-only tests below prove."""
    url = f"sqlite:///{tmp_path / 'relay.db'}"
    migrate(url)
    result = run_check({"DATABASE_URL": url}, "--json")
    assert result.returncode == 0, result.stdout
    report = json.loads(result.stdout)
    assert report["ready"] is True and [c["name"] for c in report["checks"]] == CHECK_NAMES
    database = report["checks"][1]["detail"]
    assert "the writer inserted, updated and deleted a conversation, then rolled back" in database
    assert "schema up to date" in database
    assert report["configuration"]["DATABASE_URL"] == url
    assert report["agents"] == [{"id": "default", "model": "deltarelay-offline", "maxTokens": 1024,
                                 "systemPromptChars": 0, "promptCache": "5m", "thinkingBudget": None,
                                 "serverTools": [], "tools": [], "toolsUrl": None, "maxToolRounds": 8}]
    with sqlite3.connect(tmp_path / "relay.db") as db:
        assert db.execute("SELECT COUNT(*) FROM conversations").fetchone() == (0,)


def test_pending_migrations_are_reported_and_left_to_the_server(tmp_path):
    """The server migrates at start; check does not. Fails if check migrates (schema_migrations would list
    2 and 3 afterwards) or leaves its scratch table."""
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)")
        db.executescript((LEGACY_MIGRATIONS / "0001_initial.sql").read_text())
        db.execute("INSERT INTO schema_migrations VALUES (1, '2026-01-01T00:00:00Z')")
    result = run_check({"DATABASE_URL": f"sqlite:///{path}"})
    assert result.returncode == 0, result.stdout
    database = lines(result)["database"]
    pending = ", ".join(str(version) for version in migration_versions()[1:])
    assert f"migrations {pending} pending: the server applies them at start (check does not)" in database
    assert "the writer created a table and wrote a row, then rolled back" in database
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT version FROM schema_migrations").fetchall() == [(1,)]
        assert db.execute("SELECT name FROM sqlite_master WHERE name = 'deltarelay_check'").fetchall() == []


@pytest.mark.parametrize("case", ["read-only file", "read-only directory, no file yet",
                                  "read-only directory, existing file"])
def test_a_sqlite_database_the_writer_cannot_write_fails_the_check(tmp_path, case):
    """Reads alone would pass: only the writer's write (or creating the file) shows it. Fails if the database
    check stops at reading (SELECT 1), or skips the directory test for a file the server would create."""
    directory = tmp_path / "data"
    directory.mkdir()
    path = directory / "relay.db"
    if case != "read-only directory, no file yet":
        migrate(f"sqlite:///{path}")
    if case == "read-only file":
        path.chmod(0o444)
    else:
        directory.chmod(0o555)
    try:
        result = run_check({"DATABASE_URL": f"sqlite:///{path}"}, unprivileged=True)
    finally:
        directory.chmod(0o755)
    assert result.returncode == 1, result.stdout
    database = lines(result)["database"]
    assert database.startswith("FAIL  database  SQLite file "), result.stdout
    if case == "read-only directory, no file yet":
        assert "does not exist, and its directory does not let the server create it (Permission denied)" in database
    else:
        assert "attempt to write a readonly database" in database
    assert result.stdout.rstrip().endswith("not ready: database failed")


def test_an_unreachable_postgresql_fails_with_its_address_and_no_password(tmp_path):
    """A closed port. Fails if the password is printed, or if check reports ok without connecting."""
    port = free_port()
    result = run_check({"DATABASE_URL": f"postgres://relay:{DB_PASSWORD}@127.0.0.1:{port}/relay"})
    assert result.returncode == 1
    database = lines(result)["database"]
    assert database.startswith(f"FAIL  database  postgresql://relay:***@127.0.0.1:{port}/relay: ")
    assert "Connect" in database or "refused" in database
    assert_no_secret(result, DB_PASSWORD)


def test_an_unreachable_redis_fails_and_says_where(tmp_path):
    port = free_port()
    result = run_check({"DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}",
                        "REDIS_URL": f"redis://:{REDIS_PASSWORD}@127.0.0.1:{port}/0"})
    assert result.returncode == 1
    assert lines(result)["redis"].startswith(f"FAIL  redis     redis://:***@127.0.0.1:{port}/0: ")
    assert result.stdout.rstrip().endswith("not ready: redis failed")
    assert_no_secret(result, REDIS_PASSWORD)


@pytest.mark.parametrize("transport", ["http1", "aiohttp", "httpx"])
def test_an_accepted_key_passes_through_each_upstream_client(make_upstream, tmp_path, transport):
    """Fails if the Models API request goes without x-api-key or anthropic-version (the mock refuses both,
    as the API does), or not through the configured client."""
    upstream = make_upstream("--api-key", API_KEY)
    result = run_check({"DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}", "ANTHROPIC_API_KEY": API_KEY,
                        "ANTHROPIC_BASE_URL": upstream.url, "RELAY_UPSTREAM_TRANSPORT": transport})
    assert result.returncode == 0, result.stdout
    assert lines(result)["upstream"] == (
        f"ok    upstream  {upstream.url}: the key is accepted and the model claude-sonnet-4-5 found"
        " (GET /v1/models/{id}, which spends no tokens)")
    assert f"* ANTHROPIC_API_KEY                sk-ant-…{API_KEY[-4:]}\n" in result.stdout
    assert_no_secret(result, API_KEY)
    assert httpx.get(upstream.url + "/stats").json()["requests"] == 0  # no POST /v1/messages: no tokens


def test_a_refused_key_fails_with_the_apis_401_and_is_never_printed(make_upstream, tmp_path):
    """Fails if the check passes without asking the upstream, or prints the key or the expected one."""
    upstream = make_upstream("--api-key", API_KEY)
    for args in ((), ("--json",)):
        result = run_check({"DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}", "ANTHROPIC_API_KEY": WRONG_KEY,
                            "ANTHROPIC_BASE_URL": upstream.url}, *args)
        assert result.returncode == 1
        assert_no_secret(result, WRONG_KEY, API_KEY)
    assert lines(run_check({"DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}", "ANTHROPIC_API_KEY": WRONG_KEY,
                            "ANTHROPIC_BASE_URL": upstream.url}))["upstream"] == (
        f"FAIL  upstream  {upstream.url}: the API key is refused (401 authentication_error: invalid x-api-key)")


def test_a_model_the_api_does_not_know_fails(make_upstream, tmp_path):
    upstream = make_upstream("--api-key", API_KEY)
    result = run_check({"DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}", "ANTHROPIC_API_KEY": API_KEY,
                        "ANTHROPIC_BASE_URL": upstream.url, "RELAY_MODEL": "claude-typo-4-5"})
    assert result.returncode == 1
    assert "claude-typo-4-5 is not found (404 not_found_error: model: claude-typo-4-5" in lines(result)["upstream"]


def test_an_unreachable_upstream_fails(tmp_path):
    port = free_port()
    result = run_check({"DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}", "ANTHROPIC_API_KEY": API_KEY,
                        "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{port}"})
    assert result.returncode == 1
    assert lines(result)["upstream"].startswith(f"FAIL  upstream  http://127.0.0.1:{port}: cannot reach it (Connect")
    assert_no_secret(result, API_KEY)


def test_an_upstream_that_never_answers_fails_at_the_timeout(tmp_path):
    """A socket that accepts and never answers: the check ends at --timeout instead of the client's own
    (RELAY_CONNECT_TIMEOUT and no read timeout). Fails if the upstream check has no time limit (the run
    would hit subprocess's 120 s)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        result = run_check({"DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}", "ANTHROPIC_API_KEY": API_KEY,
                            "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{port}"}, "--timeout", "1")
    assert result.returncode == 1
    assert lines(result)["upstream"] == f"FAIL  upstream  http://127.0.0.1:{port}: no answer within 1 s"


def test_a_reachable_address_without_users_is_not_ready_until_a_user_exists(tmp_path):
    """The server would refuse to start (open mode off loopback): so must check."""
    url = f"sqlite:///{tmp_path / 'x.db'}"
    refused = run_check({"DATABASE_URL": url}, "--host", "0.0.0.0")
    assert refused.returncode == 1
    assert lines(refused)["access"].startswith("FAIL  access    no users exist and 0.0.0.0 is reachable")
    subprocess.run([SERVER_PYTHON, "-m", "server", "users", "--database-url", url, "add", "ops"], cwd=SERVER_CWD,
                   env=_clean_env({}), capture_output=True, check=True, timeout=60)
    ready = run_check({"DATABASE_URL": url}, "--host", "0.0.0.0")
    assert ready.returncode == 0, ready.stdout
    assert lines(ready)["access"] == "ok    access    1 active user: every request signs in"


def test_invalid_settings_are_the_one_failing_line(tmp_path):
    result = run_check({"DATABASE_URL": f"mysql://root:{DB_PASSWORD}@db/relay"})
    assert result.returncode == 1
    assert lines(result) == {"settings": "FAIL  settings  DATABASE_URL must start with sqlite:// or postgresql://"
                                         " (sqlite+aiosqlite://, postgres:// and postgresql+asyncpg:// mean the same),"
                                         " got 'mysql'"}
    as_json = json.loads(run_check({"DATABASE_URL": "mysql://x"}, "--json").stdout)
    assert as_json["ready"] is False and as_json["checks"][0]["name"] == "settings"
    assert_no_secret(result, DB_PASSWORD)


@needs_postgresql
@needs_redis_server
def test_a_deployment_on_postgresql_and_redis_with_passwords_is_ready_and_left_as_it_was(
        fresh_postgresql, redis_with_password, make_upstream):
    """Everything real, every secret set: ready, nothing printed that is secret (text and JSON), and nothing
    left behind. Fails if the probe commits (a table would remain in the new database), if the Redis key
    outlives the check, or if a secret leaks into any line."""
    upstream = make_upstream("--api-key", API_KEY)
    env = {"DATABASE_URL": f"postgresql+asyncpg://postgres:{DB_PASSWORD}@{fresh_postgresql}",
           "REDIS_URL": f"redis://:{REDIS_PASSWORD}@127.0.0.1:{redis_with_password}/0",
           "ANTHROPIC_API_KEY": API_KEY, "ANTHROPIC_BASE_URL": upstream.url}
    for args in ((), ("--json",)):
        result = run_check(env, *args)
        assert result.returncode == 0, result.stdout
        assert_no_secret(result, DB_PASSWORD, REDIS_PASSWORD, API_KEY)
    found = lines(result := run_check(env))
    assert all(line.startswith("ok ") for line in found.values()), result.stdout
    assert found["database"].startswith(f"ok    database  postgresql://postgres:***@{fresh_postgresql} (PostgreSQL ")
    every = ", ".join(str(version) for version in migration_versions())
    assert f"empty: the server creates the schema (migrations {every}) at start" in found["database"]
    assert found["redis"].startswith(f"ok    redis     redis://:***@127.0.0.1:{redis_with_password}/0 (Redis ")
    database = f"postgresql://postgres@{fresh_postgresql}"
    assert _on_postgresql(database, "SELECT COUNT(*) FROM information_schema.tables"
                                    " WHERE table_schema = 'public'") == [(0,)]
    assert redis.Redis(port=redis_with_password, password=REDIS_PASSWORD).dbsize() == 0

    wrong = run_check({**env, "REDIS_URL": f"redis://:wrong-{REDIS_PASSWORD}@127.0.0.1:{redis_with_password}/0",
                       "ANTHROPIC_API_KEY": WRONG_KEY})
    assert wrong.returncode == 1
    assert lines(wrong)["redis"].startswith("FAIL  redis ")
    assert_no_secret(wrong, DB_PASSWORD, REDIS_PASSWORD, WRONG_KEY, API_KEY)


async def test_the_mock_upstream_refuses_a_wrong_key_on_the_messages_api_too(make_upstream, make_server):
    """With --api-key, a relay holding another key gets the API's 401 as an `auth` error event."""
    upstream = make_upstream("--api-key", API_KEY)
    relay = make_server({"ANTHROPIC_API_KEY": WRONG_KEY, "ANTHROPIC_BASE_URL": upstream.url})
    events = await sse_stream(relay.url, {"message": "hello"})
    assert events[-1][1] == "error" and events[-1][2]["code"] == "auth"
    good = make_server({"ANTHROPIC_API_KEY": API_KEY, "ANTHROPIC_BASE_URL": upstream.url})
    assert (await sse_stream(good.url, {"message": "hello"}))[-1][1] == "done"


def test_the_tools_secret_is_never_shown_in_the_report():
    """RELAY_TOOLS_SECRET signs every tool call: the configuration names its size only, and every line of the
    report is scrubbed of it. Fails if check.configuration prints it as it does ordinary settings."""
    from server.check import configuration, secrets_of
    from server.config import load_settings

    settings = load_settings({"RELAY_TOOLS_SECRET": "tools-secret-value-1234"})
    assert configuration(settings)["RELAY_TOOLS_SECRET"] == "set (23 bytes, not shown)"
    assert "tools-secret-value-1234" in secrets_of(settings)
