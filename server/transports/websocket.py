"""WebSocket transport: many streams over one socket, each frame one event.

Client frames: {"type": "message" | "resume" | "cancel" | "ping", ...}.
Server frames: {"event", "streamId", "id", "data"} (+ "requestId" on the start of a
stream the client asked for with one). Thin: parsing is in protocol/frames.py.
A socket whose token or session stops working while it is open is closed with 4401.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import orjson
from starlette.types import Receive, Scope, Send

from ..auth import ANONYMOUS
from ..core import Relay, resume
from ..errors import GoneError, LimitError, RelayError
from ..events import encode_data, error_event
from ..hub import LogLostError, Subscriber, SubscriberDropped
from ..protocol.frames import Cancel, Ping, Resume, SendMessage, parse_frame, request_id_of
from .writers import SendWriter, socket_writer

log = logging.getLogger("deltarelay.ws")

# The relay's event names as bytes (names are JSON-safe: they come from events.py, never from input).
EVENT_NAMES = {name: name.encode() for name in ("start", "chunk", "thinking", "cost", "done", "error")}

# The close code for a socket whose credentials stopped working (4000-4999 are the application's; 401 is HTTP's).
CREDENTIAL_ENDED = 4401


def error_frame(exc: RelayError, stream_id: str | None = None, request_id: str | None = None) -> str:
    data = encode_data(error_event(exc)).decode()
    tail = f',"requestId":{orjson.dumps(request_id).decode()}' if request_id else ""
    sid = orjson.dumps(stream_id).decode()
    return f'{{"event":"error","streamId":{sid},"id":null,"data":{data}{tail}}}'


class Connection:
    """One client socket: reads commands, pumps each subscribed stream's events into it."""

    def __init__(self, relay: Relay, scope: Scope, receive: Receive, send: Send) -> None:
        self.relay = relay
        self.scope = scope
        self._receive = receive
        self._send = send
        self.user = ANONYMOUS
        self.pumps: set[asyncio.Task[None]] = set()
        self.following = 0  # streams this socket is reading now
        self.started: list[str] = []  # streams this socket asked for, not yet finished
        self.active = True

    async def send(self, text: str) -> None:
        # No lock: the server writes each frame whole, so concurrent pumps cannot interleave bytes.
        self.active = True
        await self._send({"type": "websocket.send", "text": text})

    def keepalive_tick(self) -> None:
        """An idle socket gets a keepalive frame, so proxies keep it and the client's watchdog sees life."""
        if self.active:
            self.active = False
        else:
            task = asyncio.create_task(self._keepalive())
            self.pumps.add(task)
            task.add_done_callback(self.pumps.discard)

    async def _keepalive(self) -> None:
        try:
            await self.send('{"event":"keepalive"}')
        except (RuntimeError, OSError):
            pass

    def credential_ended(self) -> None:
        """The token or session this socket opened with no longer holds: close it with 4401.

        Its answers go on in the hub and are saved as usual; only this socket's reading stops.
        """
        task = asyncio.create_task(self._close(CREDENTIAL_ENDED, "your credentials are no longer valid"))
        self.pumps.add(task)
        task.add_done_callback(self.pumps.discard)

    async def _close(self, code: int, reason: str) -> None:
        try:
            await self._send({"type": "websocket.close", "code": code, "reason": reason})
        except (RuntimeError, OSError):
            pass  # closed already

    async def refuse(self, exc: RelayError) -> None:
        """Answer the handshake with an HTTP error and a JSON body instead of opening the socket."""
        headers = [(b"content-type", b"application/json")]
        if exc.retry_after:
            headers.append((b"retry-after", str(int(exc.retry_after + 0.999)).encode()))
        await self._send({"type": "websocket.http.response.start", "status": exc.status, "headers": headers})
        await self._send({"type": "websocket.http.response.body", "body": orjson.dumps(exc.to_json())})

    async def run(self) -> None:
        if (await self._receive())["type"] != "websocket.connect":
            return
        limits = self.relay.limits
        try:
            self.user = await self.relay.admit(self.scope)
            limits.take_connection(self.user)
        except RelayError as exc:
            await self.refuse(exc)
            return
        except Exception:
            log.exception("WebSocket handshake failed")
            await self.refuse(RelayError("internal server error"))
            return
        try:
            await self._serve()
        finally:
            limits.give_connection(self.user)

    async def _serve(self) -> None:
        await self._send({"type": "websocket.accept"})
        hub = self.relay.hub
        hub.keepalive_targets.add(self)
        auth = self.relay.auth
        auth.watch(self)  # a revoke, a sign-out or an expired session closes the socket (credential_ended)
        try:
            while True:
                message = await self._receive()
                if message["type"] == "websocket.disconnect":
                    return
                raw = message.get("text")
                if raw is None:
                    await self.send(error_frame(RelayError("frames must be JSON text", code="invalid_request")))
                    continue
                await self.handle(raw)
        except OSError:
            return
        except Exception:
            # No exception takes a socket down without a close code: 1011 says the server failed.
            log.exception("WebSocket connection failed")
            with contextlib.suppress(RuntimeError, OSError):
                await self._send({"type": "websocket.close", "code": 1011})
        finally:
            hub.keepalive_targets.discard(self)
            auth.unwatch(self)
            # The generation goes on in the hub; only this socket's readers stop.
            for pump in list(self.pumps):
                pump.cancel()
            if self.relay.settings.cancel_on_disconnect:
                for stream_id in self.started:
                    if stream_id in hub.streams and not hub.streams[stream_id].finished:
                        hub.cancel(stream_id)

    async def handle(self, raw: str) -> None:
        request_id: str | None = None
        try:
            command = parse_frame(raw, self.relay.settings.max_message_bytes)
            if isinstance(command, Ping):
                await self.send('{"event":"pong"}')
                return
            self.relay.limits.request(self.user)
            if isinstance(command, SendMessage):
                request_id = command.request_id
                self.check_room()
                stream = await self.relay.start(command, self.user)
                hub = self.relay.hub
                self.started = [sid for sid in self.started if sid in hub.streams and not hub.streams[sid].finished]
                self.started.append(stream.id)
                self.pump(self.relay.hub.subscribe(stream.id, 0), request_id)
            elif isinstance(command, Resume):
                self.check_room()
                self.pump(await resume(self.relay, command.stream_id, command.last_event_id, user=self.user,
                                       transport="websocket"), None)
            elif isinstance(command, Cancel):
                await self.relay.cancel(command.stream_id, self.user)
        except RelayError as exc:
            await self.send(error_frame(exc, request_id=request_id or request_id_of(raw)))
        except OSError:
            raise  # the socket itself is gone
        except Exception:
            # A bug, not the client's fault: this frame gets an error, and the socket stays open.
            log.exception("WebSocket frame failed")
            await self.send(error_frame(RelayError("internal server error"),
                                        request_id=request_id or request_id_of(raw)))

    def check_room(self) -> None:
        limit = self.relay.settings.ws_max_streams
        if self.following >= limit:
            raise LimitError(f"this socket already follows {limit} streams; wait for one to end or open another",
                             details={"limit": "streams_per_socket"})

    def pump(self, subscriber: Subscriber, request_id: str | None) -> None:
        task = asyncio.create_task(self._pump(subscriber, request_id))
        self.pumps.add(task)
        self.following += 1
        task.add_done_callback(self._pump_done)

    def _pump_done(self, task: asyncio.Task[None]) -> None:
        self.pumps.discard(task)
        self.following -= 1

    async def _pump(self, subscriber: Subscriber, request_id: str | None) -> None:
        stream_id = subscriber.stream.id
        sid = orjson.dumps(stream_id)
        start_tail = b',"requestId":%b}' % orjson.dumps(request_id) if request_id else b"}"

        def frame(event_id: int, name: str, data: bytes) -> bytes:
            self.active = True
            raw = EVENT_NAMES.get(name) or name.encode()
            return b'{"event":"%b","streamId":%b,"id":%d,"data":%b%b' % (
                raw, sid, event_id, data, start_tail if name == "start" else b"}")

        async def send_frames(frames: list[bytes]) -> None:
            for payload in frames:
                await self._send({"type": "websocket.send", "text": payload.decode()})

        writer = socket_writer(self.scope) or SendWriter(send_frames)
        metrics = self.relay.metrics
        metrics.readers["websocket"].inc()
        try:
            last = await subscriber.serve(writer, frame)
            if isinstance(writer, SendWriter):
                last = writer.take() + last
            if last:
                if not writer.can_write():
                    await writer.drain()
                writer.write_many(last)
                if isinstance(writer, SendWriter):
                    await writer.drain()
        except LogLostError as exc:
            await self.send(error_frame(GoneError(str(exc)), stream_id=stream_id))
        except SubscriberDropped as exc:
            metrics.dropped.labels("websocket").inc()
            await self.send(error_frame(
                RelayError(f"this connection fell behind ({exc}); resume from your last event id",
                           code="slow_consumer", retryable=True), stream_id=stream_id))
        except (RuntimeError, OSError):
            pass  # the socket closed; the reader loop ends the connection
        finally:
            metrics.readers["websocket"].dec()


class WebSocketEndpoint:
    """Bare ASGI: no per-frame wrapper between a stream's events and the socket."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await Connection(scope["app"].state.relay, scope, receive, send).run()
