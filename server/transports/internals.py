"""Everything the relay uses of uvicorn's and websockets' classes that is not their public API (issue 15).

The one module that imports uvicorn's protocol classes or websockets' sans-I/O protocol. http_protocol.py and
ws_protocol.py subclass UvicornHttpProtocol and UvicornWebSocketProtocol below and use only what this module
exports (tests/test_library_internals.py checks their imports). Checked against the releases pyproject admits:
uvicorn >=0.52.1,<0.55 (0.52.1, 0.53, 0.54) and websockets >=14.2,<18 (14.2 to 17.x).

What is relied on, per class; the tuples below are the same lists, and tests/test_library_internals.py checks
each name on live instances of the installed versions, failing with the name of any that is missing:

- uvicorn.protocols.http.httptools_impl.HttpToolsProtocol (HTTP_PROTOCOL_ATTRIBUTES, HTTP_PROTOCOL_METHODS):
  `parser`, `transport`, `client`, `loop`, `cycle`, `scope`; `_unset_keepalive_if_required()`,
  `_should_upgrade()`, `_unsupported_upgrade_warning()`, `handle_websocket_upgrade()`, the parser callbacks
  `on_message_begin`, `on_url`, `on_header`, `on_headers_complete`, `connection_made`, `connection_lost`,
  and the flow-control hooks `pause_writing`, `resume_writing`. data_received is replaced by
  UvicornHttpProtocol.feed(), which does what uvicorn's does (httptools' HttpParserUpgrade/HttpParserError).
- uvicorn's RequestResponseCycle (REQUEST_CYCLE_ATTRIBUTES): `scope`, `transport`, `response_started`,
  `response_complete`, `chunked_encoding`, `disconnected`, `flow`; its FlowControl
  (FLOW_CONTROL_ATTRIBUTES, FLOW_CONTROL_METHODS): `write_paused`, `drain()`.
- uvicorn.protocols.websockets.websockets_sansio_impl.WebSocketsSansIOProtocol (WEBSOCKET_PROTOCOL_ATTRIBUTES,
  WEBSOCKET_PROTOCOL_METHODS): `conn`, `logger`, `queue` and `writable` (replaced: ReceiveQueue and
  WritableFlag below give the methods uvicorn calls on them), `request` and `response` (let go once open),
  `scope`, `loop`, `transport`, `client`, `handshake_complete`, `close_sent`, `disconnected`;
  `handle_connect()`, `connection_made`, `connection_lost`, `send`, `pause_writing`, `resume_writing`.
- websockets' ServerProtocol, the protocol's `conn` (SANSIO_CONNECTION_ATTRIBUTES, SANSIO_CONNECTION_METHODS):
  `reader` (its StreamReader's `buffer`, STREAM_READER_ATTRIBUTES), `parser` (replaced), `logger` (replaced),
  `state`, `extensions`; `send_text()`, `data_to_send()`, `reject()`, `send_response()`; and
  websockets.protocol.Protocol.parse (PROTOCOL_CLASS_METHODS), the frame parser run unbound; State.OPEN.

What replacing `queue`, `writable` and `parser` and letting go of `request`/`response` saves (also in
docs/performance-notes.md):
uvicorn 0.54.0 and websockets 17.4, 300 idle sockets on loopback, tracemalloc in the server, median of 3,
`.venv/bin/python -m bench.idle_socket_memory --breakdown` (2026-12-01): uvicorn's stock protocol holds
17.4 KB per idle WebSocket, the relay's 9.4 KB (7.9 KB less). Each replacement undone alone costs: the receive
queue 3.1 KB, the writable flag 0.8 KB, keeping the request and response 4.0 KB, keeping websockets' handshake
parser (it holds the request) 2.5 KB; they overlap, and the relay's protocol adds its frame writer and limits.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.protocol import Protocol, State

__all__ = [
    "FLOW_CONTROL_ATTRIBUTES", "FLOW_CONTROL_METHODS", "HTTP_PROTOCOL_ATTRIBUTES", "HTTP_PROTOCOL_METHODS",
    "PROTOCOL_CLASS_METHODS", "REQUEST_CYCLE_ATTRIBUTES", "SANSIO_CONNECTION_ATTRIBUTES",
    "SANSIO_CONNECTION_METHODS", "STREAM_READER_ATTRIBUTES", "WEBSOCKET_PROTOCOL_ATTRIBUTES",
    "WEBSOCKET_PROTOCOL_METHODS", "ReceiveQueue", "RequestCycle", "UvicornHttpProtocol",
    "UvicornWebSocketProtocol", "WritableFlag", "cycle_can_write", "cycle_drain", "cycle_open", "cycle_streaming",
    "cycle_write", "socket_drain", "socket_open", "socket_writable", "socket_write_texts",
]

HTTP_PROTOCOL_ATTRIBUTES = ("parser", "transport", "client", "loop", "cycle", "scope")
HTTP_PROTOCOL_METHODS = (
    "_unset_keepalive_if_required", "_should_upgrade", "_unsupported_upgrade_warning", "handle_websocket_upgrade",
    "on_message_begin", "on_url", "on_header", "on_headers_complete", "connection_made", "connection_lost",
    "pause_writing", "resume_writing",
)
REQUEST_CYCLE_ATTRIBUTES = (
    "scope", "transport", "response_started", "response_complete", "chunked_encoding", "disconnected", "flow",
)
FLOW_CONTROL_ATTRIBUTES = ("write_paused",)
FLOW_CONTROL_METHODS = ("drain",)
WEBSOCKET_PROTOCOL_ATTRIBUTES = (
    "conn", "logger", "queue", "writable", "request", "response", "scope", "loop", "transport", "client",
    "handshake_complete", "close_sent", "disconnected",
)
WEBSOCKET_PROTOCOL_METHODS = (
    "handle_connect", "connection_made", "connection_lost", "send", "pause_writing", "resume_writing",
)
SANSIO_CONNECTION_ATTRIBUTES = ("reader", "parser", "logger", "state", "extensions")
SANSIO_CONNECTION_METHODS = ("send_text", "data_to_send", "reject", "send_response")
STREAM_READER_ATTRIBUTES = ("buffer",)
PROTOCOL_CLASS_METHODS = ("parse",)  # on websockets.protocol.Protocol itself

RequestCycle = RequestResponseCycle


# uvicorn's RequestResponseCycle, read by http_protocol.BodyWriter.

def cycle_open(cycle: RequestCycle) -> bool:
    """The client is there and the response is not over."""
    return not cycle.disconnected and not cycle.response_complete


def cycle_streaming(cycle: RequestCycle) -> bool:
    """The response has started a chunked body (not to a HEAD), is not over, and the client is there."""
    return (cycle.response_started and cycle.chunked_encoding is True and cycle_open(cycle)
            and cycle.scope["method"] != "HEAD")


def cycle_can_write(cycle: RequestCycle) -> bool:
    """The transport is not paused (the client keeps up)."""
    return not cycle.flow.write_paused


def cycle_write(cycle: RequestCycle, parts: list[bytes]) -> None:
    """Write `parts` to the cycle's transport in one call."""
    cycle.transport.writelines(parts)


