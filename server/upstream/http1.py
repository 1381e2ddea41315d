"""A minimal HTTP/1.1 client for the one call the relay makes: POST a JSON body, read the streamed answer.

An asyncio protocol with httptools' C parser (chunked decoding included) and a keep-alive pool. Measured
against httpx-aiohttp with 500 concurrent streams (bench/upstream.py, one core): a stream's request and
response cost about 400 us of CPU through httpx.Request + aiohttp's ClientSession, most of it per-request
Python machinery (header multidicts, tracing hooks, timeouts, payload objects) that one fixed API call never
needs. Errors are httpx's exception types, so callers map them as for any httpx transport; it is also an
`httpx.AsyncBaseTransport` for code that builds httpx requests.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import httptools
import httpx

# Stop reading from the socket while this much body is buffered and not yet consumed.
_HIGH_WATER = 256 * 1024


class Http1Response:
    """One response: status and headers first, then the body as it arrives (async iteration)."""

    __slots__ = ("status_code", "raw_headers", "_connection", "_chunks", "_buffered", "_complete", "_error",
                 "_waiter", "_headers", "_closed", "_chunked", "_length_known")

    def __init__(self, connection: _Connection) -> None:
        self.status_code = 0
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self._connection = connection
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._complete = False
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._headers: httpx.Headers | None = None
        self._closed = False
        self._chunked = False
        self._length_known = False

    @property
    def headers(self) -> httpx.Headers:
        if self._headers is None:
            self._headers = httpx.Headers(self.raw_headers)
        return self._headers

    @property
    def stream(self) -> Http1Response:
        """The body as an async iterable of byte chunks (the same object: iterate it once)."""
        return self

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._body()

    async def _body(self) -> AsyncIterator[bytes]:
        while True:
            if self._chunks:
                chunks, self._chunks = self._chunks, []
                if self._buffered > _HIGH_WATER:
                    self._connection.resume()
                self._buffered = 0
                yield chunks[0] if len(chunks) == 1 else b"".join(chunks)
                continue
            if self._error is not None:
                raise self._error
            if self._complete:
                return
            self._waiter = self._connection.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def aread(self) -> bytes:
        return b"".join([chunk async for chunk in self])

    async def aclose(self) -> None:
        """Give the connection back to the pool if the response was read to its end, else close it."""
        if self._closed:
            return
        self._closed = True
        self._connection.finish(self)

    # fed by the connection
    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _feed(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER:
            self._connection.pause()
        self._wake()

    def _fail(self, error: Exception) -> None:
        if not self._complete and self._error is None:
            self._error = error
        self._wake()


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection; one request at a time."""

    def __init__(self, pool: Http1Transport, key: tuple[str, str, int], loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.key = key
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: Http1Response | None = None
        self.headers_ready: asyncio.Future[None] | None = None
        self.closed = False
        self.reusable = False  # the last response ended cleanly with keep-alive
        self.received = False  # any byte of the current response arrived
        self.idle_since = 0.0
        self.paused = False
        self.discarded = False  # the pool no longer counts it
        self.in_idle = False

    # requests
    def send(self, data: bytes) -> Http1Response:
        assert self.transport is not None
        response = self.response = Http1Response(self)
        self.headers_ready = self.loop.create_future()
        self.reusable = False
        self.received = False
        self.transport.write(data)
        return response

    def finish(self, response: Http1Response) -> None:
        if self.response is response:
            self.response = None
        if self.reusable and not self.closed and not response._chunks:
            self.pool._release(self)
        else:
            self.close()
            self.pool._discard(self)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def pause(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._lost(httpx.RemoteProtocolError(f"invalid HTTP response from the upstream: {exc}"))
            self.close()

    def eof_received(self) -> bool | None:
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        response = self.response
        if response is not None and not response._complete and response.status_code and exc is None \
                and not response._chunked and not response._length_known:
            response._complete = True  # a body delimited by the end of the connection
            response._wake()
        else:
            self._lost(httpx.ReadError(f"the upstream closed the connection ({exc or 'EOF'})"))
        self.pool._discard(self)

    def _lost(self, error: Exception) -> None:
        if self.headers_ready is not None and not self.headers_ready.done():
            self.headers_ready.set_exception(error)
        if self.response is not None:
            self.response._fail(error)

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.response is not None
        self.response.raw_headers.append((name, value))
        lower = name.lower()
        if lower == b"transfer-encoding":
            self.response._chunked = b"chunked" in value.lower()
        elif lower == b"content-length":
            self.response._length_known = True

    def on_headers_complete(self) -> None:
        response = self.response
        assert response is not None
        response.status_code = self.parser.get_status_code()
        if self.headers_ready is not None and not self.headers_ready.done():
            self.headers_ready.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self.response is not None:
            self.response._feed(body)

    def on_message_complete(self) -> None:
        response = self.response
        if response is None:
            return
        self.reusable = self.parser.should_keep_alive()
        response._complete = True
        response._wake()


class Http1Transport(httpx.AsyncBaseTransport):
    """HTTP/1.1 to one or more hosts, with at most `max_connections` open and idle ones kept for reuse."""

    def __init__(self, max_connections: int = 100, keepalive_expiry: float = 5.0, connect_timeout: float = 10.0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.max_connections = max_connections
        self.keepalive_expiry = keepalive_expiry
        self.connect_timeout = connect_timeout
        self._ssl_context = ssl_context
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._open = 0
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False

    def ssl_context(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = httpx.create_ssl_context()
        return self._ssl_context

    async def send(self, url: httpx.URL, head: bytes, body: bytes) -> Http1Response:
        """Send one request (`head`: the request line and headers, CRLF-terminated, blank line included) and
        return its response once the status and headers arrived.

        Raises httpx.ConnectError/ConnectTimeout/PoolTimeout/ReadError/RemoteProtocolError.
        """
        scheme = url.scheme
        key = (scheme, url.host, url.port or (443 if scheme == "https" else 80))
        for attempt in (0, 1):
            connection, reused = await self._connection(key)
            response = connection.send(head + body)
            try:
                await connection.headers_ready  # type: ignore[misc]
            except BaseException as exc:
                connection.close()
                self._discard(connection)
                # A kept-alive connection the server closed meanwhile: the request never got an answer.
                if isinstance(exc, httpx.ReadError) and reused and attempt == 0 and not connection.received:
                    continue
                raise
            return response
        raise AssertionError("unreachable")

    async def _connection(self, key: tuple[str, str, int]) -> tuple[_Connection, bool]:
        if self._closed:
            raise httpx.ConnectError("the upstream transport is closed")
        loop = asyncio.get_running_loop()
        idle = self._idle.get(key)
        now = loop.time()
        while idle:
            connection = idle.pop()
            connection.in_idle = False
            if connection.closed or now - connection.idle_since > self.keepalive_expiry:
                connection.close()
                self._discard(connection)
                continue
            return connection, True
        await self._slot()
        connection = _Connection(self, key, loop)
        scheme, host, port = key
        try:
            async with asyncio.timeout(self.connect_timeout):
                if scheme == "https":
                    await loop.create_connection(lambda: connection, host, port, ssl=self.ssl_context(),
                                                 server_hostname=host)
                else:
                    await loop.create_connection(lambda: connection, host, port)
        except BaseException as exc:
            connection.close()
            self._discard(connection)
            if isinstance(exc, TimeoutError):
                raise httpx.ConnectTimeout(f"could not connect to {host}:{port} in time") from None
            if isinstance(exc, OSError | ssl.SSLError):
                raise httpx.ConnectError(f"could not connect to {host}:{port}: {exc}") from None
            raise
        return connection, False

    async def _slot(self) -> None:
        if self._open >= self.max_connections:
            # Full: close the oldest idle connection (to another host: this one's had none), else wait.
            for connections in self._idle.values():
                if connections:
                    victim = connections.pop(0)
                    victim.in_idle = False
                    victim.close()
                    self._discard(victim)
                    break
        if self._open < self.max_connections and not self._slot_waiters:
            self._open += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._slot_waiters.append(waiter)
        try:
            async with asyncio.timeout(self.connect_timeout):
                await waiter  # the slot is handed over already counted
        except TimeoutError:
            raise httpx.PoolTimeout("no free upstream connection in time") from None
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._open -= 1
                self._next_slot()
            raise

    def _next_slot(self) -> None:
        while self._slot_waiters and self._open < self.max_connections:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                self._open += 1
                waiter.set_result(None)

    def _release(self, connection: _Connection) -> None:
        if self._closed:
            connection.close()
            self._discard(connection)
            return
        connection.idle_since = connection.loop.time()
        if self._slot_waiters:
            # Someone waits for a slot: hand it this one's by closing it (its host may differ).
            connection.close()
            self._discard(connection)
            return
        connection.in_idle = True
        self._idle.setdefault(connection.key, []).append(connection)

    def _discard(self, connection: _Connection) -> None:
        """Forget a closed connection and free its slot (once)."""
        if connection.discarded:
            return
        connection.discarded = True
        if connection.in_idle:
            connection.in_idle = False
            self._idle[connection.key].remove(connection)
        self._open -= 1
        self._next_slot()

    # httpx.AsyncBaseTransport, for code that builds httpx requests
    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        url = request.url
        lines = [b"%s %s HTTP/1.1" % (request.method.encode(), url.raw_path)]
        if "host" not in request.headers:
            lines.append(b"host: " + url.netloc)
        for name, value in request.headers.raw:
            if name.lower() in (b"content-length", b"transfer-encoding"):
                continue
            lines.append(name + b": " + value)
        lines.append(b"content-length: %d" % len(body))
        response = await self.send(url, b"\r\n".join(lines) + b"\r\n\r\n", body)
        return httpx.Response(response.status_code, headers=response.raw_headers, stream=_Stream(response),
                              request=request, extensions={"http_version": b"HTTP/1.1"})

    async def aclose(self) -> None:
        self._closed = True
        for connections in self._idle.values():
            for connection in connections:
                connection.in_idle = False
                connection.close()
        self._idle.clear()


class _Stream(httpx.AsyncByteStream):
    def __init__(self, response: Http1Response) -> None:
        self.response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.response:
            yield chunk

    async def aclose(self) -> None:
        await self.response.aclose()


def request_head(url: httpx.URL, headers: dict[str, str], extra: dict[str, Any] | None = None) -> bytes:
    """The fixed part of a POST to `url` with `headers`: everything up to the content-length value."""
    lines = [b"POST " + url.raw_path + b" HTTP/1.1", b"host: " + url.netloc]
    for name, value in {**headers, **(extra or {})}.items():
        lines.append(name.encode("ascii") + b": " + str(value).encode("latin-1"))
    return b"\r\n".join(lines) + b"\r\ncontent-length: "
