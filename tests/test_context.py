"""Context-window management: the estimate, truncation and refusal (server/context.py), the upstream's refusal
for length mapped, learned from and retried (server/core.py), and the emulated API's own refusal
(server/upstream/offline.py). The conversation tests run a real Relay, SQLite file and hub against a FakeUpstream
that counts tokens by the emulated rule and refuses a request over its window exactly as the API does."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from server.config import ConfigError, load_settings
from server.context import ContextWindow, Counted, estimate_message
from server.core import Relay
from server.errors import ContextTooLongError, TooLargeError
from server.pricing import DEFAULT_LIMITS, model_limits
from server.protocol.anthropic import context_refusal, error_for_status
from server.protocol.frames import Continue, Regenerate, SendMessage
from server.protocol.tokens import request_tokens
from server.upstream.offline import OfflineOptions, OfflineTransport
from server.upstream.offline import context_refusal as emulated_refusal

from .fakes import FakeUpstream, JSONAnswer, RecordedRequest, SSEAnswer, anthropic_events, relay_in_process, run_to_end
from .relay_clients import sse_stream

MODEL = "claude-sonnet-4-5"
WINDOW = 200_000


def history_of(*sizes: int) -> list[dict[str, str]]:
    """Alternating user/assistant messages of these many bytes each, ending with the new user message."""
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": f"{i:03d}" + "x" * (size - 3)}
            for i, size in enumerate(sizes)]


def sent(request: RecordedRequest) -> list[dict[str, str]]:
    """The messages a recorded request sent, each content as its text (the cache markers of text blocks off)."""
    return [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str)
             else "".join(block["text"] for block in m["content"])} for m in request.json()["messages"]]


# --- the model limits and the API's words -----------------------------------------------------------------


def test_model_limits_resolve_dated_ids_and_aliases_and_default_for_unknown_models():
    """Mutation: model_limits ignoring resolve_model (exact keys only) fails the dated and alias ids."""
    assert model_limits("claude-haiku-4-5-20251001").max_output == 64_000
    assert model_limits("claude-opus-4-0").max_output == 32_000
    assert model_limits("claude-3-haiku-20240307").max_output == 4_096
    assert model_limits("claude-from-the-future") == DEFAULT_LIMITS


def test_both_refusals_for_length_give_the_input_tokens_and_the_window():
    """Mutation: dropping the input+max_tokens pattern fails the second message."""
    assert context_refusal("prompt is too long: 219898 tokens > 200000 maximum") == (219_898, 200_000)
    assert context_refusal("input length and `max_tokens` exceed context limit: 199759 + 8192 > 200000,"
                           " decrease input length or `max_tokens` and try again") == (199_759, 200_000)
    assert context_refusal("max_tokens: must be at most 64000") is None


def test_an_upstream_400_prompt_is_too_long_is_context_too_long_413_with_its_figures():
    """Mutation: leaving the 400 as invalid_request (the old mapping) fails the code and the details."""
    body = orjson.dumps({"type": "error", "error": {"type": "invalid_request_error",
                                                    "message": "prompt is too long: 201000 tokens > 200000 maximum"}})
    error = error_for_status(400, body, None)
    assert (error.code, error.status, error.retryable) == ("context_too_long", 413, False)
    assert error.details == {"inputTokens": 201_000, "contextWindow": 200_000}
    other = error_for_status(400, orjson.dumps({"error": {"type": "invalid_request_error", "message": "bad"}}), None)
    assert other.code == "invalid_request"


def test_the_emulated_api_refuses_over_the_window_and_input_plus_max_tokens_with_the_apis_words():
    """Mutation: comparing with >= instead of > refuses a request of exactly the window."""
    options = OfflineOptions(context_window=100)
    fits = {"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": "x" * 344}]}  # 86 + 4
    assert request_tokens(fits) == 90
    assert emulated_refusal(fits, options) is None
    tight = {**fits, "max_tokens": 11}
    refusal = orjson.loads(emulated_refusal(tight, options) or b"{}")
    assert refusal == {"type": "error", "error": {"type": "invalid_request_error", "message": (
        "input length and `max_tokens` exceed context limit: 90 + 11 > 100, decrease input length or `max_tokens`"
        " and try again")}}
    over = {**fits, "messages": [{"role": "user", "content": "x" * 400}]}
    assert orjson.loads(emulated_refusal(over, options) or b"{}")["error"]["message"] == \
        "prompt is too long: 104 tokens > 100 maximum"
    assert emulated_refusal({**over, "model": "claude-haiku-4-5"}, OfflineOptions()) is None  # 200K window


# --- the estimate and the plan (pure) ---------------------------------------------------------------------


def test_a_history_that_fits_is_sent_whole():
    plan = ContextWindow().fit("c", MODEL, "be brief", history_of(3000, 3000, 3000), 1024, "truncate")
    assert plan.dropped == 0 and len(plan.messages) == 3 and plan.context_window == WINDOW


def test_truncation_drops_the_oldest_pairs_keeps_the_new_message_and_leaves_room_for_max_tokens():
    """Mutation: dropping one message at a time leaves an assistant message first; not reserving max_tokens
    keeps a history whose estimate plus max_tokens exceeds the window."""
    history = history_of(*[120_000] * 9)  # 9 messages of 40,008 estimated tokens each
    plan = ContextWindow().fit("c", MODEL, "system", history, 32_000, "truncate")
    assert plan.dropped % 2 == 0 and plan.messages[0]["role"] == "user"
    assert plan.messages == history[plan.dropped:] and plan.messages[-1] is history[-1]
    assert plan.input_tokens + 32_000 <= WINDOW
    assert plan.input_tokens == 2 + sum(estimate_message(m) for m in plan.messages)  # "system": 2 tokens
    # Keeping two more messages would not have fit.
    assert 2 + sum(estimate_message(m) for m in history[plan.dropped - 2:]) + 32_000 > WINDOW


def test_the_error_policy_refuses_with_the_estimate_and_the_window():
    """Mutation: the error policy truncating anyway raises nothing."""
    with pytest.raises(ContextTooLongError) as caught:
        ContextWindow().fit("c", MODEL, "", history_of(*[300_000] * 3), 1024, "error")
    assert caught.value.status == 413 and caught.value.code == "context_too_long"
    assert caught.value.details == {"inputTokens": 3 * (100_000 + 8), "contextWindow": WINDOW}


@pytest.mark.parametrize("policy", ["truncate", "error"])
def test_a_message_larger_than_the_window_is_too_large_under_either_policy(policy):
    """Mutation: checking the new message after truncation, or only under "error", fails one of the two."""
    with pytest.raises(TooLargeError) as caught:
        ContextWindow().fit("c", MODEL, "", history_of(10, 10, 600_000), 1024, policy)
    assert caught.value.code == "too_large" and caught.value.status == 413


def test_the_upstreams_count_replaces_the_estimate_of_what_it_counted():
    """Mutation: ignoring remembered counts gives the conservative estimate of the whole history."""
    history = history_of(4000, 4000, 4000)
    context = ContextWindow()
    context.remember("c", Counted.of("", history, 0, 2, 2100))
    plan = context.fit("c", MODEL, "", history, 1024, "truncate")
    assert plan.input_tokens == 2100 + estimate_message(history[2])
    # A count of other messages (an edited branch) is not applied.
    other = [*history[:1], {"role": "assistant", "content": "different"}, history[2]]
    assert context.fit("c", MODEL, "", other, 1024, "truncate").input_tokens == \
        sum(estimate_message(m) for m in other)


def test_a_saved_count_too_small_for_its_whole_history_is_not_used():
    """Mutation: taking every saved count for the whole history under-counts a truncated answer's request."""
    history = history_of(60_000, 600, 60)
    assert Counted.saved("", history, 2, 15_000) is not None  # 60,600 bytes / 15,000 tokens: 4 a token
    assert Counted.saved("", history, 2, 5_000) is None  # 12 bytes a token: that request left messages out


