"""Scripted Anthropic streams, a fake Messages API on a loopback socket, and a relay run in-process.

The relay built here is the real one (Store on a real database, AnthropicUpstream on its default
transport, the built-in HTTP/1.1 client, StreamHub, Relay); only the Messages API is faked, by
FakeUpstream: an HTTP/1.1 server on 127.0.0.1 that answers from a script and records every request.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from decimal import Decimal
from http import HTTPStatus
from pathlib import Path
from typing import Any

import httpx
import orjson

from server.config import load_settings
from server.core import Relay
from server.hub import StreamHub, Subscriber
from server.protocol.caching import breakpoint_errors
from server.protocol.frames import SendMessage
from server.store import Store
from server.upstream.anthropic import AnthropicUpstream

from .raw_upstream import STREAM_HEAD, Server, chunk

API_KEY = "sk-test-secret"

#: One relay event as a subscriber sees it: (id, name, decoded data).
RelayedEvent = tuple[int, str, dict[str, Any]]


def sse_event(name: str, payload: dict[str, Any]) -> bytes:
    """One upstream SSE event, framed like the Anthropic API frames it."""
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps({"type": name, **payload}) + b"\n\n"


def anthropic_events(
    texts: list[str],
    *,
    model: str = "claude-haiku-4-5",
    input_tokens: int = 10,
    output_tokens: int | None = None,
    cache_read: int = 0,
    stop_reason: str = "end_turn",
    usage: dict[str, Any] | None = None,
) -> list[bytes]:
    """A scripted answer, one SSE event per item: message_start ... message_stop.

    output_tokens defaults to one token per text delta; `usage` replaces message_start's input and cache figures.
    """
    events = [
        sse_event("message_start", {"message": {
            "id": "msg_scripted", "type": "message", "role": "assistant", "content": [], "model": model,
            "stop_reason": None, "stop_sequence": None,
            "usage": {**(usage or {"input_tokens": input_tokens, "cache_creation_input_tokens": 0,
                                   "cache_read_input_tokens": cache_read}), "output_tokens": 1},
        }}),
        sse_event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        sse_event("ping", {}),
    ]
    events += [
        sse_event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": text}})
        for text in texts
    ]
    events += [
        sse_event("content_block_stop", {"index": 0}),
        sse_event("message_delta", {
            "delta": {"stop_reason": stop_reason, "stop_sequence": None},
            "usage": {"output_tokens": len(texts) if output_tokens is None else output_tokens},
        }),
        sse_event("message_stop", {}),
    ]
    return events


def anthropic_stream_bytes(texts: list[str], **script: Any) -> bytes:
    """The whole SSE body of a scripted streamed Messages API answer (options as anthropic_events)."""
    return b"".join(anthropic_events(texts, **script))


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request as the fake upstream read it off its socket."""

    method: str
    path: str
    headers: httpx.Headers
    body: bytes

    def json(self) -> dict[str, Any]:
        value: dict[str, Any] = orjson.loads(self.body)
        return value


class SSEAnswer:
    """A 200 text/event-stream answer, chunked: each of `chunks` is one HTTP chunk, then by `then`:

    - "end": the last chunk, as the API ends a stream;
    - "hang": nothing more, until the client closes the connection;
    - "cut": the connection is closed with the body unfinished (no last chunk).

    A "hang" answer sets `closed` once the fake upstream saw the client close the connection (EOF or reset).
    With `gate`, the chunks from index `gate_after` on wait until the test sets it.
    """

    def __init__(self, chunks: Iterable[bytes], then: str = "end", gate: asyncio.Event | None = None,
                 gate_after: int = 0) -> None:
        assert then in ("end", "hang", "cut"), then
        self.chunks = list(chunks)
        self.then = then
        self.closed = asyncio.Event()
        self.gate = gate
        self.gate_after = gate_after

    async def write(self, writer: asyncio.StreamWriter, reader: asyncio.StreamReader) -> bool:
        writer.write(STREAM_HEAD)
        for index, part in enumerate(self.chunks):
            if self.gate is not None and index == self.gate_after:
                await self.gate.wait()
            writer.write(chunk(part))
            await writer.drain()
        if self.then == "end":
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return True
        if self.then == "hang":
            await _until_closed(reader)
            self.closed.set()
        return False  # "cut", or the client closed: this connection ends here


