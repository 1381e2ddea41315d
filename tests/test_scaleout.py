"""Several instances behind one address: two real server processes sharing PostgreSQL and Redis.

Needs TEST_REDIS_URL and a PostgreSQL URL in TEST_DATABASE_URLS (.ci/run sets both); skipped, with the
reason shown, without them. Each test gets Redis keys of its own (RELAY_REDIS_PREFIX).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import jwt
import pytest
import websockets
from httpx_sse import aconnect_sse

from .conftest import SERVER_CWD, SERVER_PYTHON, _clean_env, _on_postgresql, new_postgresql_database
from .relay_clients import (
    Event,
    loads,
    names,
    sse_read,
    sse_read_first,
    sse_stream,
    text_of,
    ws_read_until_end,
)

REDIS_URL = os.environ.get("TEST_REDIS_URL", "")
POSTGRES_URLS = [url.strip() for url in os.environ.get("TEST_DATABASE_URLS", "").split(",")
                 if url.strip().startswith(("postgresql:", "postgres:"))]
pytestmark = pytest.mark.skipif(
    not (REDIS_URL and POSTGRES_URLS),
    reason="set TEST_REDIS_URL=redis://127.0.0.1:6379/7 and TEST_DATABASE_URLS=postgresql://… to run several instances",
)
PACED = {"RELAY_OFFLINE_DELAY_MS": "20", "RELAY_OFFLINE_WORDS": "80"}  # a 1.6 s answer


def expected_words(n: int) -> str:
    from server.upstream.offline import demo_words

    return "".join(demo_words([], n))


@pytest.fixture(scope="module")
def database_url() -> Iterator[str]:
    """A new PostgreSQL database for this module (the servers create the tables), dropped after: other runs
    on the same server (CI's passes, a developer's) never see it."""
    if not POSTGRES_URLS:
        yield ""
        return
    url, drop = new_postgresql_database(POSTGRES_URLS[0])
    try:
        yield url
    finally:
        _on_postgresql(POSTGRES_URLS[0], drop)


@pytest.fixture
def start_instances(make_server: Callable[..., Any], database_url: str) -> Callable[..., list[Any]]:
    """Start `count` instances sharing the database and this test's own Redis keys."""
    prefix = f"test-{uuid.uuid4().hex[:12]}"

    def start(count: int = 2, **env: str) -> list[Any]:
        shared = {"DATABASE_URL": database_url, "REDIS_URL": REDIS_URL, "RELAY_REDIS_PREFIX": prefix,
                  "RELAY_INSTANCE_LEASE_SECONDS": "1", **PACED, **env}
        return [make_server(shared) for _ in range(count)]

    return start


async def saved(database_url: str, stream_id: str) -> list[tuple[str, str]]:
    """(status, content) of every assistant message of a stream: exactly one when nothing is duplicated."""
    connection = await asyncpg.connect(database_url)
    try:
        rows = await connection.fetch(
            "SELECT status, content FROM messages WHERE stream_id = $1 AND role = 'assistant'", stream_id)
    finally:
        await connection.close()
    return [(row["status"], row["content"]) for row in rows]


async def wait_for_status(database_url: str, stream_id: str, status: str) -> list[tuple[str, str]]:
    async with asyncio.timeout(30):
        while (rows := await saved(database_url, stream_id))[0][0] != status:  # noqa: ASYNC110 - another process
            await asyncio.sleep(0.05)
    return rows


async def start_in_background(url: str) -> str:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        response = await client.post("/api/command-center/message", json={"message": "hi"},
                                     headers={"accept": "application/json"})
    assert response.status_code == 202
    stream_id: str = response.json()["streamId"]
    return stream_id


def assert_numbered_from_one(events: list[Event]) -> None:
    assert [event_id for event_id, _, _ in events] == list(range(1, len(events) + 1))


