"""The streaming core in-process: a real Relay, SQLite file and hub; the Messages API a FakeUpstream on a loopback
socket, reached through the relay's default upstream transport (the built-in HTTP/1.1 client)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

from server.core import Relay
from server.errors import NotFoundError, StorageUnavailableError
from server.protocol.frames import SendMessage
from server.protocol.sse import SSEDecoder
from server.store import new_id
from server.upstream.http1 import Http1Transport

from .fakes import (
    API_KEY,
    FakeUpstream,
    RecordedRequest,
    RelayedEvent,
    SSEAnswer,
    anthropic_events,
    anthropic_stream_bytes,
    api_error,
    collect,
    collect_until,
    refused_url,
    relay_in_process,
    run_to_end,
)

STREAMS = Path(__file__).parent / "data" / "anthropic-streams"
EXPECTED: dict[str, Any] = orjson.loads((STREAMS / "expected.json").read_bytes())["fixtures"]
FIXTURES = sorted(path.stem for path in STREAMS.glob("*.sse"))
ERROR_FIXTURE = "docs_error_overloaded_midstream"


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    """The Messages API on a loopback port; each test says what it answers."""
    async with FakeUpstream() as fake:
        yield fake


@pytest.fixture
async def relay(tmp_path: Path, upstream: FakeUpstream) -> AsyncIterator[Relay]:
    async with relay_in_process(tmp_path, upstream) as relay:
        assert isinstance(relay.upstream.transport, Http1Transport)  # RELAY_UPSTREAM_TRANSPORT's default
        yield relay


def names(events: list[RelayedEvent]) -> list[str]:
    return [name for _, name, _ in events]


def text_of(events: list[RelayedEvent], name: str = "chunk") -> str:
    return "".join(data["text"] for _, event_name, data in events if event_name == name)


async def saved_messages(relay: Relay, events: list[RelayedEvent]) -> list[dict[str, Any]]:
    conversation_id = events[0][2]["conversationId"]
    return await relay.store.list_messages(conversation_id)


async def count_rows(relay: Relay) -> tuple[int, int]:
    conversations = await relay.store.db.fetch_val("SELECT COUNT(*) FROM conversations")
    messages = await relay.store.db.fetch_val("SELECT COUNT(*) FROM messages")
    return conversations, messages


def answer(texts: list[str], **script: Any) -> SSEAnswer:
    """A scripted streamed answer, each upstream event an HTTP chunk of its own."""
    return SSEAnswer(anthropic_events(texts, **script))


def recorded(name: str) -> SSEAnswer:
    """A recorded upstream stream, as one HTTP chunk."""
    return SSEAnswer([(STREAMS / f"{name}.sse").read_bytes()])


# --- a scripted answer ------------------------------------------------------------------------------


async def test_scripted_answer_gives_start_chunks_cost_done_and_is_saved_complete(relay, upstream):
    texts = ["Hel", "lo, ", "wor", "ld 🙂"]
    upstream.answer(SSEAnswer([anthropic_stream_bytes(texts, input_tokens=10, output_tokens=7, cache_read=4)]))

    stream = await relay.start(SendMessage("Say hello"))
    events = await collect(relay.hub, stream.id)

    assert names(events) == ["start", "chunk", "chunk", "chunk", "chunk", "cost", "done"]
    assert [event_id for event_id, _, _ in events] == list(range(1, 8))
    assert [data["text"] for _, name, data in events if name == "chunk"] == texts
    start, cost, done = events[0][2], events[-2][2], events[-1][2]
    user_message, answer_message = await relay.store.list_messages(stream.conversation_id)
    assert start == {"streamId": stream.id, "conversationId": stream.conversation_id, "model": "claude-sonnet-4-5",
                     "messageId": answer_message["id"], "parentId": user_message["id"],
                     "userMessageId": user_message["id"], "truncatedMessages": 0}
    assert answer_message["parent_id"] == user_message["id"] and user_message["parent_id"] is None
    assert cost == {
        "inputTokens": 10, "outputTokens": 7, "cacheCreationInputTokens": 0, "cacheReadInputTokens": 4,
        "totalCost": Decimal("0.0000454"), "model": "claude-haiku-4-5",
        "contextTokens": 14, "contextWindow": 200_000, "truncatedMessages": 0,
    }
    assert done == {"conversationId": stream.conversation_id, "messageId": stream.message_id, "stopReason": "end_turn"}

    user, assistant = await saved_messages(relay, events)
    assert (user["role"], user["content"], user["status"]) == ("user", "Say hello", "complete")
    assert assistant["id"] == stream.message_id
    assert {key: assistant[key] for key in (
        "role", "content", "status", "stop_reason", "model", "input_tokens", "output_tokens",
        "cache_creation_input_tokens", "cache_read_input_tokens", "cost", "cost_estimated", "error_code", "stream_id",
    )} == {
        "role": "assistant", "content": "Hello, world 🙂", "status": "complete", "stop_reason": "end_turn",
        "model": "claude-haiku-4-5", "input_tokens": 10, "output_tokens": 7, "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 4, "cost": "0.0000454", "cost_estimated": 0, "error_code": None,
        "stream_id": stream.id,
    }
    assert assistant["completed_at"] is not None


# --- recorded upstream streams ----------------------------------------------------------------------


def tool_input_json(name: str) -> list[str]:
    """The tool input JSON of each tool_use block of a recorded stream, joined per block."""
    decoder = SSEDecoder()
    parts: dict[int, list[str]] = {}
    for event in decoder.decode((STREAMS / f"{name}.sse").read_bytes()) + decoder.flush():
        payload = orjson.loads(event.data)
        delta = payload.get("delta") or {}
        if payload.get("type") == "content_block_delta" and delta.get("type") == "input_json_delta":
            parts.setdefault(payload["index"], []).append(delta["partial_json"])
    return ["".join(block) for block in parts.values() if "".join(block)]


@pytest.mark.parametrize("name", [name for name in FIXTURES if name != ERROR_FIXTURE])
async def test_recorded_stream_relays_its_text_and_thinking_and_is_saved_complete(relay, upstream, name):
    expected = EXPECTED[name]
    upstream.answer(recorded(name))

    events = await run_to_end(relay, SendMessage("replay"))

    assert names(events)[0] == "start" and names(events)[-2:] == ["cost", "done"]
    assert [data["text"] for _, event_name, data in events if event_name == "chunk"] == expected["relay"]["text_deltas"]
    assert text_of(events) == expected["relay"]["text"]
    assert text_of(events, "thinking") == expected["relay"]["thinking"]
    if expected["relay"]["thinking"]:
        assert expected["relay"]["thinking"] not in text_of(events)
    for tool_json in tool_input_json(name):
        assert tool_json not in text_of(events)
    # The SDK could not accumulate two recordings: their relay block says null, the top level does not.
    assert events[-1][2]["stopReason"] == (expected["relay"]["stop_reason"] or expected["stop_reason"])

    cost = events[-2][2]
    _, assistant = await saved_messages(relay, events)
    assert (assistant["content"], assistant["thinking"], assistant["status"]) == (
        expected["relay"]["text"], expected["relay"]["thinking"], "complete"
    )
    assert (assistant["input_tokens"], assistant["output_tokens"]) == (cost["inputTokens"], cost["outputTokens"])
    if expected["relay"]["usage"] is not None:
        assert {key: cost[key] for key in expected["relay"]["usage"]} == expected["relay"]["usage"]
    if cost["totalCost"] is None:
        assert assistant["cost"] is None
    else:
        # The same amount, to the last digit (the store keeps the value exactly, not the event's trailing zeros).
        assert Decimal(assistant["cost"]) == Decimal(str(cost["totalCost"]))


async def test_recorded_overload_midstream_ends_with_a_retryable_error_and_saves_the_partial_text(relay, upstream):
    upstream.answer(recorded(ERROR_FIXTURE))

    events = await run_to_end(relay, SendMessage("replay"))

    assert names(events) == ["start", "chunk", "cost", "error"]
    assert events[2][2]["estimated"] is True
    error = events[-1][2]
    assert (error["code"], error["retryable"], error["message"]) == ("overloaded", True, "Overloaded")
    user, assistant = await saved_messages(relay, events)
    assert error["messageId"] == assistant["id"]
    assert (assistant["content"], assistant["status"], assistant["error_code"]) == ("Hello", "error", "overloaded")
    assert assistant["cost_estimated"] == 1
    assert user["status"] == "complete"


# --- the request sent upstream ----------------------------------------------------------------------


async def test_request_sent_upstream_has_the_key_the_version_and_a_streaming_body(relay, upstream):
    upstream.answer(answer(["Hi"]))

    await run_to_end(relay, SendMessage("first question"))

    [request] = upstream.requests
    assert (request.method, request.path) == ("POST", "/v1/messages")
    assert request.headers["host"] == upstream.base_url.removeprefix("http://")
    assert request.headers["x-api-key"] == API_KEY
    assert request.headers["anthropic-version"] == "2023-06-01"
    assert request.headers["content-type"] == "application/json"
    assert request.json() == {
        "model": "claude-sonnet-4-5",
        "max_tokens": 1024,
        "messages": [{"role": "user", "content": "first question"}],
        "stream": True,
    }


async def test_second_message_in_a_conversation_sends_the_whole_history(relay, upstream):
    upstream.answer(answer(["First ", "answer."]), answer(["Second answer."]))

    first = await run_to_end(relay, SendMessage("first question"))
    conversation_id = first[-1][2]["conversationId"]
    second = await run_to_end(relay, SendMessage("second question", conversation_id=conversation_id))

    assert second[0][2]["conversationId"] == conversation_id
    assert upstream.requests[-1].json()["messages"] == [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "First answer."},
        {"role": "user", "content": "second question"},
    ]
    saved = await relay.store.list_messages(conversation_id)
    assert [(m["seq"], m["role"], m["content"]) for m in saved] == [
        (0, "user", "first question"), (1, "assistant", "First answer."),
        (2, "user", "second question"), (3, "assistant", "Second answer."),
    ]


# --- upstream failures ------------------------------------------------------------------------------

# HTTP status -> (Anthropic error type, relay code, retryable): error_for_status's stable mapping.
HTTP_ERRORS = {
    400: ("invalid_request_error", "invalid_request", False),
    401: ("authentication_error", "auth", False),
    403: ("permission_error", "auth", False),
    404: ("not_found_error", "not_found", False),
    413: ("request_too_large", "too_large", False),
    429: ("rate_limit_error", "rate_limited", True),
    500: ("api_error", "upstream_error", True),
    502: ("api_error", "upstream_error", True),
    503: ("api_error", "upstream_error", True),
    529: ("overloaded_error", "overloaded", True),
}


@pytest.mark.parametrize("status", sorted(HTTP_ERRORS))
async def test_upstream_http_error_becomes_an_error_event_with_a_stable_code(relay, upstream, status):
    error_type, code, retryable = HTTP_ERRORS[status]
    # An auth error answer that quotes the key: the relay must never pass it on.
    message = f"invalid x-api-key {API_KEY}" if code == "auth" else f"upstream says {status}"
    upstream.answer(api_error(status, error_type, message, {"retry-after": "7"}))

    events = await run_to_end(relay, SendMessage("hello"))

    assert names(events) == ["start", "error"]
    error = events[-1][2]
    assert (error["code"], error["retryable"]) == (code, retryable)
    if retryable:
        assert error["retryAfter"] == 7
    else:
        assert "retryAfter" not in error
    if code != "auth":
        assert error["message"] == message
    user, assistant = await saved_messages(relay, events)
    assert error["messageId"] == assistant["id"]
    assert (user["content"], user["status"]) == ("hello", "complete")
    assert (assistant["content"], assistant["status"], assistant["error_code"]) == ("", "error", code)
    assert API_KEY not in repr(events)
    assert API_KEY not in repr(await relay.store.db.fetch_all("SELECT * FROM messages"))
    assert API_KEY not in repr(await relay.store.db.fetch_all("SELECT * FROM conversations"))


async def test_connection_failure_becomes_a_connection_failed_error(tmp_path):
    holder, url = refused_url()
    with holder:
        async with relay_in_process(tmp_path, url) as relay:
            events = await run_to_end(relay, SendMessage("hello"))
            _, assistant = await saved_messages(relay, events)

    assert names(events) == ["start", "error"]
    assert (events[-1][2]["code"], events[-1][2]["retryable"]) == ("connection_failed", True)
    assert (assistant["status"], assistant["error_code"]) == ("error", "connection_failed")


async def test_connection_closed_mid_answer_is_a_connection_failed_error_with_the_partial_text_saved(tmp_path,
                                                                                                   upstream):
    """The upstream's socket closes after two deltas, the chunked body unfinished; not retried (text went out).
    The built-in client taking any connection's end for the end of the body fails this (protocol_error)."""
    upstream.answer(SSEAnswer(anthropic_events(["Hel", "lo", " never sent"])[:5], then="cut"))

    async with relay_in_process(tmp_path, upstream, retry_attempts=3, retry_base_delay=0) as relay:
        events = await run_to_end(relay, SendMessage("hello"))
        _, assistant = await saved_messages(relay, events)

    assert names(events) == ["start", "chunk", "chunk", "cost", "error"]
    assert (events[-1][2]["code"], events[-1][2]["retryable"]) == ("connection_failed", True)
    assert (assistant["content"], assistant["status"], assistant["error_code"]) == ("Hello", "error",
                                                                                    "connection_failed")
    assert len(upstream.requests) == 1


