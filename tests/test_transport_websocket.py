"""WebSocket transport against a real server process, with the `websockets` client."""

from __future__ import annotations

import asyncio
import json

import pytest
import websockets
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from server.transports.ws_protocol import text_frame

from .conftest import SERVER_PYTHON, Process, _clean_env, free_port
from .relay_clients import (
    demo_answer,
    expected_words,
    names,
    relay_with_big_answer,
    sse_read_whole,
    sse_stream,
    text_of,
    unread_socket,
    ws_read_until_end,
    ws_stream,
)


async def test_websocket_streams_a_costed_answer(server):
    events = await ws_stream(server.ws_url, {"message": "Hello over a socket"})

    assert names(events)[0] == "start"
    assert names(events)[-2:] == ["cost", "done"]
    assert [event_id for event_id, _, _ in events] == list(range(1, len(events) + 1))
    assert text_of(events) == demo_answer("Hello over a socket")
    assert events[-2][2]["totalCost"] > 0


async def test_several_streams_run_at_once_over_one_socket_routed_by_request_id(server):
    async with websockets.connect(server.ws_url + "/api/command-center/ws") as socket:
        for n in range(3):
            await socket.send(json.dumps({"type": "message", "message": f"parallel {n}", "requestId": f"r{n}"}))
        streams: dict[str, list] = {}
        request_of: dict[str, str] = {}
        finished = 0
        async with asyncio.timeout(30):
            while finished < 3:
                frame = json.loads(await socket.recv())
                if frame["event"] == "start":
                    request_of[frame["streamId"]] = frame["requestId"]
                streams.setdefault(frame["streamId"], []).append((frame["id"], frame["event"], frame["data"]))
                finished += frame["event"] == "done"
    assert sorted(request_of.values()) == ["r0", "r1", "r2"]
    for stream_id, events in streams.items():
        n = request_of[stream_id][1:]
        assert text_of(events) == demo_answer(f"parallel {n}")
        assert [event_id for event_id, _, _ in events] == list(range(1, len(events) + 1))


async def test_bad_frames_get_an_error_event_and_the_socket_stays_open(server):
    bad_frames = [
        "not json",
        "[]",
        json.dumps({"message": "no type"}),
        json.dumps({"type": "dance"}),
        json.dumps({"type": "message", "message": ""}),
        json.dumps({"type": "message", "message": 5, "requestId": "bad-1"}),
        json.dumps({"type": "message", "message": "x" * (32 * 1024 + 1)}),
        json.dumps({"type": "message", "message": "hi", "conversationId": "missing"}),
        json.dumps({"type": "message", "message": "hi", "agentId": "nobody"}),
        json.dumps({"type": "resume", "streamId": "missing", "lastEventId": 0}),
        json.dumps({"type": "resume", "streamId": "x", "lastEventId": -1}),
        json.dumps({"type": "cancel"}),
    ]
    async with websockets.connect(server.ws_url + "/api/command-center/ws") as socket:
        codes = []
        for raw in bad_frames:
            await socket.send(raw)
            frame = json.loads(await asyncio.wait_for(socket.recv(), 10))
            assert frame["event"] == "error"
            assert frame["data"]["message"]
            codes.append(frame["data"]["code"])
            if "bad-1" in raw:
                assert frame["requestId"] == "bad-1"
        await socket.send(b"binary frame")
        assert json.loads(await socket.recv())["event"] == "error"
        await socket.send(json.dumps({"type": "ping"}))
        assert json.loads(await socket.recv()) == {"event": "pong"}
        await socket.send(json.dumps({"type": "message", "message": "still here"}))
        events = await ws_read_until_end(socket)
    assert codes == ["invalid_request"] * 6 + ["too_large", "not_found", "not_found", "not_resumable",
                                               "invalid_request", "invalid_request"]
    assert text_of(events) == demo_answer("still here")


