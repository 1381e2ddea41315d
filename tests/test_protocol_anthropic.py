"""ReplyState and error_for_status: recorded Anthropic streams in, relay events out."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

from server.errors import ProtocolError, UpstreamError
from server.events import Chunk, Citation, Cost, RelayEvent, Thinking, ToolInput, ToolUse
from server.protocol.anthropic import (
    MAX_ERROR_MESSAGE,
    ReplyState,
    error_for_status,
    parse_retry_after,
    redact,
    safe_message,
)
from server.protocol.sse import SSEDecoder

STREAMS = Path(__file__).parent / "data" / "anthropic-streams"
EXPECTED: dict[str, Any] = orjson.loads((STREAMS / "expected.json").read_bytes())["fixtures"]
FIXTURES = sorted(path.stem for path in STREAMS.glob("*.sse"))

# The SDK's own accumulation crashed on these (no usage in message_start), so their
# relay blocks say null for usage and stop_reason: checked by hand further down.
SDK_COULD_NOT_ACCUMULATE = {
    name for name, entry in EXPECTED.items() if (entry.get("error") or {}).get("class") == "AttributeError"
}

API_KEY = "sk-ant-api03-SECRETSECRETSECRET"


def upstream_events(name: str) -> list[tuple[str, str]]:
    """The (event, data) pairs of a recorded stream, through the project's SSE decoder."""
    decoder = SSEDecoder()
    events = decoder.decode((STREAMS / f"{name}.sse").read_bytes()) + decoder.flush()
    return [(event.event, event.data) for event in events]


def replay(name: str, model: str = "claude-haiku-4-5") -> tuple[ReplyState, list[RelayEvent], UpstreamError | None]:
    """Feed a recorded stream to a ReplyState; stop at an upstream error like the core does."""
    reply = ReplyState(model)
    relayed: list[RelayEvent] = []
    try:
        for event_type, data in upstream_events(name):
            relayed.extend(reply.feed(event_type, data))
    except UpstreamError as exc:
        return reply, relayed, exc
    return reply, relayed, None


def event(kind: str, **payload: Any) -> tuple[str, str]:
    return kind, orjson.dumps({"type": kind, **payload}).decode()


def text_delta(text: str, index: int = 0) -> tuple[str, str]:
    return event("content_block_delta", index=index, delta={"type": "text_delta", "text": text})


def message_start(model: str = "claude-haiku-4-5", **usage: Any) -> tuple[str, str]:
    return event("message_start", message={"id": "msg_1", "model": model, "usage": usage})


def feed_all(reply: ReplyState, events: list[tuple[str, str]]) -> list[RelayEvent]:
    relayed: list[RelayEvent] = []
    for event_type, data in events:
        relayed.extend(reply.feed(event_type, data))
    return relayed


def test_every_recorded_stream_has_an_expected_entry() -> None:
    assert FIXTURES
    assert set(FIXTURES) == set(EXPECTED)


@pytest.mark.parametrize("name", FIXTURES)
def test_recorded_stream_relays_the_expected_text_and_chunks(name: str) -> None:
    expected = EXPECTED[name]["relay"]
    reply, relayed, _ = replay(name)
    assert [e.text for e in relayed if isinstance(e, Chunk)] == expected["text_deltas"]
    assert reply.text == expected["text"]


@pytest.mark.parametrize("name", FIXTURES)
def test_recorded_stream_keeps_thinking_apart_from_the_answer(name: str) -> None:
    expected = EXPECTED[name]
    reply, relayed, _ = replay(name)
    assert reply.thinking == expected["relay"]["thinking"]
    assert [e.text for e in relayed if isinstance(e, Thinking)] == expected["thinking_deltas"]


