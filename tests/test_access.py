"""Access control (issue 6) against real server processes: users, tokens, sessions, owners, origins.

Each rule is checked on both transports, as the owner and as another user.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from httpx_sse import aconnect_sse
from websockets.exceptions import InvalidStatus

from server.upstream.offline import demo_words

from .conftest import (
    SERVER_CWD,
    SERVER_PYTHON,
    RelayServer,
    _clean_env,
    assert_no_secret_in_log,
    assert_no_traceback,
    free_port,
)
from .relay_clients import demo_answer, loads, names, sse_read, sse_resume, sse_stream, text_of, ws_read_until_end

WS_PATH = "/api/command-center/ws"
TEAM_WORDS = 40


def team_answer(message: str) -> str:
    """The offline model's answer on the team server (RELAY_OFFLINE_WORDS=40) to a first message."""
    return "".join(demo_words([{"role": "user", "content": message}], TEAM_WORDS))
EVIL = "https://evil.example"


def run_cli(database: Path | str, *args: str) -> subprocess.CompletedProcess[str]:
    """`deltarelay users ...` on a SQLite file (a Path) or a database URL."""
    url = database if isinstance(database, str) else f"sqlite:///{database}"
    return subprocess.run([SERVER_PYTHON, "-m", "server", "users", "--database-url", url, *args],
                          cwd=SERVER_CWD, env=_clean_env({}), capture_output=True, text=True, timeout=60)


def add_user(database: Path | str, name: str, *flags: str) -> str:
    result = run_cli(database, "add", name, *flags)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def saved_messages(server: RelayServer) -> int:
    return server.count("SELECT COUNT(*) FROM messages")


class Team:
    """A server with three users: alice and bob (users) and root (admin)."""

    def __init__(self, server: RelayServer) -> None:
        self.server = server
        self.alice = add_user(server.database_url, "alice")
        self.bob = add_user(server.database_url, "bob")
        self.root = add_user(server.database_url, "root", "--admin")


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Team]:
    # Paced so that streams are still running while other users try to reach them.
    server = RelayServer(tmp_path_factory.mktemp("team"), {
        "RELAY_AUTH_CACHE_SECONDS": "0", "RELAY_OFFLINE_DELAY_MS": "25", "RELAY_OFFLINE_WORDS": str(TEAM_WORDS),
    })
    yield Team(server)
    server.stop()
    assert_no_traceback(server)
    assert_no_secret_in_log(server)


