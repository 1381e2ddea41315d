"""ReplyState beyond text: tool calls, server tools, citations, thinking signatures, content_blocks() (issue 19)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from server.errors import ProtocolError
from server.events import (
    Chunk,
    Citation,
    RelayEvent,
    Search,
    SearchResults,
    ToolInput,
    ToolResult,
    ToolUse,
    encode_data,
)
from server.protocol.anthropic import ReplyState
from server.protocol.sse import SSEDecoder

STREAMS = Path(__file__).parent / "data" / "anthropic-streams"

# The tool calls of each stream with tools: id, name and the input the SDK's accumulation gives (the
# input_json_delta pieces joined and parsed), read from the files by hand.
TOOL_CALLS: dict[str, list[dict[str, Any]]] = {
    "docs_tool_use": [{"id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "name": "get_weather",
                       "input": {"location": "San Francisco, CA", "unit": "fahrenheit"}}],
    "rec_haiku45_tool_use_only": [{"id": "toolu_018acGYLtfR52q9yDbWaEdQZ", "name": "get_weather",
                                   "input": {"location": "San Francisco, CA", "units": "f"}}],
    "rec_sonnet35_text_then_tool_use": [
        {"id": "toolu_01QYZ2sgjBq1oG8iryEt8QjR", "name": "get_weather",
         "input": {"location": "San Francisco, CA", "units": "c"}},
        {"id": "toolu_01Lu9hbRKgrZqvHFutZxCNnZ", "name": "get_weather",
         "input": {"location": "San Francisco, CA", "units": "f"}},
    ],
    "sdk_tool_use_response": [{"id": "toolu_01NRLabsLyVHZPKxbKvkfSMn", "name": "get_weather",
                               "input": {"location": "Paris"}}],
    # Cut by max_tokens before its content_block_stop: not a call.
    "sdk_incomplete_partial_json_max_tokens": [],
    "derived_redacted_thinking_tool_use": [{"id": "toolu_01DerivedClock000000001", "name": "get_time", "input": {}}],
}

# Streams with something beyond text: each is checked fed whole and split at every byte.
RICH = sorted({*TOOL_CALLS, "docs_web_search", "docs_extended_thinking", "rec_sonnet37_extended_thinking_curl",
               "derived_citations_documents", "derived_web_search_citations"})


def upstream_payloads(name: str) -> list[dict[str, Any]]:
    decoder = SSEDecoder()
    return [orjson.loads(e.data) for e in decoder.decode((STREAMS / f"{name}.sse").read_bytes()) + decoder.flush()]


def feed_bytes(pieces: list[bytes], citation_base: int = 0) -> tuple[ReplyState, list[RelayEvent]]:
    """SSE bytes in the given pieces through the project's decoder into a ReplyState, as the upstream client does."""
    decoder = SSEDecoder()
    reply = ReplyState("claude-haiku-4-5", citation_base=citation_base)
    relayed: list[RelayEvent] = []
    for piece in [*pieces, b""]:
        events = decoder.decode(piece) if piece else decoder.flush()
        for sse in events:
            relayed.extend(reply.feed(sse.event, sse.data))
    return reply, relayed


def replay(name: str, citation_base: int = 0) -> tuple[ReplyState, list[RelayEvent]]:
    return feed_bytes([(STREAMS / f"{name}.sse").read_bytes()], citation_base)


def event(kind: str, **payload: Any) -> tuple[str, str]:
    return kind, orjson.dumps({"type": kind, **payload}).decode()


def wire(relayed: list[RelayEvent]) -> list[tuple[str, bytes]]:
    return [(e.name, encode_data(e)) for e in relayed]


@pytest.mark.parametrize("name", RICH)
def test_rich_stream_gives_the_same_events_and_blocks_at_every_split_point(name: str) -> None:
    body = (STREAMS / f"{name}.sse").read_bytes()
    whole, relayed = replay(name)
    expected = (wire(relayed), whole.content_blocks(), whole.tool_calls(), whole.text, whole.thinking)
    for cut in range(1, len(body)):
        reply, split = feed_bytes([body[:cut], body[cut:]])
        assert (wire(split), reply.content_blocks(), reply.tool_calls(), reply.text, reply.thinking) == expected, cut


@pytest.mark.parametrize("name", sorted(TOOL_CALLS))
def test_tool_calls_have_the_input_the_sdk_accumulated(name: str) -> None:
    reply, relayed = replay(name)
    assert reply.tool_calls() == TOOL_CALLS[name]
    uses = [e for e in relayed if isinstance(e, ToolUse)]
    assert [{"id": e.id, "name": e.tool, "input": e.input} for e in uses] == TOOL_CALLS[name]
    assert [b for b in reply.content_blocks() if b["type"] == "tool_use"] == [
        {"type": "tool_use", **call} for call in TOOL_CALLS[name]]


