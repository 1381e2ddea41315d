"""Load generator: open streams to one target, check every chunk, measure relay latency per chunk.

    python -m bench.loadgen SPEC.json RESULT.json

Runs in its own process, pinned by bench.run to the core the target does not use. Each text delta
carries "seq:send_time_ns " (the upstream's stamp), so latency = receive time - send time on one clock.

The per-chunk path is callbacks, not coroutines: SSE is a raw asyncio protocol with httptools parsing
the HTTP/1.1 response and a minimal event parser (every target's data lines are single-line JSON);
WebSocket opens with the websockets library's own sans-I/O client protocol (handshake, masking of what
the client sends), then reads the server's frames with a minimal frame parser (server frames are unmasked;
a fragmented, compressed or masked frame is handled or refused as RFC 6455 says). A Python HTTP client's
per-chunk cost (httpx: ~40 us) would make this process, not the relay, the bottleneck at 1,000 streams x
20 chunks/s while it shares a core with the upstream; websockets' generator-based frame reader cost this
process about twice the SSE path's CPU per chunk, so the WebSocket throughput figure measured the load
generator rather than the relay.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import resource
import sys
import time
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, cast

import httptools
import orjson
from websockets.client import ClientProtocol
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from .procstat import ProcSample, core_busy, core_times, reset_peak_rss, rss_kb, sample

HOST = "127.0.0.1"
MODEL = "claude-sonnet-4-5"


@dataclass
class Spec:
    """What to run; written by bench.run as JSON."""

    kind: str  # "streams" | "flat" | "idle_ws"
    target: str  # "direct" (the upstream itself) | "relay" | "seed" | "bare" | "bare-relay-protocol"
    transport: str  # "sse" | "ws"
    port: int
    streams: int = 0
    deltas: int = 0
    delay_ms: float = 0.0
    ramp_s: float = 0.0
    timeout_s: float = 60.0  # the whole run, after which every open stream counts as a timeout error
    concurrency: int = 50  # flat, idle_ws: streams (or handshakes) at once
    checkpoint_every: int = 2000  # flat: read the target's RSS after this many finished streams
    idle_sockets: int = 0
    ws_deflate: bool = True  # offer permessage-deflate, as browsers do
    warmup_streams: int = 0  # streams run (and not measured) before the measured phase
    warmup_deltas: int = 3  # bench.upstream answers a message starting "warmup" with 3 deltas at once
    target_pid: int = 0
    upstream_pid: int = 0
    # Several instances of the target (bench.run --instances): stream i goes to ports[i % len(ports)].
    ports: tuple[int, ...] = ()
    other_target_pids: tuple[int, ...] = ()  # their CPU is added to the target's; RSS is the first one's

    def port_for(self, index: int) -> int:
        return self.ports[index % len(self.ports)] if self.ports else self.port


# --- checking one stream -------------------------------------------------------------------------


class Run:
    """Everything measured in one run, shared by all its streams."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.latencies = array("q")  # ns, one per delta received
        self.first_chunk = array("q")  # ns from request start to first delta, one per stream that got one
        self.connected = array("q")  # ns from request start to connected (WebSocket: handshake done)
        self.open_sse: set[SSEClient] = set()  # responses the server has not ended yet
        self.sse_drained = asyncio.Event()
        self.errors: Counter[str] = Counter()
        self.error_examples: dict[str, str] = {}
        self.started = 0
        self.ok = 0
        self.inexact = 0
        self.deltas = 0
        self.active = 0
        self.max_active = 0
        self.first_start_ns = 0
        self.last_end_ns = 0
        self.measuring = True

    def fail(self, kind: str, detail: str) -> None:
        self.errors[kind] += 1
        self.error_examples.setdefault(kind, detail[:300])