async def test_upstream_that_never_sends_an_event_times_out(tmp_path, upstream):
    """The upstream answers 200 and its headers, then nothing. The relay hangs up on it: the built-in client
    keeping an unfinished response's connection open (pooled, in _Connection.finish) fails this."""
    body = SSEAnswer([], then="hang")
    upstream.answer(body)

    async with relay_in_process(tmp_path, upstream, first_event_timeout=0.05) as relay:
        events = await run_to_end(relay, SendMessage("hello"))
        _, assistant = await saved_messages(relay, events)
        async with asyncio.timeout(10):
            await body.closed.wait()  # the relay hung up on the silent upstream

    assert names(events) == ["start", "error"]
    error = events[-1][2]
    assert (error["code"], error["retryable"]) == ("timeout", True)
    assert "start answering" in error["message"]
    assert (assistant["content"], assistant["status"], assistant["error_code"]) == ("", "error", "timeout")


async def test_upstream_that_goes_silent_mid_answer_times_out_and_saves_the_partial_text(tmp_path, upstream):
    """Two deltas, then silence; the connection is closed, not pooled, as above."""
    body = SSEAnswer(anthropic_events(["Hel", "lo", " never sent"])[:5], then="hang")
    upstream.answer(body)

    async with relay_in_process(tmp_path, upstream, idle_timeout=0.05) as relay:
        events = await run_to_end(relay, SendMessage("hello"))
        _, assistant = await saved_messages(relay, events)
        async with asyncio.timeout(10):
            await body.closed.wait()

    assert names(events) == ["start", "chunk", "chunk", "cost", "error"]
    error = events[-1][2]
    assert (error["code"], error["retryable"]) == ("timeout", True)
    assert "mid-answer" in error["message"]
    assert (assistant["content"], assistant["status"], assistant["error_code"]) == ("Hello", "error", "timeout")


