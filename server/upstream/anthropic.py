"""The Anthropic Messages API, streamed over one shared httpx client.

I/O lives here; decoding does not: bytes go to the pure SSEDecoder. Connection
failures, HTTP errors and timeouts become UpstreamError subclasses with stable codes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import httpx
import orjson
from httpx_aiohttp import AiohttpTransport

from ..config import Settings
from ..errors import UpstreamError, UpstreamTimeoutError
from ..protocol.anthropic import error_for_status
from ..protocol.caching import cache_marked
from ..protocol.sse import SSEDecoder, SSEEvent
from .http1 import Http1Transport, request_head
from .proxies import Proxy

API_VERSION = "2023-06-01"
# Push the idle deadline forward at most this often: one timer per chunk would cost more than the chunk.
# A silence is then noticed after between 7/8 and all of RELAY_IDLE_TIMEOUT.
_DEADLINE_SLACK = 5.0
#: A token count (POST /v1/messages/count_tokens) that takes longer than this is given up: the estimate stands.
COUNT_TIMEOUT = 5.0
#: An upstream error answer's body is read up to this many bytes (its JSON error is a few hundred) and the
#: rest left unread, the connection closed: a huge error body costs no more memory than this.
MAX_ERROR_BODY = 64 * 1024


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    """One Messages API call."""

    model: str
    max_tokens: int
    messages: list[dict[str, Any]]
    system: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    #: "off", "5m" or "1h": the cache breakpoints body() marks (server/protocol/caching.py).
    prompt_cache: str = "off"
    #: Tool definitions in the API's form: server tools (web_search, web_fetch) first, then the app's.
    tools: list[dict[str, Any]] = field(default_factory=list)
    #: Extended thinking, `{"type": "enabled", "budget_tokens": N}` (N < max_tokens); None: off.
    thinking: dict[str, Any] | None = None
    #: anthropic-beta values, sent as one comma-separated header.
    betas: tuple[str, ...] = ()

    def payload(self, stream: bool = True) -> dict[str, Any]:
        """The request body as data. The API reads the cached prefix as tools, system, messages: body() marks
        the system prompt and the newest user message (caching.py), so a system breakpoint covers the tools."""
        payload: dict[str, Any] = {"model": self.model, "max_tokens": self.max_tokens, "messages": self.messages}
        if stream:
            payload["stream"] = True
        if self.tools:
            payload["tools"] = self.tools
        if self.system:
            payload["system"] = self.system
        if self.thinking is not None:
            payload["thinking"] = self.thinking
        return payload

    def body(self) -> bytes:
        payload = self.payload()
        if self.prompt_cache != "off":
            payload = cache_marked(payload, self.prompt_cache)
        return orjson.dumps(payload)

    def extra_headers(self) -> dict[str, str]:
        """The headers this request adds to the upstream's fixed ones: anthropic-beta when it has betas."""
        return {"anthropic-beta": ",".join(self.betas)} if self.betas else {}


