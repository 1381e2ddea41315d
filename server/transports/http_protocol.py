"""The relay's HTTP/1.1 server protocol: uvicorn's httptools one, with a body writer and limits for strangers.

The ASGI extension writers.WRITER, whose value is {"writer": BodyWriter}: once a chunked response has started,
the BodyWriter is the response's hub.Writer, and a subscriber's events go from its outbox straight to the
transport, one chunk per write, with no pass through uvicorn's `send` coroutine (the response's start and end
still go through `send`). Without the extension (another server) writers.SendWriter uses `send`.
Only for responses no middleware rewrites: the bytes bypass every `send` wrapper.

What a connection may do before it is anyone's (ConnectionGuard; issue 14). uvicorn bounds none of it under
httptools (its h11_max_incomplete_event_size is h11's, its limit_concurrency answers everyone 503, and its
timeout_keep_alive only covers the wait between requests, which it keeps doing):
- a request head (request line and headers) of more than `max_header_bytes`, or more than `max_headers`
  headers, is answered 431 with a JSON error and the connection closed; at most one read past the bound is
  ever held;
- a connection that has not sent a whole head `head_timeout` seconds after it opened (or after the first
  byte of a later request) is closed, with a 408 if it had begun one;
- at most `max_pending` connections may be waiting for their head at once (a WebSocket counts until its
  handshake is answered): past it the oldest are closed, once they have waited a second, so idle sockets
  cannot lock clients out, and a burst of clients that connect at once is not cut for it;
- a peer that reads nothing for `write_timeout` seconds while the server has writes waiting (the transport
  stays paused) is cut off, which ends the response and gives back the user's connection slot.
Each refusal is one WARNING line per peer per minute at most (logs.PeerLog), naming no header or token.

The uvicorn internals it relies on are reached through internals.py (UvicornHttpProtocol, the cycle_*
functions), which lists them.
"""

from __future__ import annotations

import asyncio
import http
import logging
import weakref
from collections import OrderedDict
from typing import Any, Protocol

import orjson

from ..logs import PeerLog
from .internals import (
    RequestCycle,
    UvicornHttpProtocol,
    cycle_can_write,
    cycle_drain,
    cycle_open,
    cycle_streaming,
    cycle_write,
)
from .writers import WRITER

log = logging.getLogger("deltarelay.connections")



class BodyWriter:
    """The Writer (hub.Writer) of one chunked response's body: each write_many() is one chunk in one write."""

    __slots__ = ("_cycle",)

    def __init__(self, cycle: RequestCycle) -> None:
        # Weak: the cycle's scope holds this writer, and a reference cycle per request would wait for the GC.
        self._cycle: weakref.ref[RequestCycle] | None = weakref.ref(cycle)

    @property
    def cycle(self) -> RequestCycle | None:
        return self._cycle() if self._cycle is not None else None

    def streaming(self) -> bool:
        """The response is streaming a chunked body, and the client has not gone."""
        cycle = self.cycle
        return cycle is not None and cycle_streaming(cycle)

    def can_write(self) -> bool:
        """Streaming, and the client keeps up (the transport is not paused)."""
        cycle = self.cycle
        return cycle is not None and cycle_can_write(cycle) and self.streaming()

    def write_many(self, frames: list[bytes]) -> None:
        cycle = self.cycle
        if cycle is not None and cycle_open(cycle):
            cycle_write(cycle, [b"%x\r\n" % sum(map(len, frames)), *frames, b"\r\n"])

    async def drain(self) -> None:
        cycle = self.cycle
        if cycle is not None:
            await cycle_drain(cycle)
        if not self.streaming():
            raise ConnectionResetError("the response is over or its client went away")

    def close(self) -> None:
        """The response is over: the cycle is let go."""
        self._cycle = None


# A refused peer may still be sending (a 10 MB header): its bytes are read and dropped this long, so that
# closing with unread data does not reset the connection before the client has read the refusal.
LINGER_SECONDS = 2.0


def error_response(status: int, code: str, message: str) -> bytes:
    """A whole HTTP/1.1 response with a JSON error body, for a connection about to be closed."""
    body = orjson.dumps({"error": {"code": code, "message": message}})
    return b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s" % (
        status, http.HTTPStatus(status).phrase.encode(), len(body), body)


