"""KB held per idle WebSocket: the relay's WebSocket protocol against uvicorn's stock websockets-sansio one.

    .venv/bin/python -m bench.idle_socket_memory [--sockets 300] [--rounds 3]

Each protocol is served by its own child process, under tracemalloc, with the same ASGI app: accept, then wait
for a message that never comes. The parent opens `--sockets` sockets on loopback (raw handshakes: no client
code in the server's process), and the server reports what tracemalloc holds (after a gc) before and after;
the difference over the count is the figure. Only the protocol class differs (uvicorn's `ws=` setting): the
relay's replaces uvicorn's receive asyncio.Queue and writable asyncio.Event (server/transports/internals.py) and
lets go of the handshake's request and response and of websockets' handshake parser. Both are quiet (no INFO
line per socket). The median of `--rounds` rounds is printed, per protocol, with the difference; `--breakdown`
adds the relay's protocol with each of those undone in turn (what each one saves is its row minus "relay").
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import logging
import os
import socket
import statistics
import subprocess
import sys
import time
import tracemalloc
from typing import Any

import orjson


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def idle_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """WebSocket: accept and wait. HTTP GET /memory: the bytes tracemalloc holds now, after a gc."""
    if scope["type"] == "websocket":
        await receive()  # connect
        await send({"type": "websocket.accept"})
        while (await receive())["type"] != "websocket.disconnect":
            pass
        return
    if scope["type"] == "http":
        gc.collect()
        body = orjson.dumps({"traced": tracemalloc.get_traced_memory()[0]})
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})


def serve(protocol: str, port: int) -> None:
    """The child: uvicorn with `protocol` ("relay" or "uvicorn") for WebSockets, until killed."""
    tracemalloc.start()
    import uvicorn

    from server.transports.ws_protocol import relay_websocket_protocol

    ws: Any
    if protocol.startswith("relay"):
        ws = undo(relay_websocket_protocol(quiet=True), protocol.removeprefix("relay").removeprefix("-"))
    else:
        from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

        quiet_log = logging.getLogger("bench.websockets")
        quiet_log.setLevel(logging.WARNING)

        class QuietStock(WebSocketsSansIOProtocol):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                self.logger = self.conn.logger = quiet_log

        ws = QuietStock
    uvicorn.run(idle_app, host="127.0.0.1", port=port, ws=ws, http="httptools", lifespan="off",
                log_level="warning", access_log=False, ws_ping_interval=None, backlog=2048)


# --breakdown: the relay's protocol with one of its replacements undone, each named by what it keeps.
UNDONE = ("stock-queue", "stock-event", "keep-handshake", "keep-handshake-parser")


def undo(relay: Any, what: str) -> Any:
    """`relay`, the relay's protocol class, with the replacement `what` (one of UNDONE, or "") undone."""
    if not what:
        return relay

    class Undone(relay):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if what == "stock-queue":
                self.queue = asyncio.Queue()
            elif what == "stock-event":
                self.writable = asyncio.Event()
                self.writable.set()

        def after_send(self, kind: str) -> bool:
            if what != "keep-handshake":
                return bool(super().after_send(kind))
            request, response = self.request, self.response
            answered = bool(super().after_send(kind))
            self.request, self.response = request, response
            return answered

        def start_frames(self) -> None:
            if what != "keep-handshake-parser":
                super().start_frames()

    return Undone


async def traced(port: int) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /memory HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    response = await reader.read()
    writer.close()
    value: int = orjson.loads(response.split(b"\r\n\r\n", 1)[1])["traced"]
    return value


async def open_socket(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16))
    writer.write(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % key)
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(f"handshake refused: {head[:40]!r}")
    return reader, writer


async def measure(port: int, sockets: int) -> float:
    """KB per idle socket, on a server already listening on `port`."""
    warm = [await open_socket(port) for _ in range(5)]  # first-use allocations (codecs, caches) out of the way
    await asyncio.sleep(0.2)
    before = await traced(port)
    opened = []
    for start in range(0, sockets, 50):
        opened += await asyncio.gather(*(open_socket(port) for _ in range(min(50, sockets - start))))
    await asyncio.sleep(0.5)
    after = await traced(port)
    for _, writer in warm + opened:
        writer.close()
    return (after - before) / sockets / 1024


def run(protocol: str, sockets: int) -> float:
    port = free_port()
    child = subprocess.Popen([sys.executable, "-m", "bench.idle_socket_memory", "--serve", protocol,
                              "--port", str(port)])
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.1)
        return asyncio.run(measure(port, sockets))
    finally:
        child.terminate()
        child.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sockets", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--breakdown", action="store_true",
                        help="also the relay's protocol with each replacement undone in turn")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return
    protocols = ["uvicorn", "relay"] + ([f"relay-{what}" for what in UNDONE] if args.breakdown else [])
    figures = {protocol: statistics.median(run(protocol, args.sockets) for _ in range(args.rounds))
               for protocol in protocols}
    for protocol, kb in figures.items():
        print(f"{protocol:27} {kb:5.1f} KB per idle WebSocket ({args.sockets} sockets, median of {args.rounds})")
    print(f"{'saved':27} {figures['uvicorn'] - figures['relay']:5.1f} KB per idle WebSocket")


if __name__ == "__main__":
    main()