# --- configuration ----------------------------------------------------------------------------------------


def test_the_context_policy_is_validated_and_agents_take_it_from_the_file(tmp_path):
    """Mutation: not validating contextPolicy lets "drop" through."""
    with pytest.raises(ConfigError, match="RELAY_CONTEXT_POLICY must be truncate or error"):
        load_settings({"RELAY_CONTEXT_POLICY": "drop"})
    agents = tmp_path / "agents.json"
    agents.write_text(json.dumps({"agents": [{"id": "strict", "contextPolicy": "error"}, {"id": "loose"}]}))
    settings = load_settings({"RELAY_AGENTS_FILE": str(agents)})
    assert [(a.id, a.context_policy) for a in settings.agents] == [
        ("default", "truncate"), ("strict", "error"), ("loose", "truncate")]
    assert load_settings({"RELAY_CONTEXT_POLICY": "error"}).agent(None).context_policy == "error"  # type: ignore[union-attr]
    agents.write_text(json.dumps({"agents": [{"id": "bad", "contextPolicy": "drop"}]}))
    with pytest.raises(ConfigError, match="contextPolicy must be truncate or error"):
        load_settings({"RELAY_AGENTS_FILE": str(agents)})


# --- a conversation against an emulated API ---------------------------------------------------------------


def emulated_api(window: int = 0) -> tuple[Callable[[RecordedRequest], SSEAnswer | JSONAnswer], list[int]]:
    """An upstream answer maker that counts by the emulated rule and refuses as the API does (over `window`,
    0: the model's); the statuses it answered, in order."""
    statuses: list[int] = []

    def answer(request: RecordedRequest) -> SSEAnswer | JSONAnswer:
        body = request.json()
        refusal = emulated_refusal(body, OfflineOptions(context_window=window))
        if refusal is not None:
            statuses.append(400)
            return JSONAnswer(400, orjson.loads(refusal))
        statuses.append(200)
        return SSEAnswer(anthropic_events(["ok"], model=MODEL, input_tokens=request_tokens(body)))

    return answer, statuses


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream() as fake:
        yield fake