class JSONAnswer:
    """A JSON answer with a content-length: an API error (`status` 4xx/5xx) with its headers."""

    def __init__(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.body = orjson.dumps(body)
        self.headers = headers or {}

    async def write(self, writer: asyncio.StreamWriter, reader: asyncio.StreamReader) -> bool:
        reason = b"Overloaded" if self.status == 529 else HTTPStatus(self.status).phrase.encode()  # 529: the API's own
        head = [b"HTTP/1.1 %d %s" % (self.status, reason),
                b"content-type: application/json", b"content-length: %d" % len(self.body)]
        head += [name.encode() + b": " + value.encode() for name, value in self.headers.items()]
        writer.write(b"\r\n".join(head) + b"\r\n\r\n" + self.body)
        await writer.drain()
        return True


def api_error(status: int, error_type: str, message: str, headers: dict[str, str] | None = None) -> JSONAnswer:
    """The API's error answer: {"type": "error", "error": {"type": ..., "message": ...}}."""
    return JSONAnswer(status, {"type": "error", "error": {"type": error_type, "message": message}}, headers)


Answer = SSEAnswer | JSONAnswer


async def _until_closed(reader: asyncio.StreamReader) -> None:
    """Return once the peer closed the connection (EOF or reset), whatever else it sends."""
    try:
        while await reader.read(64 * 1024):
            pass
    except ConnectionError:
        pass


class FakeUpstream:
    """The Messages API on 127.0.0.1, over real HTTP/1.1 (keep-alive, chunked bodies): each POST is
    recorded (`requests`) and answered by the next scripted answer (answer()) or by answer_each(request).

    A request with no answer scripted gets a 500 and fails the test at exit, and so does one whose cache
    breakpoints the API would refuse (more than 4, a bad ttl, 1h after 5m: server/protocol/caching.py), which
    gets the API's 400 instead of its answer. The relay talks to it through
    its real upstream transport (the built-in http1 client by default), so the relay's timeouts, cancels and
    retries meet a real socket. `connections` counts the TCP connections accepted.
    """

    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self.unexpected: list[RecordedRequest] = []
        self.refused: list[tuple[RecordedRequest, list[str]]] = []
        self.failures: list[Exception] = []
        self._script: deque[Answer] = deque()
        self._each: Callable[[RecordedRequest], Answer] | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.server = Server(self._serve)

    def answer(self, *answers: Answer) -> None:
        """Answer the next requests with these, one each, in order."""
        self._script.extend(answers)

    def answer_each(self, make: Callable[[RecordedRequest], Answer]) -> None:
        """Answer every request (once the scripted answers are used up) with make(request)."""
        self._each = make

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    @property
    def connections(self) -> int:
        return self.server.connections

    async def __aenter__(self) -> FakeUpstream:
        await self.server.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for writer in list(self._writers):
            writer.close()
        await self.server.__aexit__(*exc)
        assert not self.failures, f"the fake upstream failed: {self.failures!r}"
        assert not self.unexpected, f"requests with no scripted answer: {self.unexpected}"
        assert not self.refused, f"requests the API would refuse for their cache breakpoints: {self.refused}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        self._writers.add(writer)
        try:
            while True:  # one request after another on a kept-alive connection
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return  # the client closed an idle connection
                request = _parse_request(head)
                length = int(request.headers.get("content-length", "0"))
                request = replace(request, body=await reader.readexactly(length))
                self.requests.append(request)
                refusal = _breakpoint_errors(request)
                if refusal:
                    self.refused.append((request, refusal))
                    if not await api_error(400, "invalid_request_error", refusal[0]).write(writer, reader):
                        return
                    continue
                answer = self._next(request)
                if answer is None:
                    self.unexpected.append(request)
                    answer = api_error(500, "api_error", "the test scripted no answer for this request")
                if not await answer.write(writer, reader):
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the relay went away mid-request or mid-answer: what a cancel or a timeout does
        except Exception as exc:  # a broken script: fail the test at exit, not only in the log
            self.failures.append(exc)
        finally:
            self._writers.discard(writer)

    def _next(self, request: RecordedRequest) -> Answer | None:
        if self._script:
            return self._script.popleft()
        return self._each(request) if self._each is not None else None


def _breakpoint_errors(request: RecordedRequest) -> list[str]:
    """What the API would refuse in a Messages API request's cache breakpoints (nothing for other requests)."""
    if request.method != "POST" or not request.path.endswith("/v1/messages"):
        return []
    try:
        body = request.json()
    except orjson.JSONDecodeError:
        return []
    return breakpoint_errors(body) if isinstance(body, dict) else []


def _parse_request(head: bytes) -> RecordedRequest:
    request_line, *lines = head.decode("latin-1").split("\r\n")
    method, path, _ = request_line.split(" ", 2)
    fields = [line.split(":", 1) for line in lines if line]
    headers = httpx.Headers([(name, value.strip()) for name, value in fields])
    return RecordedRequest(method, path, headers, b"")


def refused_url() -> tuple[socket.socket, str]:
    """A loopback address where nothing listens, and the socket that holds its port (bound, not listening:
    every connection is refused) until the caller closes it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock, f"http://127.0.0.1:{sock.getsockname()[1]}"


#: Where a relay with no fake upstream sends its requests: nothing listens there (port 1, tcpmux).
UNREACHABLE = "http://127.0.0.1:1"


@asynccontextmanager
async def relay_in_process(
    tmp: Path,
    upstream: FakeUpstream | str = UNREACHABLE,
    *,
    database_url: str | None = None,
    first_event_timeout: float = 10.0,
    idle_timeout: float = 10.0,
    retry_attempts: int = 0,
    **overrides: Any,
) -> AsyncIterator[Relay]:
    """A real Relay (Store, AnthropicUpstream on the default transport, StreamHub) whose upstream is
    `upstream` (a FakeUpstream, or a base URL); closed on exit.

    One upstream request per answer unless a test asks for retries (retry_attempts):
    then a failed first request shows its own error, not the outcome of retries.
    """
    settings = load_settings(
        {},
        database_url=database_url or f"sqlite:///{tmp}/t.db",
        anthropic_api_key=API_KEY,
        anthropic_base_url=upstream if isinstance(upstream, str) else upstream.base_url,
        first_event_timeout=first_event_timeout,
        idle_timeout=idle_timeout,
        retry_attempts=retry_attempts,
        **overrides,
    )
    store = Store(settings.database_url)
    await store.connect()
    relay_upstream = AnthropicUpstream(settings)
    hub = StreamHub(settings.stream_log_events, settings.stream_retention_seconds)
    try:
        yield Relay(settings, store, relay_upstream, hub)
    finally:
        await hub.shutdown(grace_seconds=0)
        await relay_upstream.aclose()
        await store.disconnect()


def decode(data: str) -> dict[str, Any]:
    """An event's data; numbers with a fraction become Decimal, so money stays exact."""
    value: dict[str, Any] = json.loads(data, parse_float=Decimal)
    return value


def entry_frame(event_id: int, name: str, data: bytes) -> bytes:
    """A test's framing of an event (hub.Framer): the entry itself, as JSON."""
    return b'[%d,"%b",%b]' % (event_id, name.encode(), orjson.dumps(data.decode()))


class RecordingWriter:
    """A hub.Writer that keeps each write; `paused` makes it a stalled socket until resume()."""

    def __init__(self, on_write: Callable[[RecordingWriter], None] | None = None) -> None:
        self.writes: list[list[bytes]] = []
        self.paused = False
        self.on_write = on_write
        self._resumed: asyncio.Future[None] | None = None

    def can_write(self) -> bool:
        return not self.paused

    def write_many(self, frames: list[bytes]) -> None:
        self.writes.append(frames)
        if self.on_write is not None:
            self.on_write(self)

    async def drain(self) -> None:
        while self.paused:
            self._resumed = asyncio.get_running_loop().create_future()
            await self._resumed

    def resume(self) -> None:
        self.paused = False
        if self._resumed is not None and not self._resumed.done():
            self._resumed.set_result(None)

    @property
    def entries(self) -> list[tuple[int, str, str]]:
        """(id, name, data as text) of every event written, in order (keepalive frames left out)."""
        return [tuple(orjson.loads(frame)) for frames in self.writes for frame in frames  # type: ignore[misc]
                if frame.startswith(b"[")]


async def serve_all(subscriber: Subscriber, writer: RecordingWriter | None = None,
                    keepalive: bytes | None = None) -> list[tuple[int, str, str]]:
    """Serve a subscriber to its end through a RecordingWriter; its (id, name, data) entries."""
    writer = writer if writer is not None else RecordingWriter()
    last = await subscriber.serve(writer, entry_frame, keepalive)
    if last:
        writer.write_many(last)
    return writer.entries


async def collect(hub: StreamHub, stream_id: str, after: int = 0) -> list[RelayedEvent]:
    """Every event of a stream after `after`, to its end; the timeout only guards against hangs."""
    async with asyncio.timeout(10):
        entries = await serve_all(hub.subscribe(stream_id, after))
    return [(event_id, name, decode(data)) for event_id, name, data in entries]


async def collect_until(hub: StreamHub, stream_id: str, enough: Callable[[list[RelayedEvent]], bool]
                        ) -> list[RelayedEvent]:
    """The events of a stream from its start until enough(events) holds (then the reader lets go)."""
    subscriber = hub.subscribe(stream_id, 0)
    reached = False

    def check(writer: RecordingWriter) -> None:
        nonlocal reached
        if enough([(event_id, name, decode(data)) for event_id, name, data in writer.entries]):
            reached = True
            subscriber.abandon()

    writer = RecordingWriter(check)
    async with asyncio.timeout(10):
        entries = await serve_all(subscriber, writer)
    events = [(event_id, name, decode(data)) for event_id, name, data in entries]
    if reached:
        return events
    raise AssertionError(f"the stream ended before the test had what it waited for: {events}")


async def run_to_end(relay: Relay, command: SendMessage) -> list[RelayedEvent]:
    """Start an answer and collect its events from the hub, start to done or error."""
    stream = await relay.start(command)
    return await collect(relay.hub, stream.id)