@pytest.mark.parametrize("name", sorted(set(FIXTURES) - SDK_COULD_NOT_ACCUMULATE))
def test_recorded_stream_reports_the_expected_stop_reason_and_usage(name: str) -> None:
    expected = EXPECTED[name]["relay"]
    reply, _, _ = replay(name)
    usage = reply.usage
    assert reply.stop_reason == expected["stop_reason"]
    assert {
        "inputTokens": usage.input_tokens,
        "outputTokens": usage.output_tokens,
        "cacheCreationInputTokens": usage.cache_creation_input_tokens,
        "cacheReadInputTokens": usage.cache_read_input_tokens,
    } == expected["usage"]


@pytest.mark.parametrize("name", FIXTURES)
def test_recorded_stream_finishes_without_a_cost_event_or_ends_with_the_expected_error(name: str) -> None:
    # The cost event is the core's: one per answer, the sum over its upstream requests (see test_core).
    expected = EXPECTED[name]["relay"]["error"]
    reply, relayed, error = replay(name)
    costs = [e for e in relayed if isinstance(e, Cost)]
    assert costs == []
    if expected is None:
        assert error is None
        assert reply.finished
        cost = reply.cost_event()
        usage = reply.usage
        assert (cost.input_tokens, cost.output_tokens) == (usage.input_tokens, usage.output_tokens)
        assert not cost.estimated
    else:
        assert error is not None
        assert (error.code, error.retryable) == (expected["code"], expected["retryable"])
        assert not reply.finished


@pytest.mark.parametrize("name", FIXTURES)
def test_recorded_stream_gives_the_same_events_fed_byte_by_byte(name: str) -> None:
    whole = upstream_events(name)
    decoder = SSEDecoder()
    pieces = []
    for byte in (STREAMS / f"{name}.sse").read_bytes():
        pieces.extend(decoder.decode(bytes([byte])))
    pieces.extend(decoder.flush())
    assert [(e.event, e.data) for e in pieces] == whole


def test_extended_thinking_stream_without_usage_still_has_a_stop_reason_and_zero_usage() -> None:
    # Neither message_start nor message_delta carries usage; message_delta says end_turn.
    reply, relayed, _ = replay("docs_extended_thinking")
    assert reply.stop_reason == EXPECTED["docs_extended_thinking"]["stop_reason"] == "end_turn"
    assert reply.block_types == EXPECTED["docs_extended_thinking"]["block_types"]
    assert not any(isinstance(e, Cost) for e in relayed)
    cost = reply.cost_event()
    assert (cost.input_tokens, cost.output_tokens, cost.model) == (0, 0, "claude-opus-4-1-20250805")
    assert cost.total_cost == 0


def test_usage_only_in_message_delta_is_taken_from_there() -> None:
    reply, _, _ = replay("sdk_usage_only_in_message_delta")
    assert reply.stop_reason == "end_turn"
    usage = reply.usage
    assert (
        usage.input_tokens,
        usage.output_tokens,
        usage.cache_creation_input_tokens,
        usage.cache_read_input_tokens,
    ) == (11, 1, 3, 5)
    # Its upstream model, "claude-test", has no price.
    assert reply.cost_event() == Cost(11, 1, 3, 5, total_cost=None, model="claude-test")


def test_derived_cache_pricing_costs_exactly_the_published_amount() -> None:
    reply, _, _ = replay("derived_cache_pricing", model="claude-opus-4-5")
    expected = Decimal(EXPECTED["derived_cache_pricing"]["expected_total_cost_claude_haiku_4_5"])
    assert expected == Decimal("0.00001395")
    # Priced by the model the upstream reported, not the one requested.
    assert reply.model == "claude-haiku-4-5"
    assert reply.total_cost() == expected
    assert reply.cost_event().total_cost == expected
    usage = reply.usage
    assert (usage.cache_creation_5m_input_tokens, usage.cache_creation_1h_input_tokens) == (1, 2)


def test_message_delta_output_tokens_are_cumulative_not_summed() -> None:
    reply, _, _ = replay("derived_docs_basic_two_message_deltas")
    assert reply.usage.output_tokens == 15  # the last value, not 1 + 9 + 15
    assert reply.stop_reason == "end_turn"  # the first message_delta's null does not stick