async def conversation(relay: Relay, messages: int, size: int) -> list[list[tuple[int, str, dict[str, Any]]]]:
    """Send `messages` user messages of `size` bytes each in one conversation; each turn's events."""
    turns = []
    conversation_id = None
    for turn in range(messages):
        events = await run_to_end(relay, SendMessage(f"{turn:03d} " + "y" * size, conversation_id=conversation_id))
        conversation_id = events[0][2]["conversationId"]
        turns.append(events)
    return turns


async def test_a_conversation_past_250000_tokens_keeps_getting_answers_under_truncate(tmp_path: Path,
                                                                                       upstream: FakeUpstream):
    """The upstream never refuses: every request fits with max_tokens, the oldest turns are dropped as it grows,
    and the cost event's contextTokens is the recorded request's own token count.

    Mutation: sending turn.history instead of the plan's messages gets 400s from the sixth turn on; a cost event
    without the context fields fails the meter's figures."""
    answer, statuses = emulated_api()
    upstream.answer_each(answer)
    async with relay_in_process(tmp_path, upstream, max_message_bytes=200_000) as relay:
        turns = await conversation(relay, 12, 100_000)  # 12 x 25,005 emulated tokens: 300,000 and more
    assert statuses == [200] * 12
    bodies = [request.json() for request in upstream.requests]
    assert sum(request_tokens({"messages": [m]}) for m in bodies[-1]["messages"]) < 200_000
    total = sum(len(m["content"]) for m in sent(upstream.requests[-1])) + 12 * 100_000
    assert total > 250_000 * 4  # the whole conversation is past 250,000 tokens
    truncated = []
    for events, body, request in zip(turns, bodies, upstream.requests, strict=True):
        start, cost = events[0][2], next(data for _, name, data in events if name == "cost")
        assert [name for _, name, _ in events][-1] == "done"
        assert cost["contextTokens"] == request_tokens(body) and cost["contextWindow"] == 200_000
        assert request_tokens(body) + body["max_tokens"] <= 200_000
        assert start["truncatedMessages"] == cost["truncatedMessages"]
        truncated.append(start["truncatedMessages"])
        assert sent(request)[-1]["content"].startswith(f"{len(truncated) - 1:03d} ")  # the new message is sent
        assert body["messages"][0]["role"] == "user"
    assert truncated[:5] == [0] * 5 and truncated[-1] > 0 and truncated == sorted(truncated)
    assert all(n % 2 == 0 for n in truncated)


async def test_under_the_error_policy_a_conversation_past_the_window_is_refused_before_the_upstream(
        tmp_path: Path, upstream: FakeUpstream):
    """context_too_long (413) with the estimate and the window, nothing saved, no upstream request.

    Mutation: refusing after begin_turn leaves the message saved; truncating anyway sends an eighth request."""
    answer, statuses = emulated_api()
    upstream.answer_each(answer)
    async with relay_in_process(tmp_path, upstream, max_message_bytes=200_000, context_policy="error") as relay:
        turns = await conversation(relay, 7, 100_000)  # about 175,000 emulated tokens
        conversation_id = turns[0][0][2]["conversationId"]
        saved = await relay.store.list_messages(conversation_id)
        with pytest.raises(ContextTooLongError) as caught:
            await relay.start(SendMessage("007 " + "y" * 100_000, conversation_id=conversation_id))
        assert await relay.store.list_messages(conversation_id) == saved
    assert statuses == [200] * 7
    details = caught.value.details or {}
    assert details["contextWindow"] == 200_000 and details["inputTokens"] + 1024 > 200_000
    assert caught.value.to_json()["error"]["code"] == "context_too_long"


