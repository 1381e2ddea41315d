"""WebSocket transport: many streams over one socket, each frame one event.

Client frames: {"type": "message" | "regenerate" | "continue" | "resume" | "cancel" | "ping" | "auth", ...}.
Server frames: {"event", "streamId", "id", "data"} (+ "requestId" on the start of a
stream the client asked for with one). Thin: parsing is in protocol/frames.py.
A socket whose token or session stops working while it is open is closed with 4401.

A handshake without credentials on a server that needs them opens a socket that must
send `{"type": "auth", "token"}` within ws_auth_timeout_seconds; a socket of a JWT lives
until its `exp` (a later `auth` frame of the same user extends it), then gets a
`token_expired` error and 4401. Its running answers go on and are saved either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import orjson
from starlette.types import Receive, Scope, Send

from ..auth import ANONYMOUS, User, header, session_secret
from ..core import Relay, resume
from ..errors import (
    BadRequestError,
    GoneError,
    LimitError,
    RelayError,
    TokenExpiredError,
    UnauthorizedError,
)
from ..events import encode_data, error_event, kept_json
from ..hub import LogLostError, Subscriber, SubscriberDropped
from ..protocol.frames import (
    Auth,
    Cancel,
    Continue,
    Ping,
    Regenerate,
    Resume,
    SendMessage,
    frame_command,
    parse_json_object,
    request_id_of,
)
from .writers import SendWriter, socket_writer

log = logging.getLogger("deltarelay.ws")

AUTHENTICATE_FIRST = 'authenticate first: send {"type": "auth", "token": "<jwt>"}'


# The relay's event names as bytes (names are JSON-safe: they come from events.py, never from input).
EVENT_NAMES = {name: name.encode() for name in ("start", "chunk", "thinking", "cost", "done", "error")}

# The close code for a socket whose credentials stopped working (4000-4999 are the application's; 401 is HTTP's).
CREDENTIAL_ENDED = 4401


def error_frame(exc: RelayError, stream_id: str | None = None, request_id: str | None = None) -> str:
    data = encode_data(error_event(exc)).decode()
    tail = f',"requestId":{orjson.dumps(request_id).decode()}' if request_id else ""
    sid = orjson.dumps(stream_id).decode()
    return f'{{"event":"error","streamId":{sid},"id":null,"data":{data}{tail}}}'


def authenticated_frame(user: User, expires_at: int | None) -> str:
    """The answer to a good `auth` frame, which a client waits for before it sends anything else."""
    data = orjson.dumps({"userId": user.id, "name": user.name, "expiresAt": expires_at}).decode()
    return f'{{"event":"authenticated","streamId":null,"id":null,"data":{data}}}'


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
        self.authenticated = False
        self.holds_connection = False  # counted against the user's connections (once authenticated)
        self.expires_at: int | None = None  # the `exp` of the JWT this socket lives on
        self.expired = False  # closed for its token's expiry: its answers must go on whatever the settings say
        self._timer: asyncio.Task[None] | None = None  # the auth deadline, then the token's expiry

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

    def _without_credentials(self) -> bool:
        """The handshake carried no token, cookie or proxy header, on a server that takes JWTs: the socket may
        still send `auth` (browsers cannot set a socket's headers). Elsewhere such a handshake stays a 401."""
        if not self.relay.auth.tokens.configured:
            return False
        headers = self.scope["headers"]
        proxy = self.relay.auth.proxy
        return (header(headers, b"authorization") is None and session_secret(headers) is None
                and (proxy is None or header(headers, proxy.user_header) is None))

    async def run(self) -> None:
        if (await self._receive())["type"] != "websocket.connect":
            return
        limits = self.relay.limits
        try:
            try:
                self.user, self.expires_at = await self.relay.auth.credential(self.scope)
            except UnauthorizedError:
                if not self._without_credentials():
                    raise
            else:
                limits.request(self.user)
                limits.take_connection(self.user)
                self.authenticated = self.holds_connection = True
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
            if self.holds_connection:
                limits.give_connection(self.user)

    # --- authentication on the socket: the `auth` frame, its deadline and the token's expiry ---

    def _set_timer(self, delay: float, then: str) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.create_task(self._at(delay, then))

    async def _at(self, delay: float, then: str) -> None:
        await asyncio.sleep(max(delay, 0.0))
        if then == "deadline":
            if not self.authenticated:
                await self._close(CREDENTIAL_ENDED, "authenticate with an auth frame first")
            return
        self.expired = True
        with contextlib.suppress(RuntimeError, OSError):
            await self.send(error_frame(TokenExpiredError("your token has expired; send a new one in an auth"
                                                          " frame on a new socket, then resume")))
        await self._close(CREDENTIAL_ENDED, "token expired")

    def _live_until(self, expires_at: int | None) -> None:
        """This socket's credential: a JWT lives until its exp; anything else is checked again while open."""
        self.expires_at = expires_at
        auth = self.relay.auth
        if expires_at is None:
            if self._timer is not None:
                self._timer.cancel()
            auth.watch(self)  # a revoke, a sign-out or an expired session closes the socket (credential_ended)
        else:
            auth.unwatch(self)
            self._set_timer(expires_at - time.time(), "expiry")

    async def authenticate(self, command: Auth) -> None:
        """An `auth` frame: the first authenticates the socket; a later one of the same user extends it."""
        try:
            user, expires_at = await self.relay.auth.token_user(command.token)
        except UnauthorizedError as exc:
            await self.send(error_frame(exc))
            if not self.authenticated:
                await self._close(CREDENTIAL_ENDED, "that token is not valid")
            return  # an open socket keeps its current token until that one's exp
        if self.authenticated and user.id != self.user.id:
            log.info("WebSocket auth frame of another user: closing the socket")
            await self.send(error_frame(UnauthorizedError("this socket belongs to another user")))
            await self._close(CREDENTIAL_ENDED, "another user")
            return
        if not self.authenticated:
            try:
                self.relay.limits.take_connection(user)
            except LimitError as exc:
                await self.send(error_frame(exc))
                await self._close(1008, "too many connections")
                return
            self.holds_connection = True
            self.authenticated = True
        self.user = user
        if expires_at is None:
            # An API token: rechecked while open like a handshake's, through the headers it would have come in.
            headers = [(k, v) for k, v in self.scope["headers"] if k != b"authorization"]
            self.scope = {**self.scope, "headers": [*headers, (b"authorization", f"Bearer {command.token}".encode())]}
        self._live_until(expires_at)
        await self.send(authenticated_frame(user, expires_at))

    async def _serve(self) -> None:
        await self._send({"type": "websocket.accept"})
        hub = self.relay.hub
        hub.keepalive_targets.add(self)
        auth = self.relay.auth
        if self.authenticated:
            self._live_until(self.expires_at)
        else:
            self._set_timer(self.relay.settings.ws_auth_timeout_seconds, "deadline")
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
            if self._timer is not None:
                self._timer.cancel()
            # The generation goes on in the hub; only this socket's readers stop.
            for pump in list(self.pumps):
                pump.cancel()
            if self.relay.settings.cancel_on_disconnect and not self.expired:
                for stream_id in self.started:
                    if stream_id in hub.streams and not hub.streams[stream_id].finished:
                        hub.cancel(stream_id)

    async def handle(self, raw: str) -> None:
        request_id: str | None = None
        body: dict[str, Any] | None = None  # the frame parsed once: for its command, and for its error's routing
        limit = self.relay.settings.ws_max_frame_bytes
        if len(raw) * 4 > limit and len(raw.encode("utf-8", "surrogatepass")) > limit and not _has_inline_files(raw):
            # The protocol admits bigger frames only for inline attachments' base64 (see server/cli.py); any
            # other is closed as the protocol closes a frame over both limits.
            await self._close(1009, "frame too big")
            return
        try:
            try:
                body = parse_json_object(raw)
            except BadRequestError:
                if not self.authenticated:
                    raise UnauthorizedError(AUTHENTICATE_FIRST) from None
                raise
            if not self.authenticated and body.get("type") != "auth":
                raise UnauthorizedError(AUTHENTICATE_FIRST)
            command = frame_command(body, self.relay.settings.max_message_bytes,
                                    self.relay.settings.max_attachment_bytes)
            if isinstance(command, Auth):
                await self.authenticate(command)
                return
            if isinstance(command, Ping):
                await self.send('{"event":"pong"}')
                return
            self.relay.limits.request(self.user)
            if isinstance(command, SendMessage | Regenerate | Continue):
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
            await self.send(error_frame(exc, request_id=request_id or request_id_of(body)))
        except OSError:
            raise  # the socket itself is gone
        except Exception:
            # A bug, not the client's fault: this frame gets an error, and the socket stays open.
            log.exception("WebSocket frame failed")
            await self.send(error_frame(RelayError("internal server error"),
                                        request_id=request_id or request_id_of(body)))

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
        sid = kept_json(stream_id)  # both live as long as the pump
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


def _has_inline_files(raw: str) -> bool:
    """Whether a frame is a JSON object with a non-empty `attachments` (the one kind of frame that may be
    bigger than RELAY_WS_MAX_FRAME_BYTES)."""
    try:
        body = parse_json_object(raw)
    except BadRequestError:
        return False
    return bool(body.get("attachments"))
