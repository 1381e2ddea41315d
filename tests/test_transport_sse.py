"""SSE transport against a real server process, read with httpx-sse."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal

import httpx
import pytest

from .conftest import stored_cost
from .relay_clients import (
    demo_answer,
    expected_words,
    names,
    relay_with_big_answer,
    send_message_request,
    sse_read,
    sse_read_whole,
    sse_resume,
    sse_stream,
    text_of,
    unread_socket,
)


async def test_sse_streams_a_costed_answer_with_numbered_events(server):
    events = await sse_stream(server.url, {"message": "Hello, relay"})

    assert names(events)[0] == "start"
    assert names(events)[-2:] == ["cost", "done"]
    assert set(names(events)[1:-2]) == {"chunk"}
    assert [event_id for event_id, _, _ in events] == list(range(1, len(events) + 1))
    assert text_of(events) == demo_answer("Hello, relay")
    start, cost, done = events[0][2], events[-2][2], events[-1][2]
    assert start["model"] == "deltarelay-offline"
    assert done["conversationId"] == start["conversationId"]
    assert done["stopReason"] == "end_turn"
    assert cost["outputTokens"] == len(events) - 3
    assert isinstance(cost["totalCost"], Decimal) and cost["totalCost"] > 0


async def test_sse_response_is_never_cached_buffered_or_compressed(server):
    async with httpx.AsyncClient(base_url=server.url) as client:
        async with client.stream("POST", "/api/command-center/message", json={"message": "headers"},
                                 headers={"accept-encoding": "gzip"}) as response:
            await response.aread()
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["x-accel-buffering"] == "no"
    assert response.headers.get("content-encoding", "identity") == "identity"


async def test_answer_is_saved_with_its_tokens_and_exact_cost(server):
    events = await sse_stream(server.url, {"message": "save me"})
    done, cost = events[-1][2], events[-2][2]

    (row,) = server.rows(
        "SELECT role, content, status, stop_reason, input_tokens, output_tokens, cost FROM messages WHERE id = ?",
        done["messageId"])
    user = server.rows("SELECT content FROM messages WHERE conversation_id = ? AND role = 'user'",
                       done["conversationId"])
    assert (*row[:6], stored_cost(row[6])) == ("assistant", demo_answer("save me"), "complete", "end_turn",
                                               cost["inputTokens"], cost["outputTokens"],
                                               Decimal(str(cost["totalCost"])))
    assert user == [("save me",)]


async def test_second_message_continues_the_conversation_with_its_history(server):
    first = await sse_stream(server.url, {"message": "first question"})
    conversation_id = first[-1][2]["conversationId"]

    second = await sse_stream(server.url, {"message": "second question", "conversationId": conversation_id})

    # The offline model counts the user turns in the history it was sent.
    assert text_of(second) == demo_answer("first question", "second question")
    assert "turn 2 of the conversation" in text_of(second)
    async with httpx.AsyncClient(base_url=server.url) as client:
        listing = (await client.get(f"/api/conversations/{conversation_id}/messages")).json()
    assert [(m["role"], m["content"], m["status"]) for m in listing["messages"]] == [
        ("user", "first question", "complete"),
        ("assistant", text_of(first), "complete"),
        ("user", "second question", "complete"),
        ("assistant", text_of(second), "complete"),
    ]
    assert Decimal(listing["conversation"]["totalCost"]) == first[-2][2]["totalCost"] + second[-2][2]["totalCost"]


async def test_accept_json_answers_202_and_the_stream_is_read_by_id(server):
    async with httpx.AsyncClient(base_url=server.url) as client:
        response = await client.post("/api/command-center/message", json={"message": "background"},
                                     headers={"accept": "application/json"})
    assert response.status_code == 202
    stream_id = response.json()["streamId"]

    events = await sse_read(server.url, stream_id)

    assert events[0][2]["streamId"] == stream_id
    assert text_of(events) == demo_answer("background")
    assert names(events)[-1] == "done"


async def test_last_event_id_replays_exactly_the_events_after_it(server):
    full = await sse_stream(server.url, {"message": "resume me"})
    stream_id = full[0][2]["streamId"]

    rest = await sse_read(server.url, stream_id, last_event_id=5)

    assert rest == full[5:]


async def test_an_unknown_stream_is_a_404_not_resumable_for_an_eventsource_too(server):
    """An EventSource fails on any status but 200 and does not reconnect. Fails if the endpoint goes back to a
    200 stream of one error event for `Accept: text/event-stream` (its end had the browser reconnect in a loop)."""
    eventsource = await sse_resume(server.url, "no-such-stream")
    assert eventsource.status_code == 404
    assert eventsource.headers["content-type"] == "application/json"
    assert eventsource.json()["error"]["code"] == "not_resumable"
    async with httpx.AsyncClient(base_url=server.url) as client:
        response = await client.get("/api/command-center/streams/no-such-stream",
                                    headers={"accept": "application/json"})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_resumable"


def _message_count(server) -> int:
    return server.count("SELECT COUNT(*) FROM messages")


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "invalid_request"),
        (b"[1, 2]", 400, "invalid_request"),
        (b"{}", 400, "invalid_request"),
        (b'{"message": ""}', 400, "invalid_request"),
        (b'{"message": "   "}', 400, "invalid_request"),
        (b'{"message": 42}', 400, "invalid_request"),
        (b'{"message": null}', 400, "invalid_request"),
        (b'{"message": "hi", "agentId": 7}', 400, "invalid_request"),
        (b'{"message": "' + b"x" * (32 * 1024 + 1) + b'"}', 413, "too_large"),
        (b'{"message": "hi", "agentId": "nobody"}', 404, "not_found"),
        (b'{"message": "hi", "conversationId": "missing"}', 404, "not_found"),
        # PostgreSQL's text cannot hold NUL: refused alike on both databases (found by the fuzzing on PostgreSQL).
        (b'{"message": "a\\u0000b"}', 400, "invalid_request"),
        (b'{"message": "hi", "conversationId": "\\u0000"}', 400, "invalid_request"),
    ],
)
async def test_bad_input_gets_a_json_error_and_saves_nothing(server, body, status, code):
    before = _message_count(server)
    async with httpx.AsyncClient(base_url=server.url) as client:
        response = await client.post("/api/command-center/message", content=body,
                                     headers={"content-type": "application/json"})
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    assert response.json()["error"]["message"]
    assert _message_count(server) == before
    async with httpx.AsyncClient(base_url=server.url) as client:
        assert (await client.get("/healthz")).status_code == 200


async def test_rest_lists_conversations_newest_first_with_exact_costs(server):
    await sse_stream(server.url, {"message": "listed"})
    async with httpx.AsyncClient(base_url=server.url) as client:
        listing = (await client.get("/api/conversations")).json()["conversations"]
        missing = await client.get("/api/conversations/nope/messages")
    assert listing[0]["title"] == "listed"
    assert listing[0]["messageCount"] == 2
    assert Decimal(listing[0]["totalCost"]) > 0
    assert [c["updatedAt"] for c in listing] == sorted((c["updatedAt"] for c in listing), reverse=True)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


async def test_readyz_checks_the_database_and_healthz_only_the_process(server):
    async with httpx.AsyncClient(base_url=server.url) as client:
        assert (await client.get("/readyz")).json() == {"status": "ready", "database": "ok", "accepting": "ok"}
        assert (await client.get("/healthz")).json() == {"status": "ok"}


@pytest.mark.parametrize("bound", [20000, 1000])
async def test_an_sse_reader_whose_socket_stalls_keeps_its_outbox_up_to_the_bound_and_is_dropped_past_it(
        make_server, make_upstream, bound):
    """~8 MB (8,000 deltas of ~1 KB) as fast as the upstream sends it, to a client with a 4 KB receive buffer
    that reads nothing until another reader has seen the whole answer: the kernel buffers hold a few hundred
    events, so the server's socket pauses and the rest waits in the reader's outbox. Under a bound of 20,000 it
    all comes, in order, once the client reads; under 1,000 the reader gets the events up to its drop, in order,
    then `slow_consumer` without an id, and a resume from its last id gets exactly the rest. The second case
    fails with an unbounded outbox (no error), the first with one that drops early or loses what it held."""
    relay = relay_with_big_answer(make_server, make_upstream, delay_ms=0, queue_events=bound)
    sock = unread_socket(relay.port)
    send_message_request(sock, "stall then read")
    received = bytearray()
    sock.settimeout(30)
    try:
        while b'"streamId":"' not in received:  # the start event, then nothing more until the answer is done
            received += await asyncio.to_thread(sock.recv, 4096)
        stream_id = bytes(received).split(b'"streamId":"', 1)[1].split(b'"', 1)[0].decode()
        whole = await sse_read_whole(relay.url, stream_id)  # the answer is generated to its end
        assert names(whole)[-1] == "done", whole[-1]
        while not received.endswith(b"\r\n0\r\n\r\n"):
            chunk = await asyncio.to_thread(sock.recv, 1 << 20)
            if not chunk:
                break
            received += chunk
    finally:
        sock.close()
    head, _, chunked = bytes(received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower()
    events = []
    for block in dechunk(chunked).decode().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n") if line and not line.startswith(":"))
        if fields:
            events.append((int(fields["id"]) if "id" in fields else None, fields["event"], json.loads(fields["data"])))
    if bound > 8002:
        assert [event_id for event_id, _, _ in events] == list(range(1, len(events) + 1))
        assert names(events) == ["start"] + ["chunk"] * 8000 + ["cost", "done"]
        assert text_of(events) == expected_words(8000, 150)
        return
    *delivered, dropped = events
    assert (dropped[0], dropped[1], dropped[2]["code"]) == (None, "error", "slow_consumer")
    assert [event_id for event_id, _, _ in delivered] == list(range(1, len(delivered) + 1))
    assert len(delivered) < 8002
    rest = await sse_read(relay.url, stream_id, last_event_id=len(delivered))
    assert delivered + rest == whole


def dechunk(data: bytes) -> bytes:
    """An HTTP/1.1 chunked body, decoded (and checked: every chunk's size matches its bytes)."""
    out, position = bytearray(), 0
    while True:
        end = data.index(b"\r\n", position)
        size = int(data[position:end], 16)
        if size == 0:
            return bytes(out)
        out += data[end + 2:end + 2 + size]
        assert data[end + 2 + size:end + 4 + size] == b"\r\n"
        position = end + 4 + size


async def test_a_reader_dropped_as_slow_again_and_again_gets_the_whole_answer_by_resuming(make_server,
                                                                                           make_upstream):
    """8,000 unpaced deltas behind a bound of 50 events: a reader that resumes from the last id it got after each
    `slow_consumer` (as the JS client does, and as sse_read_whole does) ends with every event once, in order.
    Fails when the error is taken for the answer's end: an SSE parser gives the id-less error the last id it
    saw, so telling it by its id (as sse_read_whole first did) ends the read early."""
    relay = relay_with_big_answer(make_server, make_upstream, delay_ms=0, queue_events=50)
    async with httpx.AsyncClient(base_url=relay.url, timeout=30) as client:
        started = await client.post("/api/command-center/message", json={"message": "drop me often"},
                                    headers={"accept": "application/json"})
    assert started.status_code == 202
    events = await sse_read_whole(relay.url, started.json()["streamId"])
    assert [event_id for event_id, _, _ in events] == list(range(1, len(events) + 1))
    assert names(events) == ["start"] + ["chunk"] * 8000 + ["cost", "done"]
    assert text_of(events) == expected_words(8000, 150)