class StreamCheck:
    """One stream's expected text: seqs 0..n-1 in order, each "seq:ns " exactly once."""

    __slots__ = ("run", "next_seq", "carry", "start_ns", "first_ns", "finished", "closer", "close_on_done")

    def __init__(self, run: Run) -> None:
        self.run = run
        self.next_seq = 0
        self.carry = ""
        self.start_ns = 0
        self.first_ns = 0
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closer: Callable[[], None] | None = None
        # SSE waits for the server to end the response (the seed port saves the reply after `done`);
        # a stream's own WebSocket closes at `done`.
        self.close_on_done = False

    def begin(self) -> None:
        run = self.run
        self.start_ns = time.time_ns()
        if not run.first_start_ns:
            run.first_start_ns = self.start_ns
        run.started += 1
        run.active += 1
        run.max_active = max(run.max_active, run.active)

    def text(self, text: str, now: int) -> None:
        if self.finished.done():
            return
        run = self.run
        if not self.first_ns:
            self.first_ns = now
            run.first_chunk.append(now - self.start_ns)
        # A relay may join or split deltas: parse whole "seq:ns " tokens across chunk boundaries.
        parts = (self.carry + text).split(" ")
        self.carry = parts.pop()
        latencies = run.latencies
        for part in parts:
            seq, _, stamp = part.partition(":")
            try:
                seq_number, sent = int(seq), int(stamp)
            except ValueError:
                self.end("text", f"malformed token {part[:40]!r}")
                return
            if seq_number != self.next_seq:
                self.end("text", f"expected seq {self.next_seq}, got {seq_number}")
                return
            self.next_seq += 1
            latencies.append(now - sent)
        run.deltas += len(parts)

    def done(self) -> None:
        if self.next_seq != self.run.expected or self.carry:
            self.end("text", f"done after {self.next_seq} of {self.run.expected} deltas (rest {self.carry[:20]!r})")
        else:
            self.end(None, "")

    def end(self, error: str | None, detail: str) -> None:
        if self.finished.done():
            return
        run = self.run
        run.active -= 1
        run.last_end_ns = time.time_ns()
        if error is None:
            run.ok += 1
        else:
            if error == "text":
                run.inexact += 1
            run.fail(error, detail)
        self.finished.set_result(None)
        if self.closer is not None and (error is not None or self.close_on_done):
            self.closer()


# --- SSE ----------------------------------------------------------------------------------------


def message_text(index: int) -> str:
    """Negative indexes are warm-up streams."""
    return f"warmup {-index}" if index < 0 else f"bench {index}"


def sse_request(target: str, port: int, index: int) -> bytes:
    if target == "direct":
        path = b"/v1/messages"
        body = orjson.dumps({"model": MODEL, "max_tokens": 1024, "stream": True,
                             "messages": [{"role": "user", "content": message_text(index)}]})
        extra = b"x-api-key: bench\r\nanthropic-version: 2023-06-01\r\n"
    else:
        path = b"/api/command-center/message"
        body = orjson.dumps({"message": message_text(index)})
        extra = b""
    return (b"POST " + path + b" HTTP/1.1\r\nhost: 127.0.0.1:" + str(port).encode()
            + b"\r\ncontent-type: application/json\r\naccept: text/event-stream\r\n" + extra
            + b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)


class SSEClient(asyncio.Protocol):
    """One POST whose response is an SSE stream, read as it arrives."""

    def __init__(self, check: StreamCheck, request: bytes, direct: bool) -> None:
        self.check = check
        self.request = request
        self.direct = direct
        self.parser = httptools.HttpResponseParser(self)
        self.buffer = b""
        self.event = b""
        self.now = 0
        self.status = 0
        self.transport: asyncio.Transport | None = None
        check.closer = self.close

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        self.transport.write(self.request)
        self.check.run.connected.append(time.time_ns() - self.check.start_ns)
        self.check.run.open_sse.add(self)
        self.check.run.sse_drained.clear()

    def data_received(self, data: bytes) -> None:
        self.now = time.time_ns()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.check.end("protocol", f"bad HTTP response: {exc}")

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        if self.status != 200:
            self.check.end("http_status", f"HTTP {self.status}: {body[:200]!r}")
            return
        data = self.buffer + body if self.buffer else body
        if b"\r" in data:  # CRLF line ends: every target here writes LF, but a CR must not break the parse
            data = data.replace(b"\r\n", b"\n")
        # Whole events only, a block each: every target writes `event:` before a single `data:` line, so two
        # finds per event instead of a Python step per line (the line loop cost this process as much CPU per
        # chunk as the relay's whole SSE path, and made it the bottleneck of the SSE throughput figure).
        blocks = data.split(b"\n\n")
        self.buffer = blocks.pop()
        for block in blocks:
            start = block.find(b"data: ")
            if start < 0:
                continue  # a comment (keepalive) or an event without data
            named = block.rfind(b"event: ", 0, start)
            self.event = block[named + 7:block.index(b"\n", named)] if named >= 0 else b""
            self.data(block[start + 6:])

    def data(self, data: bytes) -> None:
        event, check = self.event, self.check
        if self.direct:
            if event == b"content_block_delta":
                check.text(orjson.loads(data)["delta"]["text"], self.now)
            elif event == b"message_stop":
                check.done()
            elif event == b"error":
                check.end("error_event", data.decode(errors="replace"))
        elif event == b"chunk":
            check.text(orjson.loads(data)["text"], self.now)
        elif event == b"done":
            check.done()
        elif event == b"error":
            payload = orjson.loads(data)
            check.end(f"error_event:{payload.get('code')}", data.decode(errors="replace"))

    def on_message_complete(self) -> None:
        if self.status != 200:
            self.check.end("http_status", f"HTTP {self.status}")
        else:
            self.check.end("closed_early", "the response ended without done")
        self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        run = self.check.run
        run.open_sse.discard(self)
        if not run.open_sse:
            run.sse_drained.set()
        self.check.end("closed_early", f"connection lost ({exc!r})")


