"""Conversations as trees end to end (issue 17): a real server process on both transports, its Messages API a
FakeUpstream in the test that records every request, so each test checks exactly what history the model got."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from typing import Any

import httpx
import pytest
import websockets

from .fakes import API_KEY, FakeUpstream, SSEAnswer, anthropic_events
from .relay_clients import Event, loads, names, sse_read, sse_stream, text_of, ws_read_until_end, ws_stream

TRANSPORTS = ["sse", "websocket"]
MESSAGE_PATH = "/api/command-center/message"


@pytest.fixture
async def upstream() -> Any:
    async with FakeUpstream() as fake:
        yield fake


@pytest.fixture
def relay(upstream: FakeUpstream, make_server: Any) -> Any:
    """A server whose model is the test's FakeUpstream (retries off: one request per answer)."""
    return make_server({"ANTHROPIC_API_KEY": API_KEY, "ANTHROPIC_BASE_URL": upstream.base_url,
                        "RELAY_RETRY_ATTEMPTS": "0"})


def command(transport: str, kind: str, value: str, **fields: Any) -> dict[str, Any]:
    """A send ("message"), "regenerate" or "continue" as the transport takes it: the POST body or the frame."""
    if transport == "sse":
        return {"message": value, **fields} if kind == "message" else {kind: value}
    return {"type": "message", "message": value, **fields} if kind == "message" else {"type": kind, "messageId": value}


async def run(relay: Any, transport: str, body: dict[str, Any]) -> list[Event]:
    if transport == "sse":
        return await sse_stream(relay.url, body)
    return await ws_stream(relay.ws_url, body)


async def refused(relay: Any, transport: str, body: dict[str, Any]) -> tuple[int | None, dict[str, Any]]:
    """(HTTP status or None on the WebSocket, the error's body) of a command the server refuses."""
    if transport == "sse":
        async with httpx.AsyncClient(base_url=relay.url, timeout=30) as client:
            response = await client.post(MESSAGE_PATH, json=body)
        return response.status_code, loads(response.text)["error"]
    events = await ws_stream(relay.ws_url, body)
    assert names(events) == ["error"], events
    return None, events[0][2]


