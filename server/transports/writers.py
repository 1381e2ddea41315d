"""How a subscriber's events reach a client's socket: the hub's Writer, found for one ASGI connection.

The relay's own protocols (http_protocol.py, ws_protocol.py) put a writer of their socket in
scope["extensions"][WRITER]: it writes framed events straight to the transport, with no pass through
`send`. Under another ASGI server, SendWriter implements the same interface with `send`. Either way
a subscriber's events take one path (hub.Subscriber.serve).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.types import Scope

from ..hub import Writer

WRITER = "deltarelay.writer"


class SendWriter:
    """A Writer over ASGI `send`, for servers without the relay's protocols.

    write_many() holds the frames and drain() sends them, so at most one send is in flight and the frames
    keep their order; take() hands what is held to the caller, to send first with its own last message.
    """

    __slots__ = ("_send_frames", "_held")

    def __init__(self, send_frames: Callable[[list[bytes]], Awaitable[None]]) -> None:
        self._send_frames = send_frames
        self._held: list[bytes] = []

    def can_write(self) -> bool:
        return not self._held

    def write_many(self, frames: list[bytes]) -> None:
        self._held += frames

    async def drain(self) -> None:
        held, self._held = self._held, []
        if held:
            await self._send_frames(held)

    def take(self) -> list[bytes]:
        held, self._held = self._held, []
        return held


def socket_writer(scope: Scope) -> Writer | None:
    """The writer the relay's protocol gave this connection, None under another server."""
    writer: Writer | None = scope.get("extensions", {}).get(WRITER, {}).get("writer")
    return writer