async def sse_stream(spec: Spec, run: Run, index: int) -> None:
    check = StreamCheck(run)
    check.begin()
    loop = asyncio.get_running_loop()
    port = spec.port_for(index)
    request = sse_request(spec.target, port, index)
    try:
        await loop.create_connection(lambda: SSEClient(check, request, spec.target == "direct"), HOST, port)
    except OSError as exc:
        check.end("connect", repr(exc))
    await check.finished


# --- WebSocket ----------------------------------------------------------------------------------


class WSClient(asyncio.Protocol):
    """One socket to the relay's /api/command-center/ws; runs one stream at a time on it."""

    def __init__(self, uri: str, deflate: bool) -> None:
        extensions = [ClientPerMessageDeflateFactory()] if deflate else None
        self.ws = ClientProtocol(parse_uri(uri), extensions=extensions, max_size=None)
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.check: StreamCheck | None = None
        self.transport: asyncio.Transport | None = None
        self.fragments: list[bytes] = []
        self.fast = False  # after the handshake: frames read by read_frames, not by websockets
        self.unread = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        self.ws.send_request(self.ws.connect())
        self.flush()

    def flush(self) -> None:
        assert self.transport is not None
        for data in self.ws.data_to_send():
            if data:
                self.transport.write(data)
            elif self.transport.can_write_eof():
                self.transport.write_eof()

    def send(self, frame: dict[str, Any], check: StreamCheck) -> None:
        self.check = check
        self.ws.send_text(orjson.dumps(frame))
        self.flush()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            try:
                self.ws.send_close(1000)
                self.flush()
            except Exception:  # noqa: BLE001 - already closing: just drop the connection
                pass
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        now = time.time_ns()
        try:
            if self.fast:
                self.read_frames(data, now)
                return
            self.ws.receive_data(data)
            self.events(now)
        except (KeyError, TypeError, ValueError) as exc:
            if self.check is not None:
                self.check.end("protocol", f"bad frame: {exc!r}")
        self.flush()

    def read_frames(self, data: bytes, now: int) -> None:
        """Every whole frame in what has arrived; the rest waits for more bytes."""
        buffer = self.unread + data if self.unread else data
        position, size = 0, len(buffer)
        while size - position >= 2:
            first, second = buffer[position], buffer[position + 1]
            if second & 0x80 or first & 0x70:
                raise ValueError("a server frame must be unmasked, with no reserved bits set")
            length, header = second & 0x7F, 2
            if length == 126:
                if size - position < 4:
                    break
                length, header = int.from_bytes(buffer[position + 2:position + 4]), 4
            elif length == 127:
                if size - position < 10:
                    break
                length, header = int.from_bytes(buffer[position + 2:position + 10]), 10
            end = position + header + length
            if end > size:
                break
            payload = buffer[position + header:end]
            position = end
            opcode = first & 0x0F
            if opcode in (1, 0):  # text, continuation
                if not first & 0x80:
                    self.fragments.append(payload)
                    continue
                if self.fragments:
                    payload = b"".join([*self.fragments, payload])
                    self.fragments.clear()
                self.frame(payload, now)
            elif opcode == 9:  # ping
                self.ws.send_pong(payload)
                self.flush()
            elif opcode == 8:
                self.fail("the server closed the socket")
            elif opcode != 10:
                raise ValueError(f"unexpected opcode {opcode}")
        self.unread = buffer[position:]

    def events(self, now: int) -> None:
        for event in self.ws.events_received():
            if isinstance(event, Response):
                if self.ws.handshake_exc is not None:
                    self.fail(f"handshake: {self.ws.handshake_exc!r}")
                elif not self.opened.done():
                    # Frames are read here from now on, unless compression was agreed (websockets inflates)
                    # or bytes after the handshake are already inside websockets' reader.
                    self.fast = not self.ws.extensions and not self.ws.reader.buffer
                    self.opened.set_result(None)
            elif isinstance(event, Frame):
                if event.opcode is Opcode.TEXT or event.opcode is Opcode.CONT:
                    if not event.fin:
                        self.fragments.append(bytes(event.data))
                        continue
                    payload = b"".join([*self.fragments, event.data]) if self.fragments else bytes(event.data)
                    self.fragments.clear()
                    self.frame(payload, now)
                elif event.opcode is Opcode.CLOSE:
                    self.fail("the server closed the socket")

    def frame(self, payload: bytes, now: int) -> None:
        check = self.check
        if check is None:
            return  # keepalive on an idle socket
        message = orjson.loads(payload)
        name = message.get("event")
        if name == "chunk":
            check.text(message["data"]["text"], now)
        elif name == "done":
            check.done()
        elif name == "error":
            check.end(f"error_event:{message['data'].get('code')}", payload.decode(errors="replace"))

    def fail(self, detail: str) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(detail))
        if self.check is not None:
            self.check.end("closed_early", detail)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(f"connection lost ({exc!r})")
        if not self.closed.done():
            self.closed.set_result(None)