async def cycle_drain(cycle: RequestCycle) -> None:
    """Wait until the transport's writes are resumed, if they are paused and the client is there."""
    if cycle.flow.write_paused and not cycle.disconnected:
        await cycle.flow.drain()


class UvicornHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with its request parsing reachable without its data_received."""

    def feed(self, data: bytes) -> bool:
        """Parse `data` as uvicorn's data_received does; False if it upgraded or was not HTTP (invalid_request()
        was called then), True if it was parsed as part of a request."""
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return False
        except httptools.HttpParserError:
            self.invalid_request()
            return False
        return True

    def invalid_request(self) -> None:
        """The bytes fed are not HTTP/1.1 (uvicorn's own answer is a 400 with a warning line per request)."""
        raise NotImplementedError

    def new_request_cycle(self) -> RequestCycle | None:
        """After on_headers_complete: the cycle of the request just parsed, None for a WebSocket upgrade."""
        cycle: RequestCycle | None = self.cycle
        return cycle if cycle is not None and cycle.scope is self.scope else None

    def responding(self) -> bool:
        """A response is going out (a pipelined head cannot be answered in between)."""
        return self.cycle is not None and not self.cycle.response_complete

    def set_extension(self, name: str, value: Any) -> None:
        """Add an ASGI extension to the current request's scope."""
        self.scope.setdefault("extensions", {})[name] = value


class WritableFlag:
    """What uvicorn's protocol uses of its `writable` asyncio.Event (set, clear, is_set, wait), without its deque."""

    __slots__ = ("_set", "_waiter")

    def __init__(self) -> None:
        self._set = True
        self._waiter: asyncio.Future[None] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> None:
        while not self._set:
            if self._waiter is None or self._waiter.done():
                self._waiter = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._waiter)