async def test_stream_that_ends_without_message_stop_is_a_protocol_error(relay, upstream):
    upstream.answer(SSEAnswer(anthropic_events(["Hel", "lo"])[:-1]))

    events = await run_to_end(relay, SendMessage("hello"))

    assert names(events) == ["start", "chunk", "chunk", "cost", "error"]
    assert (events[-1][2]["code"], events[-1][2]["retryable"]) == ("protocol_error", False)
    _, assistant = await saved_messages(relay, events)
    assert (assistant["content"], assistant["status"], assistant["error_code"]) == ("Hello", "error", "protocol_error")
    # message_delta came, so the output count is the real one, not an estimate.
    assert (assistant["output_tokens"], assistant["cost_estimated"], assistant["stop_reason"]) == (2, 0, "end_turn")


# --- cancelling -------------------------------------------------------------------------------------


async def test_cancelled_stream_ends_done_cancelled_saves_the_partial_text_and_closes_upstream(relay, upstream):
    """The upstream sees its connection closed: the built-in client pooling the connection of an unfinished
    response (in _Connection.finish) fails this."""
    body = SSEAnswer(anthropic_events(["Hel", "lo", " never sent"])[:5], then="hang")
    upstream.answer(body)
    stream = await relay.start(SendMessage("hello"))

    await collect_until(relay.hub, stream.id, lambda events: text_of(events) == "Hello")
    assert relay.hub.cancel(stream.id) is True
    events = await collect(relay.hub, stream.id)

    assert names(events) == ["start", "chunk", "chunk", "cost", "done"]
    assert events[-2][2]["estimated"] is True
    assert events[-1][2] == {"conversationId": stream.conversation_id, "messageId": stream.message_id,
                             "stopReason": "cancelled"}
    _, assistant = await saved_messages(relay, events)
    assert (assistant["content"], assistant["status"], assistant["stop_reason"]) == ("Hello", "cancelled", "cancelled")
    assert assistant["cost_estimated"] == 1
    async with asyncio.timeout(10):
        await body.closed.wait()  # the cancel closed the upstream connection
    assert relay.hub.cancel(stream.id) is False


