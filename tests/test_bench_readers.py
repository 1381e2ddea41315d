"""The benchmark's load generator reads the relay's SSE and WebSocket output with minimal parsers of its own.

They decide the benchmark's figures: every text must come through exactly, wherever the network splits the
bytes, and a malformed stream must count as an error rather than pass.
"""

from __future__ import annotations

import asyncio

import orjson
import pytest

from bench.loadgen import Run, SSEClient, StreamCheck, WSClient
from server.transports.ws_protocol import text_frame

TOKENS = [f"{seq}:{1_700_000_000_000_000_000 + seq} " for seq in range(6)]


def relay_sse(crlf: bool = False) -> bytes:
    events = [("start", {"streamId": "s"})] + [("chunk", {"text": token}) for token in TOKENS] + \
             [("cost", {"outputTokens": 6}), ("done", {"stopReason": "end_turn"})]
    text = b": keepalive\n\n" + b"".join(b"id: %d\nevent: %s\ndata: %s\n\n" % (n, name.encode(), orjson.dumps(data))
                                         for n, (name, data) in enumerate(events, 1))
    return text.replace(b"\n", b"\r\n") if crlf else text


def relay_frames() -> bytes:
    frames = [{"event": "start", "streamId": "s", "id": 1, "data": {}}]
    frames += [{"event": "chunk", "streamId": "s", "id": n, "data": {"text": t}} for n, t in enumerate(TOKENS, 2)]
    frames += [{"event": "done", "streamId": "s", "id": 9, "data": {}}]
    return b"".join(text_frame(orjson.dumps(frame)) for frame in frames)


def sse_reader(check: StreamCheck) -> SSEClient:
    client = SSEClient(check, b"", direct=False)
    client.status = 200
    return client


def ws_reader(check: StreamCheck) -> WSClient:
    client = WSClient("ws://127.0.0.1:1/x", deflate=False)
    client.fast, client.check = True, check
    return client


def splits(data: bytes) -> list[list[bytes]]:
    """The bytes whole, cut at every position, and one byte at a time."""
    return [[data]] + [[data[:k], data[k:]] for k in range(1, len(data))] + [[data[k:k + 1] for k in range(len(data))]]


@pytest.mark.parametrize("crlf", [False, True])
async def test_the_sse_reader_gets_every_token_wherever_the_bytes_are_split(crlf):
    for pieces in splits(relay_sse(crlf)):
        run = Run(expected=len(TOKENS))
        check = StreamCheck(run)
        check.begin()
        reader = sse_reader(check)
        for piece in pieces:
            reader.on_body(piece)
        assert check.finished.done() and (run.ok, run.errors, run.deltas) == (1, {}, len(TOKENS)), pieces


async def test_the_websocket_reader_gets_every_token_wherever_the_bytes_are_split():
    for pieces in splits(relay_frames()):
        run = Run(expected=len(TOKENS))
        check = StreamCheck(run)
        check.begin()
        reader = ws_reader(check)
        for piece in pieces:
            reader.read_frames(piece, 0)
        assert check.finished.done() and (run.ok, run.errors, run.deltas) == (1, {}, len(TOKENS)), pieces


async def test_a_stream_with_a_missing_token_is_an_error_on_both_readers():
    sse = relay_sse().replace(orjson.dumps({"text": TOKENS[2]}), orjson.dumps({"text": ""}))
    frames = relay_frames().replace(text_frame(orjson.dumps({"event": "chunk", "streamId": "s", "id": 4,
                                                             "data": {"text": TOKENS[2]}})), b"")
    for feed in ("sse", "ws"):
        run = Run(expected=len(TOKENS))
        check = StreamCheck(run)
        check.begin()
        if feed == "sse":
            sse_reader(check).on_body(sse)
        else:
            ws_reader(check).read_frames(frames, 0)
        assert run.ok == 0 and run.errors == {"text": 1}, feed


async def test_a_fragmented_websocket_message_is_joined_and_a_masked_frame_is_refused():
    payload = orjson.dumps({"event": "chunk", "streamId": "s", "id": 2, "data": {"text": TOKENS[0]}})
    first, rest = payload[:10], payload[10:]
    fragmented = bytes((0x01, len(first))) + first + bytes((0x80, len(rest))) + rest
    run = Run(expected=1)
    check = StreamCheck(run)
    check.begin()
    ws_reader(check).read_frames(fragmented, 0)
    assert run.deltas == 1 and not check.finished.done()
    with pytest.raises(ValueError):
        ws_reader(check).read_frames(bytes((0x81, 0x80 | 1)) + b"\0\0\0\0x", 0)
    await asyncio.sleep(0)
