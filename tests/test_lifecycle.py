"""Stream lifecycle against real processes: resume, watchers, cancel, keepalive, slow readers, retries, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import time
from decimal import Decimal

import httpx
import pytest
import websockets
from httpx_sse import aconnect_sse

from .conftest import stored_cost
from .relay_clients import (
    expected_words,
    loads,
    names,
    relay_with_big_answer,
    send_message_request,
    sse_read,
    sse_read_first,
    sse_resume,
    text_of,
    unread_socket,
    ws_read_until_end,
)

SLOW = {"RELAY_OFFLINE_DELAY_MS": "20", "RELAY_OFFLINE_WORDS": "60"}  # a 1.2 s answer


def saved(relay, message_id: str) -> tuple:
    with sqlite3.connect(relay.db_path) as db:
        return db.execute("SELECT status, content, stop_reason, cost_estimated, output_tokens, cost"
                          " FROM messages WHERE id = ?", (message_id,)).fetchone()


async def test_dropped_sse_client_resumes_with_last_event_id_and_gets_exactly_the_rest(make_server):
    relay = make_server(SLOW)
    first = await sse_read_first(relay.url, {"message": "drop me"}, 10)
    stream_id = first[0][2]["streamId"]

    rest = await sse_read(relay.url, stream_id, last_event_id=first[-1][0])

    events = first + rest
    assert [event_id for event_id, _, _ in events] == list(range(1, len(events) + 1))
    assert text_of(events) == expected_words(60)
    assert names(events)[-1] == "done"
    assert saved(relay, events[-1][2]["messageId"])[:2] == ("complete", expected_words(60))


async def test_the_answer_is_generated_and_saved_after_the_client_is_gone(make_server):
    relay = make_server(SLOW)
    first = await sse_read_first(relay.url, {"message": "leave early"}, 3)
    stream_id = first[0][2]["streamId"]
    # A watcher that starts at the end only waits for the terminal event: the client itself never came back.
    async with httpx.AsyncClient(base_url=relay.url) as client:
        async with aconnect_sse(client, "GET", f"/api/command-center/streams/{stream_id}?lastEventId=3") as source:
            tail = [(event.event, loads(event.data)) async for event in source.aiter_sse()]
    done = tail[-1][1]
    assert saved(relay, done["messageId"])[:2] == ("complete", expected_words(60))


async def test_dropped_websocket_resumes_on_a_new_socket_with_exactly_the_rest(make_server):
    relay = make_server(SLOW)
    async with websockets.connect(relay.ws_url + "/api/command-center/ws") as socket_a:
        await socket_a.send(json.dumps({"type": "message", "message": "socket drop"}))
        first = []
        while len(first) < 8:
            frame = json.loads(await socket_a.recv())
            first.append((frame["id"], frame["event"], frame["data"]))
    stream_id = first[0][2]["streamId"]

    async with websockets.connect(relay.ws_url + "/api/command-center/ws") as socket_b:
        await socket_b.send(json.dumps({"type": "resume", "streamId": stream_id, "lastEventId": first[-1][0]}))
        rest = await ws_read_until_end(socket_b, stream_id)

    events = first + rest
    assert [event_id for event_id, _, _ in events] == list(range(1, len(events) + 1))
    assert text_of(events) == expected_words(60)


async def test_a_websocket_stream_resumes_over_sse_with_the_same_ids(make_server):
    relay = make_server(SLOW)
    async with websockets.connect(relay.ws_url + "/api/command-center/ws") as ws:
        await ws.send(json.dumps({"type": "message", "message": "switch transports"}))
        first = [json.loads(await ws.recv()) for _ in range(5)]
    rest = await sse_read(relay.url, first[0]["streamId"], last_event_id=5)
    events = [(f["id"], f["event"], f["data"]) for f in first] + rest
    assert [event_id for event_id, _, _ in events] == list(range(1, len(events) + 1))
    assert text_of(events) == expected_words(60)


async def test_two_watchers_see_the_same_events(make_server):
    relay = make_server(SLOW)
    async with httpx.AsyncClient(base_url=relay.url) as client:
        started = (await client.post("/api/command-center/message", json={"message": "two tabs"},
                                     headers={"accept": "application/json"})).json()
    tab_one, tab_two = await asyncio.gather(sse_read(relay.url, started["streamId"]),
                                            sse_read(relay.url, started["streamId"]))
    assert tab_one == tab_two
    assert text_of(tab_one) == expected_words(60)


@pytest.mark.parametrize("cursor", ["ahead", "expired"])
async def test_a_cursor_that_cannot_be_served_gets_one_not_resumable_error_with_the_message_id(make_server, cursor):
    relay = make_server({"RELAY_OFFLINE_WORDS": "60", "RELAY_STREAM_LOG_EVENTS": "10"})
    async with httpx.AsyncClient(base_url=relay.url) as client:
        async with aconnect_sse(client, "POST", "/api/command-center/message", json={"message": "x"}) as source:
            full = [(int(e.id), e.event, loads(e.data)) async for e in source.aiter_sse()]
    stream_id = full[0][2]["streamId"]

    refused = await sse_resume(relay.url, stream_id, last_event_id=500 if cursor == "ahead" else 1)

    # A JSON error, not a 200 event stream: an EventSource stops there instead of reconnecting.
    assert refused.status_code == 410
    assert refused.json()["error"]["code"] == "not_resumable"
    assert refused.json()["error"]["messageId"] == full[-1][2]["messageId"]
    async with websockets.connect(relay.ws_url + "/api/command-center/ws") as ws:
        cursor_id = 500 if cursor == "ahead" else 1
        await ws.send(json.dumps({"type": "resume", "streamId": stream_id, "lastEventId": cursor_id}))
        frame = json.loads(await ws.recv())
    assert (frame["event"], frame["data"]["code"]) == ("error", "not_resumable")


async def _wait_for(predicate, limit: float = 20.0):
    """Poll a condition that another process makes true (bounded; not a test-logic sleep)."""
    async with asyncio.timeout(limit):
        while not (result := await predicate()):  # noqa: ASYNC110 - the condition lives in another process
            await asyncio.sleep(0.05)
        return result


async def upstream_stats(upstream) -> dict:
    async with httpx.AsyncClient() as client:
        return (await client.get(upstream.url + "/stats")).json()


@pytest.mark.parametrize("via", ["websocket", "http"])
async def test_cancel_closes_the_upstream_request_and_saves_the_partial_answer(make_server, make_upstream, via):
    upstream = make_upstream("--words", "400", "--delay-ms", "20")
    relay = make_server({"ANTHROPIC_API_KEY": "sk-test", "ANTHROPIC_BASE_URL": upstream.url,
                         "RELAY_MODEL": "claude-haiku-4-5"})
    async with websockets.connect(relay.ws_url + "/api/command-center/ws") as ws:
        await ws.send(json.dumps({"type": "message", "message": "stop me"}))
        events = []
        while len(events) < 6:
            frame = json.loads(await ws.recv(), parse_float=__import__("decimal").Decimal)
            events.append((frame["id"], frame["event"], frame["data"]))
        stream_id = events[0][2]["streamId"]
        if via == "websocket":
            await ws.send(json.dumps({"type": "cancel", "streamId": stream_id}))
        else:
            async with httpx.AsyncClient(base_url=relay.url) as client:
                response = await client.post(f"/api/command-center/streams/{stream_id}/cancel")
            assert response.status_code == 202
        events += await ws_read_until_end(ws, stream_id)

    assert names(events)[-2:] == ["cost", "done"]
    assert events[-1][2]["stopReason"] == "cancelled"
    cost = events[-2][2]
    assert cost["estimated"] is True
    assert cost["outputTokens"] > 1  # counted from the text received, not message_start's placeholder
    status, content, stop_reason, estimated, output_tokens, saved_cost = saved(relay, events[-1][2]["messageId"])
    assert (status, content, stop_reason, estimated) == ("cancelled", text_of(events), "cancelled", 1)
    assert (output_tokens, stored_cost(saved_cost)) == (cost["outputTokens"], Decimal(str(cost["totalCost"])))

    async def upstream_saw_the_close():
        stats = await upstream_stats(upstream)
        return stats if stats["disconnected"] == 1 else None

    stats = await _wait_for(upstream_saw_the_close)
    assert stats["completed"] == 0


async def test_a_dropped_connection_is_not_a_cancel_unless_configured(make_server):
    relay = make_server({**SLOW, "RELAY_CANCEL_ON_DISCONNECT": "1"})
    first = await sse_read_first(relay.url, {"message": "cancel when I leave"}, 3)
    stream_id = first[0][2]["streamId"]
    tail = await sse_read(relay.url, stream_id, last_event_id=3)
    assert tail[-1][2]["stopReason"] == "cancelled"
    assert saved(relay, tail[-1][2]["messageId"])[0] == "cancelled"


async def test_idle_streams_get_keepalives_on_both_transports(make_server):
    relay = make_server({"RELAY_OFFLINE_DELAY_MS": "700", "RELAY_OFFLINE_WORDS": "3", "RELAY_KEEPALIVE_SECONDS": "0.1"})
    async with httpx.AsyncClient(base_url=relay.url, timeout=30) as client:
        async with client.stream("POST", "/api/command-center/message", json={"message": "slow"}) as response:
            body = (await response.aread()).decode()
    assert ": keepalive\n\n" in body
    async with websockets.connect(relay.ws_url + "/api/command-center/ws") as ws:
        await ws.send(json.dumps({"type": "message", "message": "slow"}))
        frames = []
        async with asyncio.timeout(30):
            while not frames or frames[-1]["event"] != "done":
                frames.append(json.loads(await ws.recv()))
    assert {"event": "keepalive"} in frames
    assert text_of([(f.get("id"), f["event"], f.get("data")) for f in frames if f["event"] == "chunk"]) \
        == expected_words(3)


async def test_a_reader_that_stops_reading_is_dropped_while_others_stream_at_full_speed(make_server,
                                                                                      make_upstream):
    # 8,000 deltas of ~1 KB at 1,000 a second, paced so healthy readers keep up; a client that reads nothing.
    relay = relay_with_big_answer(make_server, make_upstream, delay_ms=1, queue_events=1000)
    stuck = unread_socket(relay.port)
    send_message_request(stuck, "I will not read")
    try:
        fast = await asyncio.gather(*(sse_read_new(relay.url, f"fast {n}") for n in range(2)))
        for events in fast:
            assert text_of(events) == expected_words(8000, 150)
        # Drain what the stuck client was sent: it ends with a slow_consumer error, not the whole answer.
        stuck.settimeout(10)
        received = b""
        # Until the error event is whole: it may arrive split over two reads.
        while (b"event: error" not in received or b"\n\n" not in received[received.index(b"event: error"):]) \
                and len(received) < 50_000_000:
            chunk = stuck.recv(65536)
            if not chunk:
                break
            received += chunk
    finally:
        stuck.close()
    # Dropped at its queue bound instead of buffering the 8 MB answer: the bound itself is tested in test_hub.py.
    assert b"slow_consumer" in received
    assert len(received) < 8_000_000


async def test_a_websocket_that_stops_reading_is_dropped_while_others_stream_at_full_speed(make_server,
                                                                                         make_upstream):
    """The WebSocket twin of the SSE test above: a socket that reads nothing after its start frame gets an
    `error` frame `slow_consumer` for its stream, not the 8 MB answer, while two SSE readers get it whole.
    Fails with an unbounded outbox (Subscriber.push without its limit check): the socket gets `done`."""
    relay = relay_with_big_answer(make_server, make_upstream, delay_ms=1, queue_events=1000)
    async with websockets.connect(relay.ws_url + "/api/command-center/ws", sock=unread_socket(relay.port),
                                  max_queue=4, max_size=None) as stuck:
        await stuck.send(json.dumps({"type": "message", "message": "I will not read"}))
        start = json.loads(await asyncio.wait_for(stuck.recv(), 30))
        assert start["event"] == "start"
        fast = await asyncio.gather(*(sse_read_new(relay.url, f"fast {n}") for n in range(2)))
        for events in fast:
            assert text_of(events) == expected_words(8000, 150)
        frames = 1
        async with asyncio.timeout(60):
            while True:
                frame = json.loads(await stuck.recv())
                frames += 1
                if frame["event"] in ("done", "error"):
                    break
    assert (frame["event"], frame["streamId"], frame["data"]["code"]) == ("error", start["streamId"],
                                                                           "slow_consumer")
    assert frames < 8003


async def sse_read_new(url: str, message: str) -> list:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        async with aconnect_sse(client, "POST", "/api/command-center/message", json={"message": message}) as source:
            return [(int(e.id), e.event, loads(e.data)) async for e in source.aiter_sse()]


@pytest.mark.parametrize("failure", ["http-429", "http-529", "overloaded-first"])
async def test_a_failure_before_the_first_delta_is_retried_without_a_second_start(make_server, make_upstream, failure):
    upstream = make_upstream("--words", "20", "--delay-ms", "0", "--error", failure, "--fail-first", "2")
    relay = make_server({"ANTHROPIC_API_KEY": "sk-test", "ANTHROPIC_BASE_URL": upstream.url,
                         "RELAY_RETRY_BASE_DELAY": "0.01", "RELAY_RETRY_MAX_WAIT": "5"})
    began = time.monotonic()
    events = await sse_read_new(relay.url, "retry me")
    elapsed = time.monotonic() - began

    assert names(events) == ["start"] + ["chunk"] * 20 + ["cost", "done"]
    assert text_of(events) == expected_words(20)
    assert (await upstream_stats(upstream))["requests"] == 3
    if failure == "http-429":
        assert elapsed >= 2.0  # retry-after: 1 was honoured twice


async def test_retries_are_bounded_and_end_in_an_error_event(make_server, make_upstream):
    upstream = make_upstream("--error", "http-529")
    relay = make_server({"ANTHROPIC_API_KEY": "sk-test", "ANTHROPIC_BASE_URL": upstream.url,
                         "RELAY_RETRY_BASE_DELAY": "0.01", "RELAY_RETRY_ATTEMPTS": "2"})
    events = await sse_read_new(relay.url, "always overloaded")
    assert names(events) == ["start", "error"]
    assert (events[-1][2]["code"], events[-1][2]["retryable"]) == ("overloaded", True)
    assert (await upstream_stats(upstream))["requests"] == 3


async def test_an_error_after_the_first_delta_is_not_retried(make_server, make_upstream):
    upstream = make_upstream("--words", "10", "--delay-ms", "0", "--error", "overloaded-midstream")
    relay = make_server({"ANTHROPIC_API_KEY": "sk-test", "ANTHROPIC_BASE_URL": upstream.url,
                         "RELAY_RETRY_BASE_DELAY": "0.01"})
    events = await sse_read_new(relay.url, "half an answer")
    assert names(events) == ["start"] + ["chunk"] * 5 + ["cost", "error"]
    assert (await upstream_stats(upstream))["requests"] == 1


async def test_sigterm_lets_a_running_answer_finish_within_the_grace_period(make_server):
    relay = make_server({"RELAY_OFFLINE_DELAY_MS": "50", "RELAY_OFFLINE_WORDS": "30",
                         "RELAY_SHUTDOWN_GRACE_SECONDS": "20"})
    async with httpx.AsyncClient(base_url=relay.url, timeout=30) as client:
        async with aconnect_sse(client, "POST", "/api/command-center/message", json={"message": "finish"}) as source:
            events = []
            async for event in source.aiter_sse():
                events.append((int(event.id), event.event, loads(event.data)))
                if len(events) == 3:
                    relay.proc.send_signal(signal.SIGTERM)
    await asyncio.to_thread(relay.proc.wait, 30)

    assert names(events)[-1] == "done"
    assert text_of(events) == expected_words(30)
    assert saved(relay, events[-1][2]["messageId"])[:2] == ("complete", expected_words(30))


async def test_sigterm_saves_answers_still_running_after_the_grace_period_as_interrupted(make_server):
    relay = make_server({"RELAY_OFFLINE_DELAY_MS": "50", "RELAY_OFFLINE_WORDS": "200",
                         "RELAY_SHUTDOWN_GRACE_SECONDS": "1"})
    long_events = await sse_read_first(relay.url, {"message": "a long one"}, 4)
    long_id = long_events[0][2]["streamId"]

    relay.proc.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(relay.proc.wait, 30)

    assert code in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a clean shutdown
    assert "Application shutdown complete" in relay.log()
    with sqlite3.connect(relay.db_path) as db:
        status, content = db.execute("SELECT status, content FROM messages WHERE stream_id = ? AND role = 'assistant'",
                                     (long_id,)).fetchone()
    assert status == "interrupted"
    assert content and expected_words(200).startswith(content)


async def test_an_expired_stream_is_not_resumable_and_points_to_the_saved_answer(make_server):
    relay = make_server({"RELAY_OFFLINE_WORDS": "10", "RELAY_STREAM_RETENTION_SECONDS": "0"})
    full = await sse_read_new(relay.url, "gone soon")
    stream_id, message_id = full[0][2]["streamId"], full[-1][2]["messageId"]

    over_sse = await sse_resume(relay.url, stream_id, last_event_id=3)
    async with websockets.connect(relay.ws_url + "/api/command-center/ws") as ws:
        await ws.send(json.dumps({"type": "resume", "streamId": stream_id, "lastEventId": 3}))
        over_ws = json.loads(await ws.recv())

    assert over_sse.status_code == 404
    assert (over_sse.json()["error"]["code"], over_sse.json()["error"]["messageId"]) == ("not_resumable", message_id)
    assert (over_ws["data"]["code"], over_ws["data"]["messageId"]) == ("not_resumable", message_id)
    assert saved(relay, message_id)[:2] == ("complete", expected_words(10))
