"""The relay's WebSocket server protocol: uvicorn's websockets-sansio one, quieter, with a batched send.

Three changes, each measured under load (bench.run --profile, tracemalloc), and the limits of
http_protocol.ConnectionGuard (issue 14): a socket counts as waiting for its head until its handshake is
answered (within the same timeout, else a 503), a refused handshake is one WARNING line per peer per minute
instead of uvicorn's ERROR "returned without completing handshake" per socket, and a peer that reads nothing
for the write timeout while frames wait is cut off (pings notice it too, but only after interval + timeout).

- No INFO lines per WebSocket unless the access log is on. uvicorn logs '"WebSocket /path" [accepted]'
  through its error logger (even with the access log off) and websockets logs "connection open": at 500 new
  sockets a second that was ~9% of the relay's CPU. Warnings and errors still show.
- The ASGI extension SEND_BATCH, whose value is {"writer": FrameWriter}:
  - `await send({"type": SEND_BATCH, "texts": [...]})` frames every text and writes them with one transport
    write, waiting while the peer reads slowly, as `websocket.send` does;
  - `writer.send_soon(text)` (when `writer.can_write()`) queues a frame from any task; every frame queued in one
    turn of the event loop goes out in one write. A stream's events reach the socket from the task that reads
    the upstream, with no wake-up of a reader task per event.
  A `websocket.send` per event cost a write system call, websockets' frame objects, a task wake-up and two
  Starlette wrappers per chunk. An app checks scope["extensions"] and falls back to `websocket.send`.
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

from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.protocol import Protocol, State

from .http_protocol import ConnectionGuard

SEND_BATCH = "deltarelay.websocket.send_batch"


def text_frame(payload: bytes) -> bytes:
    """One unfragmented, unmasked server text frame (RFC 6455 section 5.2)."""
    size = len(payload)
    if size < 126:
        return bytes((0x81, size)) + payload
    if size < 65536:
        return struct.pack("!BBH", 0x81, 126, size) + payload
    return struct.pack("!BBQ", 0x81, 127, size) + payload


def relay_websocket_protocol(quiet: bool, guard: ConnectionGuard | None = None) -> type[WebSocketsSansIOProtocol]:
    """The protocol class for uvicorn's `ws=` setting; `quiet`: no INFO lines per socket."""
    # Not under "uvicorn.": uvicorn's logging setup resets the levels of its loggers' children.
    socket_log = logging.getLogger("deltarelay.websockets")
    socket_log.setLevel(logging.WARNING if quiet else logging.NOTSET)
    limits = guard if guard is not None else ConnectionGuard()

    class RelayWebSocketProtocol(WebSocketsSansIOProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.logger = socket_log
            self.conn.logger = socket_log
            self.queue = ReceiveQueue()  # type: ignore[assignment]
            self.writable = WritableFlag()  # type: ignore[assignment]
            self.frame_writer = FrameWriter(self)
            self.write_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            limits.wait_for_head(self, self.loop)  # until the app accepts or refuses the handshake

        def handle_connect(self, event: Any) -> None:
            super().handle_connect(event)
            if self.handshake_complete:  # websockets refused the request itself (not a valid handshake)
                limits.got_head(self)
                limits.refused(self.client, f"refused a WebSocket handshake: {self.response.status_code}")
                return
            self.scope["extensions"][SEND_BATCH] = {"writer": self.frame_writer}
            conn = self.conn
            if not conn.reader.buffer:
                # uvicorn hands over the request alone, so no frame byte has been read: the frame parser that
                # websockets' handshake parser goes on to run, minus the request it holds, takes over.
                conn.parser = Protocol.parse(conn)
                next(conn.parser)

        def connection_lost(self, exc: Exception | None) -> None:
            limits.got_head(self)
            if self.write_timer is not None:
                self.write_timer.cancel()
                self.write_timer = None
            super().connection_lost(exc)
            self.frame_writer.protocol = None  # the scope holds the writer: no cycle back to this protocol

        async def send(self, message: Any) -> None:
            kind = message["type"]
            if kind != SEND_BATCH:
                if kind == "websocket.send":
                    self.frame_writer.flush()  # frames queued earlier go first
                    await super().send(message)
                    return
                await super().send(message)
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
                return
            # The peer reads slowly: wait, as every send does; then write, even if another sender paused it again.
            await self.writable.wait()
            if self.disconnected or not self.frame_writer.write(message["texts"]):
                raise ClientDisconnected()

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

        def pause_writing(self) -> None:
            super().pause_writing()
            if self.write_timer is None:
                self.write_timer = self.loop.call_later(limits.write_timeout, self._write_timed_out)

        def resume_writing(self) -> None:
            super().resume_writing()
            if self.write_timer is not None:
                self.write_timer.cancel()
                self.write_timer = None

        def _write_timed_out(self) -> None:
            self.write_timer = None
            limits.refused(self.client, f"cut off a WebSocket that read nothing for {limits.write_timeout:g} s")
            self.transport.abort()  # close() would wait for a flush that never comes

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
    """Writes text frames to one socket: now (write), or at the end of this turn of the event loop (send_soon).

    send_soon gathers every frame sent in one turn, over every stream of the socket, into one write: the events
    of one upstream read go out together, as the reader task's batches did, without a task wake-up per event.
    """

    __slots__ = ("protocol", "_outbox")

    def __init__(self, protocol: WebSocketsSansIOProtocol) -> None:
        self.protocol: WebSocketsSansIOProtocol | None = protocol
        self._outbox: list[str] = []

    def can_write(self) -> bool:
        """Open, and the peer is keeping up (the transport is not paused)."""
        protocol = self.protocol
        return protocol is not None and protocol.writable.is_set() and self._open(protocol)

    def send_soon(self, text: str) -> None:
        if not self._outbox and self.protocol is not None:
            self.protocol.loop.call_soon(self.flush)
        self._outbox.append(text)

    def write(self, texts: list[str]) -> bool:
        """Write now, after anything send_soon holds, paused or not (the caller waited); False when closed."""
        if self._outbox:
            texts, self._outbox = self._outbox + texts, []
        return self._write(texts)

    def flush(self) -> None:
        """Write what send_soon holds now."""
        texts, self._outbox = self._outbox, []
        if texts:
            self._write(texts)  # paused since or not: these were accepted while it kept up

    @staticmethod
    def _open(protocol: WebSocketsSansIOProtocol) -> bool:
        return not protocol.close_sent and protocol.conn.state is State.OPEN and not protocol.transport.is_closing()

    def _write(self, texts: list[str]) -> bool:
        protocol = self.protocol
        if protocol is None or not self._open(protocol):
            return False  # closed meanwhile: the reader loop ends the connection
        conn = protocol.conn
        if conn.extensions:  # a negotiated extension (compression) frames differently: websockets does it
            for text in texts:
                conn.send_text(text.encode())
            data = b"".join(conn.data_to_send())
        elif len(texts) == 1:
            data = text_frame(texts[0].encode())
        else:
            data = b"".join([text_frame(text.encode()) for text in texts])
        try:
            protocol.transport.write(data)
        except (OSError, RuntimeError):  # the socket broke under us: the reader sees the disconnect next
            return False
        return True
