"""The built-in HTTP/1.1 upstream client against a scripted in-process server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from server.upstream.http1 import Http1Transport

from .raw_upstream import STREAM_HEAD, Server, chunk, make_certificate, post, read_all


@pytest.fixture
async def transport() -> AsyncIterator[Http1Transport]:
    client = Http1Transport(max_connections=10, connect_timeout=5)
    yield client
    await client.aclose()


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
        assert b"\r\nx-api-key: k\r\n" in first and b"\r\nContent-Length: 7\r\n\r\n" in first


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
        assert server.requests[0].lower().count(b"content-length") == 1


@pytest.fixture
def tls_certificate(tmp_path):
    """A self-signed certificate for localhost: (certificate file, key file)."""
    return make_certificate(tmp_path)


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


async def test_interim_100_and_103_answers_are_skipped_and_the_real_response_is_read(
        transport: Http1Transport) -> None:
    """100 Continue and 103 Early Hints are not the response: the 200 after them is, and the connection then
    serves the next request. Fails if on_headers_complete resolves the response for a 1xx status (the
    request then sees status 100 and the 200 is left unread on a pooled connection)."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            body = await server.read_request(reader)
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
            writer.write(b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n")
            await writer.drain()
            writer.write(STREAM_HEAD + chunk(b"data: " + body + b"\n\n") + b"0\r\n\r\n")
            await writer.drain()

    async with Server(handler) as server:
        for i in range(2):
            response = await post(transport, server.url, b'{"n":%d}' % i)
            assert response.status_code == 200
            assert response.headers["content-type"] == "text/event-stream" and "link" not in response.headers
            assert await read_all(response.stream) == b'data: {"n":%d}\n\n' % i
            await response.aclose()
        assert server.connections == 1


async def test_bytes_on_an_idle_pooled_connection_close_it_and_the_next_request_gets_a_fresh_one(
        transport: Http1Transport, caplog: pytest.LogCaptureFixture) -> None:
    """A server that starts speaking out of turn on an idle kept-alive connection (here a status line, the
    rest to follow) loses it at once, quietly: no error is logged and the next request goes out on a new
    connection. Fails without the out-of-turn check in data_received: the partial message stayed in the
    idle connection's parser (no header yet, so no assert fired), the connection stayed pooled, and the next
    request's answer was parsed as the rest of it."""
    closed_by_client = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        if n == 1:
            await idle.wait()
            writer.write(b"HTTP/1.1 408 Request Timeout\r\n")
            await writer.drain()
            assert await reader.read() == b""
            closed_by_client.set()
        else:
            await reader.read()

    idle = asyncio.Event()
    async with Server(handler) as server:
        first = await post(transport, server.url)
        assert await read_all(first.stream) == b"ok"
        await first.aclose()
        idle.set()
        async with asyncio.timeout(10):
            await closed_by_client.wait()
        assert transport._open == 0
        second = await post(transport, server.url)
        assert await read_all(second.stream) == b"ok"
        await second.aclose()
        assert server.connections == 2
    assert not [record for record in caplog.records if record.levelname in ("ERROR", "CRITICAL")]


async def test_bytes_after_the_end_of_a_response_in_the_same_read_are_not_its_body(
        transport: Http1Transport) -> None:
    """A response followed at once by bytes nobody asked for keeps its own body, and its connection is not
    reused. Fails without on_message_begin's check (the extra message's body was appended to the finished
    response: b"okstale", and the connection went back to the pool)."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                     b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nstale")
        await writer.drain()
        await reader.read()

    async with Server(handler) as server:
        for _ in range(2):
            response = await post(transport, server.url)
            assert await read_all(response.stream) == b"ok"
            await response.aclose()
        assert server.connections == 2


async def test_a_post_that_met_a_stale_connection_is_resent_on_a_new_connection_not_another_pooled_one(
        transport: Http1Transport) -> None:
    """Two idle connections the server has given up on: the request that meets the first is sent once more,
    on a connection made for it. Fails if the resend may take the other pooled connection (`fresh` ignored
    in Http1Transport._connection): that one is stale too, and the request fails."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        if n <= 2:
            await reader.readuntil(b"\r\n\r\n")  # the next request arrives; hang up without a byte
            return
        await reader.read()

    async with Server(handler) as server:
        responses = await asyncio.gather(post(transport, server.url), post(transport, server.url))
        for response in responses:
            assert await read_all(response.stream) == b"ok"
            await response.aclose()
        assert server.connections == 2 and sum(map(len, transport._idle.values())) == 2
        response = await post(transport, server.url)
        assert await read_all(response.stream) == b"ok"
        await response.aclose()
        assert server.connections == 3
        assert len(server.requests) == 3  # the two answered first, then the resend (the dropped one is not kept)


async def test_a_post_whose_stale_connection_returned_some_bytes_is_not_resent(transport: Http1Transport) -> None:
    """Once a byte of an answer came back, the server had the request: the error reaches the caller and
    nothing is sent again. Fails if the resend rule ignores `received` (the POST would go out twice)."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-")  # and the connection closes mid-head
        await writer.drain()

    async with Server(handler) as server:
        first = await post(transport, server.url)
        assert await read_all(first.stream) == b"ok"
        await first.aclose()
        with pytest.raises(httpx.ReadError):
            await post(transport, server.url)
        assert server.connections == 1 and len(server.requests) == 2
        assert transport._open == 0


async def test_happy_eyeballs_connect_past_an_address_that_never_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    """A name whose first address silently drops the connection attempt (::1, a listener whose backlog is
    full) and whose second is 127.0.0.1: the second is tried 250 ms later and connects. Fails with a
    ConnectTimeout when addresses are tried one after the other (plain loop.create_connection(host, port)).
    The name is resolved by a replaced loop.getaddrinfo: no name on this machine resolves to both families."""
    import socket

    blackhole = socket.socket(socket.AF_INET6)
    filler = socket.socket(socket.AF_INET6)
    try:
        blackhole.bind(("::1", 0))
    except OSError:
        blackhole.close()
        filler.close()
        pytest.skip("no IPv6 loopback address")
    blackhole.listen(0)
    filler.connect(blackhole.getsockname()[:2])  # the one connection the backlog holds: later SYNs are dropped
    client = Http1Transport(max_connections=2, connect_timeout=10)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        await reader.read()

    try:
        async with Server(handler, host="dual-stack.test") as server:
            loop = asyncio.get_running_loop()
            resolve = loop.getaddrinfo

            async def getaddrinfo(host: object, port: object, *args: object, **kwargs: object) -> object:
                if host != "dual-stack.test":
                    return await resolve(host, port, *args, **kwargs)  # type: ignore[arg-type]
                return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", blackhole.getsockname()[1], 0, 0)),
                        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", server.port))]

            monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
            response = await post(client, server.url)
            assert await read_all(response.stream) == b"ok"
            await response.aclose()
    finally:
        await client.aclose()
        filler.close()
        blackhole.close()


@pytest.mark.parametrize("transport_name", ["http1", "httpx", "aiohttp"])
async def test_an_upstream_error_body_is_read_up_to_its_bound(transport_name: str) -> None:
    """A 50 MB 400 body: the relay reads MAX_ERROR_BODY of it and hangs up, so memory stays bounded (peak
    traced allocations far below the body) and the server cannot send it all. The cut body is no longer
    JSON, so the message is the generic one, not the upstream's. Fails if AnthropicUpstream reads the whole
    body (b"".join of every part): the peak passes 50 MB and the message is the upstream's text."""
    import tracemalloc

    from server.config import load_settings
    from server.errors import UpstreamError
    from server.upstream.anthropic import MAX_ERROR_BODY, AnthropicUpstream, UpstreamRequest

    size = 50 * 1024 * 1024
    opening = b'{"type":"error","error":{"type":"invalid_request_error","message":"'
    piece = memoryview(b"x" * (256 * 1024))
    sent = 0
    done = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        nonlocal sent
        await server.read_request(reader)
        try:
            writer.write(b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
                         % size + opening)
            sent = len(opening)
            while sent < size - 3:
                part = piece[:size - 3 - sent]
                writer.write(part)
                await writer.drain()
                sent += len(part)
            writer.write(b'"}}')
            await writer.drain()
            sent += 3
        finally:
            done.set()

    async with Server(handler) as server:
        settings = load_settings({}, anthropic_api_key="sk-ant-test", anthropic_base_url=f"http://127.0.0.1:{server.port}",
                                 upstream_transport=transport_name, retry_attempts=0)
        upstream = AnthropicUpstream(settings)
        tracemalloc.start()
        try:
            with pytest.raises(UpstreamError) as caught:
                async for _ in upstream.events(UpstreamRequest("claude-haiku-4-5", 10, [])):
                    pass
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
            await upstream.aclose()
        async with asyncio.timeout(30):
            await done.wait()
    assert (caught.value.code, caught.value.message) == ("invalid_request", "the upstream answered HTTP 400")
    assert MAX_ERROR_BODY == 64 * 1024
    assert peak < 16 * 1024 * 1024, peak
    assert sent < size, "the whole error body went out: the relay read it all"
