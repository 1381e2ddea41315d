"""A fast Anthropic-compatible upstream for the benchmark: streamed Messages API answers, stamped.

    python -m bench.upstream --port 9100 --delay-ms 50 --words 60

Each text delta's text is "seq:send_time_ns " (time.time_ns() when it is written), so a client measures
latency = receive time - send time. The event sequence is the offline model's (server/upstream/offline.py):
message_start, content_block_start, ping, one content_block_delta per word, content_block_stop,
message_delta (usage), message_stop.

Why not `python -m server.mock_upstream --stamp`: it spends about 50 us of CPU per delta (ASGI, uvicorn,
a coroutine per stream); at 1,000 streams x 20 deltas/s that is a whole core, the one it shares with the
load generator. Here a delta is one timer callback and one write on a raw asyncio protocol (about 10 us).

Pacing is absolute: delta i of a stream is due at start + (i + 1) * delay, so a late timer does not slow
the stream down. With delay 0, one delta per stream per event-loop turn, pausing while the socket's buffer
is full ("as fast as the upstream can"). A user message that starts with "warmup" gets 3 deltas at once.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import time
from typing import Any, cast

import httptools
import orjson

HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ncache-control: no-store\r\n"
        b"transfer-encoding: chunked\r\n\r\n")
DELTA_HEAD = (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
              b'"delta":{"type":"text_delta","text":"')
DELTA_TAIL = b'"}}\n\n'
WARMUP_WORDS = 3


def _event(name: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def _chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def opening(model: str, input_tokens: int, index: int) -> bytes:
    return (
        _event("message_start", {"type": "message_start", "message": {
            "id": f"msg_bench_{os.getpid()}_{index}", "type": "message", "role": "assistant", "content": [],
            "model": model, "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "cache_creation_input_tokens": 0,
                      "cache_read_input_tokens": 0, "output_tokens": 1}}})
        + _event("content_block_start",
                 {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
        + _event("ping", {"type": "ping"})
    )


def closing(words: int) -> bytes:
    return (
        _event("content_block_stop", {"type": "content_block_stop", "index": 0})
        + _event("message_delta", {"type": "message_delta",
                                   "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                   "usage": {"output_tokens": words}})
        + _event("message_stop", {"type": "message_stop"})
    )


class Stats:
    requests = 0
    completed = 0
    disconnected = 0
    deltas = 0


class Answer:
    """One streamed answer on one connection, driven by loop timers."""

    __slots__ = ("conn", "words", "delay", "seq", "start", "handle", "waiting")

    def __init__(self, conn: UpstreamConnection, words: int, delay: float) -> None:
        self.conn = conn
        self.words = words
        self.delay = delay
        self.seq = 0
        self.start = conn.loop.time()
        self.handle: asyncio.Handle | asyncio.TimerHandle | None = None
        self.waiting = False  # paused for backpressure

    def schedule(self) -> None:
        loop = self.conn.loop
        if self.delay > 0:
            self.handle = loop.call_at(self.start + (self.seq + 1) * self.delay, self.step)
        else:
            self.handle = loop.call_soon(self.step)

    def step(self) -> None:
        conn = self.conn
        if conn.closed:
            return
        if conn.paused and self.delay == 0:
            self.waiting = True  # resume_writing schedules the next delta
            return
        text = b"%d:%d " % (self.seq, time.time_ns())
        body = DELTA_HEAD + text + DELTA_TAIL
        self.seq += 1
        Stats.deltas += 1
        if self.seq == self.words:
            body += closing(self.words)
            conn.write(_chunk(body) + b"0\r\n\r\n")
            Stats.completed += 1
            conn.answer = None
            conn.next_request()
            return
        conn.write(_chunk(body))
        self.schedule()

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()


class UpstreamConnection(asyncio.Protocol):
    """HTTP/1.1 with keep-alive: one request at a time, as httpx sends them."""

    def __init__(self, words: int, delay: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.words = words
        self.delay = delay
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []
        self.queue: list[tuple[bytes, bytes, bytes]] = []
        self.answer: Answer | None = None
        self.paused = False
        self.closed = False
        self.keep_alive = True

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.answer is not None:
            self.answer.cancel()
            Stats.disconnected += 1
            self.answer = None

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.answer is not None and self.answer.waiting:
            self.answer.waiting = False
            self.answer.schedule()

    # httptools callbacks
    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()
        self.queue.append((self.parser.get_method(), self.url, b"".join(self.body)))
        self.url, self.body = b"", []
        if self.answer is None:
            self.next_request()

    # responses
    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.closed = True

    def next_request(self) -> None:
        if not self.queue:
            if not self.keep_alive:
                self.close()
            return
        method, url, body = self.queue.pop(0)
        Stats.requests += 1
        if method == b"GET" and url == b"/stats":
            self.respond(200, orjson.dumps({k: getattr(Stats, k) for k in
                                            ("requests", "completed", "disconnected", "deltas")}))
        elif method != b"POST" or url.split(b"?")[0] != b"/v1/messages":
            self.respond(404, b'{"type":"error","error":{"type":"not_found_error","message":"no such route"}}')
        else:
            self.start_answer(body)

    def respond(self, status: int, body: bytes) -> None:
        self.write(b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                   % (status, len(body), body))
        self.next_request()

    def start_answer(self, body: bytes) -> None:
        try:
            request = orjson.loads(body)
            messages = request.get("messages") or []
            last = messages[-1].get("content", "") if messages else ""
        except (orjson.JSONDecodeError, AttributeError, TypeError):
            self.respond(400, b'{"type":"error","error":{"type":"invalid_request_error","message":"bad JSON"}}')
            return
        text = last if isinstance(last, str) else str(last)
        warmup = text.startswith("warmup")
        words, delay = (WARMUP_WORDS, 0.0) if warmup else (self.words, self.delay)
        model = str(request.get("model") or "claude-sonnet-4-5")
        self.write(HEAD + _chunk(opening(model, max(1, len(text) // 4), Stats.requests)))
        self.answer = Answer(self, words, delay)
        self.answer.schedule()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.upstream", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--delay-ms", type=float, default=50.0, help="time between text deltas (0: no pause)")
    parser.add_argument("--words", type=int, default=60, help="text deltas per answer")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        def factory() -> asyncio.Protocol:
            return UpstreamConnection(args.words, args.delay_ms / 1000)

        server = await loop.create_server(factory, args.host, args.port, backlog=4096)
        async with server:
            await server.serve_forever()

    try:
        import uvloop
    except ImportError:
        asyncio.run(serve())
    else:
        uvloop.run(serve())


if __name__ == "__main__":
    main()
