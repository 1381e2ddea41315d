"""Scripted Anthropic streams, a recording fake upstream body, and a relay run in-process.

The relay built here is the real one (Store on a real database, AnthropicUpstream over
httpx, StreamHub, Relay); only the network is faked, with respx at https://upstream.test.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson

from server.config import load_settings
from server.core import Relay
from server.hub import StreamHub
from server.protocol.frames import SendMessage
from server.store import Store
from server.upstream.anthropic import AnthropicUpstream

API_KEY = "sk-test-secret"
BASE_URL = "https://upstream.test"
MESSAGES_URL = BASE_URL + "/v1/messages"

#: One relay event as a subscriber sees it: (id, name, decoded data).
RelayedEvent = tuple[int, str, dict[str, Any]]


def sse_event(name: str, payload: dict[str, Any]) -> bytes:
    """One upstream SSE event, framed like the Anthropic API frames it."""
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps({"type": name, **payload}) + b"\n\n"


def anthropic_events(
    texts: list[str],
    *,
    model: str = "claude-haiku-4-5",
    input_tokens: int = 10,
    output_tokens: int | None = None,
    cache_read: int = 0,
    stop_reason: str = "end_turn",
) -> list[bytes]:
    """A scripted answer, one SSE event per item: message_start ... message_stop.

    output_tokens defaults to one token per text delta.
    """
    events = [
        sse_event("message_start", {"message": {
            "id": "msg_scripted", "type": "message", "role": "assistant", "content": [], "model": model,
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "cache_creation_input_tokens": 0,
                      "cache_read_input_tokens": cache_read, "output_tokens": 1},
        }}),
        sse_event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        sse_event("ping", {}),
    ]
    events += [
        sse_event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": text}})
        for text in texts
    ]
    events += [
        sse_event("content_block_stop", {"index": 0}),
        sse_event("message_delta", {
            "delta": {"stop_reason": stop_reason, "stop_sequence": None},
            "usage": {"output_tokens": len(texts) if output_tokens is None else output_tokens},
        }),
        sse_event("message_stop", {}),
    ]
    return events


def anthropic_stream_bytes(texts: list[str], **script: Any) -> bytes:
    """The whole SSE body of a scripted streamed Messages API answer (options as anthropic_events)."""
    return b"".join(anthropic_events(texts, **script))


class FakeBody(httpx.AsyncByteStream):
    """An upstream response body: sends `chunks`, then (hang=True) waits for ever.

    Records what happened to it: `waiting` is set once every chunk was handed out and
    the body hangs, `ended` when its generator finished (normally or not), `closed`
    when the HTTP response was closed.
    """

    def __init__(self, chunks: Iterable[bytes], *, hang: bool = False) -> None:
        self.chunks = list(chunks)
        self.hang = hang
        self.waiting = asyncio.Event()
        self.ended = asyncio.Event()
        self.closed = asyncio.Event()
        self.served = False
        self._generator = self._generate()

    async def _generate(self) -> AsyncIterator[bytes]:
        try:
            for chunk in self.chunks:
                yield chunk
            if self.hang:
                self.waiting.set()
                await asyncio.Event().wait()  # never set: only a cancel or a close ends this
        finally:
            self.ended.set()

    def __aiter__(self) -> AsyncIterator[bytes]:
        # One body per response: a respx return_value served twice would otherwise look empty.
        assert not self.served, "a FakeBody serves one response; use side_effect for several"
        self.served = True
        return self._generator

    async def aclose(self) -> None:
        self.closed.set()
        await self._generator.aclose()  # type: ignore[attr-defined]


def sse_response(body: bytes | FakeBody) -> httpx.Response:
    """A 200 text/event-stream response with `body`."""
    stream = body if isinstance(body, FakeBody) else FakeBody([body])
    return httpx.Response(200, headers={"content-type": "text/event-stream; charset=utf-8"}, stream=stream)


@asynccontextmanager
async def relay_in_process(
    tmp: Path,
    *,
    database_url: str | None = None,
    first_event_timeout: float = 10.0,
    idle_timeout: float = 10.0,
    retry_attempts: int = 0,
    **overrides: Any,
) -> AsyncIterator[Relay]:
    """A real Relay (Store, AnthropicUpstream to https://upstream.test, StreamHub); closed on exit.

    One upstream request per answer unless a test asks for retries (retry_attempts):
    then a failed first request shows its own error, not the outcome of retries.
    """
    settings = load_settings(
        {},
        database_url=database_url or f"sqlite:///{tmp}/t.db",
        anthropic_api_key=API_KEY,
        anthropic_base_url=BASE_URL,
        first_event_timeout=first_event_timeout,
        idle_timeout=idle_timeout,
        retry_attempts=retry_attempts,
        upstream_transport="httpx",  # respx fakes httpcore; the aiohttp transport is tested against processes
        **overrides,
    )
    store = Store(settings.database_url)
    await store.connect()
    upstream = AnthropicUpstream(settings)
    hub = StreamHub(settings.stream_log_events, settings.stream_retention_seconds)
    try:
        yield Relay(settings, store, upstream, hub)
    finally:
        await hub.shutdown(grace_seconds=0)
        await upstream.aclose()
        await store.disconnect()


def decode(data: str) -> dict[str, Any]:
    """An event's data; numbers with a fraction become Decimal, so money stays exact."""
    value: dict[str, Any] = json.loads(data, parse_float=Decimal)
    return value


async def collect(hub: StreamHub, stream_id: str, after: int = 0) -> list[RelayedEvent]:
    """Every event of a stream after `after`, to its end; the timeout only guards against hangs."""
    events: list[RelayedEvent] = []
    async with asyncio.timeout(10):
        subscriber = hub.subscribe(stream_id, after)
        async for batch in subscriber.batches():
            events.extend((event_id, name, decode(data)) for event_id, name, data in batch)
    return events


async def run_to_end(relay: Relay, command: SendMessage) -> list[RelayedEvent]:
    """Start an answer and collect its events from the hub, start to done or error."""
    stream = await relay.start(command)
    return await collect(relay.hub, stream.id)
