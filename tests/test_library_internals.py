"""The attributes of uvicorn's and websockets' classes that the relay's protocols use and that are not public API.

pyproject admits only the uvicorn and websockets releases the suite ran on (an upper bound on each). When a new
release is tried, these tests say by name which attribute it lacks, before any end-to-end test fails obscurely.
Each list mirrors what `server/transports/ws_protocol.py` and `server/transports/http_protocol.py` touch.
"""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
import websockets
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState
from websockets.protocol import Protocol, State

from server.transports.http_protocol import RelayHttpProtocol
from server.transports.ws_protocol import relay_websocket_protocol

# (what, attribute): read or replaced on an instance once its request head has been handled.
WEBSOCKET_PROTOCOL_ATTRIBUTES = (
    "conn", "logger", "queue", "writable", "scope", "loop", "transport", "close_sent", "disconnected",
    "handshake_complete", "request", "response",
)
WEBSOCKET_PROTOCOL_METHODS = ("handle_connect", "connection_lost", "send")
SANSIO_CONNECTION_ATTRIBUTES = ("reader", "parser", "logger", "state", "extensions")
SANSIO_CONNECTION_METHODS = ("send_text", "data_to_send")
HTTP_PROTOCOL_ATTRIBUTES = ("cycle", "scope", "loop")
HTTP_PROTOCOL_METHODS = ("on_headers_complete",)
REQUEST_CYCLE_ATTRIBUTES = (
    "scope", "transport", "response_started", "response_complete", "chunked_encoding", "disconnected", "flow",
)


class RecordingTransport(asyncio.Transport):
    """A transport that keeps what the protocol writes: enough for a protocol to take a request head."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


async def idle_app(scope: Any, receive: Any, send: Any) -> None:
    await asyncio.Event().wait()  # never answers: the test reads the protocol's state after the head


def loaded_config(**kwargs: Any) -> uvicorn.Config:
    config = uvicorn.Config(idle_app, lifespan="off", log_config=None, **kwargs)
    config.load()
    return config


def missing(obj: object, names: tuple[str, ...]) -> list[str]:
    return [f"{type(obj).__module__}.{type(obj).__qualname__}.{name}" for name in names if not hasattr(obj, name)]


def test_the_installed_versions_are_the_ones_pyproject_admits() -> None:
    uvicorn_version = tuple(int(part) for part in uvicorn.__version__.split(".")[:3])
    websockets_major = int(websockets.__version__.split(".")[0])
    assert (0, 52, 1) <= uvicorn_version < (0, 55), uvicorn.__version__
    assert 14 <= websockets_major < 18  # 14.2 at the least (pyproject), websockets.__version__


async def test_uvicorn_websocket_protocol_has_every_attribute_the_relay_uses() -> None:
    loop = asyncio.get_running_loop()
    config = loaded_config(ws="websockets-sansio")
    protocol = relay_websocket_protocol(quiet=True)(config, ServerState(), {}, loop)
    assert isinstance(protocol, WebSocketsSansIOProtocol)
    transport = RecordingTransport()
    protocol.connection_made(transport)
    protocol.data_received(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    await asyncio.sleep(0)  # the app's task starts
    try:
        assert missing(protocol, WEBSOCKET_PROTOCOL_ATTRIBUTES + WEBSOCKET_PROTOCOL_METHODS) == []
        assert missing(protocol.conn, SANSIO_CONNECTION_ATTRIBUTES + SANSIO_CONNECTION_METHODS) == []
        assert hasattr(protocol.conn.reader, "buffer"), "websockets StreamReader.buffer"
        assert callable(getattr(Protocol, "parse", None)), "websockets.protocol.Protocol.parse"
        assert protocol.conn.state in set(State)
        assert "extensions" in protocol.scope, "uvicorn WebSocket scope['extensions']"
    finally:
        protocol.connection_lost(None)
        for task in list(protocol.tasks):
            task.cancel()


async def test_uvicorn_http_protocol_and_request_cycle_have_every_attribute_the_relay_uses() -> None:
    loop = asyncio.get_running_loop()
    config = loaded_config(http="httptools")
    protocol = RelayHttpProtocol(config, ServerState(), {}, loop)
    assert isinstance(protocol, HttpToolsProtocol)
    protocol.connection_made(RecordingTransport())
    protocol.data_received(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    try:
        assert missing(protocol, HTTP_PROTOCOL_ATTRIBUTES + HTTP_PROTOCOL_METHODS) == []
        cycle = protocol.cycle
        assert cycle is not None, "uvicorn HttpToolsProtocol.cycle is set once a request head is read"
        assert missing(cycle, REQUEST_CYCLE_ATTRIBUTES) == []
        assert hasattr(cycle.flow, "write_paused"), "uvicorn FlowControl.write_paused"
    finally:
        protocol.connection_lost(None)
        for task in list(protocol.tasks):
            task.cancel()

