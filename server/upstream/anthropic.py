"""The Anthropic Messages API, streamed over one shared httpx client.

I/O lives here; decoding does not: bytes go to the pure SSEDecoder. Connection
failures, HTTP errors and timeouts become UpstreamError subclasses with stable codes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
from httpx_aiohttp import AiohttpTransport

from ..config import Settings
from ..errors import UpstreamError, UpstreamTimeoutError
from ..protocol.anthropic import error_for_status
from ..protocol.sse import SSEDecoder, SSEEvent
from .http1 import Http1Transport, request_head

API_VERSION = "2023-06-01"
# Push the idle deadline forward at most this often: one timer per chunk would cost more than the chunk.
# A silence is then noticed after between 7/8 and all of RELAY_IDLE_TIMEOUT.
_DEADLINE_SLACK = 5.0


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    """One Messages API call."""

    model: str
    max_tokens: int
    messages: list[dict[str, Any]]
    system: str = ""
    metadata: dict[str, str] = field(default_factory=dict)

    def body(self) -> bytes:
        payload: dict[str, Any] = {
            "model": self.model,
            "max_tokens": self.max_tokens,
            "messages": self.messages,
            "stream": True,
        }
        if self.system:
            payload["system"] = self.system
        return orjson.dumps(payload)


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
        if transport is None and settings.upstream_transport == "http1":
            # The default: one fixed POST needs no general client. Per stream start it costs about a third
            # of httpx.Request + aiohttp's ClientSession (bench: 500 concurrent streams), per chunk less too.
            transport = Http1Transport(settings.upstream_max_connections, connect_timeout=settings.connect_timeout)
        elif transport is None and settings.upstream_transport == "aiohttp":
            # httpcore's pool walks (and polls) every pooled connection on each request and release: with
            # hundreds of concurrent streams that was a third of the relay's CPU. aiohttp's pool and C parser
            # are O(1) per request; httpx stays the API.
            transport = AiohttpTransport(limits=limits)
        self.transport = transport or httpx.AsyncHTTPTransport(limits=limits)
        # Requests go straight to the transport: an API call needs none of AsyncClient's per-request
        # cookie, redirect and auth machinery, which was a quarter of a stream's start-up CPU.
        self.url = httpx.URL((base_url or settings.anthropic_base_url).rstrip("/") + "/v1/messages")
        self.headers = {"anthropic-version": API_VERSION, "content-type": "application/json"}
        if settings.anthropic_api_key:
            self.headers["x-api-key"] = settings.anthropic_api_key
        self.extensions = {"timeout": timeout.as_dict()}
        # The built-in transport takes the request as bytes: everything but the body's length is fixed.
        self.http1 = self.transport if isinstance(self.transport, Http1Transport) else None
        self.head = request_head(self.url, self.headers)

    async def _send(self, body: bytes) -> Any:
        """The response (status, headers, body stream, aclose) to one POST of `body`."""
        if self.http1 is not None:
            return await self.http1.send(self.url, self.head + b"%d\r\n\r\n" % len(body), body)
        http_request = httpx.Request("POST", self.url, headers=self.headers, content=body, extensions=self.extensions)
        return await self.transport.handle_async_request(http_request)

    @property
    def secrets(self) -> tuple[str, ...]:
        """The credentials this upstream sends: the core masks them in every error a user sees."""
        return (self.settings.anthropic_api_key,) if self.settings.anthropic_api_key else ()

    async def aclose(self) -> None:
        await self.transport.aclose()

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
                response = await self._send(request.body())
                try:
                    if response.status_code != 200:
                        body = b"".join([part async for part in response.stream])
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
            raise UpstreamTimeoutError("could not connect to the model's API in time") from None
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
            raise UpstreamError(
                f"connection to the model's API failed ({type(exc).__name__})", code="connection_failed"
            ) from None