class PendingConnection(Protocol):
    """A connection that has not yet sent a whole request head, or had its WebSocket handshake answered."""

    def head_timed_out(self) -> None: ...

    def evicted(self) -> None: ...


class ConnectionGuard:
    """The limits on connections that are nobody's yet, shared by every connection of one server.

    Pending connections are kept oldest first. None stays longer than `head_timeout` seconds. Past
    `max_pending` of them (0: no bound) the oldest are closed until the bound holds again, each once it has
    been waiting `min_age` seconds: clients that connect at once are accepted in one round, before any of
    them is read, and are not closed for it; idle ones are, within about `min_age`. One timer serves them all.
    """

    def __init__(self, max_header_bytes: int = 32 * 1024, max_headers: int = 100, head_timeout: float = 15.0,
                 max_pending: int = 256, write_timeout: float = 30.0, peer_log: PeerLog | None = None,
                 min_age: float = 1.0) -> None:
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        self.head_timeout = head_timeout
        self.max_pending = max_pending
        self.write_timeout = write_timeout
        self.min_age = min_age
        self.peer_log = peer_log if peer_log is not None else PeerLog(log)
        self._pending: OrderedDict[PendingConnection, float] = OrderedDict()  # -> since when (loop time)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = 0.0

    def __len__(self) -> int:
        return len(self._pending)

    def wait_for_head(self, connection: PendingConnection, loop: asyncio.AbstractEventLoop) -> None:
        """Start counting `connection` as pending (if it is not already), its clock from now."""
        if connection not in self._pending:
            self._pending[connection] = loop.time()
            self._schedule(loop)

    def got_head(self, connection: PendingConnection) -> None:
        """`connection` is no longer pending: its head came, its handshake was answered, or it closed."""
        self._pending.pop(connection, None)

    def _over(self) -> bool:
        return bool(self.max_pending) and len(self._pending) > self.max_pending

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._pending:
            return
        since = next(iter(self._pending.values()))
        due = since + (self.min_age if self._over() else self.head_timeout)
        if self._timer is not None:
            if self._timer_due <= due:
                return
            self._timer.cancel()
        self._timer, self._timer_due = loop.call_at(due, self._sweep, loop), due

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        now = loop.time()
        while self._pending:
            connection, since = next(iter(self._pending.items()))
            if now >= since + self.head_timeout:
                del self._pending[connection]
                connection.head_timed_out()
            elif self._over() and now >= since + self.min_age:
                del self._pending[connection]
                connection.evicted()
            else:
                break
        self._schedule(loop)

    def refused(self, peer: tuple[str, int] | None, reason: str) -> None:
        """Log a refusal of `peer` (host, port), at most once a minute per host."""
        self.peer_log.warning(peer[0] if peer else "unknown peer", reason)


class _HeadRefused(Exception):
    """Raised in a parser callback to stop parsing a head that was just refused."""


class WriteDeadline:
    """A protocol mixin: a peer that reads nothing for `write_deadline_guard().write_timeout` seconds while
    writes wait (the transport stays paused) is cut off. Mixed in before internals' protocol classes."""

    write_timer: asyncio.TimerHandle | None = None
    stalled_peer = "connection"  # how the refusal's log line names the peer

    # Provided by internals' protocol classes (uvicorn's).
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    client: tuple[str, int] | None

    def write_deadline_guard(self) -> ConnectionGuard:
        raise NotImplementedError

    # The transport pauses writes while its buffer is over the high-water mark, and resumes them when it drains.
    def pause_writing(self) -> None:
        super().pause_writing()  # type: ignore[misc]
        if self.write_timer is None:
            self.write_timer = self.loop.call_later(self.write_deadline_guard().write_timeout, self._write_timed_out)

    def resume_writing(self) -> None:
        super().resume_writing()  # type: ignore[misc]
        self.cancel_write_deadline()

    def cancel_write_deadline(self) -> None:
        if self.write_timer is not None:
            self.write_timer.cancel()
            self.write_timer = None

    def _write_timed_out(self) -> None:
        self.write_timer = None
        guard = self.write_deadline_guard()
        guard.refused(self.client, f"cut off a {self.stalled_peer} that read nothing for {guard.write_timeout:g} s")
        self.transport.abort()  # close() would wait for a flush that never comes


