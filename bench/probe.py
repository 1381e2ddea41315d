"""What one chunk costs between the hub and the client's socket, counted rather than timed.

`python -m bench.probe` serves one stream to one reader over loopback, on uvicorn with the relay's own
protocols, once over SSE and once over the WebSocket, and appends chunks to the stream from the probe (no
upstream). A profile hook counts, per chunk, in the relay's code and the server's (server/, uvicorn/,
starlette/, websockets/; never the probe's client):

- `resumptions`: coroutine and async-generator frames entered or resumed (each is a task step or a hop
  through an `async for`), and of them `agen`, the async-generator ones;
- `copies`: calls of the builtins that make a new buffer from a chunk's bytes or text (str.encode,
  bytes.decode, bytes/str join, bytes(), bytearray extension); f-strings and % formatting make copies too
  without a call the hook sees, so those are written beside the figures by reading the code;
- `writes`: transport.write calls.

Three cases: `live`, the reader keeps up and each chunk is appended in its own turn of the loop; `burst`, every
chunk is appended in one turn (one upstream read holding many events); `stalled`, chunks of 2 KB, one a turn,
while the client reads nothing (the server's socket pauses), then the client reads them all.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import time
from collections import Counter
from types import FrameType, SimpleNamespace
from typing import Any

import uvicorn

from server.events import Chunk, Done, Start
from server.hub import StreamHub
from server.metrics import Metrics
from server.transports.http_protocol import ConnectionGuard, relay_http_protocol
from server.transports.sse import EventStreamResponse
from server.transports.websocket import Connection
from server.transports.ws_protocol import relay_websocket_protocol

CO_COROUTINE, CO_ASYNC_GENERATOR = 0x80, 0x200
COUNTED = ("/server/", "/uvicorn/", "/starlette/", "/websockets/")
COPIES = {"encode", "decode", "join", "bytes", "extend", "__iadd__"}


class Probe:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.on = False

    def hook(self, frame: FrameType, event: str, arg: Any) -> None:
        if not self.on:
            return
        if event == "call":
            code = frame.f_code
            if code.co_name == "write" and "asyncio" in code.co_filename and "events" in code.co_filename:
                self.counts["writes"] += 1
                return
            if code.co_flags & (CO_COROUTINE | CO_ASYNC_GENERATOR) and any(p in code.co_filename for p in COUNTED):
                self.counts["resumptions"] += 1
                if code.co_flags & CO_ASYNC_GENERATOR:
                    self.counts["agen"] += 1
        elif event == "c_call":
            if not any(p in frame.f_code.co_filename for p in COUNTED):
                return
            name = getattr(arg, "__name__", "")
            if name in COPIES:
                self.counts["copies"] += 1
                self.counts[f"copies by {name}"] += 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def run_case(transport: str, case: str, chunks: int, timed: bool = False) -> dict[str, float]:
    hub = StreamHub(chunks + 30, retention_seconds=60, queue_limit=chunks + 30)
    hub.start()
    stream = hub.create("s1", "c1", "m1", "model")
    stream.append(Start("s1", "c1", "model"))
    subscribed = asyncio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        subscriber = hub.subscribe("s1", 1)
        subscribed.set()
        if scope["type"] == "http":
            await EventStreamResponse(subscriber)(scope, receive, send)
            return
        relay = SimpleNamespace(metrics=Metrics())
        connection = Connection(relay, scope, receive, send)  # type: ignore[arg-type]
        await receive()
        await send({"type": "websocket.accept"})
        await connection._pump(subscriber, None)
        await send({"type": "websocket.close", "code": 1000})

    port = free_port()
    guard = ConnectionGuard()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on",
                            http=relay_http_protocol(guard), ws=relay_websocket_protocol(True, guard),
                            ws_per_message_deflate=False)
    server = uvicorn.Server(config)
    serving = asyncio.ensure_future(server.serve())
    while not server.started:  # noqa: ASYNC110 (uvicorn offers no event for it)
        await asyncio.sleep(0.01)
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # small: a client that stops reading stalls soon
    client.setblocking(False)
    await asyncio.get_running_loop().sock_connect(client, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=client)
    if transport == "sse":
        writer.write(b"GET /s HTTP/1.1\r\nhost: x\r\n\r\n")
    else:
        writer.write(b"GET /ws HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
                     b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n")
    await subscribed.wait()
    received = bytearray()

    async def read_until(marker: bytes) -> None:
        while marker not in received:
            data = await reader.read(1 << 20)
            if not data:
                raise RuntimeError("closed before " + marker.decode())
            received.extend(data)

    await read_until(b"\r\n\r\n")
    for _ in range(20):  # warm up: each code path once before counting
        stream.append(Chunk("warm"))
        await asyncio.sleep(0)
    await read_until(b"warm" * 0 + b'"warm"}' if transport == "ws" else b'{"text":"warm"}\n\n')

    probe = Probe()
    if not timed:
        sys.setprofile(probe.hook)
    probe.on = True
    started = time.process_time()
    if case == "live":
        for n in range(chunks):
            stream.append(Chunk(f"chunk {n:06d} 🙂"))
            await asyncio.sleep(0)
            await asyncio.sleep(0)
    elif case == "burst":
        for n in range(chunks):
            stream.append(Chunk(f"chunk {n:06d} 🙂"))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    else:  # stalled: the client reads nothing until every chunk is appended, then everything
        for n in range(chunks):
            stream.append(Chunk(f"chunk {n:06d} 🙂 " + "x" * 2000))
            await asyncio.sleep(0)
    if case == "stalled":
        await read_until(f"chunk {chunks - 1:06d}".encode())
    cpu = time.process_time() - started
    probe.on = False
    sys.setprofile(None)
    stream.append(Done("c1", "m1", "end_turn"))
    await read_until(f"chunk {chunks - 1:06d}".encode())
    writer.close()
    server.should_exit = True
    await serving
    await hub.shutdown(0)
    if timed:
        return {"µs": cpu * 1e6 / chunks}
    return {key: value / chunks for key, value in probe.counts.items()}


async def main(chunks: int, timed: bool) -> None:
    if timed:
        print(f"CPU per chunk, µs, best of 5 runs of {chunks} chunks (python -m bench.probe --time)")
        for transport in ("sse", "ws"):
            for case in ("live", "burst"):
                best = min([(await run_case(transport, case, chunks, timed=True))["µs"] for _ in range(5)])
                print(f"{transport:10} {case:7} {best:8.2f}")
        return
    print(f"per chunk, over {chunks} chunks (python -m bench.probe --chunks {chunks})")
    print(f"{'transport':10} {'case':7} {'resumptions':>12} {'agen':>6} {'copies':>7} {'writes':>7}")
    for transport in ("sse", "ws"):
        for case in ("live", "burst", "stalled"):
            counts = await run_case(transport, case, chunks)
            detail = ", ".join(f"{key.removeprefix('copies by ')} {value:.2f}" for key, value in sorted(counts.items())
                               if key.startswith("copies by "))
            print(f"{transport:10} {case:7} {counts.get('resumptions', 0):12.2f} {counts.get('agen', 0):6.2f}"
                  f" {counts.get('copies', 0):7.2f} {counts.get('writes', 0):7.2f}   ({detail})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=400)
    parser.add_argument("--time", action="store_true", help="CPU time per chunk instead of counts (no hook)")
    args = parser.parse_args()
    asyncio.run(main(args.chunks, args.time))
