"""The relay's WebSocket server protocol: uvicorn's websockets-sansio one, quieter, with a batched send.

Two changes, both measured under load (bench.run --profile):

- No INFO lines per WebSocket unless the access log is on. uvicorn logs '"WebSocket /path" [accepted]'
  through its error logger (even with the access log off) and websockets logs "connection open": at 500 new
  sockets a second that was ~9% of the relay's CPU. Warnings and errors still show.
- The ASGI extension SEND_BATCH, whose value is {"writer": FrameWriter}:
  - `await send({"type": SEND_BATCH, "texts": [...]})` frames every text and writes them with one transport
    write, waiting while the peer reads slowly, as `websocket.send` does;
  - `writer.write(texts)` does the same at once, from any task, and returns False instead of waiting when the
    socket is paused or closed. A stream's events reach the socket from the task that reads the upstream,
    with no wake-up of a reader task per event.
  A `websocket.send` per event cost a write system call, websockets' frame objects, a task wake-up and two
  Starlette wrappers per chunk. An app checks scope["extensions"] and falls back to `websocket.send`.
"""

from __future__ import annotations

import logging
import struct
from typing import Any

from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.protocol import State

SEND_BATCH = "deltarelay.websocket.send_batch"


def text_frame(payload: bytes) -> bytes:
    """One unfragmented, unmasked server text frame (RFC 6455 section 5.2)."""
    size = len(payload)
    if size < 126:
        return bytes((0x81, size)) + payload
    if size < 65536:
        return struct.pack("!BBH", 0x81, 126, size) + payload
    return struct.pack("!BBQ", 0x81, 127, size) + payload


def relay_websocket_protocol(quiet: bool) -> type[WebSocketsSansIOProtocol]:
    """The protocol class for uvicorn's `ws=` setting; `quiet`: no INFO lines per socket."""
    # Not under "uvicorn.": uvicorn's logging setup resets the levels of its loggers' children.
    socket_log = logging.getLogger("deltarelay.websockets")
    socket_log.setLevel(logging.WARNING if quiet else logging.NOTSET)

    class RelayWebSocketProtocol(WebSocketsSansIOProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.logger = socket_log
            self.conn.logger = socket_log
            self.frame_writer = FrameWriter(self)

        def handle_connect(self, event: Any) -> None:
            super().handle_connect(event)
            self.scope["extensions"][SEND_BATCH] = {"writer": self.frame_writer}

        def connection_lost(self, exc: Exception | None) -> None:
            super().connection_lost(exc)
            self.frame_writer.protocol = None  # the scope holds the writer: no cycle back to this protocol

        async def send(self, message: Any) -> None:
            if message["type"] != SEND_BATCH:
                await super().send(message)
                return
            await self.writable.wait()  # the peer reads slowly: wait, as every send does
            if not self.frame_writer.write(message["texts"]):
                raise ClientDisconnected()

    return RelayWebSocketProtocol


class FrameWriter:
    """Writes text frames to one open socket now, or says it cannot (paused, closing or closed)."""

    __slots__ = ("protocol",)

    def __init__(self, protocol: WebSocketsSansIOProtocol) -> None:
        self.protocol: WebSocketsSansIOProtocol | None = protocol

    def write(self, texts: list[str]) -> bool:
        protocol = self.protocol
        if protocol is None or not protocol.writable.is_set() or protocol.close_sent:
            return False
        conn = protocol.conn
        if conn.state is not State.OPEN or protocol.transport.is_closing():
            return False
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