class AnthropicUpstream:
    """Streams Messages API answers as decoded SSE events."""

    def __init__(
        self, settings: Settings, transport: httpx.AsyncBaseTransport | None = None, base_url: str | None = None
    ) -> None:
        self.settings = settings
        limits = httpx.Limits(
            max_connections=settings.upstream_max_connections,
            max_keepalive_connections=settings.upstream_max_connections,
        )
        # read=None: the first-event and idle deadlines below replace httpx's per-read timeout.
        timeout = httpx.Timeout(connect=settings.connect_timeout, read=None, write=30.0, pool=settings.connect_timeout)
        url = httpx.URL((base_url or settings.anthropic_base_url).rstrip("/") + "/v1/messages")
        # HTTPS_PROXY and friends, as httpx's AsyncClient(trust_env=True) would apply them; the transports
        # alone (the client is not used) ignore the environment, so each is given the proxy explicitly.
        self.proxy: Proxy | None = None if transport is not None else settings.proxies.proxy_for(url)
        proxy = self.proxy.httpx_proxy() if self.proxy is not None else None
        if transport is None and settings.upstream_transport == "http1":
            # The default: one fixed POST needs no general client. A stream's request and response cost
            # 163 us of CPU on a new connection and 80 us on a reused one, where httpx.Request + aiohttp's
            # ClientSession cost 400 and 230 us (500 concurrent streams, bench/upstream.py; commit dc6a1e6).
            transport = Http1Transport(settings.upstream_max_connections, connect_timeout=settings.connect_timeout,
                                       proxies=settings.proxies)
        elif transport is None and settings.upstream_transport == "aiohttp":
            # httpcore's pool walks (and polls) every pooled connection on each request and release: with
            # hundreds of concurrent streams that was a third of the relay's CPU. aiohttp's pool and C parser
            # are O(1) per request; httpx stays the API.
            transport = AiohttpTransport(limits=limits, proxy=proxy)
        self.transport = transport or httpx.AsyncHTTPTransport(limits=limits, proxy=proxy)
        # Requests go straight to the transport: an API call needs none of AsyncClient's per-request
        # cookie, redirect and auth machinery, which was a quarter of a stream's start-up CPU.
        self.base_url = (base_url or settings.anthropic_base_url).rstrip("/")
        self.url = url
        self.headers = {"anthropic-version": API_VERSION, "content-type": "application/json"}
        if settings.anthropic_api_key:
            self.headers["x-api-key"] = settings.anthropic_api_key
        if isinstance(self.transport, AiohttpTransport) and self.proxy is not None \
                and self.proxy.authorization is not None and url.scheme == "http":
            # aiohttp sends proxy headers on CONNECT only; a plain http request to a proxy carries its own.
            self.headers["proxy-authorization"] = self.proxy.authorization.decode("ascii")
        self.extensions = {"timeout": timeout.as_dict()}
        # The built-in transport takes the request as bytes: everything but the body's length is fixed.
        self.http1 = self.transport if isinstance(self.transport, Http1Transport) else None
        self.head = request_head(self.url, self.headers)

    async def _send(self, body: bytes, extra: dict[str, str] | None = None) -> Any:
        """The response (status, headers, body stream, aclose) to one POST of `body`, with `extra` headers
        (anthropic-beta) besides the fixed ones."""
        if self.http1 is not None:
            head = self.head if not extra else request_head(self.url, self.headers, extra)
            return await self.http1.send(self.url, head + b"%d\r\n\r\n" % len(body), body)
        headers = {**self.headers, **extra} if extra else self.headers
        http_request = httpx.Request("POST", self.url, headers=headers, content=body, extensions=self.extensions)
        return await self.transport.handle_async_request(http_request)

    @property
    def secrets(self) -> tuple[str, ...]:
        """The credentials this upstream sends: the core masks them in every error a user sees."""
        return (self.settings.anthropic_api_key,) if self.settings.anthropic_api_key else ()

    async def aclose(self) -> None:
        await self.transport.aclose()

    async def get(self, path: str, limit: int = 64 * 1024) -> tuple[int, bytes]:
        """GET `path` of the API (`/v1/models/...`) with the streams' key, version, transport and timeouts.

        Returns the status and at most `limit` bytes of the body.

        Raises:
            httpx.TransportError: no connection, or it broke.
        """
        headers = {name: value for name, value in self.headers.items() if name != "content-type"}
        request = httpx.Request("GET", httpx.URL(self.base_url + path), headers=headers, extensions=self.extensions)
        response = await self.transport.handle_async_request(request)
        body = b""
        try:
            async for chunk in response.aiter_raw():
                body += chunk
                if len(body) >= limit:
                    break
        finally:
            await response.aclose()
        return response.status_code, body[:limit]

    async def count_tokens(self, request: UpstreamRequest) -> int | None:
        """The request's input tokens as the Messages API counts them (POST /v1/messages/count_tokens, free,
        rate-limited apart from messages: https://platform.claude.com/docs/en/build-with-claude/token-counting);
        None when the count fails or takes longer than COUNT_TIMEOUT (the caller keeps its estimate)."""
        payload = request.payload(stream=False)
        del payload["max_tokens"]  # counting takes no output limit
        http_request = httpx.Request("POST", httpx.URL(self.base_url + "/v1/messages/count_tokens"),
                                     headers={**self.headers, **request.extra_headers()},
                                     content=orjson.dumps(payload), extensions=self.extensions)
        try:
            async with asyncio.timeout(COUNT_TIMEOUT):
                response = await self.transport.handle_async_request(http_request)
                try:
                    body = await _read_at_most(response.aiter_raw(), MAX_ERROR_BODY)
                finally:
                    await response.aclose()
        except (TimeoutError, httpx.HTTPError):
            return None
        if response.status_code != 200:
            return None
        try:
            tokens = orjson.loads(body).get("input_tokens")
        except (orjson.JSONDecodeError, AttributeError):
            return None
        return tokens if type(tokens) is int and tokens >= 0 else None

    async def events(self, request: UpstreamRequest) -> AsyncGenerator[SSEEvent, None]:
        """Yield the upstream's SSE events as they arrive.

        Raises:
            UpstreamError: HTTP error status, connection failure (code `connection_failed`).
            UpstreamTimeoutError: no first event within first_event_timeout, or a silence
                longer than idle_timeout between events.
        """
        settings = self.settings
        loop = asyncio.get_running_loop()
        waiting_for_first = True
        try:
            async with asyncio.timeout(settings.connect_timeout + settings.first_event_timeout) as deadline:
                response = await self._send(request.body(), request.extra_headers())
                try:
                    if response.status_code != 200:
                        body = await _read_at_most(response.stream, MAX_ERROR_BODY)
                        if response.status_code == 407 and self.proxy is not None:  # only a proxy says 407
                            raise self._proxy_error(httpx.ProxyError("407 Proxy Authentication Required"))
                        error = error_for_status(response.status_code, body, response.headers.get("retry-after"))
                        if settings.anthropic_api_key and settings.anthropic_api_key in error.message:
                            error.message = error.message.replace(settings.anthropic_api_key, "[redacted]")
                        raise error
                    deadline.reschedule(loop.time() + settings.first_event_timeout)
                    decoder = SSEDecoder()
                    pushed_at = loop.time()
                    slack = min(_DEADLINE_SLACK, settings.idle_timeout / 8)
                    async for chunk in response.stream:
                        events = decoder.decode(chunk)
                        if not events:
                            continue
                        now = loop.time()
                        if waiting_for_first or now - pushed_at > slack:
                            waiting_for_first = False
                            pushed_at = now
                            deadline.reschedule(now + settings.idle_timeout)
                        for event in events:
                            yield event
                    for event in decoder.flush():
                        yield event
                finally:
                    await response.aclose()
        except TimeoutError:
            if waiting_for_first:
                raise UpstreamTimeoutError("the model did not start answering in time") from None
            raise UpstreamTimeoutError("the model stopped sending data mid-answer") from None
        except httpx.TimeoutException:
            raise UpstreamTimeoutError(f"could not connect to the model's API{self._through()} in time") from None
        except httpx.ProxyError as exc:
            raise self._proxy_error(exc) from None
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
            raise UpstreamError(
                f"connection to the model's API{self._through()} failed ({type(exc).__name__})",
                code="connection_failed",
            ) from None

    def _through(self) -> str:
        return "" if self.proxy is None else f" through the proxy {self.proxy}"

    def _proxy_error(self, exc: httpx.ProxyError) -> UpstreamError:
        """The proxy refused or failed the connection: which proxy (credentials masked), with what status.

        The transports' messages start with the proxy's status (httpcore's, httpx-aiohttp's and the built-in
        one's alike); only that number is passed on. A 5xx (the proxy could not reach the API) is retryable,
        a 407 or 403 (the proxy's credentials or rules) is not.
        """
        head = str(exc)[:3]
        status = int(head) if head.isdigit() else None
        try:
            detail = f"HTTP {status} {HTTPStatus(status).phrase}" if status else type(exc).__name__
        except ValueError:
            detail = f"HTTP {status}"
        return UpstreamError(f"the proxy {self.proxy} refused the connection to the model's API ({detail})",
                             code="proxy_error", retryable=status is None or status >= 500)


async def _read_at_most(stream: AsyncIterable[bytes], limit: int) -> bytes:
    """The first `limit` bytes of `stream` (all of it if shorter); the rest is not read."""
    parts: list[bytes] = []
    size = 0
    async for part in stream:
        parts.append(part)
        size += len(part)
        if size >= limit:
            break
    return b"".join(parts)[:limit]