def test_message_delta_restating_input_tokens_replaces_them() -> None:
    reply, _, _ = replay("docs_web_search")
    assert reply.usage.input_tokens == 10682  # message_start said 2679
    assert reply.usage.web_search_requests == 1


def test_message_delta_cache_total_without_split_keeps_the_earlier_split() -> None:
    reply, _, _ = replay("sdk_message_delta_usage_fields")
    usage = reply.usage
    assert (usage.cache_creation_input_tokens, usage.cache_creation_5m_input_tokens) == (12, 10)
    # 40 x $3 + 12 x $3.75 (2 of them beyond the split, at the 5m rate) + 7 x $0.30 + 8 x $15, + 1 search.
    assert reply.total_cost() == Decimal("0.0002871") + Decimal("0.01")


def test_tool_json_and_signatures_never_reach_the_text() -> None:
    for name in ("docs_tool_use", "rec_haiku45_tool_use_only", "sdk_incomplete_partial_json_max_tokens"):
        reply, relayed, _ = replay(name)
        assert "location" not in reply.text and "filename" not in reply.text
        assert all(isinstance(e, (Chunk, ToolInput, ToolUse)) for e in relayed)
        assert not any("location" in e.text or "filename" in e.text for e in relayed if isinstance(e, Chunk))
    reply, _, _ = replay("docs_extended_thinking")
    assert "EqQB" not in reply.text and "EqQB" not in reply.thinking
    assert "step by step" not in reply.text


def test_overloaded_error_midstream_keeps_the_text_so_far() -> None:
    reply, relayed, error = replay("docs_error_overloaded_midstream")
    assert relayed == [Chunk("Hello")]
    assert isinstance(error, UpstreamError)
    assert (error.code, error.retryable, error.message) == ("overloaded", True, "Overloaded")
    assert reply.text == "Hello" and reply.has_content


def test_unicode_line_separators_pass_through_unchanged() -> None:
    reply, _, _ = replay("derived_unicode_line_separators")
    assert "\u2028" in reply.text and "\u0085" in reply.text and "\u2029" in reply.text
    assert "🙂" in reply.text and "中文" in reply.text


def test_unknown_model_costs_none_without_raising(caplog: pytest.LogCaptureFixture) -> None:
    reply = ReplyState("claude-from-the-future")
    with caplog.at_level(logging.WARNING):
        feed_all(reply, [text_delta("hi"), event("message_stop")])
    assert reply.total_cost() is None
    assert reply.cost_event() == Cost(0, 0, 0, 0, total_cost=None, model="claude-from-the-future")


def test_requested_model_prices_the_reply_when_upstream_names_none() -> None:
    reply = ReplyState("claude-sonnet-4-5-20250929")
    feed_all(reply, [event("message_start", message={"id": "m", "usage": {"input_tokens": 1_000_000}})])
    assert reply.model == "claude-sonnet-4-5-20250929"
    assert reply.total_cost() == Decimal("3")


def test_cancelled_answer_estimates_output_tokens_from_what_arrived() -> None:
    reply = ReplyState("claude-haiku-4-5")
    feed_all(reply, [message_start(input_tokens=10, output_tokens=1), text_delta("Hello there, "), text_delta("🙂!")])
    # 13 + 5 UTF-8 bytes: ceil(18 / 4) = 5 tokens, not message_start's placeholder 1.
    cost = reply.cost_event(estimated=True)
    assert (cost.input_tokens, cost.output_tokens, cost.estimated) == (10, 5, True)
    assert cost.total_cost == (10 * Decimal(1) + 5 * Decimal(5)) / 1_000_000
    assert reply.cost_event().output_tokens == 1  # unestimated: what upstream said