@pytest.mark.parametrize("name", sorted(TOOL_CALLS))
def test_tool_input_events_are_the_input_json_pieces_in_order(name: str) -> None:
    _, relayed = replay(name)
    pieces: dict[int, list[str]] = {}
    ids: dict[int, str] = {}
    for payload in upstream_payloads(name):
        if payload["type"] == "content_block_start" and payload["content_block"]["type"] == "tool_use":
            ids[payload["index"]] = payload["content_block"]["id"]
        elif payload["type"] == "content_block_delta" and payload["delta"]["type"] == "input_json_delta":
            if payload["delta"]["partial_json"]:
                pieces.setdefault(payload["index"], []).append(payload["delta"]["partial_json"])
    expected = [(ids[index], piece) for index in sorted(pieces) for piece in pieces[index]]
    assert [(e.id, e.partial_json) for e in relayed if isinstance(e, ToolInput)] == expected
    # Each tool_use event comes after its last piece.
    for use in (e for e in relayed if isinstance(e, ToolUse)):
        last_piece = max((i for i, e in enumerate(relayed) if isinstance(e, ToolInput) and e.id == use.id),
                         default=-1)
        assert relayed.index(use) > last_piece


def test_text_then_tool_use_keeps_the_text_block_before_the_calls() -> None:
    reply, relayed = replay("rec_sonnet35_text_then_tool_use")
    blocks = reply.content_blocks()
    assert [b["type"] for b in blocks] == ["text", "tool_use", "tool_use"]
    assert blocks[0] == {"type": "text", "text": reply.text} and reply.text
    assert reply.stop_reason == "tool_use" and reply.has_content


def test_tool_input_cut_by_max_tokens_is_not_a_call_and_not_an_error() -> None:
    reply, relayed = replay("sdk_incomplete_partial_json_max_tokens")
    assert reply.finished and reply.stop_reason == "max_tokens"
    assert reply.tool_calls() == [] and not any(isinstance(e, ToolUse) for e in relayed)
    assert [b["type"] for b in reply.content_blocks()] == ["text"]
    assert any(isinstance(e, ToolInput) for e in relayed)  # it was shown typing