async def test_a_client_dropped_on_one_instance_resumes_on_the_other_with_exactly_the_rest(start_instances,
                                                                                         database_url):
    a, b = start_instances()
    first = await sse_read_first(a.url, {"message": "hi"}, 10)
    stream_id = first[0][2]["streamId"]

    rest = await sse_read(b.url, stream_id, last_event_id=first[-1][0])

    events = first + rest
    assert_numbered_from_one(events)
    assert text_of(events) == expected_words(80)
    assert names(events)[-1] == "done"
    assert await saved(database_url, stream_id) == [("complete", expected_words(80))]
    # And over a WebSocket on the other instance, from the middle, once the stream has ended.
    async with websockets.connect(b.ws_url + "/api/command-center/ws") as ws:
        await ws.send(json.dumps({"type": "resume", "streamId": stream_id, "lastEventId": 40}))
        again = await ws_read_until_end(ws, stream_id)
    assert again == [(i, name, data) for i, name, data in events[40:]]


async def test_a_cancel_sent_to_the_other_instance_stops_the_answer_where_it_is_generated(start_instances,
                                                                                         database_url):
    a, b = start_instances(RELAY_OFFLINE_WORDS="2000")  # 40 s: it only ends by the cancel
    async with websockets.connect(a.ws_url + "/api/command-center/ws") as ws:
        await ws.send(json.dumps({"type": "message", "message": "stop me"}))
        events: list[Event] = []
        while len(events) < 6:
            frame = json.loads(await ws.recv())
            events.append((frame["id"], frame["event"], frame["data"]))
        stream_id = events[0][2]["streamId"]
        async with httpx.AsyncClient(base_url=b.url) as client:
            response = await client.post(f"/api/command-center/streams/{stream_id}/cancel")
        assert (response.status_code, response.json()["cancelled"]) == (202, True)
        events += await ws_read_until_end(ws, stream_id)

    assert names(events)[-2:] == ["cost", "done"]
    assert events[-1][2]["stopReason"] == "cancelled"
    assert await saved(database_url, stream_id) == [("cancelled", text_of(events))]


async def test_when_the_generating_instance_is_killed_a_watcher_on_the_other_gets_interrupted(start_instances,
                                                                                            database_url):
    a, b = start_instances(RELAY_OFFLINE_WORDS="2000")
    stream_id = await start_in_background(a.url)
    events: list[Event] = []
    async with httpx.AsyncClient(base_url=b.url, timeout=30) as client:
        async with aconnect_sse(client, "GET", f"/api/command-center/streams/{stream_id}") as source:
            async for event in source.aiter_sse():
                events.append((int(event.id), event.event, loads(event.data)))
                if len(events) == 10:
                    a.proc.send_signal(signal.SIGKILL)

    assert_numbered_from_one(events)
    assert names(events)[-1] == "error"
    assert events[-1][2]["code"] == "interrupted"
    text = text_of(events)
    assert text and expected_words(2000).startswith(text)
    # Saved once, by the survivor, with the text every watcher saw.
    assert await saved(database_url, stream_id) == [("interrupted", text)]
    # A later resume on the survivor gets the same end, not a second one.
    again = await sse_read(b.url, stream_id, last_event_id=len(events) - 1)
    assert again == events[-1:]


async def test_an_answer_nobody_watches_is_saved_as_interrupted_by_the_next_instance_to_start(start_instances,
                                                                                            database_url):
    (a,) = start_instances(1, RELAY_OFFLINE_WORDS="2000")
    first = await sse_read_first(a.url, {"message": "hi"}, 20)
    stream_id = first[0][2]["streamId"]
    a.proc.send_signal(signal.SIGKILL)
    await asyncio.to_thread(a.proc.wait, 30)

    start_instances(1)

    rows = await wait_for_status(database_url, stream_id, "interrupted")
    assert len(rows) == 1
    # At least what the client saw: the log in Redis may hold a few events more than it read.
    assert rows[0][1].startswith(text_of(first))


