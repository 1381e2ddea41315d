"""Storage faults against real server processes (issue 14): a PostgreSQL restart, a full disk, a second
process on the same database, and kill -9 mid-answer.

Each test runs its own fault: its own PostgreSQL (tests/own_services.py), its own small tmpfs. The disk is
filled on a tmpfs rather than with RLIMIT_FSIZE: a full filesystem fails every file the database grows (the
WAL, the journal, the file itself) with ENOSPC, as a real full disk does, while a file-size limit sends
SIGXFSZ and fails only the files that pass the size. Mounting needs root (CI runs as root); elsewhere those
tests are skipped with that reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import signal
import sqlite3
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from httpx_sse import aconnect_sse

from .conftest import SERVER_CWD, SERVER_PYTHON, _clean_env, assert_no_traceback
from .own_services import own_postgres
from .relay_clients import Event, expected_words, loads, names, sse_stream, text_of
from .test_access import add_user, bearer

WORDS = 60
SLOW = {"RELAY_OFFLINE_DELAY_MS": "100", "RELAY_OFFLINE_WORDS": str(WORDS)}  # a 6 s answer


class Reader:
    """One answer read over SSE in the background; a test waits on what it has seen so far."""

    def __init__(self, base_url: str, message: str, headers: dict[str, str] | None = None) -> None:
        self.events: list[Event] = []
        self._seen = asyncio.Event()
        self.task = asyncio.create_task(self._read(base_url, message, headers or {}))

    async def _read(self, base_url: str, message: str, headers: dict[str, str]) -> None:
        try:
            async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
                async with aconnect_sse(client, "POST", "/api/command-center/message", json={"message": message},
                                        headers=headers) as source:
                    source.response.raise_for_status()
                    async for event in source.aiter_sse():
                        self.events.append((int(event.id) if event.id else None, event.event, loads(event.data)))
                        self._seen.set()
        finally:
            self._seen.set()

    @property
    def ended(self) -> bool:
        return bool(self.events) and self.events[-1][1] in ("done", "error")

    async def until(self, condition: Callable[[list[Event]], bool], seconds: float = 120) -> None:
        """Wait until `condition(events)` holds; the timeout only guards against hangs."""
        async with asyncio.timeout(seconds):
            while not condition(self.events):
                if self.task.done():
                    self.task.result()
                    raise AssertionError(f"the stream ended without that: {names(self.events)}")
                self._seen.clear()
                await self._seen.wait()

    @property
    def message_id(self) -> str | None:
        return self.events[-1][2].get("messageId") if self.ended else None


def has(name: str) -> Callable[[list[Event]], bool]:
    return lambda events: name in names(events)


def ended(events: list[Event]) -> bool:
    return bool(events) and events[-1][1] in ("done", "error")


async def eventually(check: Callable[[], Any], seconds: float = 60) -> None:
    """Wait until `check()` is true (a state outside this process: a row, a status); a guard, not a delay."""
    async with asyncio.timeout(seconds):
        while not await asyncio.to_thread(check):  # noqa: ASYNC110 - the condition lives in another process
            await asyncio.sleep(0.05)


def readyz(relay: Any) -> int:
    return httpx.get(relay.url + "/readyz", timeout=10).status_code


def answer_row(relay: Any, message_id: str) -> tuple[Any, ...]:
    return relay.rows("SELECT status, content FROM messages WHERE id = ?", message_id)[0]


async def post_json(relay: Any, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
                    ) -> httpx.Response:
    async with httpx.AsyncClient(base_url=relay.url, timeout=60) as client:
        return await client.post(path, json=body, headers={"accept": "application/json", **(headers or {})})


# --- PostgreSQL restarts ------------------------------------------------------------------------------


async def test_a_postgresql_restart_mid_answer_saves_the_answer_and_later_answers_succeed(make_server):
    """Stop the relay's own PostgreSQL mid-answer, start it again (issue 14, finding 1). On main the answer
    ended `done` with messageId null and stayed `streaming`, /readyz stayed 200 and every later answer was
    a 500: reverting the writer's reconnect (_AsyncWriter._main), the save retries (core._save) or the write
    probe in /readyz (Store.writable) each fails this."""
    with own_postgres() as postgres:
        relay = make_server({**SLOW, "RELAY_SAVE_WAIT_SECONDS": "300"}, database_url=postgres.url)
        assert readyz(relay) == 200
        reader = Reader(relay.url, "survive a restart")
        await reader.until(has("chunk"))

        await asyncio.to_thread(postgres.stop)
        assert not reader.ended, "the answer ended before the database went away: make it longer"
        await eventually(lambda: readyz(relay) == 503)
        refused = await post_json(relay, "/api/command-center/message", {"message": "while it is down"})
        assert refused.status_code == 503
        assert (refused.json()["error"]["code"], refused.headers["retry-after"]) == ("storage_unavailable", "1")
        await reader.until(has("cost"))  # generated to its end while the database is down
        assert names(reader.events)[-1] == "cost", "the stream ended before its answer could be saved"

        await asyncio.to_thread(postgres.start)
        await reader.until(ended)
        assert names(reader.events)[-1] == "done" and reader.message_id is not None
        assert answer_row(relay, reader.message_id) == ("complete", expected_words(WORDS))
        await eventually(lambda: readyz(relay) == 200)

        for n in range(2):  # the same process, no restart
            later = await sse_stream(relay.url, {"message": f"after the restart {n}"})
            assert names(later)[-1] == "done" and text_of(later) == expected_words(WORDS)
            assert answer_row(relay, later[-1][2]["messageId"]) == ("complete", expected_words(WORDS))
        relay.stop()
    assert_no_traceback(relay)


# --- a full disk ----------------------------------------------------------------------------------------


@pytest.fixture
def small_disk() -> Iterator[Path]:
    """A 4 MB tmpfs of the test's own, unmounted after it."""
    mountpoint = Path(tempfile.mkdtemp(prefix="small-disk-"))
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0755", "tmpfs", str(mountpoint)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        mountpoint.rmdir()
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)
        mountpoint.rmdir()