def test_cancelled_answer_counts_thinking_and_tool_input_in_its_estimate() -> None:
    reply = ReplyState("claude-haiku-4-5")
    feed_all(
        reply,
        [
            event("content_block_delta", index=0, delta={"type": "thinking_delta", "thinking": "abcd"}),
            event("content_block_delta", index=1, delta={"type": "input_json_delta", "partial_json": '{"a":1}'}),
        ],
    )
    assert reply.cost_event(estimated=True).output_tokens == 3  # ceil((4 + 7) / 4)


def test_estimate_keeps_a_real_output_count_from_message_delta() -> None:
    reply = ReplyState("claude-haiku-4-5")
    feed_all(
        reply,
        [
            message_start(output_tokens=1),
            text_delta("Hi"),
            event("message_delta", delta={}, usage={"output_tokens": 42}),
        ],
    )
    cost = reply.cost_event(estimated=True)
    assert (cost.output_tokens, cost.estimated) == (42, False)


def test_has_content_turns_true_with_the_first_text_or_thinking() -> None:
    reply = ReplyState("claude-haiku-4-5")
    empty_text_block = event("content_block_start", index=0, content_block={"type": "text", "text": ""})
    feed_all(reply, [message_start(), empty_text_block])
    assert not reply.has_content
    assert reply.feed(*event("ping")) == []
    assert not reply.has_content
    thinking = event("content_block_delta", index=0, delta={"type": "thinking_delta", "thinking": "hm"})
    assert reply.feed(*thinking) == [Thinking("hm")]
    assert reply.has_content and reply.text == ""


def test_a_text_block_that_starts_with_text_relays_it() -> None:
    reply = ReplyState("claude-haiku-4-5")
    start = event("content_block_start", index=0, content_block={"type": "text", "text": "Hi"})
    assert reply.feed(*start) == [Chunk("Hi")]
    assert reply.feed(*text_delta(" you")) == [Chunk(" you")]
    assert reply.text == "Hi you" and reply.has_content


def test_unknown_events_and_delta_types_are_ignored() -> None:
    reply = ReplyState("claude-haiku-4-5")
    assert reply.feed(*event("content_block_future", index=0)) == []
    assert reply.feed(*event("content_block_delta", index=0, delta={"type": "future_delta", "text": "x"})) == []
    assert reply.text == "" and not reply.has_content


def test_a_citation_without_a_text_block_is_still_relayed_and_counts_as_content() -> None:
    reply = ReplyState("claude-haiku-4-5", citation_base=2)
    citation = {"type": "citations_delta", "citation": {"cited_text": "quoted"}}
    assert reply.feed(*event("content_block_delta", index=0, delta=citation)) == [
        Citation(3, None, None, "quoted")]
    assert reply.has_content and reply.citation_count == 3 and reply.text == ""


def test_json_type_wins_over_the_sse_event_name() -> None:
    reply = ReplyState("claude-haiku-4-5")
    _, data = text_delta("a")
    assert reply.feed("message", data) == [Chunk("a")]
    assert reply.feed("ping", "{}") == []


def test_message_stop_finishes_without_a_cost_event() -> None:
    reply = ReplyState("claude-haiku-4-5")
    assert not reply.finished
    assert reply.feed(*event("message_stop")) == []
    assert reply.finished
    assert reply.feed(*event("message_stop")) == []


@pytest.mark.parametrize("data", ["not json", '{"type": "content_block_delta"', "", "[1, 2]"])
def test_invalid_json_raises_a_protocol_error(data: str) -> None:
    with pytest.raises(ProtocolError):
        ReplyState("claude-haiku-4-5").feed("content_block_delta", data)