async def test_twenty_concurrent_streams_over_both_transports_are_exact_and_saved_once(server):
    messages = [f"concurrent message {n}" for n in range(20)]

    async def one(n: int, text: str):
        if n % 2:
            return await sse_stream(server.url, {"message": text})
        return await ws_stream(server.ws_url, {"message": text})

    results = await asyncio.gather(*(one(n, text) for n, text in enumerate(messages)))

    for text, events in zip(messages, results, strict=True):
        assert names(events)[-1] == "done"
        assert text_of(events) == demo_answer(text)
    message_ids = [events[-1][2]["messageId"] for events in results]
    rows = server.rows(f"SELECT id, content, status FROM messages WHERE id IN ({','.join('?' * 20)})", *message_ids)
    expected = [(events[-1][2]["messageId"], demo_answer(text), "complete")
                for text, events in zip(messages, results, strict=True)]
    assert sorted(rows) == sorted(expected)


async def test_a_stream_started_over_sse_can_be_watched_over_the_websocket(server):
    full = await sse_stream(server.url, {"message": "cross transport"})
    stream_id = full[0][2]["streamId"]
    async with websockets.connect(server.ws_url + "/api/command-center/ws") as socket:
        await socket.send(json.dumps({"type": "resume", "streamId": stream_id, "lastEventId": 3}))
        rest = await ws_read_until_end(socket, stream_id)
    assert rest == full[3:]


async def test_a_websocket_logs_no_line_of_its_own_unless_the_access_log_is_on(make_server):
    quiet = make_server()
    loud = make_server({"RELAY_ACCESS_LOG": "1"})

    for relay in (quiet, loud):
        events = await ws_stream(relay.ws_url, {"message": "log or not"})
        assert names(events)[-1] == "done"

    assert "[accepted]" not in quiet.log() and "connection open" not in quiet.log()
    assert '"WebSocket /api/command-center/ws" [accepted]' in loud.log() and "connection open" in loud.log()


@pytest.mark.parametrize(("streams", "bound"), [(1, 20000), (2, 20000), (1, 1000), (2, 1000)])
async def test_a_websocket_whose_socket_stalls_keeps_each_outbox_up_to_the_bound_and_drops_past_it(
        make_server, make_upstream, streams, bound):
    """~8 MB an answer as fast as the upstream sends it, to a client with a 4 KB receive buffer that reads
    nothing after the start frames until SSE readers have seen every answer whole: the socket pauses and the
    rest waits in each reader's outbox (two answers: two outboxes behind one paused socket). Under a bound of
    20,000 everything comes, in order; under 1,000 each stream's reader gets its events up to its drop, in
    order, then an `error` frame `slow_consumer` for that stream, and a `resume` from its last id gets exactly
    the rest. The 1,000 cases fail with an unbounded outbox (Subscriber.push without its limit check)."""
    relay = relay_with_big_answer(make_server, make_upstream, delay_ms=0, queue_events=bound)
    sock = unread_socket(relay.port)
    by_stream: dict[str, list] = {}
    async with websockets.connect(relay.ws_url + "/api/command-center/ws", sock=sock, max_queue=4,
                                  max_size=None) as ws:
        for n in range(streams):
            await ws.send(json.dumps({"type": "message", "message": f"stall then read {n}", "requestId": f"r{n}"}))
        async with asyncio.timeout(30):
            while sum(1 for events in by_stream.values() if events and events[0][1] == "start") < streams:
                frame = json.loads(await ws.recv())
                by_stream.setdefault(frame["streamId"], []).append((frame["id"], frame["event"], frame["data"]))
        # Readers that keep up: every answer is generated to its end while this socket reads nothing.
        whole = {stream_id: await sse_read_whole(relay.url, stream_id) for stream_id in by_stream}
        ended = 0
        async with asyncio.timeout(120):
            while ended < streams:
                frame = json.loads(await ws.recv())
                by_stream[frame["streamId"]].append((frame["id"], frame["event"], frame["data"]))
                ended += frame["event"] in ("done", "error")
        for stream_id, events in by_stream.items():
            if bound > 8002:
                assert [event_id for event_id, _, _ in events] == list(range(1, len(events) + 1))
                assert names(events) == ["start"] + ["chunk"] * 8000 + ["cost", "done"]
                assert text_of(events) == expected_words(8000, 150)
                continue
            *delivered, dropped = events
            assert (dropped[0], dropped[1], dropped[2]["code"]) == (None, "error", "slow_consumer")
            assert [event_id for event_id, _, _ in delivered] == list(range(1, len(delivered) + 1))
            await ws.send(json.dumps({"type": "resume", "streamId": stream_id, "lastEventId": len(delivered)}))
            rest = await ws_read_until_end(ws, stream_id)
            joined = delivered + rest
            assert [(event_id, name) for event_id, name, _ in joined] == [(i, n) for i, n, _ in whole[stream_id]]
            assert text_of(joined) == text_of(whole[stream_id]) == expected_words(8000, 150)