class RelayHttpProtocol(WriteDeadline, UvicornHttpProtocol):
    guard = ConnectionGuard()  # relay_http_protocol() gives each server its own

    def write_deadline_guard(self) -> ConnectionGuard:
        return self.guard

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reading_head = True  # what arrives belongs to a request head
        self.head_bytes = 0  # received while reading this head (its upper bound: a read may hold body too)
        self.head_begun = False  # the request's first byte came
        self.head_size = 0  # exact: the request line and the header lines parsed so far
        self.header_count = 0
        self.refused = False  # answered and closing: whatever else comes is dropped

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.guard.wait_for_head(self, self.loop)

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.got_head(self)
        self.cancel_write_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        if self.reading_head:
            self.head_bytes += len(data)
        if not self.feed(data):  # upgraded, or not HTTP
            return
        if self.reading_head:
            if self.head_bytes > self.guard.max_header_bytes:
                self.refuse(431, "headers_too_large", f"the request head is over {self.guard.max_header_bytes} bytes")
            else:
                self.guard.wait_for_head(self, self.loop)  # a later request's head began and is not whole yet

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.reading_head = self.head_begun = True
        self.head_size = self.header_count = 0

    def on_url(self, url: bytes) -> None:
        self.head_size += len(url)
        if self.head_size > self.guard.max_header_bytes:
            self.refuse(431, "headers_too_large", f"the request head is over {self.guard.max_header_bytes} bytes")
            raise _HeadRefused
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_count += 1
        self.head_size += len(name) + len(value) + 4  # ": " and CRLF
        if self.header_count > self.guard.max_headers:
            self.refuse(431, "headers_too_large", f"a request may have at most {self.guard.max_headers} headers")
            raise _HeadRefused
        if self.head_size > self.guard.max_header_bytes:
            self.refuse(431, "headers_too_large", f"the request head is over {self.guard.max_header_bytes} bytes")
            raise _HeadRefused
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self.reading_head = self.head_begun = False
        self.head_bytes = 0
        self.guard.got_head(self)
        super().on_headers_complete()
        cycle = self.new_request_cycle()
        if cycle is not None:  # a new request (not a WebSocket upgrade)
            self.set_extension(WRITER, {"writer": BodyWriter(cycle)})

    def invalid_request(self) -> None:
        if not self.refused:  # uvicorn answers 400 too, with a warning line per request
            self.refuse(400, "invalid_request", "invalid HTTP request")

    def refuse(self, status: int, code: str, message: str) -> None:
        """Answer `status` with a JSON error, log it (rate-limited), and close once the peer has read it."""
        self.refused = True
        self.reading_head = False
        self.guard.got_head(self)
        self.guard.refused(self.client, f"refused a request: {status} {message}")
        transport = self.transport
        if transport.is_closing():
            return
        if self.responding():
            transport.abort()  # a pipelined head while a response is going out: no answer can go in between
            return
        transport.write(error_response(status, code, message))
        if transport.can_write_eof():
            transport.write_eof()  # a client that reads the answer closes; the rest waits out LINGER_SECONDS
        self.loop.call_later(LINGER_SECONDS, transport.abort)

    def head_timed_out(self) -> None:
        if self.head_begun:
            self.refuse(408, "timeout", f"the request head did not arrive within {self.guard.head_timeout:g} s")
        else:
            self._close_idle(f"closed a connection that sent nothing for {self.guard.head_timeout:g} s")

    def evicted(self) -> None:
        if self.head_begun:
            self.refuse(503, "overloaded", "too many connections are waiting to send a request; try again")
        else:
            self._close_idle("closed an idle connection: too many connections are waiting to send a request")

    def _close_idle(self, reason: str) -> None:
        self.reading_head = False
        self.guard.refused(self.client, reason)
        self.transport.close()



def relay_http_protocol(guard: ConnectionGuard) -> type[RelayHttpProtocol]:
    """The protocol class for uvicorn's `http=` setting, with its server's own guard."""
    return type("RelayHttpProtocol", (RelayHttpProtocol,), {"guard": guard})
