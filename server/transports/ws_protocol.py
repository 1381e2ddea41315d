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
- Less held per socket: a receive queue of one list instead of asyncio.Queue's three deques, a writable flag
  without asyncio.Event's deque, and the handshake's request and response let go once the socket is open, with
  websockets' handshake parser (which kept the request, every header parsed, as a local for the socket's life).
  17.4 KB per idle socket under uvicorn's protocol, 9.4 KB under this one: the command and the breakdown are in
  internals.py.

The uvicorn and websockets internals it relies on are reached through internals.py
(UvicornWebSocketProtocol, the socket_* functions), which lists them.
"""

from __future__ import annotations

import logging
import struct
from typing import Any

from .http_protocol import ConnectionGuard, WriteDeadline
from .internals import UvicornWebSocketProtocol, socket_drain, socket_open, socket_writable, socket_write_texts
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


def relay_websocket_protocol(quiet: bool, guard: ConnectionGuard | None = None) -> type[UvicornWebSocketProtocol]:
    """The protocol class for uvicorn's `ws=` setting; `quiet`: no INFO lines per socket."""
    # Not under "uvicorn.": uvicorn's logging setup resets the levels of its loggers' children.
    socket_log = logging.getLogger("deltarelay.websockets")
    socket_log.setLevel(logging.WARNING if quiet else logging.NOTSET)
    limits = guard if guard is not None else ConnectionGuard()

    class RelayWebSocketProtocol(WriteDeadline, UvicornWebSocketProtocol):
        stalled_peer = "WebSocket"

        def write_deadline_guard(self) -> ConnectionGuard:
            return limits

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, socket_log=socket_log, **kwargs)
            self.frame_writer = FrameWriter(self)

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            limits.wait_for_head(self, self.loop)  # until the app accepts or refuses the handshake

        def handle_connect(self, event: Any) -> None:
            super().handle_connect(event)
            status = self.rejected_status()
            if status is not None:  # websockets refused the request itself (not a valid handshake)
                limits.got_head(self)
                limits.refused(self.client, f"refused a WebSocket handshake: {status}")
                return
            self.set_extension(WRITER, {"writer": self.frame_writer})
            self.start_frames()

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
            if self.after_send(kind):
                limits.got_head(self)

        def head_timed_out(self) -> None:
            self._unanswered(f"the WebSocket handshake was not answered within {limits.head_timeout:g} s")

        def evicted(self) -> None:
            self._unanswered("too many connections are waiting to send a request")

        def _unanswered(self, reason: str) -> None:
            """503 to a handshake the app has not answered yet; the app's answer, when it comes, finds it gone."""
            if self.reject_unanswered(reason):
                limits.refused(self.client, f"refused a WebSocket handshake: 503 {reason}")

    return RelayWebSocketProtocol


class FrameWriter:
    """The Writer (hub.Writer) of one socket: each write_many() is text frames of JSON payloads in one write.

    Every stream of the socket writes through it; frames are whole, so the streams' frames never interleave.
    """

    __slots__ = ("protocol",)

    def __init__(self, protocol: UvicornWebSocketProtocol) -> None:
        self.protocol: UvicornWebSocketProtocol | None = protocol

    def can_write(self) -> bool:
        """Open, and the peer is keeping up (the transport is not paused)."""
        protocol = self.protocol
        return protocol is not None and socket_writable(protocol) and socket_open(protocol)

    def write_many(self, frames: list[bytes]) -> None:
        protocol = self.protocol
        if protocol is None or not socket_open(protocol):
            return  # closed meanwhile: the reader loop ends the connection
        try:
            socket_write_texts(protocol, frames, text_frame_header)
        except (OSError, RuntimeError):  # the socket broke under us: the reader sees the disconnect next
            pass

    async def drain(self) -> None:
        protocol = self.protocol
        if protocol is None or not await socket_drain(protocol):
            raise ConnectionResetError("the WebSocket is closed")
