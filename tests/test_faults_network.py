"""Hostile and broken clients against real server processes (issue 14): oversized and slow request heads, idle
sockets, half-open readers behind a frozen proxy, EventSource reconnects, and SIGTERM's grace period.

Every wait on the server is a condition with a timeout that only guards against a hang; the one clock in a
test is the SIGTERM test's bound, a multiple of the grace period it sets.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from httpx_sse import aconnect_sse

from .proxy import TcpProxy
from .relay_clients import (
    expected_words,
    loads,
    names,
    sse_read,
    sse_resume,
    sse_stream,
    text_of,
    ws_read_until_end,
)


def connection_warnings(relay: Any, peer: str = "127.0.0.1") -> list[str]:
    """What the server's connection log says about `peer`, one entry a line."""
    return re.findall(rf"WARNING deltarelay\.connections: {re.escape(peer)}: (.*)", relay.log())


async def wait_for(predicate: Any, limit: float = 30.0) -> Any:
    """Poll a condition that another process makes true (bounded; not a test-logic sleep)."""
    async with asyncio.timeout(limit):
        while not (result := await predicate()):  # noqa: ASYNC110 - the condition lives in another process
            await asyncio.sleep(0.05)
        return result


async def raw_exchange(port: int, request: bytes) -> tuple[int, dict[str, Any], bytes]:
    """Send `request` on a new connection (as far as the server lets it) and read the answer to its end."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def send() -> None:
        try:
            for start in range(0, len(request), 1 << 20):
                writer.write(request[start:start + (1 << 20)])
                await writer.drain()
        except ConnectionError:
            pass  # the server stopped reading: it has answered

    sending = asyncio.create_task(send())
    try:
        async with asyncio.timeout(30):
            answer = await reader.read()
            await sending
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head else 0
    return status, json.loads(body) if body.startswith(b"{") else {}, head


def peak_memory_kb(relay: Any) -> int:
    """The server process's peak resident set (VmHWM), in KiB."""
    for line in Path(f"/proc/{relay.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc")


# --- request heads ---------------------------------------------------------------------------------------