async def rest(relay: Any, method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
    async with httpx.AsyncClient(base_url=relay.url, timeout=30) as client:
        return await client.request(method, path, json=body)


def answers_with(upstream: FakeUpstream, *texts: str, **script: Any) -> None:
    upstream.answer(SSEAnswer(anthropic_events(list(texts), **script)))


def sent(upstream: FakeUpstream) -> list[tuple[str, str]]:
    """The history the model got in the last request, as (role, text)."""
    return [(m["role"], m["content"]) for m in upstream.requests[-1].json()["messages"]]


def ids(events: list[Event]) -> tuple[str, str, str, str]:
    """(conversationId, messageId, parentId, userMessageId) of a stream's start."""
    start = events[0][2]
    assert events[0][1] == "start"
    return start["conversationId"], start["messageId"], start["parentId"], start["userMessageId"]


def cost_of(events: list[Event]) -> Decimal:
    return next(Decimal(data["totalCost"]) for _, name, data in events if name == "cost")


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_edit_regenerate_switch_and_continue_send_the_model_exactly_the_active_path(relay, upstream,
                                                                                            transport):
    """Each command's upstream request holds the path from the root to the new answer's parent and nothing else
    (a continue's ends with the partial answer); the continued answer is one message with the text, tokens and
    exact cost of both generations. Fails if history is read by seq (the edited-away "two" would be sent),
    if regenerate or continue start a new user message, or if a continue overwrites the first part."""
    answers_with(upstream, "A1")
    first = await run(relay, transport, command(transport, "message", "one"))
    conv, a1, parent, u1 = ids(first)
    assert parent == u1 and sent(upstream) == [("user", "one")]

    answers_with(upstream, "A2")
    _, a2, _, u2 = ids(await run(relay, transport, command(transport, "message", "two", conversationId=conv)))
    assert sent(upstream) == [("user", "one"), ("assistant", "A1"), ("user", "two")]

    answers_with(upstream, "A3")  # edit "two": a sibling of it, under the answer it followed
    edited = await run(relay, transport, command(transport, "message", "two bis", conversationId=conv,
                                                 parentMessageId=a1))
    _, a3, _, u3 = ids(edited)
    assert sent(upstream) == [("user", "one"), ("assistant", "A1"), ("user", "two bis")]

    answers_with(upstream, "A4")
    regenerated = await run(relay, transport, command(transport, "regenerate", a3))
    _, a4, parent4, user4 = ids(regenerated)
    assert a4 not in (a3, u3) and parent4 == user4 == u3
    assert sent(upstream) == [("user", "one"), ("assistant", "A1"), ("user", "two bis")]

    listing = (await rest(relay, "GET", f"/api/conversations/{conv}/messages")).json()
    assert listing["activeLeafId"] == listing["conversation"]["activeLeafId"] == a4
    by_id = {m["id"]: m for m in listing["messages"]}
    assert len(by_id) == 7
    assert [(by_id[i]["parentId"], by_id[i]["siblingIndex"], by_id[i]["siblingCount"]) for i in (u2, u3, a3, a4)] == [
        (a1, 0, 2), (a1, 1, 2), (u3, 0, 2), (u3, 1, 2)]

    switched = await rest(relay, "PUT", f"/api/conversations/{conv}/active-leaf", {"messageId": u2})
    assert switched.status_code == 200
    assert switched.json()["activeLeafId"] == a2
    assert [m["id"] for m in switched.json()["messages"]] == [u1, a1, u2, a2]
    active = (await rest(relay, "GET", f"/api/conversations/{conv}/messages?path=active")).json()
    assert [m["id"] for m in active["messages"]] == [u1, a1, u2, a2]

    answers_with(upstream, "Once ", "upon ", stop_reason="max_tokens", input_tokens=30, output_tokens=5)
    cut = await run(relay, transport, command(transport, "message", "three", conversationId=conv))
    _, a5, _, u5 = ids(cut)
    assert sent(upstream) == [("user", "one"), ("assistant", "A1"), ("user", "two"), ("assistant", "A2"),
                              ("user", "three")]
    assert cut[-1][2]["stopReason"] == "max_tokens"

    answers_with(upstream, "a time.", input_tokens=40, output_tokens=3)
    more = await run(relay, transport, command(transport, "continue", a5))
    assert ids(more) == (conv, a5, u5, u5)
    assert sent(upstream) == [("user", "one"), ("assistant", "A1"), ("user", "two"), ("assistant", "A2"),
                              ("user", "three"), ("assistant", "Once upon")]  # no trailing whitespace
    assert text_of(more) == "a time." and names(more).count("done") == 1 and more[-1][2]["messageId"] == a5
    path = (await rest(relay, "GET", f"/api/conversations/{conv}/messages?path=active")).json()["messages"]
    continued = path[-1]
    assert [m["id"] for m in path] == [u1, a1, u2, a2, u5, a5]
    assert (continued["content"], continued["inputTokens"], continued["outputTokens"]) == ("Once upon a time.", 70, 8)
    assert Decimal(continued["totalCost"]) == cost_of(cut) + cost_of(more)

    status, error = await refused(relay, transport, command(transport, "continue", a5))
    assert (status, error["code"]) == (409 if transport == "sse" else None, "not_continuable")
    status, error = await refused(relay, transport, command(transport, "regenerate", "no-such-answer"))
    assert (status, error["code"]) == (404 if transport == "sse" else None, "not_found")
    assert len(upstream.requests) == 6


async def test_a_regenerated_answer_resumed_in_its_middle_is_exact_and_a_busy_conversation_refuses(relay,
                                                                                                    upstream):
    """Read over the WebSocket until two chunks of a regenerated answer, drop the socket, resume over SSE from
    the last id while the answer goes on: the two reads are the whole stream, once each. Meanwhile every command
    on that conversation, a plain send too, is a 409 busy naming the running stream (nothing saved)."""
    answers_with(upstream, "first")
    conv, answer, _, user = ids(await sse_stream(relay.url, {"message": "hello"}))
    gate = asyncio.Event()
    upstream.answer(SSEAnswer(anthropic_events(["r1 ", "r2 ", "r3 ", "r4"]), gate=gate, gate_after=5))
    head: list[Event] = []
    async with websockets.connect(relay.ws_url + "/api/command-center/ws") as socket:
        await socket.send(json.dumps({"type": "regenerate", "messageId": answer}))
        async with asyncio.timeout(30):
            while sum(1 for _, name, _ in head if name == "chunk") < 2:
                frame = json.loads(await socket.recv())
                head.append((frame["id"], frame["event"], frame["data"]))
    stream_id = head[0][2]["streamId"]
    for body in ({"regenerate": answer}, {"continue": answer}, {"message": "x", "conversationId": conv},
                 {"message": "x", "conversationId": conv, "parentMessageId": answer}):
        status, error = await refused(relay, "sse", body)
        assert (status, error["code"], error["streamId"]) == (409, "busy", stream_id)
    tail = asyncio.create_task(sse_read(relay.url, stream_id, last_event_id=head[-1][0]))
    await asyncio.sleep(0)
    gate.set()
    rest_of_it = await tail
    whole = await sse_read(relay.url, stream_id)
    assert head + rest_of_it == whole
    assert [event_id for event_id, _, _ in whole] == list(range(1, len(whole) + 1))
    assert text_of(whole) == "r1 r2 r3 r4" and ids(whole)[2:] == (user, user)


async def usage_total(relay: Any) -> dict[str, Any]:
    response = await rest(relay, "GET", "/api/usage?groupBy=day")
    assert response.status_code == 200
    total: dict[str, Any] = loads(response.text)["total"]
    return total


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_deleting_a_conversation_while_it_answers_stops_the_answer_and_keeps_its_costs(relay, upstream,
                                                                                              transport):
    """DELETE cancels the running answer (its reader gets `done` cancelled, the model's connection is closed),
    leaves no message, makes its streams not resumable, and usage still counts everything it spent, the
    cancelled answer's estimate included. Fails if usage is summed over messages (the totals would drop)."""
    answers_with(upstream, "kept")
    kept = ids(await run(relay, transport, command(transport, "message", "keep")))[0]
    answers_with(upstream, "g1")
    first = await run(relay, transport, command(transport, "message", "go"))
    conv = ids(first)[0]
    before = await usage_total(relay)
    hanging = SSEAnswer(anthropic_events(["partial ", "never"])[:4], then="hang")
    upstream.answer(hanging)
    async with websockets.connect(relay.ws_url + "/api/command-center/ws") as socket:
        await socket.send(json.dumps({"type": "message", "message": "more", "conversationId": conv}))
        events: list[Event] = []
        async with asyncio.timeout(30):
            while "chunk" not in names(events):
                frame = json.loads(await socket.recv())
                events.append((frame["id"], frame["event"], frame["data"]))
        stream_id = events[0][2]["streamId"]
        deleted = await rest(relay, "DELETE", f"/api/conversations/{conv}")
        assert deleted.status_code == 200
        assert deleted.json() == {"id": conv, "deleted": True, "cancelledStreamIds": [stream_id]}
        events += await ws_read_until_end(socket, stream_id)
    async with asyncio.timeout(10):
        await hanging.closed.wait()
    assert events[-1][1] == "done" and events[-1][2]["stopReason"] == "cancelled"
    cancelled_cost = cost_of(events)
    assert (await rest(relay, "GET", f"/api/conversations/{conv}/messages")).status_code == 404
    assert (await rest(relay, "DELETE", f"/api/conversations/{conv}")).status_code == 404
    listed = (await rest(relay, "GET", "/api/conversations")).json()
    assert [c["id"] for c in listed["conversations"]] == [kept] and listed["nextBefore"] is None
    assert relay.count("SELECT COUNT(*) FROM messages WHERE conversation_id = ?", conv) == 0
    for stream in (stream_id, first[0][2]["streamId"]):
        resumed = await rest(relay, "GET", f"/api/command-center/streams/{stream}")
        assert (resumed.status_code, resumed.json()["error"]["code"]) == (404, "not_resumable")
    after = await usage_total(relay)
    assert after["messages"] == before["messages"] + 1
    assert Decimal(after["cost"]) == Decimal(before["cost"]) + cancelled_cost
    assert after["inputTokens"] == before["inputTokens"] + 10


async def test_rename_and_list_conversations_by_page_and_title(relay, upstream):
    upstream.answer_each(lambda request: SSEAnswer(anthropic_events(["ok"])))
    made = [ids(await sse_stream(relay.url, {"message": f"Question {n} about {'Python' if n % 2 else 'Rust'}"}))[0]
            for n in range(5)]
    first = (await rest(relay, "GET", "/api/conversations?limit=2")).json()
    second = (await rest(relay, "GET", f"/api/conversations?limit=2&before={first['nextBefore']}")).json()
    third = (await rest(relay, "GET", f"/api/conversations?limit=2&before={second['nextBefore']}")).json()
    assert [c["id"] for page in (first, second, third) for c in page["conversations"]] == made[::-1]
    assert third["nextBefore"] is None
    found = (await rest(relay, "GET", "/api/conversations?q=PYTHON")).json()["conversations"]
    assert [c["id"] for c in found] == [made[3], made[1]]
    renamed = await rest(relay, "PATCH", f"/api/conversations/{made[0]}", {"title": "  A better name  "})
    assert renamed.status_code == 200 and renamed.json()["title"] == "A better name"
    assert renamed.json()["activeLeafId"] is not None
    for title in ("   ", "x" * 201, 7):
        bad = await rest(relay, "PATCH", f"/api/conversations/{made[0]}", {"title": title})
        assert (bad.status_code, bad.json()["error"]["code"]) == (400, "invalid_request")
    assert (await rest(relay, "PATCH", "/api/conversations/nope", {"title": "x"})).status_code == 404
    assert (await rest(relay, "GET", "/api/conversations?limit=201")).status_code == 400
    assert (await rest(relay, "GET", "/api/conversations?before=garbage")).status_code == 400
    missing = await rest(relay, "PUT", f"/api/conversations/{made[0]}/active-leaf", {"messageId": "nope"})
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "not_found")
