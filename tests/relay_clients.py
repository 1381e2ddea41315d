"""Real clients for a live server: SSE through httpx-sse, WebSocket through `websockets`."""

from __future__ import annotations

import asyncio
import json
import socket
from decimal import Decimal
from typing import Any

import httpx
import websockets
from httpx_sse import aconnect_sse

from server.upstream.offline import demo_words

Event = tuple[int | None, str, dict[str, Any]]
TERMINAL = {"done", "error"}


def expected_words(n: int, repeat: int = 1) -> str:
    """The offline model's first `n` words, each `repeat` times: what a stream of the mock upstream says."""
    return "".join(demo_words([], n, repeat))


def relay_with_big_answer(make_server: Any, make_upstream: Any, delay_ms: int, queue_events: int) -> Any:
    """A relay whose upstream answers 8,000 deltas of ~1 KB (~8 MB, more than kernel buffers hold)."""
    upstream = make_upstream("--words", "8000", "--repeat", "150", "--delay-ms", str(delay_ms))
    return make_server({"ANTHROPIC_API_KEY": "sk-test", "ANTHROPIC_BASE_URL": upstream.url,
                        "RELAY_SUBSCRIBER_QUEUE_EVENTS": str(queue_events)})


def unread_socket(port: int) -> socket.socket:
    """A connection with a 4 KB receive buffer: until it reads, the server's writes soon pause."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    return sock


def send_message_request(sock: socket.socket, message: str) -> None:
    """POST a message for an SSE answer by hand, on a socket the test reads (or does not read) itself."""
    body = json.dumps({"message": message}).encode()
    sock.sendall(b"POST /api/command-center/message HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


def demo_answer(*user_messages: str) -> str:
    """The offline model's exact answer to the last message of a conversation of `user_messages`."""
    history = [{"role": "user", "content": text} for text in user_messages]
    return "".join(demo_words(history))


def loads(data: str) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(data, parse_float=Decimal)  # money stays exact
    return value


async def sse_stream(base_url: str, body: dict[str, Any], **kwargs: Any) -> list[Event]:
    """POST a message and read every event to the end of the stream."""
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        async with aconnect_sse(client, "POST", "/api/command-center/message", json=body, **kwargs) as source:
            source.response.raise_for_status()
            return [(int(e.id) if e.id else None, e.event, loads(e.data)) async for e in source.aiter_sse()]


async def sse_read_first(base_url: str, body: dict[str, Any], count: int) -> list[Event]:
    """POST a command, read its first `count` events, drop the connection (the answer goes on)."""
    events: list[Event] = []
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        async with aconnect_sse(client, "POST", "/api/command-center/message", json=body) as source:
            async for event in source.aiter_sse():
                events.append((int(event.id), event.event, loads(event.data)))
                if len(events) == count:
                    break
    return events


async def sse_read(base_url: str, stream_id: str, last_event_id: int | None = None) -> list[Event]:
    headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        async with aconnect_sse(client, "GET", f"/api/command-center/streams/{stream_id}",
                                headers=headers) as source:
            return [(int(e.id) if e.id else None, e.event, loads(e.data)) async for e in source.aiter_sse()]


async def sse_read_whole(base_url: str, stream_id: str) -> list[Event]:
    """Every event of a stream, in order, however far behind this reader falls: where the server drops it as a
    slow consumer (a reader sharing a small bound with an unpaced upstream, on a loaded machine), it resumes
    from its last id, as the JS client does; the `slow_consumer` errors are not in the result."""
    events: list[Event] = []
    while True:
        last_id = events[-1][0] if events else None
        batch = await sse_read(base_url, stream_id, last_event_id=last_id)
        # By code, not by id: the error has no id line, but an SSE parser gives every event the last id it saw.
        if batch and batch[-1][1] == "error" and batch[-1][2].get("code") == "slow_consumer":
            batch.pop()
            if not batch:
                raise AssertionError(f"dropped as a slow consumer with no event read, after id {last_id}")
            events += batch
            continue
        return events + batch


async def sse_resume(base_url: str, stream_id: str, last_event_id: int | None = None) -> httpx.Response:
    """GET a stream as an EventSource would (Accept: text/event-stream), body read whole: status, headers, body."""
    headers = {"Accept": "text/event-stream"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        return await client.get(f"/api/command-center/streams/{stream_id}", headers=headers)


async def ws_stream(ws_url: str, frame: dict[str, Any]) -> list[Event]:
    """Send one message frame over a new socket and read its stream to the end."""
    async with websockets.connect(ws_url + "/api/command-center/ws") as socket:
        await socket.send(json.dumps({"type": "message", **frame}))
        return await ws_read_until_end(socket)


async def ws_read_until_end(socket: Any, stream_id: str | None = None) -> list[Event]:
    events: list[Event] = []
    async with asyncio.timeout(30):
        while True:
            frame = json.loads(await socket.recv(), parse_float=Decimal)
            if stream_id is not None and frame.get("streamId") != stream_id:
                continue
            events.append((frame["id"], frame["event"], frame["data"]))
            if frame["event"] in TERMINAL:
                return events


def text_of(events: list[Event]) -> str:
    return "".join(data["text"] for _, name, data in events if name == "chunk")


def names(events: list[Event]) -> list[str]:
    return [name for _, name, _ in events]