async def test_a_10_mb_header_is_refused_with_431_and_the_server_goes_on_serving(make_server):
    """Fails without the bound on the head's bytes (RelayHttpProtocol.data_received and on_header): uvicorn's
    httptools protocol reads the whole header and serves the request (200), and the peak memory grows with it."""
    relay = make_server()
    async with httpx.AsyncClient(base_url=relay.url) as client:
        assert (await client.get("/healthz")).status_code == 200
    before = peak_memory_kb(relay)

    status, body, head = await raw_exchange(
        relay.port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 10_000_000 + b"\r\n\r\n")
    assert status == 431, head
    assert body["error"]["code"] == "headers_too_large"
    assert b"connection: close" in head
    status, body, head = await raw_exchange(
        relay.port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Bigger: " + b"a" * 50_000_000 + b"\r\n\r\n")
    assert status == 431, head

    async with httpx.AsyncClient(base_url=relay.url) as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
    # What is held of a refused head is the bound plus one read, not the header.
    assert peak_memory_kb(relay) - before < 20_000
    # Two refusals, one line: the second is counted for the peer's next line.
    assert connection_warnings(relay) == ["refused a request: 431 the request head is over 32768 bytes"]


async def test_200_headers_are_refused_with_431(make_server):
    """Fails without the header count in on_header: the request with 200 headers is served (200)."""
    relay = make_server()
    headers = b"".join(b"X-Header-%d: %d\r\n" % (n, n) for n in range(200))
    status, body, _ = await raw_exchange(relay.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    assert status == 431
    assert body["error"] == {"code": "headers_too_large", "message": "a request may have at most 100 headers"}
    hundred = b"".join(b"X-Header-%d: %d\r\n" % (n, n) for n in range(98))  # and Host and Connection
    status, body, _ = await raw_exchange(
        relay.port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n" + hundred + b"\r\n")
    assert status == 200


async def test_a_silent_socket_and_a_slowloris_are_closed_after_the_head_timeout_and_logged_once(make_server):
    """Fails without the head timeout (ConnectionGuard): neither connection is ever closed, and nothing is logged."""
    relay = make_server({"RELAY_HEADER_TIMEOUT_SECONDS": "1.5"})
    silent_reader, silent_writer = await asyncio.open_connection("127.0.0.1", relay.port)
    slow_reader, slow_writer = await asyncio.open_connection("127.0.0.1", relay.port)

    async def dribble() -> None:
        # One header byte every half second: each byte would reset a timer that counts silence.
        slow_writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        while not slow_writer.is_closing():
            await asyncio.sleep(0.5)  # the attack's pace, not a wait for the server
            try:
                slow_writer.write(b"a")
                await slow_writer.drain()
            except ConnectionError:
                return

    dribbling = asyncio.create_task(dribble())
    try:
        async with asyncio.timeout(30):
            silent_answer = await silent_reader.read()
            slow_answer = await slow_reader.read()
    finally:
        dribbling.cancel()
        silent_writer.close()
        slow_writer.close()

    assert silent_answer == b""  # it asked nothing: it is closed without an answer
    assert slow_answer.startswith(b"HTTP/1.1 408 ")
    assert json.loads(slow_answer.partition(b"\r\n\r\n")[2])["error"]["code"] == "timeout"
    async with httpx.AsyncClient(base_url=relay.url) as client:
        assert (await client.get("/healthz")).status_code == 200
    assert connection_warnings(relay) == ["closed a connection that sent nothing for 1.5 s"]


async def test_idle_sockets_past_the_cap_are_closed_and_a_real_client_still_streams_an_answer(make_server):
    """Fails without the cap on pending connections (ConnectionGuard.max_pending): all 100 idle sockets stay
    open. Fails too if the cap refused new connections instead of closing the oldest: the real client, which
    comes after 20 idle ones that are still open, would be turned away."""
    relay = make_server({"RELAY_MAX_UNAUTHENTICATED_CONNECTIONS": "20", "RELAY_HEADER_TIMEOUT_SECONDS": "120"})
    idle = [await asyncio.open_connection("127.0.0.1", relay.port) for _ in range(100)]
    closing = [asyncio.create_task(reader.read()) for reader, _ in idle]
    try:
        async def eighty_closed() -> bool:
            return sum(task.done() for task in closing) >= 80

        await wait_for(eighty_closed)
        assert sum(task.done() for task in closing) == 80  # the 20 newest are still open

        events = await sse_stream(relay.url, {"message": "still here"})
        assert names(events)[-1] == "done" and text_of(events)
        assert sum(not task.done() for task in closing) >= 19  # its connection closed at most one more
    finally:
        for task in closing:
            task.cancel()
        for _, writer in idle:
            writer.close()
    warnings = connection_warnings(relay)
    assert warnings == ["closed an idle connection: too many connections are waiting to send a request"]


# --- half-open readers -----------------------------------------------------------------------------------


PROXIED = "127.0.0.2"  # the frozen reader's address, as the server sees it


def big_answer_relay(make_server: Any, make_upstream: Any, **env: str) -> Any:
    """A relay whose upstream answers 8,000 deltas of ~1 KB over 8 s or more: more than every buffer on the way
    holds (the relay's send buffer grows to 4 MB on Linux loopback)."""
    upstream = make_upstream("--words", "8000", "--repeat", "150", "--delay-ms", "1")
    return make_server({"ANTHROPIC_API_KEY": "sk-test", "ANTHROPIC_BASE_URL": upstream.url,
                        "RELAY_SUBSCRIBER_QUEUE_EVENTS": "100000", "RELAY_LIMIT_CONNECTIONS": "1",
                        "RELAY_WRITE_TIMEOUT_SECONDS": "2", "RELAY_KEEPALIVE_SECONDS": "60", **env})


async def connection_slot_status(relay: Any, stream_id: str) -> int:
    """429 while the user's one connection slot is held; else 410 (a cursor ahead of the stream holds nothing)."""
    async with httpx.AsyncClient(base_url=relay.url, timeout=30) as client:
        response = await client.get(f"/api/command-center/streams/{stream_id}",
                                    headers={"Accept": "text/event-stream", "Last-Event-ID": str(10**9)})
    return response.status_code


async def saved_answer(relay: Any, stream_id: str) -> tuple[str, str] | None:
    rows = relay.rows("SELECT status, content FROM messages WHERE stream_id = ? AND role = 'assistant'", stream_id)
    return (rows[0][0], rows[0][1]) if rows and rows[0][0] != "streaming" else None


async def test_a_half_open_sse_reader_gives_its_connection_slot_back_within_the_write_deadline(
        make_server, make_upstream):
    """Fails without the write deadline (RelayHttpProtocol.pause_writing): `send` waits for a drain that never
    comes, and the slot is still held when the guard's 60 s run out, long after the answer ended."""
    relay = big_answer_relay(make_server, make_upstream)
    with TcpProxy(relay.port, rcvbuf=4096, source=PROXIED) as proxy:
        async with httpx.AsyncClient(base_url=proxy.url, timeout=120) as client:
            async with aconnect_sse(client, "POST", "/api/command-center/message", json={"message": "x"}) as source:
                events = []
                async for event in source.aiter_sse():
                    events.append((int(event.id), event.event, loads(event.data)))
                    if len(events) == 3:
                        break
                proxy.freeze()  # the far side is gone; nothing is closed
                stream_id = events[0][2]["streamId"]
                assert await connection_slot_status(relay, stream_id) == 429  # held by the frozen reader

                async def slot_free() -> bool:
                    return await connection_slot_status(relay, stream_id) != 429

                await wait_for(slot_free, limit=60)
                assert await connection_slot_status(relay, stream_id) == 410

                saved = await wait_for(lambda: saved_answer(relay, stream_id), limit=60)
    assert saved == ("complete", expected_words(8000, 150))
    assert connection_warnings(relay, PROXIED) == ["cut off a connection that read nothing for 2 s"]


async def test_a_half_open_websocket_reader_gives_its_connection_slot_back_within_the_write_deadline(
        make_server, make_upstream):
    """Fails without the write deadline (the WebSocket protocol's pause_writing): pings come every 60 s here,
    so the frozen socket still holds the slot when the guard's 60 s run out."""
    relay = big_answer_relay(make_server, make_upstream)

    async def slot_status() -> int:
        try:
            async with websockets.connect(relay.ws_url + "/api/command-center/ws"):
                return 101
        except websockets.InvalidStatus as exc:
            return exc.response.status_code

    with TcpProxy(relay.port, rcvbuf=4096, source=PROXIED) as proxy:
        async with websockets.connect(proxy.ws_url + "/api/command-center/ws", ping_interval=None,
                                      max_size=None) as socket:
            await socket.send(json.dumps({"type": "message", "message": "x"}))
            start = json.loads(await socket.recv())
            stream_id = start["streamId"]
            await socket.recv()
            proxy.freeze()
            assert await slot_status() == 429

            async def slot_free() -> bool:
                return await slot_status() == 101

            await wait_for(slot_free, limit=60)
            saved = await wait_for(lambda: saved_answer(relay, stream_id), limit=60)
    assert saved == ("complete", expected_words(8000, 150))
    assert connection_warnings(relay, PROXIED) == ["cut off a WebSocket that read nothing for 2 s"]


# --- EventSource resumes ---------------------------------------------------------------------------------


async def test_a_resume_at_the_last_id_of_a_finished_stream_is_204_and_no_resume_goes_back(server):
    """Fails if a resume at the end answers 200 again (before: an empty event stream, whose end had every
    EventSource reconnect every few seconds for as long as its page was open)."""
    full = await sse_stream(server.url, {"message": "the end is 204"})
    stream_id, last = full[0][2]["streamId"], full[-1][0]

    at_the_end = await sse_resume(server.url, stream_id, last)
    assert at_the_end.status_code == 204
    assert at_the_end.content == b""
    # Every other cursor gets exactly the events after it: never an id at or below what the client sent.
    for cursor in range(last):
        rest = await sse_read(server.url, stream_id, cursor)
        assert [event_id for event_id, _, _ in rest] == list(range(cursor + 1, last + 1))
    ahead = await sse_resume(server.url, stream_id, last + 1)
    assert ahead.status_code == 410 and ahead.json()["error"]["code"] == "not_resumable"
    assert b"id: 0" not in ahead.content


# --- refused WebSocket handshakes ------------------------------------------------------------------------


async def test_refused_websocket_handshakes_are_one_warning_per_peer_not_an_error_each(make_server):
    """Fails without ws_protocol's handshake_complete after a refusal: uvicorn logs 'ASGI callable returned
    without completing handshake' at ERROR for every refused socket."""
    relay = make_server()
    for _ in range(5):
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(relay.ws_url + "/api/command-center/ws",
                                          additional_headers={"Origin": "https://evil.example"}):
                pass
        assert refused.value.response.status_code == 403
    async with httpx.AsyncClient(base_url=relay.url) as client:
        assert (await client.get("/healthz")).status_code == 200

    assert " ERROR " not in relay.log()
    assert connection_warnings(relay) == ["refused a WebSocket handshake: 403"]


# --- SIGTERM ---------------------------------------------------------------------------------------------


async def test_sigterm_exits_within_the_grace_period_and_readers_get_the_interrupted_event(make_server):
    """Fails before the drain ends answers and readers within the grace period (cli.Server.drain): the drain
    waited the whole grace for answers and then uvicorn as long again for the open connections, about twice
    the grace, and then cancelled the readers without an `interrupted` event."""
    grace = 4.0
    relay = make_server({"RELAY_OFFLINE_DELAY_MS": "50", "RELAY_OFFLINE_WORDS": "2000",
                         "RELAY_SHUTDOWN_GRACE_SECONDS": str(grace)})
    async with httpx.AsyncClient(base_url=relay.url, timeout=60) as client:
        async with aconnect_sse(client, "POST", "/api/command-center/message", json={"message": "sse"}) as source:
            sse_events = source.aiter_sse()
            sse_first = [await anext(sse_events) for _ in range(3)]
            async with websockets.connect(relay.ws_url + "/api/command-center/ws") as socket:
                await socket.send(json.dumps({"type": "message", "message": "ws"}))
                ws_first = [json.loads(await socket.recv()) for _ in range(3)]

                relay.proc.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                exiting = asyncio.create_task(asyncio.to_thread(relay.proc.wait, 60))
                sse_rest = [(int(e.id), e.event, loads(e.data)) async for e in sse_events]
                ws_rest = await ws_read_until_end(socket)
                await exiting
                took = time.monotonic() - signalled

    assert took < grace * 1.5, f"exited {took:.1f} s after SIGTERM, with a grace of {grace} s"
    for last in (sse_rest[-1], ws_rest[-1]):
        assert last[1] == "error" and last[2]["code"] == "interrupted"
    sse_ids = [int(e.id) for e in sse_first] + [event_id for event_id, _, _ in sse_rest]
    assert sse_ids == list(range(1, len(sse_ids) + 1))
    assert [f["id"] for f in ws_first] + [event_id for event_id, _, _ in ws_rest] == list(
        range(1, len(ws_first) + len(ws_rest) + 1))
    statuses = relay.rows("SELECT status FROM messages WHERE role = 'assistant'")
    assert sorted(status for (status,) in statuses) == ["interrupted", "interrupted"]