# --- what is not found saves nothing ----------------------------------------------------------------


async def test_unknown_conversation_raises_not_found_and_saves_nothing(relay, upstream):
    with pytest.raises(NotFoundError):
        await relay.start(SendMessage("hello", conversation_id=new_id()))
    assert await count_rows(relay) == (0, 0)
    assert upstream.connections == 0
    assert relay.hub.streams == {}


async def test_unknown_agent_raises_not_found_and_saves_nothing(relay, upstream):
    with pytest.raises(NotFoundError):
        await relay.start(SendMessage("hello", agent_id="no-such-agent"))
    assert await count_rows(relay) == (0, 0)
    assert upstream.connections == 0
    assert relay.hub.streams == {}


# --- concurrency ------------------------------------------------------------------------------------


async def test_twenty_concurrent_streams_on_one_sqlite_file_all_complete_and_are_saved(relay, upstream):
    def answer_to(request: RecordedRequest) -> SSEAnswer:
        return answer(["Answer", " to ", request.json()["messages"][-1]["content"]])

    upstream.answer_each(answer_to)

    results = await asyncio.gather(*(run_to_end(relay, SendMessage(f"question {i}")) for i in range(20)))

    for i, events in enumerate(results):
        assert names(events)[-1] == "done", events[-1]
        assert text_of(events) == f"Answer to question {i}"
    rows = await relay.store.db.fetch_all("SELECT content, status FROM messages WHERE role = 'assistant'")
    assert sorted((row[0], row[1]) for row in rows) == sorted(
        (f"Answer to question {i}", "complete") for i in range(20)
    )