async def test_fifty_concurrent_streams_over_two_instances_have_exact_texts_and_one_saved_row_each(
        start_instances, database_url):
    instances = start_instances(RELAY_OFFLINE_DELAY_MS="5", RELAY_OFFLINE_WORDS="40")

    async def one(n: int) -> list[Event]:
        # Started on one instance, read to the end on the other: every stream crosses over.
        here, there = instances[n % 2], instances[(n + 1) % 2]
        if n % 4 < 2:
            stream_id = await start_in_background(here.url)
            return await sse_read(there.url, stream_id)
        # close_timeout: under this load the server's reply to a close can take the client's whole close
        # timeout (10 s by default; main does the same, with one instance too): not what this test is about.
        async with websockets.connect(here.ws_url + "/api/command-center/ws", close_timeout=1) as ws:
            await ws.send(json.dumps({"type": "message", "message": f"n{n}"}))
            frame = json.loads(await ws.recv())
        return await sse_read(there.url, frame["streamId"], last_event_id=frame["id"])

    results = await asyncio.gather(*(one(n) for n in range(50)))

    for events in results:
        assert text_of(events) == expected_words(40)
        assert names(events)[-1] == "done"
    stream_ids = [events[-1][2]["messageId"] for events in results]
    assert len(set(stream_ids)) == 50
    connection = await asyncpg.connect(database_url)
    try:
        rows = await connection.fetch("SELECT id, status, content FROM messages WHERE id = ANY($1::text[])",
                                      stream_ids)
    finally:
        await connection.close()
    assert sorted((row["status"], row["content"]) for row in rows) == [("complete", expected_words(40))] * 50


