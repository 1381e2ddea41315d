"""WebSocket transport: many streams over one socket, each frame one event.

Client frames: {"type": "message" | "resume" | "cancel" | "ping", ...}.
Server frames: {"event", "streamId", "id", "data"} (+ "requestId" on the start of a
stream the client asked for with one). Thin: parsing is in protocol/frames.py.
"""

from __future__ import annotations

import asyncio
import logging

import orjson
from starlette.websockets import WebSocket, WebSocketDisconnect

from ..core import Relay
from ..errors import RelayError
from ..events import Error, encode_data
from ..hub import Subscriber, SubscriberDropped
from ..protocol.frames import Cancel, Ping, Resume, SendMessage, parse_frame, request_id_of

log = logging.getLogger("deltarelay.ws")


def error_frame(exc: RelayError, stream_id: str | None = None, request_id: str | None = None) -> str:
    data = encode_data(Error(exc.code, exc.message, exc.retryable, exc.retry_after, exc.message_id)).decode()
    tail = f',"requestId":{orjson.dumps(request_id).decode()}' if request_id else ""
    sid = orjson.dumps(stream_id).decode()
    return f'{{"event":"error","streamId":{sid},"id":null,"data":{data}{tail}}}'


class Connection:
    """One client socket: reads commands, pumps each subscribed stream's events into it."""

    def __init__(self, websocket: WebSocket, relay: Relay) -> None:
        self.websocket = websocket
        self.relay = relay
        self.pumps: set[asyncio.Task[None]] = set()
        self.started: list[str] = []  # streams this socket asked for
        self.active = True
        self._send_lock = asyncio.Lock()

    async def send(self, text: str) -> None:
        self.active = True
        async with self._send_lock:
            await self.websocket.send_text(text)

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
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass

    async def run(self) -> None:
        await self.websocket.accept()
        hub = self.relay.hub
        hub.keepalive_targets.add(self)
        try:
            while True:
                message = await self.websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                raw = message.get("text")
                if raw is None:
                    await self.send(error_frame(RelayError("frames must be JSON text", code="invalid_request")))
                    continue
                await self.handle(raw)
        except WebSocketDisconnect:
            return
        finally:
            hub.keepalive_targets.discard(self)
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
            if isinstance(command, SendMessage):
                request_id = command.request_id
                stream = await self.relay.start(command)
                self.started.append(stream.id)
                self.pump(self.relay.hub.subscribe(stream.id, 0), request_id)
            elif isinstance(command, Resume):
                self.pump(self.relay.hub.subscribe(command.stream_id, command.last_event_id), None)
            elif isinstance(command, Cancel):
                self.relay.hub.cancel(command.stream_id)
            elif isinstance(command, Ping):
                await self.send('{"event":"pong"}')
        except RelayError as exc:
            await self.send(error_frame(exc, request_id=request_id or request_id_of(raw)))

    def pump(self, subscriber: Subscriber, request_id: str | None) -> None:
        task = asyncio.create_task(self._pump(subscriber, request_id))
        self.pumps.add(task)
        task.add_done_callback(self.pumps.discard)

    async def _pump(self, subscriber: Subscriber, request_id: str | None) -> None:
        stream_id = subscriber.stream.id
        head = f'{{"event":"%s","streamId":"{stream_id}","id":%d,"data":'
        start_tail = f',"requestId":{orjson.dumps(request_id).decode()}}}' if request_id else "}"
        try:
            async for batch in subscriber.batches():
                for event_id, name, data in batch:
                    tail = start_tail if name == "start" else "}"
                    await self.send(head % (name, event_id) + data + tail)
        except SubscriberDropped as exc:
            await self.send(error_frame(
                RelayError(f"this connection fell behind ({exc}); resume from your last event id",
                           code="slow_consumer", retryable=True), stream_id=stream_id))
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass  # the socket closed; the reader loop ends the connection


async def websocket_endpoint(websocket: WebSocket) -> None:
    await Connection(websocket, websocket.app.state.relay).run()