# --- retries ----------------------------------------------------------------------------------------


async def test_retryable_error_before_any_text_is_retried_and_the_answer_completes(tmp_path, upstream):
    upstream.answer(api_error(529, "overloaded_error", "Overloaded"), answer(["Second ", "try"]))

    async with relay_in_process(tmp_path, upstream, retry_attempts=2, retry_base_delay=0) as relay:
        events = await run_to_end(relay, SendMessage("hello"))
        _, assistant = await saved_messages(relay, events)

    assert names(events) == ["start", "chunk", "chunk", "cost", "done"]
    assert len(upstream.requests) == 2
    assert (assistant["content"], assistant["status"]) == ("Second try", "complete")


async def test_retries_stop_after_the_configured_attempts(tmp_path, upstream):
    upstream.answer_each(lambda request: api_error(503, "api_error", "unavailable"))

    async with relay_in_process(tmp_path, upstream, retry_attempts=2, retry_base_delay=0) as relay:
        events = await run_to_end(relay, SendMessage("hello"))

    assert names(events) == ["start", "error"]
    assert events[-1][2]["code"] == "upstream_error"
    assert len(upstream.requests) == 3


async def test_error_after_text_went_out_is_never_retried(tmp_path, upstream):
    upstream.answer_each(lambda request: recorded(ERROR_FIXTURE))

    async with relay_in_process(tmp_path, upstream, retry_attempts=3, retry_base_delay=0) as relay:
        events = await run_to_end(relay, SendMessage("hello"))

    assert names(events) == ["start", "chunk", "cost", "error"]
    assert text_of(events) == "Hello"
    assert len(upstream.requests) == 1