def fill(directory: Path) -> Path:
    """Fill the filesystem of `directory` to the last byte; the file that does it."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as file:
        for size in (1 << 16, 1 << 12, 1):
            try:
                while True:
                    file.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    return filler


async def test_a_full_disk_gives_retryable_503s_keeps_sockets_open_and_saves_the_running_answer_once_freed(
        make_server, small_disk):
    """The SQLite file's disk fills mid-answer (issue 14, finding 8). On main: a new answer and sign-in were
    500s, a WebSocket message frame dropped the socket without a close frame, /readyz stayed 200, and the
    running answer ended `done` with messageId null and stayed `streaming`. Reverting the mapping to
    StorageUnavailableError (store.unavailable), the save retries (core._save) or the write probe
    (Store.writable) each fails this."""
    url = f"sqlite:///{small_disk}/relay.db"
    token = add_user(url, "alice")
    auth = bearer(token)
    relay = make_server({**SLOW, "RELAY_SAVE_WAIT_SECONDS": "1", "RELAY_PARTIAL_SAVE_SECONDS": "0.5"},
                        database_url=url)
    async with websockets.connect(relay.ws_url + "/api/command-center/ws", additional_headers=auth) as socket:
        reader = Reader(relay.url, "fill the disk", auth)
        await reader.until(has("chunk"))
        filler = await asyncio.to_thread(fill, small_disk)

        refused = await post_json(relay, "/api/command-center/message", {"message": "no room"}, auth)
        assert (refused.status_code, refused.json()["error"]["code"]) == (503, "storage_unavailable")
        signed = await post_json(relay, "/api/session", {"token": token})
        assert (signed.status_code, signed.json()["error"]["code"]) == (503, "storage_unavailable")
        await socket.send(json.dumps({"type": "message", "message": "no room either", "requestId": "r1"}))
        frame = json.loads(await asyncio.wait_for(socket.recv(), 60))
        assert (frame["event"], frame["data"]["code"], frame["data"]["retryable"], frame["requestId"]) == (
            "error", "storage_unavailable", True, "r1")
        await socket.send(json.dumps({"type": "ping"}))
        assert json.loads(await asyncio.wait_for(socket.recv(), 60)) == {"event": "pong"}  # still open
        assert readyz(relay) == 503

        await reader.until(ended)
        error = reader.events[-1][2]
        assert names(reader.events)[-1] == "error" and "done" not in names(reader.events)
        assert (error["code"], error["retryable"]) == ("storage_unavailable", True)
        assert relay.rows("SELECT id, status FROM messages WHERE stream_id = ? AND role = 'assistant'",
                          reader.events[0][2]["streamId"]) == [(error["messageId"], "streaming")]
        assert text_of(reader.events) == expected_words(WORDS)

        filler.unlink()
        await eventually(lambda: answer_row(relay, error["messageId"]) == ("complete", expected_words(WORDS)))
        await eventually(lambda: readyz(relay) == 200)
        await socket.send(json.dumps({"type": "message", "message": "room again", "requestId": "r2"}))
        frames = []
        while not frames or frames[-1]["event"] not in ("done", "error"):
            frames.append(json.loads(await asyncio.wait_for(socket.recv(), 60)))
        assert frames[-1]["event"] == "done"
    # Nothing half-written: the refused answers left no row, and the file is whole.
    assert relay.count("SELECT COUNT(*) FROM messages") == 4
    with sqlite3.connect(relay.db_path) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    relay.stop()
    assert_no_traceback(relay)


# --- a second process on the same database ----------------------------------------------------------------


async def test_a_second_process_on_the_same_database_leaves_the_running_answer_alone(make_server):
    """`python -m server` again on the same database while an answer runs (an overlapping restart), which
    then fails to bind the port (issue 14, finding 6). On main it marked the answer `interrupted`, and the
    first process's save matched no row yet ended `done`: skipping the lease check in interrupt_unfinished
    (store._lease_held answering False) fails this."""
    relay = make_server(SLOW)
    reader = Reader(relay.url, "do not interrupt me")
    await reader.until(has("chunk"))

    second = await asyncio.to_thread(
        subprocess.run, [SERVER_PYTHON, "-m", "server", "--port", str(relay.port)], cwd=SERVER_CWD,
        env=_clean_env({"DATABASE_URL": relay.database_url}), capture_output=True, text=True, timeout=120)

    assert second.returncode != 0, second.stdout + second.stderr
    assert "interrupted" not in second.stdout + second.stderr
    assert not reader.ended, "the answer ended before the second process had started: make it longer"
    assert relay.rows("SELECT status FROM messages WHERE role = 'assistant'") == [("streaming",)]
    await reader.until(ended)
    assert names(reader.events)[-1] == "done" and reader.message_id is not None
    assert answer_row(relay, reader.message_id) == ("complete", expected_words(WORDS))


# --- kill -9 --------------------------------------------------------------------------------------------------


async def test_after_kill_9_the_answer_keeps_its_partial_text_and_is_marked_interrupted_at_the_next_start(
        make_server, tmp_path):
    """The row holds the text saved by the last partial save (RELAY_PARTIAL_SAVE_SECONDS), and its input
    usage and estimated cost (issue 14, finding 11). Turning Relay.save_progress off fails this: the row
    was empty."""
    url = f"sqlite:///{tmp_path}/killed.db"
    relay = make_server({"RELAY_OFFLINE_DELAY_MS": "100", "RELAY_OFFLINE_WORDS": "200",
                         "RELAY_PARTIAL_SAVE_SECONDS": "0.3"}, database_url=url)
    started = await post_json(relay, "/api/command-center/message", {"message": "crash mid-answer"})
    assert started.status_code == 202

    def partial() -> tuple[Any, ...]:
        return relay.rows("SELECT status, content, input_tokens, cost, cost_estimated FROM messages"
                          " WHERE stream_id = ? AND role = 'assistant'", started.json()["streamId"])[0]

    await eventually(lambda: len(partial()[1]) > 0)
    relay.stop(signal.SIGKILL)

    status, content, input_tokens, cost, estimated = partial()
    assert status == "streaming" and content and expected_words(200).startswith(content)
    assert content != expected_words(200), "the answer finished before the kill: make it longer"
    assert input_tokens > 0 and cost is not None and estimated == 1
    restarted = make_server({}, database_url=url)
    assert partial() == ("interrupted", content, input_tokens, cost, 1)
    assert "marked 1 answers left unfinished by an earlier run as interrupted" in restarted.log()
    with contextlib.suppress(FileNotFoundError):  # the killed process's lease was found dead and removed
        assert len(os.listdir(f"{tmp_path}/killed.db-instances")) == 1
