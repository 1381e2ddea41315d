"""A minimal HTTP/1.1 client for the one call the relay makes: POST a JSON body, read the streamed answer.

An asyncio protocol with httptools' C parser (chunked decoding included), a keep-alive pool, HTTP proxies
(HTTPS_PROXY and friends, through server/upstream/proxies.py: a CONNECT tunnel for https, absolute-form
requests for http) and happy eyeballs. It is hand-written because one fixed API call needs none of a
general client's per-request machinery (httpx.Request, aiohttp's ClientSession: header multidicts, tracing
hooks, timeouts, payload objects), which was the largest cost of a stream's start. Measured when it became
the default (commit dc6a1e6, 500 concurrent streams, bench/upstream.py, CPU on one core), the upstream
request and response of one stream cost 163 us instead of httpx-aiohttp's 400 us on a new connection and
80 us instead of 230 us on a reused one; the relay's CPU per stream started (500 streams x 1 delta over 1 s)
fell from 1,180 to 940 us over SSE and from 1,440 to 1,160 us over the WebSocket. Errors are httpx's
exception types, so callers map them as for any httpx transport; it is also an `httpx.AsyncBaseTransport`
for code that builds httpx requests.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import socket
import ssl
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import httptools
import httpx

from .proxies import Proxy, ProxyEnvironment

# Stop reading from the socket while this much body is buffered and not yet consumed.
_HIGH_WATER = 256 * 1024
# Happy eyeballs (RFC 8305): the next address is tried this long after the last attempt started, unless it
# failed sooner. 250 ms is the RFC's default and anyio's, which httpx connects through.
HAPPY_EYEBALLS_DELAY = 0.25
# A proxy's answer to CONNECT is a status line and a few headers.
_MAX_PROXY_ANSWER = 64 * 1024

# A pooled connection's key: the upstream's scheme, host and port, and the proxy in between (or None).
Key = tuple[str, str, int, Proxy | None]


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


class _OutOfTurn(Exception):
    """A response began that no request asked for."""


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection; one request at a time."""

    def __init__(self, pool: Http1Transport, key: Key, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.key = key
        # Through a CONNECT tunnel: the TCP transport under this connection's TLS. Closed with it, since a
        # proxy may never pass the upstream's close_notify back, and asyncio keeps the socket until it comes.
        self.tunnel: asyncio.BaseTransport | None = None
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: Http1Response | None = None
        self.headers_ready: asyncio.Future[None] | None = None
        self.closed = False
        self.reusable = False  # the last response ended cleanly with keep-alive
        self.received = False  # any byte came back since the current request was sent
        self.interim = False  # the message being parsed is a 1xx answer, not the response
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
        if self.tunnel is not None:
            self.tunnel.close()  # after the TLS transport queued its close_notify, which this still writes

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
        response = self.response
        if response is None or response._complete:
            # Bytes no request asked for (on an idle pooled connection, or after the response's end): whatever
            # the server meant, the next request on this connection could be answered with them.
            self.reusable = False
            self.close()
            self.pool._discard(self)
            return
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if response._complete:  # the response ended and more came in the same read: see above
                self.reusable = False
                self.close()
                return
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

    # httptools callbacks (only while a response is expected: data_received sees to that)
    def on_message_begin(self) -> None:
        response = self.response
        if response is None or response._complete:
            raise _OutOfTurn
        response.raw_headers.clear()  # an interim answer's headers are not the response's
        response._chunked = response._length_known = False

    def on_header(self, name: bytes, value: bytes) -> None:
        response = self.response
        assert response is not None
        response.raw_headers.append((name, value))
        lower = name.lower()
        if lower == b"transfer-encoding":
            response._chunked = b"chunked" in value.lower()
        elif lower == b"content-length":
            response._length_known = True

    def on_headers_complete(self) -> None:
        response = self.response
        assert response is not None
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            if status == 101:  # nothing here asks to switch protocols
                raise httptools.HttpParserError("101 Switching Protocols to a request that asked for no upgrade")
            # 100 Continue, 103 Early Hints: interim answers; the response follows on the same connection.
            self.interim = True
            return
        response.status_code = status
        if self.headers_ready is not None and not self.headers_ready.done():
            self.headers_ready.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self.response is not None:
            self.response._feed(body)

    def on_message_complete(self) -> None:
        response = self.response
        if response is None:
            return
        if self.interim:
            self.interim = False
            return
        self.reusable = self.parser.should_keep_alive()
        response._complete = True
        response._wake()


class _TunnelAnswer(asyncio.Protocol):
    """Reads a proxy's answer to CONNECT: `answer` gets its head (status line and headers)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, proxy: Proxy) -> None:
        self.proxy = proxy
        self.head = bytearray()
        self.answer: asyncio.Future[bytes] = loop.create_future()

    def data_received(self, data: bytes) -> None:
        if self.answer.done():
            return
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end >= 0:
            self.answer.set_result(bytes(self.head[:end]))
        elif len(self.head) > _MAX_PROXY_ANSWER:
            self.answer.set_exception(httpx.ProxyError(f"the proxy {self.proxy} answered CONNECT with more than"
                                                       f" {_MAX_PROXY_ANSWER} bytes of headers"))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answer.done():
            self.answer.set_exception(httpx.ProxyError(f"the proxy {self.proxy} closed the connection before"
                                                       f" answering CONNECT ({exc or 'EOF'})"))


class Http1Transport(httpx.AsyncBaseTransport):
    """HTTP/1.1 to one or more hosts, with at most `max_connections` open and idle ones kept for reuse.

    `proxies` (from the environment: server/upstream/proxies.py) says which URLs go through which proxy;
    connections are pooled per (scheme, host, port, proxy).
    """

    def __init__(self, max_connections: int = 100, keepalive_expiry: float = 5.0, connect_timeout: float = 10.0,
                 ssl_context: ssl.SSLContext | None = None, proxies: ProxyEnvironment | None = None) -> None:
        self.max_connections = max_connections
        self.keepalive_expiry = keepalive_expiry
        self.connect_timeout = connect_timeout
        self._ssl_context = ssl_context
        self._proxies = proxies or ProxyEnvironment()
        self._routes: dict[tuple[str, str, int | None], Key] = {}
        self._idle: dict[Key, list[_Connection]] = {}
        self._open = 0
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False

    def ssl_context(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = httpx.create_ssl_context()
        return self._ssl_context

    def route(self, url: httpx.URL) -> Key:
        """The pool key of `url`: its scheme, host and port, and the proxy that serves it (or None)."""
        key = self._routes.get((url.scheme, url.host, url.port))
        if key is None:
            scheme = url.scheme
            key = (scheme, url.host, url.port or (443 if scheme == "https" else 80), self._proxies.proxy_for(url))
            self._routes[(url.scheme, url.host, url.port)] = key
        return key

    async def send(self, url: httpx.URL, head: bytes, body: bytes) -> Http1Response:
        """Send one request (`head`: the request line with an origin-form target such as /v1/messages, and
        headers, CRLF-terminated, blank line included) and return its response once the status and headers
        arrived. Through a proxy, an http:// request's target is made absolute-form and carries the proxy's
        credentials; an https:// one goes through a CONNECT tunnel as it is.

        Raises httpx.ConnectError/ConnectTimeout/PoolTimeout/ProxyError/ReadError/RemoteProtocolError.
        """
        key = self.route(url)
        proxy = key[3]
        if proxy is not None and key[0] == "http":
            head = _absolute_form(head, url, proxy)
        data = head + body
        for attempt in (0, 1):
            connection, reused = await self._connection(key, fresh=attempt == 1)
            response = connection.send(data)
            try:
                await connection.headers_ready  # type: ignore[misc]
            except BaseException as exc:
                connection.close()
                self._discard(connection)
                # A POST is not idempotent: it is sent again, once and on a new connection, only when a
                # kept-alive connection failed before a single byte came back (the server closed it, idle, as
                # it was reused: it did not take the request). Once any byte came back, even an interim 100,
                # the server may have acted on it, and the error is the caller's.
                if isinstance(exc, httpx.ReadError) and reused and not connection.received:
                    continue
                raise
            return response
        raise AssertionError("unreachable")

    async def _connection(self, key: Key, fresh: bool = False) -> tuple[_Connection, bool]:
        """An idle connection for `key` (unless `fresh`), else a new one; and whether it was reused."""
        if self._closed:
            raise httpx.ConnectError("the upstream transport is closed")
        loop = asyncio.get_running_loop()
        idle = self._idle.get(key)
        now = loop.time()
        while idle and not fresh:
            connection = idle.pop()
            connection.in_idle = False
            if connection.closed or now - connection.idle_since > self.keepalive_expiry:
                connection.close()
                self._discard(connection)
                continue
            return connection, True
        await self._slot()
        connection = _Connection(self, key, loop)
        try:
            async with asyncio.timeout(self.connect_timeout):
                await self._open_connection(connection, loop)
        except BaseException as exc:
            connection.close()
            self._discard(connection)
            scheme, host, port, proxy = key
            where = f"{host}:{port}" if proxy is None else f"{host}:{port} through the proxy {proxy}"
            if isinstance(exc, TimeoutError):
                raise httpx.ConnectTimeout(f"could not connect to {where} in time") from None
            if isinstance(exc, OSError | ssl.SSLError):
                raise httpx.ConnectError(f"could not connect to {where}: {exc}") from None
            raise
        return connection, False

    async def _open_connection(self, connection: _Connection, loop: asyncio.AbstractEventLoop) -> None:
        """Connect `connection`: to the upstream, or to its proxy (and through a tunnel for https)."""
        scheme, host, port, proxy = connection.key
        if proxy is None:
            sock = await connect_socket(loop, host, port)
            tls = self.ssl_context() if scheme == "https" else None
            await loop.create_connection(lambda: connection, sock=sock, ssl=tls, server_hostname=host if tls else None)
            return
        to_proxy = self.ssl_context() if proxy.url.scheme == "https" else None
        sock = await connect_socket(loop, proxy.host, proxy.port)
        if scheme == "http":
            await loop.create_connection(lambda: connection, sock=sock, ssl=to_proxy,
                                         server_hostname=proxy.host if to_proxy else None)
            return
        tunnel = _TunnelAnswer(loop, proxy)
        transport, _ = await loop.create_connection(lambda: tunnel, sock=sock, ssl=to_proxy,
                                                    server_hostname=proxy.host if to_proxy else None)
        try:
            authority = _authority(host, port)
            request = [b"CONNECT " + authority + b" HTTP/1.1", b"host: " + authority]
            if proxy.authorization is not None:
                request.append(b"proxy-authorization: " + proxy.authorization)
            transport.write(b"\r\n".join(request) + b"\r\n\r\n")
            _check_tunnel(await tunnel.answer, proxy, authority)
            # TLS with the upstream inside the tunnel, its certificate checked for the upstream's name.
            tls_transport = await loop.start_tls(transport, connection, self.ssl_context(), server_hostname=host)
        except BaseException:
            transport.close()
            raise
        assert tls_transport is not None
        connection.tunnel = transport
        connection.connection_made(tls_transport)

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
        lines.append(b"Content-Length: %d" % len(body))
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


async def connect_socket(loop: asyncio.AbstractEventLoop, host: str, port: int) -> socket.socket:
    """A connected non-blocking TCP socket to `host`:`port`, by happy eyeballs (RFC 8305, as httpx's anyio
    does; uvloop's create_connection has no happy_eyeballs_delay): the addresses in getaddrinfo's order with
    the families interleaved, each attempt started HAPPY_EYEBALLS_DELAY after the one before (at once if that
    one failed), the first to connect kept and the others cancelled.

    Raises:
        OSError: no address connected (the last address's error), or the name did not resolve.
    """
    infos: list[tuple[Any, ...]]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        infos = list(await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM))
    else:  # an address: no resolver (a thread) needed
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        infos = [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port))]
    if not infos:
        raise OSError(f"{host} resolves to no address")
    families: dict[int, list[Any]] = {}
    for info in infos:
        families.setdefault(info[0], []).append(info)
    addresses = iter([info for group in itertools.zip_longest(*families.values()) for info in group if info])
    attempts: set[asyncio.Task[socket.socket]] = set()
    errors: list[BaseException] = []
    try:
        address = next(addresses, None)
        while address is not None or attempts:
            if address is not None:
                attempts.add(loop.create_task(_connect_one(loop, address)))
                address = next(addresses, None)
            done, attempts = await asyncio.wait(attempts, timeout=HAPPY_EYEBALLS_DELAY if address else None,
                                                return_when=asyncio.FIRST_COMPLETED)
            for attempt in done:
                error = attempt.exception()
                if error is None:
                    winner = attempt.result()
                    for other in done - {attempt}:
                        _close_socket_of(other)
                    return winner
                errors.append(error)
        raise errors[-1]
    finally:
        for attempt in attempts:
            attempt.cancel()
            attempt.add_done_callback(_close_socket_of)


async def _connect_one(loop: asyncio.AbstractEventLoop, info: Any) -> socket.socket:
    family, kind, proto, _, address = info
    sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await loop.sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock


def _close_socket_of(attempt: asyncio.Task[socket.socket]) -> None:
    if attempt.done() and not attempt.cancelled() and attempt.exception() is None:
        attempt.result().close()


def _authority(host: str, port: int) -> bytes:
    return (f"[{host}]:{port}" if ":" in host else f"{host}:{port}").encode("ascii")


def _check_tunnel(head: bytes, proxy: Proxy, authority: bytes) -> None:
    """Raise httpx.ProxyError unless `head` is a 2xx answer to CONNECT (its message starts with the status)."""
    status_line = head.split(b"\r\n", 1)[0]
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise httpx.ProxyError(f"the proxy {proxy} answered CONNECT {authority.decode()} with something that is"
                               f" not HTTP")
    status = int(parts[1])
    if not 200 <= status < 300:
        reason = parts[2].decode("latin-1", "replace").strip() if len(parts) > 2 else ""
        raise httpx.ProxyError(f"{status} {reason} from the proxy {proxy} to CONNECT {authority.decode()}")


def _absolute_form(head: bytes, url: httpx.URL, proxy: Proxy) -> bytes:
    """`head` for a proxy: the request target as a whole URL, and the proxy's credentials if it has some."""
    end = head.index(b"\r\n")
    method, target, version = head[:end].split(b" ", 2)
    line = b"%s %s://%s%s %s" % (method, url.raw_scheme, url.netloc, target, version)
    if proxy.authorization is not None:
        line += b"\r\nproxy-authorization: " + proxy.authorization
    return line + head[end:]


def request_head(url: httpx.URL, headers: dict[str, str], extra: dict[str, Any] | None = None) -> bytes:
    """The fixed part of a POST to `url` with `headers`: everything up to the content-length value."""
    lines = [b"POST " + url.raw_path + b" HTTP/1.1", b"host: " + url.netloc]
    for name, value in {**headers, **(extra or {})}.items():
        lines.append(name.encode("ascii") + b": " + str(value).encode("latin-1"))
    # Spelled as httpx and aiohttp spell it: proxy.py 2.4 looks for this spelling only when it forwards a
    # request, and adds a second Content-Length (which servers refuse with a 400) after any other.
    return b"\r\n".join(lines) + b"\r\nContent-Length: "