async def test_retry_after_longer_than_the_retry_budget_fails_at_once(tmp_path, upstream):
    upstream.answer_each(lambda request: api_error(429, "rate_limit_error", "slow down", {"retry-after": "7"}))

    async with relay_in_process(tmp_path, upstream, retry_attempts=3, retry_max_wait=1.0) as relay:
        events = await run_to_end(relay, SendMessage("hello"))

    assert names(events) == ["start", "error"]
    assert (events[-1][2]["code"], events[-1][2]["retryAfter"]) == ("rate_limited", 7)
    assert len(upstream.requests) == 1


def blocked_saves(relay: Relay, monkeypatch: pytest.MonkeyPatch) -> tuple[asyncio.Event, asyncio.Event, list[str]]:
    """Make the store's save_reply wait for the test: (saving: set when a save began, release: set it to let
    the save go on, saved: the message id of every save that completed)."""
    saving, release, saved = asyncio.Event(), asyncio.Event(), []
    save_reply = relay.store.save_reply

    async def blocked_save_reply(message_id: str, reply: Any) -> None:
        saving.set()
        await release.wait()
        await save_reply(message_id, reply)
        saved.append(message_id)

    monkeypatch.setattr(relay.store, "save_reply", blocked_save_reply)
    return saving, release, saved


async def test_a_users_cancel_while_the_answer_is_being_saved_is_too_late_and_the_answer_ends_complete(
        relay, upstream, monkeypatch):
    """The answer came whole: a cancel that arrives during its save changes nothing. Letting hub.cancel cancel a
    stream whose core is finalizing fails this (cancel answers True)."""
    upstream.answer(answer(["Hel", "lo"]))
    saving, release, saved = blocked_saves(relay, monkeypatch)
    stream = await relay.start(SendMessage("hello"))
    async with asyncio.timeout(10):
        await saving.wait()
    assert relay.hub.cancel(stream.id) is False  # a user's cancel racing the end of the answer
    release.set()
    events = await collect(relay.hub, stream.id)

    assert names(events) == ["start", "chunk", "chunk", "cost", "done"]
    assert events[-1][2]["stopReason"] == "end_turn"
    assert saved == [stream.message_id]
    _, assistant = await relay.store.list_messages(stream.conversation_id)
    assert (assistant["content"], assistant["status"]) == ("Hello", "complete")


async def test_cancel_while_the_answer_is_being_saved_still_ends_the_stream(relay, upstream, monkeypatch):
    """A cancellation that reaches the core while it waits for the save (nothing in the hub cancels a saving
    stream, see above; asyncio.run cancelling every task as a process ends does) neither cancels the save nor
    ends the stream without its last event: the save completes once, then `done`. Fails if run_stream awaits
    _save directly instead of through its own future (the save is cancelled: nothing saved, no `done`), or if
    _wait lets the CancelledError through (the task ends cancelled and the log without `done`)."""
    upstream.answer(answer(["Hel", "lo"]))
    saving, release, saved = blocked_saves(relay, monkeypatch)
    stream = await relay.start(SendMessage("hello"))
    task = stream.task
    assert task is not None
    async with asyncio.timeout(10):
        await saving.wait()
        for _ in range(2):  # every cancellation is absorbed, not only the first
            task.cancel()
            # Until the core has taken it: no event says so, the task's count of pending cancellations does.
            while task.cancelling() and not task.done():  # noqa: ASYNC110
                await asyncio.sleep(0)
            assert not task.done() and not stream.finished, "the stream ended before its save did"
        release.set()
        await asyncio.wait([task])

    assert not task.cancelled()
    assert saved == [stream.message_id]
    events = await collect(relay.hub, stream.id)
    assert names(events) == ["start", "chunk", "chunk", "cost", "done"]
    assert events[-1][2] == {"conversationId": stream.conversation_id, "messageId": stream.message_id,
                             "stopReason": "end_turn"}
    _, assistant = await relay.store.list_messages(stream.conversation_id)
    assert (assistant["content"], assistant["status"]) == ("Hello", "complete")