@pytest.mark.parametrize(
    "payload",
    [
        {"type": "content_block_delta", "index": 0},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": 5}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": None}},
        {"type": "content_block_start", "index": 0},
        {"type": "message_start"},
        {"type": "message_start", "message": "hello"},
    ],
)
def test_malformed_events_raise_a_protocol_error(payload: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        ReplyState("claude-haiku-4-5").feed(str(payload["type"]), orjson.dumps(payload).decode())


@pytest.mark.parametrize(
    ("error_type", "code", "retryable"),
    [
        ("overloaded_error", "overloaded", True),
        ("rate_limit_error", "rate_limited", True),
        ("api_error", "upstream_error", True),
        ("invalid_request_error", "invalid_request", False),
        ("authentication_error", "auth", False),
        ("permission_error", "auth", False),
        ("not_found_error", "not_found", False),
        ("request_too_large", "too_large", False),
        ("billing_error", "upstream_error", True),
        (None, "upstream_error", True),
    ],
)
def test_error_event_maps_the_upstream_error_type(error_type: str | None, code: str, retryable: bool) -> None:
    with pytest.raises(UpstreamError) as caught:
        ReplyState("claude-haiku-4-5").feed(*event("error", error={"type": error_type, "message": f"bad {API_KEY}"}))
    assert (caught.value.code, caught.value.retryable) == (code, retryable)
    if code == "auth":
        assert API_KEY not in caught.value.message


def test_error_event_message_is_capped() -> None:
    with pytest.raises(UpstreamError) as caught:
        ReplyState("claude-haiku-4-5").feed(*event("error", error={"type": "api_error", "message": "word " * 1000}))
    assert len(caught.value.message) == MAX_ERROR_MESSAGE


def anthropic_error_body(error_type: str, message: str) -> bytes:
    return orjson.dumps({"type": "error", "error": {"type": error_type, "message": message}})


@pytest.mark.parametrize(
    ("status", "code", "retryable"),
    [
        (400, "invalid_request", False),
        (401, "auth", False),
        (403, "auth", False),
        (404, "not_found", False),
        (413, "too_large", False),
        (429, "rate_limited", True),
        (500, "upstream_error", True),
        (502, "upstream_error", True),
        (503, "upstream_error", True),
        (529, "overloaded", True),
        (418, "invalid_request", False),
        (422, "invalid_request", False),
        (504, "upstream_error", True),
    ],
)
def test_error_for_status_maps_every_status(status: int, code: str, retryable: bool) -> None:
    body = anthropic_error_body("some_error", f"invalid x-api-key {API_KEY}")
    error = error_for_status(status, body, None)
    assert isinstance(error, UpstreamError)
    assert (error.code, error.retryable) == (code, retryable)
    if code == "auth":
        assert API_KEY not in error.message and "x-api-key" not in error.message


def test_error_for_status_uses_the_upstream_message_when_it_parses() -> None:
    body = anthropic_error_body("invalid_request_error", "max_tokens: must be at most 64000")
    assert error_for_status(400, body, None).message == "max_tokens: must be at most 64000"
    assert error_for_status(400, b"<html>Bad Request</html>", None).message == "the upstream answered HTTP 400"
    long_body = anthropic_error_body("api_error", "why " * 300)
    assert len(error_for_status(500, long_body, None).message) == MAX_ERROR_MESSAGE


def test_upstream_error_text_reaches_the_client_as_one_safe_line() -> None:
    leaky = "bad key sk-ant-api03-AbC_dEf-123 from Bearer drt_abcdef and blob " + "Q" * 64 + "\nsecond\x00line"
    message = error_for_status(400, anthropic_error_body("invalid_request_error", leaky), None).message
    assert message == "bad key [redacted] from [redacted] and blob [redacted] second line"
    with pytest.raises(UpstreamError) as caught:
        ReplyState("claude-haiku-4-5").feed(*event("error", error={"type": "api_error", "message": leaky}))
    assert "sk-ant" not in caught.value.message and "drt_" not in caught.value.message


def test_redact_masks_a_key_of_any_shape_also_where_a_shape_or_the_length_cap_cut_it() -> None:
    """Fails without the masked form (safe_message leaves "testkey-not-" of this key) or without the tail rule."""
    key = "testkey-not-sk-ant-shaped-123"
    assert redact(safe_message(f"bad key {key}, try again"), [key]) == "bad key [redacted], try again"
    assert redact(f"plain {key} twice {key}", [key]) == "plain [redacted] twice [redacted]"
    words = "w " * ((MAX_ERROR_MESSAGE - 10) // 2)
    cut = safe_message(words + key)  # the length cap leaves the key's first 10 characters
    assert cut.endswith(" " + key[:10]) and redact(cut, [key]) == words + "[redacted]"
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl"
    assert redact(f"token {jwt} refused", []) == "token [redacted] refused"
    assert redact("nothing secret here", [key, ""]) == "nothing secret here"


def test_error_for_status_auth_messages_are_fixed() -> None:
    for status in (401, 403):
        message = error_for_status(status, anthropic_error_body("authentication_error", API_KEY), None).message
        assert API_KEY not in message
    assert error_for_status(401, b"", None).message == "the upstream rejected the API key"


def test_rate_limit_carries_retry_after_seconds() -> None:
    assert error_for_status(429, b"{}", "7").retry_after == 7.0
    assert error_for_status(429, b"{}", "1.5").retry_after == 1.5
    assert error_for_status(529, b"{}", "3").retry_after == 3.0
    assert error_for_status(429, b"{}", None).retry_after is None
    assert error_for_status(400, b"{}", "7").retry_after is None  # not retryable: no retry hint


def test_retry_after_accepts_an_http_date() -> None:
    now = datetime(2025, 11, 24, 12, 0, 0, tzinfo=UTC)
    error = error_for_status(429, b"{}", "Mon, 24 Nov 2025 12:00:30 GMT", now=now)
    assert error.retry_after == 30.0
    assert parse_retry_after("Mon, 24 Nov 2025 11:00:00 GMT", now=now) == 0.0  # in the past


@pytest.mark.parametrize("value", ["soon", "", "nan", "inf"])
def test_unusable_retry_after_values_give_none(value: str) -> None:
    assert parse_retry_after(value) is None


def test_text_parts_keep_every_piece_in_order_across_folds() -> None:
    from server.protocol.anthropic import TextParts

    parts = TextParts()
    assert not parts and parts.value() == ""
    pieces = [f"{n} 🙂 " for n in range(1000)]
    for piece in pieces:
        parts.add(piece)
    assert parts and parts.value() == "".join(pieces)


def test_the_usage_mark_moves_whenever_the_answers_usage_can_have_changed() -> None:
    """The Redis copy of a running answer's usage (what a survivor saves it with) is sent again only when this
    mark moved: a mark that stood still across a usage report, a retry or a new round (drop any of the three
    increments) fails here."""
    from server.protocol.answer import AnswerState

    answer = AnswerState(ReplyState("claude-haiku-4-5"))
    marks = [answer.usage_mark]

    def changed() -> bool:
        marks.append(answer.usage_mark)
        return marks[-1] != marks[-2]

    assert not changed()
    answer.current.feed(*message_start(input_tokens=10, output_tokens=1))
    assert changed() and answer.usage.input_tokens == 10
    answer.current.feed(*event("content_block_start", index=0, content_block={"type": "text", "text": ""}))
    answer.current.feed(*text_delta("hi"))
    assert not changed()  # text alone leaves the usage as it was
    answer.current.feed(*event("message_delta", delta={"stop_reason": "tool_use"}, usage={"output_tokens": 7}))
    assert changed() and answer.usage.output_tokens == 7
    answer.next_round(ReplyState("claude-haiku-4-5"))
    assert changed()
    answer.current.feed(*message_start(input_tokens=20))
    assert changed() and answer.usage.input_tokens == 30
    answer.retry(ReplyState("claude-haiku-4-5"))
    assert changed() and answer.usage.input_tokens == 10