async def ws_open(spec: Spec, path: str = "/api/command-center/ws", index: int = 0) -> WSClient:
    loop = asyncio.get_running_loop()
    port = spec.port_for(index)
    uri = f"ws://{HOST}:{port}{path}"
    _, client = await loop.create_connection(lambda: WSClient(uri, spec.ws_deflate), HOST, port)
    await client.opened
    return client


async def ws_stream(spec: Spec, run: Run, index: int, client: WSClient | None = None) -> None:
    """One stream; on its own new socket unless `client` is given (the socket is then kept)."""
    check = StreamCheck(run)
    check.begin()
    own = client is None
    try:
        if client is None:
            client = await ws_open(spec, index=index)
            run.connected.append(time.time_ns() - check.start_ns)
    except (OSError, ConnectionError) as exc:
        check.end("connect", repr(exc))
        return
    if own:
        check.closer = client.close
        check.close_on_done = True
    client.send({"type": "message", "message": message_text(index), "requestId": f"r{index}"}, check)
    await check.finished
    client.check = None


# --- workloads ----------------------------------------------------------------------------------


def percentile(values: list[int], p: float) -> float:
    """Nearest rank, in ms."""
    if not values:
        return math.nan
    return values[min(len(values) - 1, max(0, math.ceil(p * len(values)) - 1))] / 1e6


CDF_POINTS = [i / 100 for i in range(1, 100)] + [0.995, 0.999, 0.9995, 0.9999, 1.0]


def summarize(run: Run, spec: Spec) -> dict[str, Any]:
    latencies = sorted(run.latencies)
    first = sorted(run.first_chunk)
    connected = sorted(run.connected)
    wall = (run.last_end_ns - run.first_start_ns) / 1e9 if run.last_end_ns else math.nan
    return {
        "streams": run.started,
        "ok": run.ok,
        "errors": sum(run.errors.values()),
        "error_kinds": dict(run.errors),
        "error_examples": run.error_examples,
        "exact_text": run.inexact == 0 and run.ok == run.started,
        "inexact_streams": run.inexact,
        "deltas": run.deltas,
        "deltas_expected": spec.streams * spec.deltas if spec.kind == "streams" else None,
        "max_active": run.max_active,
        "latency_ms": {"p50": percentile(latencies, 0.50), "p90": percentile(latencies, 0.90),
                       "p99": percentile(latencies, 0.99), "max": percentile(latencies, 1.0),
                       "mean": (sum(latencies) / len(latencies) / 1e6) if latencies else math.nan},
        "first_chunk_ms": {"p50": percentile(first, 0.50), "p99": percentile(first, 0.99),
                           "max": percentile(first, 1.0)},
        "connect_ms": {"p50": percentile(connected, 0.50), "p99": percentile(connected, 0.99),
                       "max": percentile(connected, 1.0)},
        "latency_cdf_ms": [[p, percentile(latencies, p)] for p in CDF_POINTS] if latencies else [],
        "wall_s": wall,
        "chunks_per_s": run.deltas / wall if wall and wall > 0 else math.nan,
    }