async def test_cancel_right_after_start_still_ends_the_stream_and_saves_it_cancelled(relay, upstream):
    upstream.answer(answer(["never", " read"]))
    stream = await relay.start(SendMessage("hello"))

    assert relay.hub.cancel(stream.id) is True  # before the event loop ran the stream's task
    async with asyncio.timeout(10):
        await asyncio.wait([stream.task])

    assert stream.finished, f"no terminal event: the log is {[name for name, _ in stream.log.entries()]}"
    assert names(await collect(relay.hub, stream.id))[-1] == "done"
    saved = await relay.store.get_message(stream.message_id)
    assert saved is not None and saved["status"] == "cancelled"


# --- saving when the database cannot take it ----------------------------------------------------------


async def test_a_save_that_finds_its_message_finished_elsewhere_ends_with_an_error_never_done(relay, upstream,
                                                                                              monkeypatch):
    """Another process marked the answer interrupted before its save (issue 14, finding 6). Treating
    FinishedElsewhereError as a successful save in run_stream fails this: the stream ended `done`."""
    upstream.answer(answer(["Hel", "lo"]))
    save_reply = relay.store.save_reply

    async def marked_first(message_id: str, reply: Any) -> None:
        assert await relay.store.interrupt_unfinished() == 1  # what a second process did on main
        await save_reply(message_id, reply)

    monkeypatch.setattr(relay.store, "save_reply", marked_first)
    events = await run_to_end(relay, SendMessage("hello"))

    assert names(events)[-1] == "error"
    assert events[-1][2]["code"] == "interrupted" and events[-1][2]["retryable"] is True
    assert "done" not in names(events)


async def test_an_answer_whose_save_fails_for_a_while_ends_done_once_it_is_saved(tmp_path, upstream, monkeypatch):
    """The database is back within RELAY_SAVE_WAIT_SECONDS: `done` waits for the save. Making _save give up
    at the first StorageUnavailableError fails this (the stream ends with an error and nothing is saved)."""
    async with relay_in_process(tmp_path, upstream, save_wait_seconds=30) as relay:
        upstream.answer(answer(["Hel", "lo"]))
        save_reply, failures = relay.store.save_reply, []

        async def unavailable_three_times(message_id: str, reply: Any) -> None:
            if len(failures) < 3:
                failures.append(reply)
                raise StorageUnavailableError("the database is restarting")
            await save_reply(message_id, reply)

        monkeypatch.setattr(relay.store, "save_reply", unavailable_three_times)
        events = await run_to_end(relay, SendMessage("hello"))

        assert names(events)[-2:] == ["cost", "done"] and len(failures) == 3
        assert events[-1][2]["messageId"] is not None
        _, assistant = await saved_messages(relay, events)
        assert (assistant["content"], assistant["status"]) == ("Hello", "complete")


async def test_past_the_save_wait_the_stream_ends_storage_unavailable_and_the_answer_is_saved_later(
        tmp_path, upstream, monkeypatch):
    """RELAY_SAVE_WAIT_SECONDS=0: the client is told at the first failed save, and the save goes on. Ending
    with `done` there, or dropping the retries after the error event, fails this."""
    async with relay_in_process(tmp_path, upstream, save_wait_seconds=0) as relay:
        upstream.answer(answer(["Hel", "lo"]))
        save_reply, back = relay.store.save_reply, asyncio.Event()

        async def unavailable_until_back(message_id: str, reply: Any) -> None:
            if not back.is_set():
                raise StorageUnavailableError("the disk is full")
            await save_reply(message_id, reply)

        monkeypatch.setattr(relay.store, "save_reply", unavailable_until_back)
        stream = await relay.start(SendMessage("hello"))
        events = await collect(relay.hub, stream.id)

        assert names(events)[-1] == "error" and "done" not in names(events)
        error = events[-1][2]
        assert (error["code"], error["retryable"], error["messageId"]) == ("storage_unavailable", True,
                                                                           stream.message_id)
        assert (await relay.store.get_message(stream.message_id) or {})["status"] == "streaming"
        back.set()
        async with asyncio.timeout(10):
            await asyncio.wait([stream.task])
        saved = await relay.store.get_message(stream.message_id) or {}
        assert (saved["content"], saved["status"]) == ("Hello", "complete")
