"""The relay's HTTP/1.1 server protocol: uvicorn's httptools one, with a body writer for event streams.

The ASGI extension BODY_WRITER, whose value is {"writer": BodyWriter}: once a chunked response has started,
`writer.send_soon(body)` (when `writer.can_write()`) queues body bytes from any task, and every body queued
in one turn of the event loop goes out as one chunk in one write. An SSE stream's events then reach the
socket from the task that reads the upstream, with no wake-up of the response's task per event and no pass
through uvicorn's `send` coroutine; the response's task still writes what queued while the client was slow,
and the end. Without the extension (another server) an app sends everything through `send`.

Only for responses no middleware rewrites: the bytes bypass every `send` wrapper.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

BODY_WRITER = "deltarelay.http.body_writer"


class BodyWriter:
    """Writes body chunks of one started, chunked response: at the end of this turn of the loop, or on take()."""

    __slots__ = ("_cycle", "_loop", "_outbox")

    def __init__(self, cycle: RequestResponseCycle, loop: asyncio.AbstractEventLoop) -> None:
        # Weak: the cycle's scope holds this writer, and a reference cycle per request would wait for the GC.
        self._cycle: weakref.ref[RequestResponseCycle] | None = weakref.ref(cycle)
        self._loop = loop
        self._outbox: list[bytes] = []

    @property
    def cycle(self) -> RequestResponseCycle | None:
        return self._cycle() if self._cycle is not None else None

    def can_write(self) -> bool:
        """The response is streaming its body and the client keeps up (the transport is not paused)."""
        cycle = self.cycle
        return (cycle is not None and cycle.response_started and not cycle.response_complete
                and cycle.chunked_encoding is True and not cycle.disconnected and not cycle.flow.write_paused
                and cycle.scope["method"] != "HEAD")

    def send_soon(self, body: bytes) -> None:
        if not self._outbox:
            self._loop.call_soon(self._flush)
        self._outbox.append(body)

    def take(self) -> bytes:
        """What is queued and not yet written, for the caller to send first (in order) through `send`."""
        body = b"".join(self._outbox)
        self._outbox.clear()
        return body

    def close(self) -> None:
        """The response is over: nothing more is written, and the cycle is let go."""
        self._outbox.clear()
        self._cycle = None

    def _flush(self) -> None:
        body = self.take()
        cycle = self.cycle
        if body and cycle is not None and not cycle.disconnected and not cycle.response_complete:
            cycle.transport.write(b"%x\r\n%b\r\n" % (len(body), body))


class RelayHttpProtocol(HttpToolsProtocol):
    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        cycle: Any = self.cycle
        if cycle is not None and cycle.scope is self.scope:  # a new request (not a WebSocket upgrade)
            self.scope.setdefault("extensions", {})[BODY_WRITER] = {"writer": BodyWriter(cycle, self.loop)}