class ReceiveQueue:
    """The receive queue uvicorn's protocol uses (put_nowait, get, empty), for its one reader: the app."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def empty(self) -> bool:
        return not self._items

    async def get(self) -> Any:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.pop(0)


class UvicornWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio protocol, lighter per socket, with its handshake state reachable by name."""

    def __init__(self, *args: Any, socket_log: logging.Logger, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.logger = socket_log
        self.conn.logger = socket_log
        self.queue = ReceiveQueue()  # type: ignore[assignment]
        self.writable = WritableFlag()  # type: ignore[assignment]

    def handshake_answered(self) -> bool:
        return bool(self.handshake_complete)

    def rejected_status(self) -> int | None:
        """After handle_connect: the status websockets answered an invalid handshake with, else None."""
        return int(self.response.status_code) if self.handshake_complete else None

    def start_frames(self) -> None:
        """After handle_connect of a valid handshake: uvicorn hands over the request alone, so no frame byte
        has been read; the frame parser that websockets' handshake parser goes on to run, minus the request it
        holds, takes over."""
        conn = self.conn
        if not conn.reader.buffer:
            conn.parser = Protocol.parse(conn)
            next(conn.parser)

    def set_extension(self, name: str, value: Any) -> None:
        self.scope["extensions"][name] = value

    def after_send(self, kind: str) -> bool:
        """After uvicorn's send() of a message of type `kind`: True if the handshake is answered by now.

        A refusal whose body is written and socket closed answers it (uvicorn would log an ERROR that it never
        completed, once per refused socket); once accepted, the handshake's request and response are let go."""
        if not self.handshake_complete and self.close_sent:
            self.handshake_complete = True
        if kind == "websocket.accept" and self.handshake_complete:
            self.request = self.response = None  # type: ignore[assignment]
        return bool(self.handshake_complete)

    def reject_unanswered(self, reason: str) -> bool:
        """503 `reason` to a handshake the app has not answered yet (its answer, when it comes, finds the socket
        gone); False if it was answered already."""
        if self.handshake_complete:
            return False
        self.handshake_complete = self.close_sent = self.disconnected = True
        if not self.transport.is_closing():
            self.conn.send_response(self.conn.reject(503, reason + "\n"))
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.transport.close()
        return True


# uvicorn's WebSocket protocol, read by ws_protocol.FrameWriter.

def socket_open(protocol: WebSocketsSansIOProtocol) -> bool:
    """No close frame sent, websockets' state is OPEN and the transport is not closing."""
    return not protocol.close_sent and protocol.conn.state is State.OPEN and not protocol.transport.is_closing()


def socket_writable(protocol: WebSocketsSansIOProtocol) -> bool:
    """The transport is not paused (the peer keeps up)."""
    return protocol.writable.is_set()


def socket_write_texts(protocol: WebSocketsSansIOProtocol, payloads: list[bytes],
                       frame_header: Callable[[int], bytes]) -> None:
    """Write `payloads` as text frames in one transport call; `frame_header(size)` gives an unmasked frame's
    header, unless an extension (compression) is negotiated: websockets frames them then."""
    conn = protocol.conn
    if conn.extensions:
        for payload in payloads:
            conn.send_text(payload)
        parts = conn.data_to_send()
    else:
        parts = []
        for payload in payloads:
            parts.append(frame_header(len(payload)))
            parts.append(payload)
    protocol.transport.writelines(parts)


async def socket_drain(protocol: WebSocketsSansIOProtocol) -> bool:
    """Wait until the transport's writes are resumed; False if the socket is (by then) closed or gone."""
    if socket_open(protocol):
        await protocol.writable.wait()
    return not protocol.disconnected and socket_open(protocol)