async def test_the_websocket_endpoint_works_under_plain_uvicorn_without_the_relays_protocol(tmp_path):
    # Without the batched-send extension (another ASGI server, or uvicorn's own protocol) every event is a
    # websocket.send of its own: same frames, same order.
    port = free_port()
    launch = ("import uvicorn; from server.app import create_app; from server.config import load_settings; "
              f"uvicorn.run(create_app(load_settings(port={port})), host='127.0.0.1', port={port}, "
              "ws='websockets-sansio', log_level='warning')")
    plain = Process([SERVER_PYTHON, "-c", launch], _clean_env({"DATABASE_URL": f"sqlite:///{tmp_path / 'r.db'}"}),
                    tmp_path / "plain.log", port, "/healthz")
    try:
        single = await ws_stream(plain.ws_url, {"message": "plain uvicorn"})
        async with websockets.connect(plain.ws_url + "/api/command-center/ws") as ws:
            await ws.send(json.dumps({"type": "resume", "streamId": single[0][2]["streamId"], "lastEventId": 2}))
            rest = await ws_read_until_end(ws, single[0][2]["streamId"])
    finally:
        plain.stop()
    assert names(single)[0] == "start" and names(single)[-2:] == ["cost", "done"]
    assert text_of(single) == demo_answer("plain uvicorn")
    assert rest == single[2:]


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 200_000])
def test_text_frames_are_what_a_websocket_client_reads(size):
    text = ("é" * size)[:size] if size % 2 else "a" * size
    payload = text.encode()
    reader = StreamReader()
    reader.feed_data(text_frame(payload))
    parser = Frame.parse(reader.read_exact, mask=False)
    try:
        next(parser)
    except StopIteration as done:
        frame = done.value
    else:
        raise AssertionError("the frame was not whole")
    assert (frame.opcode, frame.fin, frame.rsv1, bytes(frame.data)) == (Opcode.TEXT, True, False, payload)


async def test_the_socket_answers_pings_takes_fragmented_frames_and_closes_cleanly(server):
    """A ping is answered with a pong that echoes its payload: websockets resolves the waiter only for that pong,
    so a server that does not answer (a RelayWebSocketProtocol.handle_ping that writes nothing), or answers with
    other bytes, fails this with a timeout."""
    async with websockets.connect(server.ws_url + "/api/command-center/ws") as ws:
        pong = await ws.ping(b"deltarelay ping 1")
        await asyncio.wait_for(pong, 10)
        frame = json.dumps({"type": "message", "message": "in three fragments"})
        await ws.send([frame[:10], frame[10:25], frame[25:]])  # one message, sent as three frames
        events = await ws_read_until_end(ws)
        await ws.close()
    assert text_of(events) == demo_answer("in three fragments")
    assert ws.close_code == 1000
