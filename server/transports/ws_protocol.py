"""The relay's WebSocket server protocol: uvicorn's websockets-sansio one, quieter, with a frame writer.

Three changes, each measured under load (bench.run --profile, tracemalloc), and the limits of
http_protocol.ConnectionGuard (issue 14): a socket counts as waiting for its head until its handshake is
answered (within the same timeout, else a 503), a refused handshake is one WARNING line per peer per minute
instead of uvicorn's ERROR "returned without completing handshake" per socket, and a peer that reads nothing
for the write timeout while frames wait is cut off (pings notice it too, but only after interval + timeout).

- No INFO lines per WebSocket unless the access log is on. uvicorn logs '"WebSocket /path" [accepted]'
  through its error logger (even with the access log off) and websockets logs "connection open": at 500 new
  sockets a second that was ~9% of the relay's CPU. Warnings and errors still show.
- The ASGI extension writers.WRITER, whose value is {"writer": FrameWriter}: the socket's hub.Writer. A
  subscriber's outbox goes out as text frames in one transport write, built from the events' JSON bytes
  without websockets' frame objects; control frames (errors, pongs, keepalives) still go through
  `websocket.send`. A `websocket.send` per event cost a write system call, websockets' frame objects, a task
  wake-up and two Starlette wrappers per chunk. Under another server the app uses writers.SendWriter.
- Less held per socket (tracemalloc, 300 sockets): a receive queue of one list instead of asyncio.Queue's three
  deques (1.9 KB), a writable flag without asyncio.Event's deque (0.6 KB), and the handshake's request and
  response let go once the socket is open (about 2 KB: websockets' handshake parser kept the request, every header
  parsed, as a local for the socket's life).

uvicorn internals this module relies on (uvicorn 0.54, WebSocketsSansIOProtocol): `conn` (websockets'
ServerProtocol: `parser`, `reader`, `logger`, `state`, `extensions`, `reject`, `send_response`,
`data_to_send`), `queue`, `writable`, `logger`, `request`, `response`, `scope`, `transport`, `client`, `loop`,
`handshake_complete`, `close_sent`, `disconnected`, `handle_connect()`, and the flow-control hooks
`pause_writing` and `resume_writing`.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.protocol import Protocol, State

from .http_protocol import ConnectionGuard, WriteDeadline
from .writers import WRITER

_SHORT_HEADERS = [bytes((0x81, size)) for size in range(126)]


def text_frame_header(size: int) -> bytes:
    """The header of one unfragmented, unmasked server text frame of `size` bytes (RFC 6455 section 5.2)."""
    if size < 126:
        return _SHORT_HEADERS[size]
    if size < 65536:
        return struct.pack("!BBH", 0x81, 126, size)
    return struct.pack("!BBQ", 0x81, 127, size)


def text_frame(payload: bytes) -> bytes:
    """One unfragmented, unmasked server text frame."""
    return text_frame_header(len(payload)) + payload


def relay_websocket_protocol(quiet: bool, guard: ConnectionGuard | None = None) -> type[WebSocketsSansIOProtocol]:
    """The protocol class for uvicorn's `ws=` setting; `quiet`: no INFO lines per socket."""
    # Not under "uvicorn.": uvicorn's logging setup resets the levels of its loggers' children.
    socket_log = logging.getLogger("deltarelay.websockets")
    socket_log.setLevel(logging.WARNING if quiet else logging.NOTSET)
    limits = guard if guard is not None else ConnectionGuard()

    class RelayWebSocketProtocol(WriteDeadline, WebSocketsSansIOProtocol):
        stalled_peer = "WebSocket"

        def write_deadline_guard(self) -> ConnectionGuard:
            return limits

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.logger = socket_log
            self.conn.logger = socket_log
            self.queue = ReceiveQueue()  # type: ignore[assignment]
            self.writable = WritableFlag()  # type: ignore[assignment]
            self.frame_writer = FrameWriter(self)

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            limits.wait_for_head(self, self.loop)  # until the app accepts or refuses the handshake

        def handle_connect(self, event: Any) -> None:
            super().handle_connect(event)
            if self.handshake_complete:  # websockets refused the request itself (not a valid handshake)
                limits.got_head(self)
                limits.refused(self.client, f"refused a WebSocket handshake: {self.response.status_code}")
                return
            self.scope["extensions"][WRITER] = {"writer": self.frame_writer}
            conn = self.conn
            if not conn.reader.buffer:
                # uvicorn hands over the request alone, so no frame byte has been read: the frame parser that
                # websockets' handshake parser goes on to run, minus the request it holds, takes over.
                conn.parser = Protocol.parse(conn)
                next(conn.parser)

        def connection_lost(self, exc: Exception | None) -> None:
            limits.got_head(self)
            self.cancel_write_deadline()
            super().connection_lost(exc)
            self.frame_writer.protocol = None  # the scope holds the writer: no cycle back to this protocol

        async def send(self, message: Any) -> None:
            kind = message["type"]
            await super().send(message)
            if kind == "websocket.send":
                return
            if kind == "websocket.http.response.start":
                limits.refused(self.client, f"refused a WebSocket handshake: {message['status']}")
            elif not self.handshake_complete and self.close_sent:
                # The refusal's body is written and the socket closed: that answers the handshake (uvicorn
                # would log an ERROR that it never completed, once per refused socket).
                self.handshake_complete = True
            if self.handshake_complete:
                limits.got_head(self)
            if kind == "websocket.accept" and self.handshake_complete:
                # The response is written: its headers and the request's are not read again.
                self.request = self.response = None  # type: ignore[assignment]

        def head_timed_out(self) -> None:
            self._unanswered(f"the WebSocket handshake was not answered within {limits.head_timeout:g} s")

        def evicted(self) -> None:
            self._unanswered("too many connections are waiting to send a request")

        def _unanswered(self, reason: str) -> None:
            """503 to a handshake the app has not answered yet; the app's answer, when it comes, finds it gone."""
            if self.handshake_complete:
                return
            limits.refused(self.client, f"refused a WebSocket handshake: 503 {reason}")
            self.handshake_complete = self.close_sent = self.disconnected = True
            if not self.transport.is_closing():
                self.conn.send_response(self.conn.reject(503, reason + "\n"))
                self.transport.write(b"".join(self.conn.data_to_send()))
                self.transport.close()

    return RelayWebSocketProtocol


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