async def test_a_refusal_for_length_is_learned_and_retried_once_with_a_shorter_history(tmp_path: Path,
                                                                                        upstream: FakeUpstream):
    """An upstream with a smaller window than the table's refuses the third turn; the relay takes its figures,
    drops the oldest pair, and the answer comes, with one 400 only; the next turn uses the learned window.

    Mutation: not retrying ends turn 3 with context_too_long; not learning the window gets a 400 on turn 4 too."""
    answer, statuses = emulated_api(window=60_000)
    upstream.answer_each(answer)
    async with relay_in_process(tmp_path, upstream, max_message_bytes=200_000) as relay:
        turns = await conversation(relay, 4, 80_000)  # 20,005 emulated tokens each
    assert statuses == [200, 200, 400, 200, 200]
    third = turns[2]
    assert [name for _, name, _ in third][0] == "start" and [name for _, name, _ in third][-1] == "done"
    assert third[0][2]["truncatedMessages"] == 0  # as planned before the refusal
    cost = next(data for _, name, data in third if name == "cost")
    assert cost["truncatedMessages"] == 2 and cost["contextTokens"] == request_tokens(upstream.requests[3].json())
    assert sent(upstream.requests[3]) == sent(upstream.requests[2])[2:]
    assert turns[3][0][2]["truncatedMessages"] >= 2


async def test_under_the_error_policy_a_refusal_for_length_is_context_too_long_without_a_retry(
        tmp_path: Path, upstream: FakeUpstream):
    """Mutation: retrying under "error" sends a second request; the old mapping ends with invalid_request."""
    answer, statuses = emulated_api(window=30_000)
    upstream.answer_each(answer)
    async with relay_in_process(tmp_path, upstream, max_message_bytes=200_000, context_policy="error") as relay:
        turns = await conversation(relay, 2, 80_000)
    assert statuses == [200, 400]
    error = turns[1][-1][2]
    assert turns[1][-1][1] == "error" and error["code"] == "context_too_long"
    assert error["contextWindow"] == 30_000 and error["inputTokens"] == request_tokens(upstream.requests[1].json())


async def test_a_single_message_larger_than_the_window_is_too_large_and_nothing_is_saved(tmp_path: Path):
    """Mutation: checking after begin_turn leaves a conversation saved."""
    async with relay_in_process(tmp_path, max_message_bytes=1_000_000) as relay:
        with pytest.raises(TooLargeError) as caught:
            await relay.start(SendMessage("z" * 700_000))
        assert caught.value.code == "too_large"
        assert await relay.store.db.fetch_val("SELECT COUNT(*) FROM messages") == 0


def dense_api(counted: list[int]) -> Callable[[RecordedRequest], SSEAnswer | JSONAnswer]:
    """An API whose tokenizer finds twice the emulated rule's tokens (a text denser than the relay's rule
    assumes): it counts, answers and refuses by that; `counted` gets each token count it was asked for."""

    def answer(request: RecordedRequest) -> SSEAnswer | JSONAnswer:
        body = request.json()
        tokens = 2 * request_tokens(body)
        if request.path.endswith("/count_tokens"):
            counted.append(tokens)
            return JSONAnswer(200, {"input_tokens": tokens})
        if tokens + body["max_tokens"] > WINDOW:
            return JSONAnswer(400, {"type": "error", "error": {
                "type": "invalid_request_error", "message": f"prompt is too long: {tokens} tokens > {WINDOW} maximum"}})
        return SSEAnswer(anthropic_events(["ok"], model=MODEL, input_tokens=tokens))

    return answer