async def test_a_jwt_users_conversation_is_theirs_on_both_instances_and_a_404_to_other_users(start_instances,
                                                                                           database_url):
    """Both instances make the same (issuer, sub) user at once: one row; its conversation and stream are readable
    on the other instance with a JWT, and a 404 there to another JWT user and to a CLI user."""
    secret = "scale-out-shared-secret-0123456789abcdef"
    a, b = start_instances(RELAY_JWT_SECRET=secret, RELAY_AUTH_CACHE_SECONDS="0")

    def token(sub: str) -> dict[str, str]:
        claims = {"sub": sub, "name": sub, "iss": "https://app.example", "exp": int(time.time()) + 300}
        return {"Authorization": "Bearer " + jwt.encode(claims, secret, algorithm="HS256")}

    owner = token("scale-owner")
    async with httpx.AsyncClient(timeout=30) as client:
        first = await asyncio.gather(*(client.get(server.url + "/api/session", headers=owner) for server in (a, b)))
        assert [res.status_code for res in first] == [200, 200]
        rows = _on_postgresql(database_url, "SELECT COUNT(*) FROM users WHERE subject = 'scale-owner'")
        assert rows == [(1,)]
        started = await client.post(a.url + "/api/command-center/message", json={"message": "mine"},
                                    headers={**owner, "Accept": "application/json"})
        assert started.status_code == 202
        stream_id, conversation_id = started.json()["streamId"], started.json()["conversationId"]
        async with aconnect_sse(client, "GET", f"{b.url}/api/command-center/streams/{stream_id}",
                                headers=owner) as source:
            events = [(int(e.id) if e.id else None, e.event, loads(e.data)) async for e in source.aiter_sse()]
        assert names(events)[-1] == "done" and text_of(events) == expected_words(80)
        await wait_for_status(database_url, stream_id, "complete")
        # A short CLI run between requests:
        cli = subprocess.run(  # noqa: ASYNC221
            [SERVER_PYTHON, "-m", "server", "users", "--database-url", database_url, "add", "scale-cli"],
            cwd=SERVER_CWD, env=_clean_env({}), capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0, cli.stderr
        path = f"/api/conversations/{conversation_id}/messages"
        assert (await client.get(b.url + path, headers=owner)).status_code == 200
        for other in (token("scale-other"), {"Authorization": "Bearer " + cli.stdout.strip()}):
            for server in (a, b):
                assert (await client.get(server.url + path, headers=other)).status_code == 404
                res = await client.get(f"{server.url}/api/command-center/streams/{stream_id}", headers=other)
                assert res.status_code in (404, 410)


# --- conversations as trees across instances (issue 17) ----------------------------------------------------------


@pytest.fixture
def open_instances(make_server: Callable[..., Any]) -> Iterator[tuple[Callable[..., list[Any]], str]]:
    """Like start_instances, on a database of this test's own: in open mode whatever users earlier tests made
    (their usage totals would mix too). Yields the starter and the database's URL."""
    if not POSTGRES_URLS:
        pytest.skip("needs PostgreSQL")
    url, drop = new_postgresql_database(POSTGRES_URLS[0])
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    started: list[Any] = []

    def start(count: int = 2, **env: str) -> list[Any]:
        shared = {"DATABASE_URL": url, "REDIS_URL": REDIS_URL, "RELAY_REDIS_PREFIX": prefix,
                  "RELAY_INSTANCE_LEASE_SECONDS": "1", **PACED, **env}
        started.extend(make_server(shared) for _ in range(count))
        return started[-count:]

    try:
        yield start, url
    finally:
        for process in started:  # before the database goes (make_server checks their logs after)
            process.stop()
        _on_postgresql(POSTGRES_URLS[0], drop)


async def call(url: str, method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        return await client.request(method, path, json=body)


async def usage_total(url: str) -> dict[str, Any]:
    response = await call(url, "GET", "/api/usage?groupBy=day")
    total: dict[str, Any] = loads(response.text)["total"]
    return total


async def read_until(url: str, body: dict[str, Any], enough: asyncio.Event, chunks: int) -> list[Event]:
    """POST a command and read its whole stream, setting `enough` once `chunks` chunks came."""
    events: list[Event] = []
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        async with aconnect_sse(client, "POST", "/api/command-center/message", json=body) as source:
            async for event in source.aiter_sse():
                events.append((int(event.id) if event.id else None, event.event, loads(event.data)))
                if names(events).count("chunk") >= chunks:
                    enough.set()
    return events


async def active_answer_stream(url: str, conversation_id: str) -> str:
    """The stream of the answer at the conversation's active leaf."""
    listing = (await call(url, "GET", f"/api/conversations/{conversation_id}/messages?path=active")).json()
    stream_id: str = listing["messages"][-1]["streamId"]
    return stream_id


def offline_answer(*turns: tuple[str, str]) -> str:
    """The offline model's answer to a history of (role, text): it quotes the last turn and counts user turns."""
    from server.upstream.offline import demo_words

    return "".join(demo_words([{"role": role, "content": text} for role, text in turns]))


async def test_edit_regenerate_switch_and_continue_across_instances_send_the_active_path(open_instances):
    """Each step on the other instance than the one before; the offline model's answer quotes the last turn it
    got and counts the user turns, so each text proves the history was the active path (a continue's ends with
    the partial answer). A regenerated answer read on one instance and resumed on the other is exact."""
    a, b = open_instances[0](RELAY_OFFLINE_WORDS="0")
    first = await sse_stream(a.url, {"message": "one"})
    conv, a1, a1_text = first[0][2]["conversationId"], first[0][2]["messageId"], text_of(first)
    second = await sse_stream(b.url, {"message": "two", "conversationId": conv})
    u2, a2_text = second[0][2]["userMessageId"], text_of(second)
    assert a2_text == offline_answer(("user", "one"), ("assistant", a1_text), ("user", "two"))
    edited = await sse_stream(a.url, {"message": "two bis", "conversationId": conv, "parentMessageId": a1})
    assert text_of(edited) == offline_answer(("user", "one"), ("assistant", a1_text), ("user", "two bis"))

    head = await sse_read_first(b.url, {"regenerate": edited[0][2]["messageId"]}, 5)
    stream_id = head[0][2]["streamId"]
    tail = await sse_read(a.url, stream_id, last_event_id=head[-1][0])
    whole = await sse_read(b.url, stream_id)
    assert head + tail == whole
    assert [event_id for event_id, _, _ in whole] == list(range(1, len(whole) + 1))
    assert text_of(whole) == text_of(edited)

    switched = await call(b.url, "PUT", f"/api/conversations/{conv}/active-leaf", {"messageId": u2})
    assert switched.status_code == 200
    third = await sse_stream(a.url, {"message": "three", "conversationId": conv})
    path = [("user", "one"), ("assistant", a1_text), ("user", "two"), ("assistant", a2_text), ("user", "three")]
    assert text_of(third) == offline_answer(*path)

    enough = asyncio.Event()
    cut = asyncio.create_task(read_until(a.url, {"message": "four", "conversationId": conv}, enough, 3))
    async with asyncio.timeout(30):
        await enough.wait()
    cancel = await call(b.url, "POST", f"/api/command-center/streams/{await active_answer_stream(a.url, conv)}/cancel")
    assert cancel.status_code == 202
    cut_events = await cut
    assert cut_events[-1][2]["stopReason"] == "cancelled"
    partial = text_of(cut_events)
    path += [("assistant", text_of(third)), ("user", "four")]
    more = await sse_stream(b.url, {"continue": cut_events[0][2]["messageId"]})
    assert more[0][2]["messageId"] == cut_events[0][2]["messageId"]
    assert text_of(more) == offline_answer(*path, ("assistant", partial.rstrip()))
    messages = (await call(a.url, "GET", f"/api/conversations/{conv}/messages?path=active")).json()["messages"]
    assert len(messages) == 8 and messages[-1]["content"] == partial + text_of(more)


async def test_deleting_a_conversation_on_the_other_instance_stops_its_answer_and_keeps_its_costs(open_instances):
    """The answer runs on `a`, the DELETE goes to `b`: the cancel reaches `a` through Redis, `a`'s reader gets
    `done` cancelled, nothing of the conversation is left, its streams are not resumable on either instance,
    and both instances' usage totals count what it spent (summed over messages, they would drop)."""
    start, database_url = open_instances
    a, b = start(RELAY_OFFLINE_WORDS="2000")  # 40 s: it only ends by the delete
    before = await usage_total(b.url)
    enough = asyncio.Event()
    reading = asyncio.create_task(read_until(a.url, {"message": "doomed"}, enough, 2))
    async with asyncio.timeout(30):
        await enough.wait()
    conversation_id = (await call(a.url, "GET", "/api/conversations")).json()["conversations"][0]["id"]
    stream_id = await active_answer_stream(b.url, conversation_id)
    deleted = await call(b.url, "DELETE", f"/api/conversations/{conversation_id}")
    assert deleted.status_code == 200
    assert deleted.json() == {"id": conversation_id, "deleted": True, "cancelledStreamIds": [stream_id]}
    async with asyncio.timeout(30):
        events = await reading
    assert events[-1][1] == "done" and events[-1][2]["stopReason"] == "cancelled"
    assert len(text_of(events)) < len(expected_words(2000))
    cost = next(data["totalCost"] for _, name, data in events if name == "cost")
    connection = await asyncpg.connect(database_url)
    try:
        assert await connection.fetchval("SELECT COUNT(*) FROM messages WHERE conversation_id = $1",
                                         conversation_id) == 0
    finally:
        await connection.close()
    for instance in (a, b):
        assert (await call(instance.url, "GET", f"/api/conversations/{conversation_id}/messages")).status_code == 404
        resumed = await call(instance.url, "GET", f"/api/command-center/streams/{stream_id}")
        assert (resumed.status_code, resumed.json()["error"]["code"]) == (404, "not_resumable")
        after = await usage_total(instance.url)
        assert after["messages"] == before["messages"] + 1
        assert Decimal(after["cost"]) == Decimal(before["cost"]) + Decimal(str(cost))
