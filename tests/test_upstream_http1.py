"""The built-in HTTP/1.1 upstream client against a scripted in-process server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest

from server.upstream.http1 import Http1Transport, request_head

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class Server:
    """Accepts connections; `handler(reader, writer, connection_number)` answers them."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Server:
        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(reader, writer, self.connections)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(accept, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def url(self) -> httpx.URL:
        assert self.server is not None
        return httpx.URL(f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1/messages")

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        body = await reader.readexactly(length)
        self.requests.append(head + body)
        return body


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


STREAM_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


async def read_all(response: AsyncIterator[bytes]) -> bytes:
    return b"".join([part async for part in response])


@pytest.fixture
async def transport() -> AsyncIterator[Http1Transport]:
    client = Http1Transport(max_connections=10, connect_timeout=5)
    yield client
    await client.aclose()


async def post(client: Http1Transport, url: httpx.URL, body: bytes = b'{"x":1}') -> object:
    head = request_head(url, {"content-type": "application/json", "x-api-key": "k"}) + b"%d\r\n\r\n" % len(body)
    return await client.send(url, head, body)


async def test_a_chunked_stream_arrives_whole_and_the_connection_is_reused(transport: Http1Transport) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            body = await server.read_request(reader)
            writer.write(STREAM_HEAD + chunk(b"event: a\n"))
            await writer.drain()
            writer.write(chunk(b"data: " + body + b"\n\n") + b"0\r\n\r\n")
            await writer.drain()

    async with Server(handler) as server:
        for i in range(3):
            response = await post(transport, server.url, b'{"n":%d}' % i)
            assert response.status_code == 200  # type: ignore[attr-defined]
            assert response.headers["content-type"] == "text/event-stream"  # type: ignore[attr-defined]
            assert await read_all(response.stream) == b'event: a\ndata: {"n":%d}\n\n' % i  # type: ignore[attr-defined]
            await response.aclose()  # type: ignore[attr-defined]
        assert server.connections == 1
        first = server.requests[0]
        assert first.startswith(b"POST /v1/messages HTTP/1.1\r\nhost: 127.0.0.1:")
        assert b"\r\nx-api-key: k\r\n" in first and b"\r\ncontent-length: 7\r\n\r\n" in first


async def test_a_response_closed_before_its_end_is_not_reused(transport: Http1Transport) -> None:
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await server.read_request(reader)
        writer.write(STREAM_HEAD + chunk(b"event: a\n\n"))
        await writer.drain()
        await release.wait()

    async with Server(handler) as server:
        response = await post(transport, server.url)
        async for part in response.stream:  # type: ignore[attr-defined]
            assert part == b"event: a\n\n"
            break
        await response.aclose()  # type: ignore[attr-defined]
        second = await post(transport, server.url)
        await second.aclose()  # type: ignore[attr-defined]
        release.set()
        assert server.connections == 2


async def test_an_error_status_comes_with_its_headers_and_body(transport: Http1Transport) -> None:
    body = b'{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}'

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 7\r\ncontent-length: %d\r\n\r\n%s"
                     % (len(body), body))
        await writer.drain()
        await reader.read()

    async with Server(handler) as server:
        response = await post(transport, server.url)
        assert response.status_code == 429  # type: ignore[attr-defined]
        assert response.headers.get("retry-after") == "7"  # type: ignore[attr-defined]
        assert await read_all(response.stream) == body  # type: ignore[attr-defined]
        await response.aclose()  # type: ignore[attr-defined]


async def test_a_body_delimited_by_the_end_of_the_connection(transport: Http1Transport) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it")
        await writer.drain()

    async with Server(handler) as server:
        response = await post(transport, server.url)
        assert await read_all(response.stream) == b"all of it"  # type: ignore[attr-defined]
        await response.aclose()  # type: ignore[attr-defined]


async def test_a_connection_lost_mid_body_is_a_read_error(transport: Http1Transport) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await server.read_request(reader)
        writer.write(STREAM_HEAD + chunk(b"event: a\n\n"))
        await writer.drain()

    async with Server(handler) as server:
        response = await post(transport, server.url)
        with pytest.raises(httpx.ReadError):
            await read_all(response.stream)  # type: ignore[attr-defined]
        await response.aclose()  # type: ignore[attr-defined]
        assert transport._open == 0


async def test_a_garbled_response_is_a_protocol_error(transport: Http1Transport) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await server.read_request(reader)
        writer.write(b"SPDY/9 what\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with Server(handler) as server:
        with pytest.raises(httpx.RemoteProtocolError):
            await post(transport, server.url)
        assert transport._open == 0


async def test_a_refused_connection_is_a_connect_error(transport: Http1Transport) -> None:
    async with Server(lambda r, w, n: asyncio.sleep(0)) as server:
        url = server.url
    with pytest.raises(httpx.ConnectError):
        await post(transport, url)
    assert transport._open == 0


async def test_a_kept_alive_connection_the_server_closed_is_replaced_once(transport: Http1Transport) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        if n == 1:
            # Read the next request, then hang up without answering: a stale keep-alive connection.
            await reader.readuntil(b"\r\n\r\n")
            return
        await reader.read()

    async with Server(handler) as server:
        first = await post(transport, server.url)
        assert await read_all(first.stream) == b"ok"  # type: ignore[attr-defined]
        await first.aclose()  # type: ignore[attr-defined]
        second = await post(transport, server.url)
        assert await read_all(second.stream) == b"ok"  # type: ignore[attr-defined]
        await second.aclose()  # type: ignore[attr-defined]
        assert server.connections == 2


async def test_at_most_max_connections_are_open_and_a_waiter_gets_a_freed_slot() -> None:
    client = Http1Transport(max_connections=1, connect_timeout=5)
    gate = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            await server.read_request(reader)
            if n == 1:
                await gate.wait()
            writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()
            return

    try:
        async with Server(handler) as server:
            first = asyncio.create_task(post(client, server.url))
            for _ in range(1000):  # a few loop turns for the first request to arrive
                if server.requests:
                    break
                await asyncio.sleep(0)
            assert server.requests
            second = asyncio.create_task(post(client, server.url))
            for _ in range(20):
                await asyncio.sleep(0)
            assert server.connections == 1 and not second.done()
            gate.set()
            response = await first
            assert await read_all(response.stream) == b"ok"  # type: ignore[attr-defined]
            await response.aclose()  # type: ignore[attr-defined]
            response = await second
            assert await read_all(response.stream) == b"ok"  # type: ignore[attr-defined]
            await response.aclose()  # type: ignore[attr-defined]
            assert server.connections == 2
    finally:
        await client.aclose()


async def test_it_is_an_httpx_transport_too(transport: Http1Transport) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        body = await server.read_request(reader)
        writer.write(STREAM_HEAD + chunk(body) + b"0\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with Server(handler) as server, httpx.AsyncClient(transport=transport) as client:
        response = await client.post(str(server.url), content=b"hello", headers={"anthropic-version": "v"})
        assert (response.status_code, response.content) == (200, b"hello")
        assert b"\r\nanthropic-version: v\r\n" in server.requests[0]
        assert server.requests[0].count(b"content-length") == 1


@pytest.fixture
def tls_certificate(tmp_path):
    """A self-signed certificate for localhost: (certificate file, key file)."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


async def test_https_goes_through_tls_with_the_hostname_checked(tls_certificate) -> None:
    import ssl

    cert, key = tls_certificate
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    client = Http1Transport(max_connections=2, connect_timeout=5, ssl_context=ssl.create_default_context(cafile=cert))

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(STREAM_HEAD + chunk(b"secret") + b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    try:
        url = httpx.URL(f"https://localhost:{port}/v1/messages")
        response = await post(client, url)
        assert await read_all(response.stream) == b"secret"  # type: ignore[attr-defined]
        await response.aclose()  # type: ignore[attr-defined]
        with pytest.raises(httpx.ConnectError):  # the certificate names localhost, not 127.0.0.1
            await post(client, httpx.URL(f"https://127.0.0.1:{port}/v1/messages"))
    finally:
        await client.aclose()
        server.close()
