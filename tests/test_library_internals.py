"""The attributes of uvicorn's and websockets' classes that the relay's protocols use and that are not public API.

pyproject admits only the uvicorn and websockets releases the suite ran on (an upper bound on each). When a new
release is tried, these tests say by name which attribute it lacks, before any end-to-end test fails obscurely.
The lists are server/transports/internals.py's own tuples, so the module and this test cannot drift apart; and
http_protocol.py and ws_protocol.py may reach uvicorn and websockets only through internals.py.
"""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path
from typing import Any

import uvicorn
import websockets
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState
from websockets.protocol import Protocol, State

from server.transports import internals
from server.transports.http_protocol import RelayHttpProtocol
from server.transports.ws_protocol import relay_websocket_protocol

TRANSPORTS = Path(internals.__file__).parent
LIBRARIES = ("uvicorn", "websockets", "httptools")


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
    """The qualified names of those of `names` that `obj` lacks (a class's own name if `obj` is a class)."""
    where = obj if isinstance(obj, type) else type(obj)
    return [f"{where.__module__}.{where.__qualname__}.{name}" for name in names if not hasattr(obj, name)]


def library_imports(path: Path) -> list[str]:
    """The modules of uvicorn, websockets or httptools that the module at `path` imports."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
        found += [name for name in names if name.split(".")[0] in LIBRARIES]
    return found


def test_only_internals_imports_uvicorn_or_websockets_among_the_protocol_modules() -> None:
    """Mutation: `from uvicorn.protocols.http.httptools_impl import RequestResponseCycle` in http_protocol.py
    (or websockets' State in ws_protocol.py) fails it, naming the module and the import."""
    assert library_imports(TRANSPORTS / "internals.py"), "the scan finds internals' own imports"
    for name in ("http_protocol.py", "ws_protocol.py"):
        assert library_imports(TRANSPORTS / name) == [], f"{name} imports uvicorn/websockets outside internals.py"


def test_the_module_docstring_names_every_attribute_it_lists() -> None:
    """Mutation: a name added to a tuple in internals.py but not to its docstring fails it, naming it."""
    listed = [name for tuple_name in dir(internals) if tuple_name.endswith(("_ATTRIBUTES", "_METHODS"))
              for name in getattr(internals, tuple_name)]
    assert len(listed) > 40
    doc = internals.__doc__ or ""
    assert [name for name in listed if f"`{name}" not in doc] == []


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
        assert missing(protocol, internals.WEBSOCKET_PROTOCOL_ATTRIBUTES) == []
        # The methods on uvicorn's class itself: the relay's subclass defines some of them.
        assert missing(WebSocketsSansIOProtocol, internals.WEBSOCKET_PROTOCOL_METHODS) == []
        # What the relay replaces, on uvicorn's own instance (the relay's always has them).
        stock = WebSocketsSansIOProtocol(config, ServerState(), {}, loop)
        assert missing(stock, ("conn", "logger", "queue", "writable")) == []
        conn_names = internals.SANSIO_CONNECTION_ATTRIBUTES + internals.SANSIO_CONNECTION_METHODS
        assert missing(protocol.conn, conn_names) == []
        assert missing(protocol.conn.reader, internals.STREAM_READER_ATTRIBUTES) == []
        assert missing(Protocol, internals.PROTOCOL_CLASS_METHODS) == []
        assert callable(Protocol.parse)
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
        assert missing(protocol, internals.HTTP_PROTOCOL_ATTRIBUTES) == []
        # The methods on uvicorn's class itself: the relay's subclass defines some of them.
        assert missing(HttpToolsProtocol, internals.HTTP_PROTOCOL_METHODS) == []
        cycle = protocol.cycle
        assert cycle is not None, "uvicorn HttpToolsProtocol.cycle is set once a request head is read"
        assert missing(cycle, internals.REQUEST_CYCLE_ATTRIBUTES) == []
        assert missing(cycle.flow, internals.FLOW_CONTROL_ATTRIBUTES + internals.FLOW_CONTROL_METHODS) == []
        assert asyncio.iscoroutinefunction(cycle.flow.drain), "uvicorn FlowControl.drain()"
    finally:
        protocol.connection_lost(None)
        for task in list(protocol.tasks):
            task.cancel()