@pytest.mark.parametrize("count_tokens", [True, False])
async def test_with_token_counting_a_request_near_the_window_is_counted_and_shortened_before_it_is_sent(
        tmp_path: Path, upstream: FakeUpstream, count_tokens: bool):
    """RELAY_COUNT_TOKENS: the fourth turn's estimate is within 10% of the window, so the API counts it, and the
    count (over the window) drops the oldest pair before the request goes: no 400. Without counting the same
    turn is refused once and retried.

    Mutation: near_limit always False makes the counting run see a 400."""
    counted: list[int] = []
    upstream.answer_each(dense_api(counted))
    async with relay_in_process(tmp_path, upstream, max_message_bytes=200_000, count_tokens=count_tokens) as relay:
        turns = await conversation(relay, 4, 100_000)
    paths = [request.path for request in upstream.requests]
    assert all(events[-1][1] == "done" for events in turns)
    if count_tokens:
        assert paths == ["/v1/messages"] * 3 + ["/v1/messages/count_tokens", "/v1/messages"]
        assert counted == [2 * request_tokens(upstream.requests[3].json())] and counted[0] > WINDOW - 1024
        assert sent(upstream.requests[4]) == sent(upstream.requests[3])[2:]
    else:
        assert paths == ["/v1/messages"] * 5  # the fourth turn: refused, then retried shorter
        assert sent(upstream.requests[4]) == sent(upstream.requests[3])[2:]


async def test_the_offline_transport_refuses_over_its_window_before_the_200_and_counts_tokens():
    """Mutation: calling the refusal inside the stream generator answers 200 and then an error event."""
    async with httpx.AsyncClient(transport=OfflineTransport(OfflineOptions(delay_ms=0, context_window=100)),
                                 base_url="http://offline") as client:
        body = {"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": "x" * 400}]}
        refused = await client.post("/v1/messages", json=body)
        assert refused.status_code == 400
        assert refused.json()["error"] == {"type": "invalid_request_error",
                                           "message": "prompt is too long: 104 tokens > 100 maximum"}
        counted = await client.post("/v1/messages/count_tokens", json=body)
        assert counted.json() == {"input_tokens": 104}
        small = {**body, "messages": [{"role": "user", "content": "hi"}]}
        answered = await client.post("/v1/messages", json=small)
        assert answered.status_code == 200 and b"message_stop" in await answered.aread()


async def test_regenerate_and_continue_are_fit_to_the_window_too(tmp_path: Path, upstream: FakeUpstream):
    """After the window was learned, a regenerate of the last answer and a continue of it leave the same oldest
    turns out, send the answered user message last (a continue: then the answer), and get no 400.

    Mutation: sending turn.history instead of the plan's messages gets a 400 for the regenerate."""
    answer, statuses = emulated_api(window=60_000)
    upstream.answer_each(answer)
    async with relay_in_process(tmp_path, upstream, max_message_bytes=200_000) as relay:
        turns = await conversation(relay, 3, 80_000)
        last_answer = turns[-1][-1][2]["messageId"]
        regenerated = await run_to_end(relay, Regenerate(last_answer))
        await relay.store.db.execute("UPDATE messages SET stop_reason = 'max_tokens' WHERE id = :id",
                                     {"id": last_answer})
        continued = await run_to_end(relay, Continue(last_answer))
    assert statuses == [200, 200, 400, 200, 200, 200]
    for events, request in ((regenerated, upstream.requests[4]), (continued, upstream.requests[5])):
        assert events[0][2]["truncatedMessages"] == 2 and events[-1][1] == "done"
        assert request_tokens(request.json()) + 1024 <= 60_000
    assert sent(upstream.requests[4])[-1]["content"].startswith("002 ")
    assert sent(upstream.requests[5])[-1] == {"role": "assistant", "content": "ok"}


async def test_over_http_a_message_larger_than_the_window_is_a_413_json_and_the_server_keeps_serving(make_server):
    """The real server (offline model): 413 too_large with the figures, nothing saved, the next message answered.

    Mutation: raising the check's error after begin_turn leaves a conversation in the database."""
    server = make_server({"RELAY_MAX_MESSAGE_BYTES": "1000000"})
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        refused = await client.post("/api/command-center/message", json={"message": "z" * 700_000})
    assert refused.status_code == 413
    error = refused.json()["error"]
    assert error["code"] == "too_large" and error["contextWindow"] == 200_000
    assert error["inputTokens"] == -(-700_000 // 3) + 8
    assert server.count("SELECT COUNT(*) FROM messages") == 0
    events = await sse_stream(server.url, {"message": "still here?"})
    assert events[0][1] == "start" and events[-1][1] == "done"