class FrameWriter:
    """The Writer (hub.Writer) of one socket: each write_many() is text frames of JSON payloads in one write.

    Every stream of the socket writes through it; frames are whole, so the streams' frames never interleave.
    """

    __slots__ = ("protocol",)

    def __init__(self, protocol: WebSocketsSansIOProtocol) -> None:
        self.protocol: WebSocketsSansIOProtocol | None = protocol

    def can_write(self) -> bool:
        """Open, and the peer is keeping up (the transport is not paused)."""
        protocol = self.protocol
        return protocol is not None and protocol.writable.is_set() and self._open(protocol)

    def write_many(self, frames: list[bytes]) -> None:
        protocol = self.protocol
        if protocol is None or not self._open(protocol):
            return  # closed meanwhile: the reader loop ends the connection
        conn = protocol.conn
        if conn.extensions:  # a negotiated extension (compression) frames differently: websockets does it
            for payload in frames:
                conn.send_text(payload)
            parts = conn.data_to_send()
        else:
            parts = []
            for payload in frames:
                parts.append(text_frame_header(len(payload)))
                parts.append(payload)
        try:
            protocol.transport.writelines(parts)
        except (OSError, RuntimeError):  # the socket broke under us: the reader sees the disconnect next
            pass

    async def drain(self) -> None:
        protocol = self.protocol
        if protocol is not None and self._open(protocol):
            await protocol.writable.wait()
        if protocol is None or protocol.disconnected or not self._open(protocol):
            raise ConnectionResetError("the WebSocket is closed")

    @staticmethod
    def _open(protocol: WebSocketsSansIOProtocol) -> bool:
        return not protocol.close_sent and protocol.conn.state is State.OPEN and not protocol.transport.is_closing()
