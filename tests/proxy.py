"""A loopback TCP proxy for fault tests, on a thread and event loop of its own (sync and async tests alike).

It forwards bytes both ways, records the request line of every HTTP request it carries, and on demand:
- freezes: stops reading both ways and closes nothing, as a proxy whose far side went away without a word
  (with small receive buffers, the server's writes soon pause);
- cuts: closes both sides of a connection once a rule says so, as a network that drops mid-answer.
"""

from __future__ import annotations

import asyncio
import re
import socket
import threading
from collections.abc import Callable
from typing import Any

REQUEST_LINE = re.compile(rb"(GET|POST|PUT|DELETE|HEAD|OPTIONS|PATCH) (\S+) HTTP/1\.[01]\r\n")

# (connection number, request lines the client sent on it, bytes the server sent on it so far) -> cut now
CutRule = Callable[[int, list[str], bytes], bool]


class _Side(asyncio.Protocol):
    """One socket of a proxied connection; what it receives goes to the other side's transport."""

    def __init__(self, link: _Link, upstream: bool) -> None:
        self.link = link
        self.upstream = upstream  # the socket to the server
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        if not self.upstream:
            transport.pause_reading()  # nothing to forward to until the server's side is connected
            asyncio.get_running_loop().create_task(self.link.proxy.connect(self.link))
        elif self.link.proxy.is_frozen:
            transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        self.link.forward(self, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.link.close()

    # The other side reads slowly: stop reading this one, as any proxy does.
    def pause_writing(self) -> None:
        other = self.link.other(self)
        if other is not None and other.transport is not None:
            other.transport.pause_reading()

    def resume_writing(self) -> None:
        other = self.link.other(self)
        if other is not None and other.transport is not None and not self.link.proxy.is_frozen:
            other.transport.resume_reading()


class _Link:
    def __init__(self, proxy: TcpProxy, number: int) -> None:
        self.proxy = proxy
        self.number = number
        self.client = _Side(self, upstream=False)
        self.server = _Side(self, upstream=True)
        self.requests: list[str] = []
        self.answered = bytearray()
        self.closed = False

    def other(self, side: _Side) -> _Side | None:
        return self.server if side is self.client else self.client

    def forward(self, side: _Side, data: bytes) -> None:
        target = self.other(side)
        if target is None or target.transport is None or self.closed:
            return
        if side is self.client:
            for match in REQUEST_LINE.finditer(data):
                line = f"{match.group(1).decode()} {match.group(2).decode()}"
                self.requests.append(line)
                self.proxy.requests.append(line)
        else:
            self.answered += data
        target.transport.write(data)
        rule = self.proxy.cut_rule
        if side is self.server and rule is not None and rule(self.number, self.requests, bytes(self.answered)):
            self.proxy.cuts += 1
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for side in (self.client, self.server):
            if side.transport is not None:
                side.transport.abort()
        self.proxy.links.discard(self)


class TcpProxy:
    """Forwards 127.0.0.1:`port` to 127.0.0.1:`target_port`, from the address `source` (the server sees that
    peer: another loopback address keeps its log lines apart from the test's own requests); `rcvbuf` sets
    SO_RCVBUF on both of its sockets."""

    def __init__(self, target_port: int, rcvbuf: int | None = None, cut_rule: CutRule | None = None,
                 source: str = "127.0.0.1") -> None:
        self.target_port = target_port
        self.source = source
        self.rcvbuf = rcvbuf
        self.cut_rule = cut_rule
        self.requests: list[str] = []  # "GET /path" of every request, in order
        self.cuts = 0
        self.is_frozen = False
        self.links: set[_Link] = set()
        self._count = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy", daemon=True)
        self._thread.start()
        self._server = self._call(self._listen())
        self.port: int = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=30)

    def _socket(self) -> socket.socket:
        sock = socket.socket()
        if self.rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        sock.setblocking(False)
        return sock

    async def _listen(self) -> asyncio.Server:
        sock = self._socket()  # accepted sockets inherit its receive buffer
        sock.bind(("127.0.0.1", 0))
        sock.listen(512)
        return await self._loop.create_server(self._accepted, sock=sock)

    def _accepted(self) -> asyncio.Protocol:
        self._count += 1
        link = _Link(self, self._count)
        self.links.add(link)
        return link.client

    async def connect(self, link: _Link) -> None:
        assert link.client.transport is not None
        sock = self._socket()
        try:
            sock.bind((self.source, 0))
            await self._loop.sock_connect(sock, ("127.0.0.1", self.target_port))
            await self._loop.create_connection(lambda: link.server, sock=sock)
        except OSError:
            sock.close()
            link.close()
            return
        if not self.is_frozen and not link.closed:
            link.client.transport.resume_reading()
        elif link.closed and link.server.transport is not None:
            link.server.transport.abort()

    def freeze(self) -> None:
        """Stop reading on every connection, now and to come; close nothing."""
        async def freeze_all() -> None:
            self.is_frozen = True
            for link in list(self.links):
                for side in (link.client, link.server):
                    if side.transport is not None:
                        side.transport.pause_reading()

        self._call(freeze_all())

    def close(self) -> None:
        async def close_all() -> None:
            self._server.close()
            for link in list(self.links):
                link.close()

        self._call(close_all())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
