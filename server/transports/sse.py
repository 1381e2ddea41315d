"""SSE transport: POST a message and read its events, or read a running stream by id.

Thin: it validates input, asks the relay or the hub, and frames log entries.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from ..attachments import inline_room
from ..core import Relay, resume
from ..errors import TooLargeError
from ..events import Error, encode_data
from ..hub import LogLostError, StreamHub, Subscriber, SubscriberDropped
from ..metrics import Metrics
from ..protocol.frames import parse_answer_body, parse_event_id, parse_json_object
from ..protocol.sse import encode_comment, encode_entry, encode_event
from .http_protocol import BodyWriter
from .writers import SendWriter, socket_writer

SSE_HEADERS = {
    "cache-control": "no-store",
    "x-accel-buffering": "no",  # nginx: pass each event on at once
    "content-encoding": "identity",  # never compressed: a gzip layer would hold events back
    "x-content-type-options": "nosniff",
}
SSE_MEDIA_TYPE = "text/event-stream; charset=utf-8"


# One logged event as an SSE event; data is one line of compact JSON.
frame_event = encode_entry


KEEPALIVE = encode_comment("keepalive")
_HEADERS = [(b"content-type", SSE_MEDIA_TYPE.encode())] + [(k.encode(), v.encode()) for k, v in SSE_HEADERS.items()]


class EventStreamResponse:
    """A stream's events as text/event-stream, written through the subscriber's one path (Subscriber.serve).

    The stream's last event and the response's end go out in one write. Bare ASGI rather than
    StreamingResponse: no task group per stream, and the client's disconnect detaches the reader at once
    instead of when the next event fails to send.
    """

    def __init__(self, subscriber: Subscriber, cancel_on_disconnect: StreamHub | None = None,
                 release: Callable[[], None] | None = None, metrics: Metrics | None = None) -> None:
        self.subscriber = subscriber
        self.cancel_on_disconnect = cancel_on_disconnect
        self.release = release  # gives the user's connection slot back when the response ends
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        subscriber = self.subscriber
        stream = subscriber.stream
        gone = asyncio.ensure_future(_wait_for_disconnect(receive))
        gone.add_done_callback(lambda _: subscriber.abandon())
        if self.metrics is not None:
            self.metrics.readers["sse"].inc()
        body_writer = socket_writer(scope)

        async def send_body(frames: list[bytes]) -> None:
            await send({"type": "http.response.body", "body": b"".join(frames), "more_body": True})

        fallback = SendWriter(send_body)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
            writer = body_writer if body_writer is not None and body_writer.can_write() else fallback
            try:
                last = await subscriber.serve(writer, frame_event, KEEPALIVE)
            except SubscriberDropped as exc:
                if isinstance(exc, LogLostError):
                    error = Error("not_resumable", str(exc), False)
                else:
                    if self.metrics is not None:
                        self.metrics.dropped.labels("sse").inc()
                    error = Error("slow_consumer", f"this connection fell behind ({exc}); resume with"
                                  " Last-Event-ID", True)
                # No id: the client's Last-Event-ID stays at the last event it really got.
                last = [encode_event("error", encode_data(error))]
            except OSError:
                return  # the client went away
            if gone.done():
                # The client went away. The answer goes on and is saved, unless configured to stop with it.
                if self.cancel_on_disconnect is not None and not stream.finished:
                    self.cancel_on_disconnect.cancel(stream.id)
                return
            await send({"type": "http.response.body", "body": b"".join(fallback.take() + last), "more_body": False})
        finally:
            if isinstance(body_writer, BodyWriter):
                body_writer.close()
            gone.cancel()
            if self.release is not None:
                self.release()
            if self.metrics is not None:
                self.metrics.readers["sse"].dec()


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def event_stream(subscriber: Subscriber, cancel_on_disconnect: StreamHub | None = None,
                 release: Callable[[], None] | None = None, metrics: Metrics | None = None) -> EventStreamResponse:
    return EventStreamResponse(subscriber, cancel_on_disconnect, release, metrics)


def _wants_json(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return "application/json" in accept and "text/event-stream" not in accept


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing early once it passes `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLargeError(f"the body is over {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLargeError(f"the body is over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def post_message(request: Request) -> Response | EventStreamResponse:
    """POST /api/command-center/message: start an answer (to a message, or `regenerate` / `continue` one) and
    stream it (or 202 with its id)."""
    relay: Relay = request.app.state.relay
    user = await relay.admit(request.scope)
    max_bytes = relay.settings.max_message_bytes
    # JSON escapes can take 6 bytes per character of the message, plus room for the other fields; a body with
    # inline attachments may also hold their base64 (see inline_room), and only such a body may be that big.
    text_limit = max_bytes * 6 + 4096
    body = await read_body(request, text_limit + inline_room(relay.settings.max_attachment_bytes))
    parsed = parse_json_object(body)
    if len(body) > text_limit and not parsed.get("attachments"):
        raise TooLargeError(f"the body is over {text_limit} bytes")
    command = parse_answer_body(parsed, max_bytes, relay.settings.max_attachment_bytes)
    if _wants_json(request):
        stream = await relay.start(command, user)
        return JSONResponse({"streamId": stream.id, "conversationId": stream.conversation_id}, status_code=202)
    limits = relay.limits
    limits.take_connection(user)  # before the start: a refused connection saves nothing
    try:
        stream = await relay.start(command, user)
        owner = relay.hub if relay.settings.cancel_on_disconnect else None
        return event_stream(relay.hub.subscribe(stream.id, 0, keepalive=True), owner,
                            lambda: limits.give_connection(user), relay.metrics)
    except BaseException:
        limits.give_connection(user)
        raise


async def get_stream(request: Request) -> Response | EventStreamResponse:
    """GET /api/command-center/streams/{id}: the stream's events after Last-Event-ID (EventSource-ready).

    204 when the stream has ended and the cursor is at its last event; a JSON error (404/410 not_resumable,
    401, 429...) when it cannot be read. Neither has an EventSource reconnect.
    """
    relay: Relay = request.app.state.relay
    limits = relay.limits
    raw_cursor = request.headers.get("last-event-id") or request.query_params.get("lastEventId") or "0"
    held = None
    try:
        user = await relay.admit(request.scope)
        after = parse_event_id(raw_cursor)
        limits.take_connection(user)
        held = user
        subscriber = await resume(relay, request.path_params["stream_id"], after, keepalive=True, user=user,
                                  transport="sse")
    except BaseException:
        # A RelayError is its JSON error and status, whatever the Accept header: an EventSource fails on any
        # status but 200 and does not reconnect, and a fetch client reads the code (and messageId) from it.
        if held is not None:
            limits.give_connection(held)
        raise
    if subscriber.has_had_everything:
        # The stream has ended and the client has had its every event. A 200, even empty, would have an
        # EventSource reconnect every few seconds for as long as the page is open; 204 tells it to stop.
        subscriber.detach()
        limits.give_connection(user)
        return Response(status_code=204, headers={"cache-control": "no-store"})
    return event_stream(subscriber, release=lambda: limits.give_connection(user), metrics=relay.metrics)


async def cancel_stream(request: Request) -> Response:
    """POST /api/command-center/streams/{id}/cancel."""
    relay: Relay = request.app.state.relay
    user = await relay.admit(request.scope)
    stream_id = request.path_params["stream_id"]
    running = await relay.cancel(stream_id, user)
    return JSONResponse({"streamId": stream_id, "cancelled": running}, status_code=202 if running else 200)