async def start_json(url: str, token: str, **body: Any) -> dict[str, Any]:
    """Start an answer without reading it: 202 with its ids."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        res = await client.post("/api/command-center/message", json={"message": "hello", **body},
                                headers={**bearer(token), "Accept": "application/json"})
    assert res.status_code == 202, res.text
    return dict(res.json())


async def ws_call(ws_url: str, token: str, frame: dict[str, Any]) -> dict[str, Any]:
    """Send one frame over a new socket and return the first frame that answers it."""
    async with websockets.connect(ws_url + WS_PATH, additional_headers=bearer(token)) as socket:
        await socket.send(json.dumps(frame))
        async with asyncio.timeout(30):
            return dict(json.loads(await socket.recv()))


# ---- Users and tokens -------------------------------------------------------------------------


def test_a_token_is_printed_once_and_only_its_hash_is_stored(tmp_path):
    db_path = tmp_path / "users.db"
    token = add_user(db_path, "carol", "--admin")
    assert token.startswith("drt_") and len(token) > 40
    assert token.encode() not in db_path.read_bytes()
    with sqlite3.connect(db_path) as db:
        (stored,) = db.execute("SELECT token_hash FROM users WHERE name = 'carol'").fetchone()
    assert stored != token and len(stored) == 64

    listing = run_cli(db_path, "list")
    assert "carol" in listing.stdout and "admin" in listing.stdout and token not in listing.stdout

    again = run_cli(db_path, "add", "carol")
    assert again.returncode != 0 and "already exists" in again.stderr and again.stdout == ""
    assert run_cli(db_path, "add", "no spaces allowed").returncode != 0
    assert run_cli(db_path, "revoke", "carol").returncode == 0
    assert "revoked" in run_cli(db_path, "list").stdout
    assert run_cli(db_path, "revoke", "carol").returncode != 0


async def test_no_or_a_wrong_token_gets_401_on_every_endpoint_and_transport(team):
    server = team.server
    before = saved_messages(server)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        for headers in ({}, bearer("drt_wrong"), {"Authorization": "Basic YWxpY2U6eA=="}):
            for method, path, body in (
                ("GET", "/api/conversations", None),
                ("GET", "/api/session", None),
                ("POST", "/api/command-center/message", {"message": "spend"}),
                ("POST", "/api/command-center/streams/abc/cancel", None),
            ):
                res = await client.request(method, path, json=body, headers={**headers, "Accept": "application/json"})
                assert res.status_code == 401, (method, path, res.text)
                assert res.json()["error"]["code"] == "unauthorized"
            for raw in (b"drt_wrong", b"Basic x"):
                assert raw.decode() not in (await client.get("/api/conversations", headers=headers)).text
        # For an EventSource too: any status but 200 stops it (a 200 event stream would have it reconnect).
        resumed = await sse_resume(server.url, "abc")
        assert resumed.status_code == 401 and resumed.json()["error"]["code"] == "unauthorized"
    for headers in ({}, bearer("drt_wrong")):
        with pytest.raises(InvalidStatus) as refused:
            async with websockets.connect(server.ws_url + WS_PATH, additional_headers=headers):
                pass
        assert refused.value.response.status_code == 401
        assert json.loads(refused.value.response.body)["error"]["code"] == "unauthorized"
    assert saved_messages(server) == before


async def test_a_revoked_token_stops_working(team):
    server = team.server
    token = add_user(server.database_url, "leaver")
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        assert (await client.get("/api/session", headers=bearer(token))).json()["user"]["name"] == "leaver"
        assert run_cli(server.database_url, "revoke", "leaver").returncode == 0
        assert (await client.get("/api/session", headers=bearer(token))).status_code == 401


# ---- Owners -----------------------------------------------------------------------------------


async def test_another_users_conversation_and_stream_are_not_found_on_both_transports(team):
    server = team.server
    started = await start_json(server.url, team.alice, message="alice's secret plan")
    stream_id, conversation_id = started["streamId"], started["conversationId"]
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        as_bob = {**bearer(team.bob), "Accept": "application/json"}
        listed = (await client.get("/api/conversations", headers=as_bob)).json()["conversations"]
        assert conversation_id not in [c["id"] for c in listed]
        res = await client.get(f"/api/conversations/{conversation_id}/messages", headers=as_bob)
        assert res.status_code == 404 and "secret" not in res.text
        res = await client.get(f"/api/command-center/streams/{stream_id}", headers=as_bob)
        assert res.status_code == 404 and res.json()["error"]["code"] == "not_resumable"
        res = await client.post(f"/api/command-center/streams/{stream_id}/cancel", headers=as_bob)
        assert res.status_code == 404 and res.json()["error"]["code"] == "not_found"
        res = await client.post("/api/command-center/message", headers=as_bob,
                                json={"message": "mine now", "conversationId": conversation_id})
        assert res.status_code == 404
        # The same 404 as for a stream that never existed: nothing tells bob it is there.
        unknown = await client.get("/api/command-center/streams/0123456789abcdef", headers=as_bob)
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_resumable"

    frame = await ws_call(server.ws_url, team.bob, {"type": "resume", "streamId": stream_id, "lastEventId": 0})
    assert frame["event"] == "error" and frame["data"]["code"] == "not_resumable"
    frame = await ws_call(server.ws_url, team.bob, {"type": "cancel", "streamId": stream_id})
    assert frame["event"] == "error" and frame["data"]["code"] == "not_found"
    frame = await ws_call(server.ws_url, team.bob,
                          {"type": "message", "message": "mine now", "conversationId": conversation_id})
    assert frame["event"] == "error" and frame["data"]["code"] == "not_found"

    # Alice's answer ran on untouched, and watching it works for her over the WebSocket.
    async with websockets.connect(server.ws_url + WS_PATH, additional_headers=bearer(team.alice)) as socket:
        await socket.send(json.dumps({"type": "resume", "streamId": stream_id, "lastEventId": 0}))
        events = await ws_read_until_end(socket, stream_id)
    assert names(events)[-1] == "done" and text_of(events) == team_answer("alice's secret plan")
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        body = (await client.get(f"/api/conversations/{conversation_id}/messages", headers=bearer(team.alice))).json()
    assert [m["role"] for m in body["messages"]] == ["user", "assistant"]
    assert body["messages"][1]["status"] == "complete"


async def test_another_users_answers_cannot_be_regenerated_continued_branched_renamed_or_deleted(team):
    """Every tree command and REST write (issue 17) names alice's ids to bob as unknown ones: 404 `not_found`,
    nothing changed, nothing sent upstream."""
    server = team.server
    started = await start_json(server.url, team.alice, message="alice's plan")
    async with websockets.connect(server.ws_url + WS_PATH, additional_headers=bearer(team.alice)) as socket:
        await socket.send(json.dumps({"type": "resume", "streamId": started["streamId"], "lastEventId": 0}))
        await ws_read_until_end(socket, started["streamId"])
    conversation_id = started["conversationId"]
    path = f"/api/conversations/{conversation_id}"
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        before = (await client.get(path + "/messages", headers=bearer(team.alice))).json()
        answer_id = before["messages"][1]["id"]
        as_bob = bearer(team.bob)
        for body in ({"regenerate": answer_id}, {"continue": answer_id},
                     {"message": "x", "parentMessageId": answer_id}):
            res = await client.post("/api/command-center/message", json=body, headers=as_bob)
            assert (res.status_code, res.json()["error"]["code"]) == (404, "not_found"), body
        for method, url, body in (("PUT", path + "/active-leaf", {"messageId": answer_id}),
                                  ("PATCH", path, {"title": "bob's now"}), ("DELETE", path, None)):
            res = await client.request(method, url, json=body, headers=as_bob)
            assert (res.status_code, res.json()["error"]["code"]) == (404, "not_found"), method
        after = (await client.get(path + "/messages", headers=bearer(team.alice))).json()
    for kind in ("regenerate", "continue"):
        frame = await ws_call(server.ws_url, team.bob, {"type": kind, "messageId": answer_id})
        assert frame["event"] == "error" and frame["data"]["code"] == "not_found"
    assert after == before


async def test_an_admin_sees_every_users_conversations_and_streams(team):
    server = team.server
    started = await start_json(server.url, team.alice, message="admins may look")
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        as_root = bearer(team.root)
        own = (await client.get("/api/conversations", headers=as_root)).json()["conversations"]
        assert started["conversationId"] not in [c["id"] for c in own]
        every = (await client.get("/api/conversations?all=1", headers=as_root)).json()["conversations"]
        assert started["conversationId"] in [c["id"] for c in every]
        # ?all=1 from a plain user lists only their own.
        alices = (await client.get("/api/conversations?all=1", headers=bearer(team.bob))).json()["conversations"]
        assert started["conversationId"] not in [c["id"] for c in alices]
    events = await sse_read_as(server.url, started["streamId"], team.root)
    assert text_of(events) == team_answer("admins may look")


async def sse_read_as(url: str, stream_id: str, token: str) -> list[Any]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        async with aconnect_sse(client, "GET", f"/api/command-center/streams/{stream_id}",
                                headers=bearer(token)) as source:
            return [(int(e.id) if e.id else None, e.event, loads(e.data)) async for e in source.aiter_sse()]


async def test_the_owner_can_cancel_over_either_transport(team):
    server = team.server
    for transport in ("sse", "ws"):
        started = await start_json(server.url, team.alice, message=f"stop me over {transport}")
        if transport == "sse":
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                res = await client.post(f"/api/command-center/streams/{started['streamId']}/cancel",
                                        headers=bearer(team.alice))
            assert res.status_code in (200, 202)
        else:
            async with websockets.connect(server.ws_url + WS_PATH, additional_headers=bearer(team.alice)) as socket:
                await socket.send(json.dumps({"type": "cancel", "streamId": started["streamId"]}))
                await socket.send(json.dumps({"type": "resume", "streamId": started["streamId"]}))
                events = await ws_read_until_end(socket, started["streamId"])
            assert events[-1][2]["stopReason"] == "cancelled"


# ---- Sessions and origins ---------------------------------------------------------------------


async def test_a_browser_session_is_an_httponly_strict_cookie_that_every_transport_accepts(team):
    server = team.server
    own = {"Origin": server.url}
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        res = await client.post("/api/session", json={"token": team.alice}, headers=own)
        assert res.status_code == 200 and res.json()["user"] == {"name": "alice", "admin": False, "anonymous": False}
        cookie = res.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
        assert team.alice not in cookie and team.alice not in res.text
        assert (await client.get("/api/session")).json()["user"]["name"] == "alice"
        # A state-changing request carried by the cookie must come from this server's own page.
        refused = await client.post("/api/command-center/message", json={"message": "csrf"},
                                    headers={"Origin": EVIL, "Accept": "application/json"})
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden"
        session_cookie = f"deltarelay_session={client.cookies['deltarelay_session']}"
        events = await sse_stream(server.url, {"message": "by cookie"},
                                  headers={"Origin": server.url, "Cookie": session_cookie})
        assert text_of(events) == team_answer("by cookie")

        async with websockets.connect(server.ws_url + WS_PATH, origin=server.url,
                                      additional_headers={"Cookie": session_cookie}) as socket:
            await socket.send(json.dumps({"type": "message", "message": "cookie socket"}))
            events = await ws_read_until_end(socket)
        assert text_of(events) == team_answer("cookie socket")
        with pytest.raises(InvalidStatus) as refused_ws:
            async with websockets.connect(server.ws_url + WS_PATH, origin=EVIL,
                                          additional_headers={"Cookie": session_cookie}):
                pass
        assert refused_ws.value.response.status_code == 403

        assert (await client.delete("/api/session", headers=own)).status_code == 200
        after = await client.get("/api/session", headers={"Cookie": session_cookie})
        assert after.status_code == 401


async def test_a_wrong_token_cannot_sign_in(team):
    async with httpx.AsyncClient(base_url=team.server.url, timeout=30) as client:
        for body in ({"token": "drt_nope"}, {"token": ""}, {}, {"token": 5}):
            res = await client.post("/api/session", json=body)
            assert res.status_code in (400, 401) and "set-cookie" not in res.headers


async def test_the_websocket_origin_is_checked_even_in_open_mode(make_server):
    server = make_server({"RELAY_ALLOWED_ORIGINS": "https://app.example.com"})
    for origin in (EVIL, "http://127.0.0.1:1", "null"):
        with pytest.raises(InvalidStatus) as refused:
            async with websockets.connect(server.ws_url + WS_PATH, origin=origin):
                pass
        assert refused.value.response.status_code == 403
        assert json.loads(refused.value.response.body)["error"]["code"] == "forbidden"
    for origin in (server.url, "https://app.example.com", None):
        async with websockets.connect(server.ws_url + WS_PATH, origin=origin) as socket:
            await socket.send('{"type": "ping"}')
            assert json.loads(await socket.recv()) == {"event": "pong"}
    # In open mode another site's page cannot spend through a simple cross-site POST either.
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        res = await client.post("/api/command-center/message", content=b'{"message": "csrf"}',
                                headers={"Origin": EVIL, "Content-Type": "text/plain"})
        assert res.status_code == 403
        # DNS rebinding: another name pointed at this address is refused while the server is open.
        res = await client.get("/api/conversations", headers={"Host": "evil.example:8000"})
        assert res.status_code == 403
    assert saved_messages(server) == 0


def test_open_mode_is_refused_on_a_reachable_address_unless_allowed(tmp_path):
    port = free_port()
    args = [SERVER_PYTHON, "-m", "server", "--host", "0.0.0.0", "--port", str(port)]
    env = {"DATABASE_URL": f"sqlite:///{tmp_path / 'open.db'}"}
    refused = subprocess.run(args, cwd=SERVER_CWD, env=_clean_env(env), capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "RELAY_ALLOW_ANONYMOUS" in refused.stderr

    allowed = RelayServer(tmp_path, {"RELAY_ALLOW_ANONYMOUS": "1"})
    try:
        assert httpx.get(allowed.url + "/api/session").json()["user"]["anonymous"] is True
    finally:
        allowed.stop(signal.SIGTERM)
    assert "open mode" in allowed.log()

    # With a user, the same address starts without the setting and asks for a token.
    add_user(tmp_path / "open.db", "dora")
    secured = subprocess.Popen(args, cwd=SERVER_CWD, env=_clean_env(env), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            try:
                res = httpx.get(f"http://127.0.0.1:{port}/api/conversations", timeout=1)
                break
            except httpx.TransportError:
                assert secured.poll() is None, "the server with a user exited at start"
                time.sleep(0.1)  # waiting for the process to bind
        assert res.status_code == 401
    finally:
        secured.terminate()
        secured.wait(timeout=30)


# ---- Socket limits ----------------------------------------------------------------------------


async def test_an_oversized_frame_closes_that_socket_and_the_server_keeps_serving(make_server):
    server = make_server({"RELAY_WS_MAX_FRAME_BYTES": "2048"})
    async with websockets.connect(server.ws_url + WS_PATH, max_size=None) as socket:
        await socket.send(json.dumps({"type": "message", "message": "x" * 4000}))
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(socket.recv(), 10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    events = await sse_stream(server.url, {"message": "still here"})
    assert text_of(events) == demo_answer("still here")
    assert saved_messages(server) == 2


async def test_a_socket_follows_at_most_its_limit_of_streams(make_server):
    server = make_server({"RELAY_WS_MAX_STREAMS": "2", "RELAY_OFFLINE_DELAY_MS": "20", "RELAY_OFFLINE_WORDS": "30"})
    async with websockets.connect(server.ws_url + WS_PATH) as socket:
        for n in range(3):
            await socket.send(json.dumps({"type": "message", "message": f"stream {n}", "requestId": f"r{n}"}))
        refused = None
        done = 0
        async with asyncio.timeout(30):
            while done < 2 or refused is None:
                frame = json.loads(await socket.recv())
                if frame["event"] == "error" and frame.get("requestId") == "r2":
                    refused = frame
                done += frame["event"] == "done"
    assert refused["data"]["code"] == "rate_limited" and refused["data"]["limit"] == "streams_per_socket"
    assert saved_messages(server) == 4  # two turns; nothing of the refused one


# ---- Per-user limits --------------------------------------------------------------------------


async def test_requests_per_minute_are_limited_with_a_retry_time(make_server):
    server = make_server({"RELAY_LIMIT_REQUESTS_PER_MINUTE": "3"})
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        for _ in range(3):
            assert (await client.get("/api/conversations")).status_code == 200
        res = await client.get("/api/conversations")
    assert res.status_code == 429
    assert res.json()["error"]["limit"] == "requests_per_minute"
    assert 0 < res.json()["error"]["retryAfter"] <= 20 and int(res.headers["retry-after"]) >= 1
    with pytest.raises(InvalidStatus) as refused:
        async with websockets.connect(server.ws_url + WS_PATH):
            pass
    assert refused.value.response.status_code == 429


async def test_concurrent_streams_are_limited_per_user_on_both_transports(make_server):
    server = make_server({"RELAY_LIMIT_CONCURRENT_STREAMS": "1", "RELAY_OFFLINE_DELAY_MS": "20",
                          "RELAY_OFFLINE_WORDS": "40"})
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        first = await client.post("/api/command-center/message", json={"message": "one"},
                                  headers={"Accept": "application/json"})
        assert first.status_code == 202
        second = await client.post("/api/command-center/message", json={"message": "two"},
                                   headers={"Accept": "application/json"})
        assert second.status_code == 429 and second.json()["error"]["limit"] == "concurrent_streams"
        async with websockets.connect(server.ws_url + WS_PATH) as socket:
            await socket.send(json.dumps({"type": "message", "message": "three"}))
            frame = json.loads(await asyncio.wait_for(socket.recv(), 10))
            assert frame["event"] == "error" and frame["data"]["limit"] == "concurrent_streams"
            assert frame["data"]["retryable"] is True
        # Once the first answer ends, the slot is free again.
        await sse_read(server.url, first.json()["streamId"])
        events = await sse_stream(server.url, {"message": "four"})
        assert names(events)[-1] == "done"
    assert saved_messages(server) == 4


async def test_open_connections_are_limited_per_user(make_server):
    server = make_server({"RELAY_LIMIT_CONNECTIONS": "1", "RELAY_OFFLINE_DELAY_MS": "20", "RELAY_OFFLINE_WORDS": "40"})
    async with websockets.connect(server.ws_url + WS_PATH) as socket:
        with pytest.raises(InvalidStatus) as refused:
            async with websockets.connect(server.ws_url + WS_PATH):
                pass
        assert refused.value.response.status_code == 429
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            res = await client.post("/api/command-center/message", json={"message": "over"})
        assert res.status_code == 429 and res.json()["error"]["limit"] == "connections"
        await socket.send('{"type": "ping"}')
        assert json.loads(await socket.recv()) == {"event": "pong"}
    assert saved_messages(server) == 0
    # The socket closed: its slot is free.
    async with asyncio.timeout(10):
        while True:
            try:
                events = await sse_stream(server.url, {"message": "now"})
                break
            except httpx.HTTPStatusError:
                await asyncio.sleep(0.05)  # the server notices the close a moment later
    assert names(events)[-1] == "done"


async def test_the_daily_budget_stops_new_answers_with_402_and_the_amount_spent(make_server):
    server = make_server({"RELAY_BUDGET_PER_DAY": "0.0000001"})
    events = await sse_stream(server.url, {"message": "the only answer today"})
    spent = events[-2][2]["totalCost"]
    assert spent > 0
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        res = await client.post("/api/command-center/message", json={"message": "one more"})
    assert res.status_code == 402
    error = res.json()["error"]
    assert error["code"] == "budget_exceeded" and error["limit"] == "budget_per_day"
    assert error["spent"] == format(spent, "f") and error["budget"] == "0.0000001"
    assert error["retryAfter"] > 0 and "retry-after" in res.headers
    async with websockets.connect(server.ws_url + WS_PATH) as socket:
        await socket.send(json.dumps({"type": "message", "message": "over the socket"}))
        frame = json.loads(await asyncio.wait_for(socket.recv(), 10))
    assert frame["data"]["code"] == "budget_exceeded" and frame["data"]["spent"] == format(spent, "f")
    assert saved_messages(server) == 2


async def test_history_length_and_message_size_are_capped_and_nothing_is_saved(make_server):
    server = make_server({"RELAY_MAX_HISTORY_MESSAGES": "4", "RELAY_MAX_MESSAGE_BYTES": "100"})
    first = await sse_stream(server.url, {"message": "turn one"})
    conversation_id = first[0][2]["conversationId"]
    await sse_stream(server.url, {"message": "turn two", "conversationId": conversation_id})
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        res = await client.post("/api/command-center/message",
                                json={"message": "turn three", "conversationId": conversation_id})
        assert res.status_code == 413 and res.json()["error"]["code"] == "history_too_long"
        res = await client.post("/api/command-center/message", json={"message": "é" * 51})
        assert res.status_code == 413 and res.json()["error"]["code"] == "too_large"
    async with websockets.connect(server.ws_url + WS_PATH) as socket:
        await socket.send(json.dumps({"type": "message", "message": "turn three", "conversationId": conversation_id}))
        frame = json.loads(await asyncio.wait_for(socket.recv(), 10))
    assert frame["data"]["code"] == "history_too_long"
    assert saved_messages(server) == 4


# ---- Headers ----------------------------------------------------------------------------------


def test_the_page_is_served_with_a_strict_content_security_policy(server):
    res = httpx.get(server.url + "/")
    policy = res.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "'unsafe-inline'" not in policy and "frame-ancestors 'none'" in policy
    assert res.headers["x-content-type-options"] == "nosniff"
    assert res.headers["x-frame-options"] == "DENY"
    assert "<script>" not in res.text and "onclick" not in res.text  # every script is a file
    for path in ("/static/app.js", "/client/deltarelay.js", "/api/conversations"):
        assert httpx.get(server.url + path).headers["x-content-type-options"] == "nosniff"