def tool_stream(partial: str, stop_reason: str) -> list[tuple[str, str]]:
    return [
        event("message_start", message={"id": "m", "model": "claude-haiku-4-5", "usage": {"input_tokens": 3}}),
        event("content_block_start", index=0,
              content_block={"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}),
        event("content_block_delta", index=0, delta={"type": "input_json_delta", "partial_json": partial}),
        event("content_block_stop", index=0),
        event("message_delta", delta={"stop_reason": stop_reason}, usage={"output_tokens": 9}),
        event("message_stop"),
    ]


def test_malformed_tool_input_is_a_protocol_error_unless_max_tokens_cut_it() -> None:
    reply = ReplyState("claude-haiku-4-5")
    with pytest.raises(ProtocolError):
        for kind, data in tool_stream('{"a": ', "tool_use"):
            reply.feed(kind, data)
    assert not reply.finished
    cut = ReplyState("claude-haiku-4-5")
    relayed = [e for kind, data in tool_stream('{"a": ', "max_tokens") for e in cut.feed(kind, data)]
    assert cut.finished and cut.tool_calls() == [] and cut.content_blocks() == []
    assert relayed == [ToolInput("toolu_1", '{"a": ')]
    # JSON that parses but is not an object is no tool input either.
    not_an_object = ReplyState("claude-haiku-4-5")
    with pytest.raises(ProtocolError):
        for kind, data in tool_stream("[1]", "tool_use"):
            not_an_object.feed(kind, data)


def test_thinking_signature_is_kept_byte_for_byte() -> None:
    for name in ("docs_extended_thinking", "rec_sonnet37_extended_thinking_curl", "derived_redacted_thinking_tool_use"):
        signature = "".join(p["delta"]["signature"] for p in upstream_payloads(name)
                            if p["type"] == "content_block_delta" and p["delta"]["type"] == "signature_delta")
        reply, _ = replay(name)
        thinking = reply.content_blocks()[0]
        assert thinking == {"type": "thinking", "thinking": reply.thinking, "signature": signature}
        assert signature and orjson.dumps(thinking["signature"]) == orjson.dumps(signature)
    reply, _ = replay("derived_redacted_thinking_tool_use")
    # Two signature deltas, joined; a non-ASCII character and "+/=" kept as sent.
    assert reply.content_blocks()[0]["signature"] == "ErUBCkYIBRgCIkD+/==Zm9vYmFy\u00e9+/"


def test_redacted_thinking_is_sent_back_as_received() -> None:
    reply, relayed = replay("derived_redacted_thinking_tool_use")
    data = next(p["content_block"]["data"] for p in upstream_payloads("derived_redacted_thinking_tool_use")
                if p["type"] == "content_block_start" and p["content_block"]["type"] == "redacted_thinking")
    assert [b["type"] for b in reply.content_blocks()] == ["thinking", "redacted_thinking", "tool_use"]
    assert reply.content_blocks()[1] == {"type": "redacted_thinking", "data": data}
    # An empty input_json_delta: no tool_input event, and the input is {}.
    assert [e for e in relayed if isinstance(e, ToolInput)] == []
    assert [e for e in relayed if isinstance(e, ToolUse)] == [ToolUse("toolu_01DerivedClock000000001", "get_time", {})]


def test_recorded_web_search_gives_search_then_its_results() -> None:
    reply, relayed = replay("docs_web_search")
    searches = [e for e in relayed if isinstance(e, (Search, SearchResults))]
    assert searches == [
        Search("srvtoolu_014hJH82Qum7Td6UV8gDXThB", "web_search", "weather NYC today"),
        SearchResults("srvtoolu_014hJH82Qum7Td6UV8gDXThB", (
            {"url": "https://world-weather.info/forecast/usa/new_york/may-2025/",
             "title": "Weather in New York City in May 2025 (New York) - detailed Weather Forecast for a month"},)),
    ]
    # A server tool's input is not the page's to show typing.
    assert not any(isinstance(e, ToolInput) for e in relayed) and reply.tool_calls() == []
    blocks = reply.content_blocks()
    assert [b["type"] for b in blocks] == ["text", "server_tool_use", "web_search_tool_result", "text"]
    assert blocks[1] == {"type": "server_tool_use", "id": "srvtoolu_014hJH82Qum7Td6UV8gDXThB",
                         "name": "web_search", "input": {"query": "weather NYC today"}}
    received = next(p["content_block"] for p in upstream_payloads("docs_web_search")
                    if p["type"] == "content_block_start" and p["content_block"]["type"] == "web_search_tool_result")
    assert blocks[2] == received  # encrypted_content and all, as the next request must carry it
    assert "".join(b["text"] for b in blocks if b["type"] == "text") == reply.text


def test_web_search_citations_are_numbered_across_the_answer() -> None:
    reply, relayed = replay("derived_web_search_citations", citation_base=4)
    citations = [e for e in relayed if isinstance(e, Citation)]
    assert citations == [
        Citation(5, "https://example.org/news/deltarelay-2", "deltarelay 2.0 released",
                 "deltarelay 2.0 is out with tool calls and citations. "),
        Citation(6, "https://example.org/docs/changelog", "Release notes",
                 "It relays thinking, tool calls and web search. "),
    ]
    assert reply.citation_count == 6
    assert [orjson.loads(encode_data(c)) for c in citations][0] == {
        "index": 5, "url": "https://example.org/news/deltarelay-2", "title": "deltarelay 2.0 released",
        "citedText": "deltarelay 2.0 is out with tool calls and citations. "}
    # The second citation came in its text block's start, before the block's text: the page shows [6] there.
    second = relayed.index(citations[1])
    assert relayed[second - 1] == Chunk(" and relays tool calls")


def test_web_search_citations_are_kept_in_their_text_blocks_as_received() -> None:
    reply, _ = replay("derived_web_search_citations")
    sent = [p["delta"]["citation"] for p in upstream_payloads("derived_web_search_citations")
            if p["type"] == "content_block_delta" and p["delta"]["type"] == "citations_delta"]
    started = [c for p in upstream_payloads("derived_web_search_citations") if p["type"] == "content_block_start"
               for c in p["content_block"].get("citations") or []]
    texts = [b for b in reply.content_blocks() if b["type"] == "text"]
    assert texts == [
        {"type": "text", "text": "Here is what I found. "},
        {"type": "text", "text": "Version 2.0 is out", "citations": sent},
        {"type": "text", "text": " and relays tool calls", "citations": started},
        {"type": "text", "text": "."},
    ]
    assert sent[0]["encrypted_index"] and started[0]["encrypted_index"]


def test_failed_search_and_web_fetch_give_their_events() -> None:
    reply, relayed = replay("derived_web_search_citations")
    assert [e for e in relayed if isinstance(e, (Search, SearchResults))][2:] == [
        Search("srvtoolu_01Derived0000000000000002", "web_search", "deltarelay benchmarks"),
        SearchResults("srvtoolu_01Derived0000000000000002", (), "max_uses_exceeded"),
        Search("srvtoolu_01Derived0000000000000003", "web_fetch", "https://example.org/docs/changelog"),
        SearchResults("srvtoolu_01Derived0000000000000003",
                      ({"url": "https://example.org/docs/changelog", "title": "Release notes"},)),
    ]
    assert orjson.loads(encode_data(SearchResults("s", (), "max_uses_exceeded"))) == {
        "id": "s", "results": [], "error": "max_uses_exceeded"}
    assert [b["type"] for b in reply.content_blocks()] == [
        "server_tool_use", "web_search_tool_result", "text", "text", "text", "server_tool_use",
        "web_search_tool_result", "server_tool_use", "web_fetch_tool_result", "text"]
    assert reply.usage.web_search_requests == 1


def test_document_citations_carry_the_document_title_and_no_url() -> None:
    reply, relayed = replay("derived_citations_documents")
    citations = [e for e in relayed if isinstance(e, Citation)]
    assert citations == [
        Citation(1, None, "Grass and sky", "The grass is green. ", "Grass and sky"),
        Citation(2, None, "Sky report (PDF)", "The sky is blue.", "Sky report (PDF)"),
        Citation(3, None, None, "Water is wet."),
    ]
    assert orjson.loads(encode_data(citations[0])) == {
        "index": 1, "url": None, "title": "Grass and sky", "citedText": "The grass is green. ",
        "documentTitle": "Grass and sky"}
    sent = [p["delta"]["citation"] for p in upstream_payloads("derived_citations_documents")
            if p["type"] == "content_block_delta" and p["delta"]["type"] == "citations_delta"]
    assert [c["type"] for c in sent] == ["char_location", "page_location", "content_block_location"]
    assert reply.content_blocks() == [
        {"type": "text", "text": "According to the documents, "},
        {"type": "text", "text": "the grass is green", "citations": [sent[0]]},
        {"type": "text", "text": ", the sky is blue", "citations": [sent[1]]},
        {"type": "text", "text": " and water is wet", "citations": [sent[2]]},
        {"type": "text", "text": "."},
    ]
    assert "".join(b["text"] for b in reply.content_blocks()) == reply.text


def test_a_cancelled_answer_keeps_its_open_text_block_but_not_an_open_tool_call() -> None:
    payloads = upstream_payloads("rec_sonnet35_text_then_tool_use")
    # Stop just before the first content_block_stop: the text block is still open.
    first_stop = next(i for i, p in enumerate(payloads) if p["type"] == "content_block_stop")
    reply = ReplyState("claude-haiku-4-5")
    for payload in payloads[:first_stop]:
        reply.feed(payload["type"], orjson.dumps(payload).decode())
    assert reply.content_blocks() == [{"type": "text", "text": reply.text}] and reply.text
    # Stop inside the first tool_use block: the text is complete, the call is not in the blocks.
    in_tool = next(i for i, p in enumerate(payloads) if p["type"] == "content_block_delta"
                   and p["delta"]["type"] == "input_json_delta" and p["delta"]["partial_json"])
    reply = ReplyState("claude-haiku-4-5")
    for payload in payloads[:in_tool + 1]:
        reply.feed(payload["type"], orjson.dumps(payload).decode())
    assert [b["type"] for b in reply.content_blocks()] == ["text"] and reply.tool_calls() == []
    assert reply.has_content


def test_a_tool_call_alone_counts_as_content() -> None:
    # After a tool_input went out, a retry would show the call twice.
    reply = ReplyState("claude-haiku-4-5")
    for kind, data in tool_stream('{"a": 1}', "tool_use")[:3]:
        reply.feed(kind, data)
    assert reply.text == "" and reply.has_content


def test_new_events_have_their_wire_names_and_camel_case_fields() -> None:
    cases: list[tuple[RelayEvent, str, dict[str, Any]]] = [
        (ToolInput("t", '{"a'), "tool_input", {"id": "t", "partialJson": '{"a'}),
        (ToolUse("t", "f", {"a": 1}), "tool_use", {"id": "t", "name": "f", "input": {"a": 1}}),
        (ToolResult("t", True, "timed out"), "tool_result", {"id": "t", "isError": True, "content": "timed out"}),
        (ToolResult("t", False, [{"type": "text", "text": "ok"}]), "tool_result",
         {"id": "t", "isError": False, "content": [{"type": "text", "text": "ok"}]}),
        (Search("s", "web_search", "q"), "search", {"id": "s", "name": "web_search", "query": "q"}),
        (SearchResults("s", ({"url": "u", "title": None},)), "search_results",
         {"id": "s", "results": [{"url": "u", "title": None}]}),
        (Citation(1, "u", "t", "c"), "citation", {"index": 1, "url": "u", "title": "t", "citedText": "c"}),
    ]
    for relay_event, name, data in cases:
        assert relay_event.name == name
        assert orjson.loads(encode_data(relay_event)) == data