async def run_streams(spec: Spec, run: Run) -> None:
    """N streams started evenly over the ramp, each on its own connection."""
    loop = asyncio.get_running_loop()
    one = sse_stream if spec.transport == "sse" or spec.target in ("direct", "seed") else ws_stream
    t0 = loop.time() + 0.05
    step = spec.ramp_s / spec.streams if spec.streams else 0.0

    async def start(i: int) -> None:
        await asyncio.sleep(max(0.0, t0 + i * step - loop.time()))
        await one(spec, run, i)

    await asyncio.gather(*(start(i) for i in range(spec.streams)))


async def run_flat(spec: Spec, run: Run, checkpoints: list[dict[str, Any]]) -> None:
    """Many short streams, `concurrency` at a time; the target's RSS after every `checkpoint_every`."""
    pending = iter(range(spec.streams))
    next_mark = spec.checkpoint_every

    def mark() -> None:
        nonlocal next_mark
        finished = run.ok + sum(run.errors.values())
        while finished >= next_mark:
            checkpoints.append({"finished": next_mark, "rss_kb": rss_kb(spec.target_pid),
                                "t_s": round(time.monotonic() - begun, 3)})
            next_mark += spec.checkpoint_every

    begun = time.monotonic()

    async def worker() -> None:
        client = None
        if spec.transport == "ws":
            try:
                client = await ws_open(spec)  # one socket per user, who sends message after message
            except (OSError, ConnectionError) as exc:
                run.fail("connect", repr(exc))
                return
        try:
            for i in pending:
                if client is None:
                    await sse_stream(spec, run, i)
                else:
                    await ws_stream(spec, run, i, client)
                mark()
        finally:
            if client is not None:
                client.close()

    await asyncio.gather(*(worker() for _ in range(spec.concurrency)))


async def run_idle(spec: Spec, result: dict[str, Any]) -> None:
    """K idle WebSockets: the target's RSS as they open, in 4 steps; per socket = the fitted slope.

    The slope leaves out one-off costs of the first sockets (allocator arenas, lazily built state);
    50 sockets opened first and kept open take the rest of them.
    """
    path = "/ws" if spec.target.startswith("bare") else "/api/command-center/ws"
    gate = asyncio.Semaphore(spec.concurrency)
    clients: list[WSClient] = []
    failures: list[BaseException] = []

    async def open_one() -> None:
        async with gate:
            clients.append(await ws_open(spec, path))

    async def open_many(count: int) -> None:
        results = await asyncio.gather(*(open_one() for _ in range(count)), return_exceptions=True)
        failures.extend(r for r in results if isinstance(r, BaseException))
        await asyncio.sleep(1.0)  # let allocation settle

    await open_many(50)
    points: list[tuple[int, int]] = [(len(clients), rss_kb(spec.target_pid))]
    step = spec.idle_sockets // 4
    for _ in range(4):
        await open_many(step)
        points.append((len(clients), rss_kb(spec.target_pid)))
    xs, ys = [x for x, _ in points], [y for _, y in points]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / spread if spread else math.nan
    opened = points[-1][0] - points[0][0]
    result.update({
        "sockets": opened, "failures": len(failures),
        "failure_example": repr(failures[0]) if failures else None,
        "rss_points_kb": points, "rss_before_kb": points[0][1], "rss_after_kb": points[-1][1],
        "kb_per_socket": slope,
        "kb_per_socket_first_to_last": (points[-1][1] - points[0][1]) / opened if opened else math.nan,
    })
    for client in clients:
        client.close()
    await asyncio.sleep(0.5)


async def warmup(spec: Spec) -> dict[str, int]:
    """A few unmeasured streams, so first-request costs (imports, caches) stay out of the figures."""
    if not spec.warmup_streams or spec.target.startswith("bare"):
        return {}
    run = Run(spec.warmup_deltas)
    one = sse_stream if spec.transport == "sse" or spec.target in ("direct", "seed") else ws_stream
    await asyncio.wait_for(asyncio.gather(*(one(spec, run, -1 - i) for i in range(spec.warmup_streams))),
                           timeout=spec.timeout_s)
    return dict(run.errors)


async def main_async(spec: Spec) -> dict[str, Any]:
    result: dict[str, Any] = {"spec": asdict(spec)}
    try:
        result["warmup_errors"] = await warmup(spec)
    except TimeoutError:
        result["warmup_errors"] = {"timeout": spec.warmup_streams}
    await asyncio.sleep(0.2)
    if spec.target_pid:
        reset_peak_rss(spec.target_pid)
    pids = {"target": spec.target_pid, "upstream": spec.upstream_pid}
    pids.update({f"target_{n + 2}": pid for n, pid in enumerate(spec.other_target_pids)})
    before: dict[str, ProcSample | None] = {name: sample(pid) for name, pid in pids.items()}
    own_before = resource.getrusage(resource.RUSAGE_SELF)
    cores_before = core_times()
    wall_before = time.monotonic()
    peak_rss = 0

    async def watch_rss() -> None:
        nonlocal peak_rss
        while True:
            peak_rss = max(peak_rss, rss_kb(spec.target_pid))
            await asyncio.sleep(0.1)

    watcher = asyncio.create_task(watch_rss()) if spec.target_pid else None
    expected = spec.deltas
    run = Run(expected)
    checkpoints: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(spec.timeout_s):
            if spec.kind == "streams":
                await run_streams(spec, run)
            elif spec.kind == "flat":
                await run_flat(spec, run, checkpoints)
            elif spec.kind == "idle_ws":
                await run_idle(spec, result)
        # A client reads to the end of the response, and the seed port saves its reply after `done`.
        if run.open_sse:
            async with asyncio.timeout(10):
                await run.sse_drained.wait()
    except TimeoutError:
        result["timed_out"] = True
    finally:
        if watcher is not None:
            watcher.cancel()
    result["responses_left_open"] = len(run.open_sse)
    wall = time.monotonic() - wall_before
    own_after = resource.getrusage(resource.RUSAGE_SELF)
    result["core_busy"] = core_busy(cores_before, core_times())
    after = {name: sample(pid) for name, pid in pids.items()}
    # Streams still open at the deadline are errors, not silently dropped.
    missing = run.started - run.ok - sum(run.errors.values())
    if missing > 0:
        run.fail("timeout", f"{missing} streams still open after {spec.timeout_s} s")
        run.errors["timeout"] = missing
    if spec.kind == "streams" and run.started < spec.streams:
        run.fail("not_started", f"{spec.streams - run.started} streams never started")
        run.errors["not_started"] = spec.streams - run.started
    if spec.kind != "idle_ws":
        result.update(summarize(run, spec))
    if spec.kind == "flat":
        result["checkpoints"] = checkpoints
        await asyncio.sleep(1.0)
        result["rss_end_kb"] = rss_kb(spec.target_pid)
    result["measured_wall_s"] = wall
    result["loadgen_cpu_s"] = (own_after.ru_utime + own_after.ru_stime) - (own_before.ru_utime + own_before.ru_stime)
    result["loadgen_peak_rss_kb"] = own_after.ru_maxrss
    for name in pids:
        b, a = before[name], after[name]
        if b is not None and a is not None:
            result[f"{name}_cpu_s"] = a.cpu_s - b.cpu_s
            result[f"{name}_rss_before_kb"] = b.rss_kb
            result[f"{name}_rss_after_kb"] = a.rss_kb
            result[f"{name}_peak_rss_kb"] = max(a.hwm_kb, peak_rss) if name == "target" else a.hwm_kb
    if spec.other_target_pids and "target_cpu_s" in result:
        # The relay's CPU is all its instances' together.
        result["target_instances_cpu_s"] = [result["target_cpu_s"]] + [
            result.get(f"target_{n + 2}_cpu_s", 0.0) for n in range(len(spec.other_target_pids))]
        result["target_cpu_s"] = sum(result["target_instances_cpu_s"])
    busy = result["core_busy"]
    load_share = (result["loadgen_cpu_s"] + result.get("upstream_cpu_s", 0.0)) / wall if wall else 0.0
    # What else kept the cores busy: other processes on the machine, and kernel work not charged to ours.
    result["load_core_other"] = round(busy.get("cpu1", 0.0) - load_share, 3)
    result["target_core_other"] = round(busy.get("cpu0", 0.0) - result.get("target_cpu_s", 0.0) / wall, 3) \
        if wall else None
    return result


def raise_open_files_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> None:
    spec_path, result_path = sys.argv[1], sys.argv[2]
    with open(spec_path) as f:
        spec = Spec(**json.load(f))
    raise_open_files_limit()
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(main_async(spec))
    else:
        result = uvloop.run(main_async(spec))
    result["uvloop"] = "uvloop" in sys.modules
    tmp = result_path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(orjson.dumps(result))
    os.replace(tmp, result_path)


if __name__ == "__main__":
    main()
