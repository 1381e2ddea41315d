"""The offline model and `server.mock_upstream` answer with thinking, web search with citations and tool calls,
in the shapes of the recorded real streams, and refuse what the API refuses (issue 19).

Tested at the level of the upstream SSE events (decoded with the relay's own SSEDecoder): event order, block
types, index numbering, JSON validity of tool input, signatures, usage, stop reasons, and round trips that send
the content back as the next request's assistant message.
"""

from __future__ import annotations

import base64
from typing import Any

import httpx
import orjson
import pytest

from server.protocol.sse import SSEDecoder
from server.upstream.offline import OfflineOptions, OfflineTransport
from server.upstream.shapes import sign_thinking, verify_signature

MODEL = "claude-sonnet-4-5"
WEB_SEARCH = {"type": "web_search_20250305", "name": "web_search", "max_uses": 5}
WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "input_schema": {"type": "object", "required": ["city", "days", "metric", "extra"],
                            "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                           "metric": {"type": "boolean"}, "extra": {"type": "object"},
                                           "unused": {"type": "string"}}}}
THINKING = {"type": "enabled", "budget_tokens": 2048}
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 16).decode()
PDF = base64.b64encode(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n").decode()


def request(messages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": 4096, "stream": True, "messages": messages, **extra}


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def offline_client(**options: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=OfflineTransport(OfflineOptions(delay_ms=0, **options)),
                             base_url="http://offline")


async def post(client: httpx.AsyncClient, body: dict[str, Any],
               headers: dict[str, str] | None = None) -> httpx.Response:
    return await client.post("/v1/messages", json=body, headers=headers or {})


def decode(response: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    """The response's SSE events as (event type, parsed data), checked to be JSON and typed consistently."""
    assert response.status_code == 200, response.text
    decoder = SSEDecoder()
    events = decoder.decode(response.content) + decoder.flush()
    decoded = []
    for event in events:
        data = orjson.loads(event.data)
        assert data["type"] == event.event
        decoded.append((event.event, data))
    return decoded


class Answer:
    """One streamed response put together as the API's content blocks, with its stop reason and usage."""

    def __init__(self, events: list[tuple[str, dict[str, Any]]]) -> None:
        self.events = events
        assert events[0][0] == "message_start" and events[-1][0] == "message_stop"
        assert events[-2][0] == "message_delta"
        self.start_usage = events[0][1]["message"]["usage"]
        self.stop_reason = events[-2][1]["delta"]["stop_reason"]
        self.usage = events[-2][1]["usage"]
        self.blocks: list[dict[str, Any]] = []
        self.citation_order: list[str] = []  # per text block: "citation" / "text" in delta order
        partial: dict[int, str] = {}
        open_index: int | None = None
        for name, data in events[1:-2]:
            if name == "ping":
                continue
            if name == "content_block_start":
                assert open_index is None and data["index"] == len(self.blocks)  # 0, 1, 2, … one at a time
                open_index = data["index"]
                self.blocks.append(dict(data["content_block"]))
                partial[open_index] = ""
            elif name == "content_block_delta":
                assert data["index"] == open_index
                block, delta = self.blocks[open_index], data["delta"]
                kind = delta["type"]
                if kind == "text_delta":
                    assert block["type"] == "text"
                    block["text"] += delta["text"]
                elif kind == "citations_delta":
                    assert block["type"] == "text" and block["text"] == "", "citations come before their text"
                    block.setdefault("citations", []).append(delta["citation"])
                elif kind == "thinking_delta":
                    assert block["type"] == "thinking" and block["signature"] == ""
                    block["thinking"] += delta["thinking"]
                elif kind == "signature_delta":
                    assert block["type"] == "thinking"
                    block["signature"] = delta["signature"]
                else:
                    assert kind == "input_json_delta" and block["type"] in ("tool_use", "server_tool_use")
                    partial[open_index] += delta["partial_json"]
            else:
                assert name == "content_block_stop" and data["index"] == open_index
                block = self.blocks[open_index]
                if block["type"] in ("tool_use", "server_tool_use"):
                    block["input"] = orjson.loads(partial[open_index])  # valid JSON once complete
                open_index = None
        assert open_index is None

    def types(self) -> list[str]:
        return [block["type"] for block in self.blocks]

    def text(self) -> str:
        return "".join(block["text"] for block in self.blocks if block["type"] == "text")


async def answer(client: httpx.AsyncClient, body: dict[str, Any], headers: dict[str, str] | None = None) -> Answer:
    return Answer(decode(await post(client, body, headers)))


def refusal(response: httpx.Response) -> str:
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    return str(error["error"]["message"])


# --- shapes -----------------------------------------------------------------------------------------------


async def test_without_directives_or_thinking_the_plain_demo_answer_is_unchanged() -> None:
    async with offline_client() as client:
        reply = await answer(client, request([user("hello there")], tools=[WEB_SEARCH, WEATHER]))
    assert reply.types() == ["text"] and reply.stop_reason == "end_turn"
    assert "You wrote: “hello there”" in reply.text()
    assert "server_tool_use" not in reply.usage


async def test_thinking_comes_first_with_a_signature_of_exactly_its_text() -> None:
    async with offline_client() as client:
        reply = await answer(client, request([user("why is the sky blue")], thinking=THINKING))
    assert reply.types()[0] == "thinking" and reply.types()[1:] == ["text"]
    thinking = reply.blocks[0]
    assert "why is the sky blue" in thinking["thinking"]
    deltas = [d["delta"]["type"] for n, d in reply.events if n == "content_block_delta" and d["index"] == 0]
    assert deltas[-1] == "signature_delta" and set(deltas[:-1]) == {"thinking_delta"} and len(deltas) > 3
    assert verify_signature(thinking["thinking"], thinking["signature"])
    assert not verify_signature(thinking["thinking"] + " ", thinking["signature"])
    assert thinking["signature"] == sign_thinking(thinking["thinking"])
    # Output tokens count the thinking text too (one per 4 bytes) beyond one per text delta.
    text_deltas = sum(1 for n, d in reply.events if n == "content_block_delta" and d["delta"]["type"] == "text_delta")
    assert reply.usage["output_tokens"] == text_deltas + (len(thinking["thinking"].encode()) + 3) // 4


async def test_search_streams_the_query_results_and_cited_text() -> None:
    async with offline_client() as client:
        reply = await answer(client, request([user("[search] weather in Paris today")], tools=[WEB_SEARCH]))
    types = reply.types()
    assert types[:3] == ["text", "server_tool_use", "web_search_tool_result"] and set(types[3:]) == {"text"}
    search, results = reply.blocks[1], reply.blocks[2]
    assert search["name"] == "web_search" and search["id"].startswith("srvtoolu_")
    assert search["input"] == {"query": "weather in Paris today"}
    assert results["tool_use_id"] == search["id"]
    assert 2 <= len(results["content"]) <= 3
    for item in results["content"]:
        assert item["type"] == "web_search_result" and item["url"].startswith("https://example.")
        assert set(item) == {"type", "title", "url", "encrypted_content", "page_age"}
    cited = [block for block in reply.blocks if block.get("citations")]
    assert len(cited) == len(results["content"])
    for block, item in zip(cited, results["content"], strict=True):
        (citation,) = block["citations"]
        assert citation["type"] == "web_search_result_location"
        assert citation["url"] == item["url"] and citation["title"] == item["title"]
        assert citation["cited_text"] and citation["encrypted_index"] and block["text"]
    assert reply.stop_reason == "end_turn"
    assert reply.usage["server_tool_use"] == {"web_search_requests": 1}
    # The same query finds the same results (deterministic), a fresh tool id each time.
    async with offline_client() as client:
        again = await answer(client, request([user("[search] weather in Paris today")], tools=[WEB_SEARCH]))
    assert again.blocks[2]["content"] == results["content"] and again.blocks[1]["id"] != search["id"]


async def test_search_without_the_tool_offered_is_a_plain_answer() -> None:
    async with offline_client() as client:
        reply = await answer(client, request([user("[search] weather")]))
    assert reply.types() == ["text"]


async def test_max_uses_zero_gives_the_apis_error_result() -> None:
    async with offline_client() as client:
        reply = await answer(client, request([user("[search] news")], tools=[{**WEB_SEARCH, "max_uses": 0}]))
    assert reply.blocks[2]["type"] == "web_search_tool_result"
    assert reply.blocks[2]["content"] == {"type": "web_search_tool_result_error", "error_code": "max_uses_exceeded"}
    assert "server_tool_use" not in reply.usage and reply.stop_reason == "end_turn"


async def test_a_tool_call_then_the_result_reaches_the_model() -> None:
    messages = [user("[tool] Lyon")]
    async with offline_client() as client:
        first = await answer(client, request(messages, tools=[WEATHER]))
        assert first.types() == ["text", "tool_use"] and first.stop_reason == "tool_use"
        call = first.blocks[1]
        assert call["name"] == "get_weather" and call["id"].startswith("toolu_")
        assert call["input"] == {"city": "Lyon", "days": 1, "metric": True, "extra": None}
        pieces = [d for n, d in first.events if n == "content_block_delta" and d["index"] == 1]
        assert len(pieces) > 3  # the input streams in several input_json_delta pieces
        messages += [{"role": "assistant", "content": first.blocks},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call["id"],
                                                   "content": "sunny, 21 °C"}]}]
        second = await answer(client, request(messages, tools=[WEATHER]))
    assert second.stop_reason == "end_turn" and set(second.types()) == {"text"}
    assert "The tool get_weather returned: “sunny, 21 °C”." in second.text()


async def test_thinking_search_and_tool_in_one_answer() -> None:
    """The "done when" case: thinking, web search with citations and an app tool, then the final text."""
    tools = [WEB_SEARCH, WEATHER]
    messages = [user("[search] [tool] Should I cycle in Lyon tomorrow?")]
    async with offline_client() as client:
        first = await answer(client, request(messages, tools=tools, thinking=THINKING))
        types = first.types()
        assert types[0] == "thinking" and types[-1] == "tool_use" and first.stop_reason == "tool_use"
        assert types.index("server_tool_use") < types.index("web_search_tool_result") < types.index("tool_use")
        assert any(block.get("citations") for block in first.blocks)
        assert first.usage["server_tool_use"] == {"web_search_requests": 1}
        call = first.blocks[-1]
        assert call["input"]["city"] == "Should I cycle in Lyon tomorrow?"
        messages += [{"role": "assistant", "content": first.blocks},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call["id"],
                                                   "content": [{"type": "text", "text": "rain at 9"}]}]}]
        second = await answer(client, request(messages, tools=tools, thinking=THINKING))
    # The signed thinking block went back unchanged and was accepted; no new thinking within the turn.
    assert second.types()[0] == "text" and "rain at 9" in second.text() and second.stop_reason == "end_turn"


async def test_pause_turn_then_continuing_finishes_the_search() -> None:
    messages = [user("[search] tides in Brest")]
    async with offline_client() as client:
        first = await answer(client, request(messages, tools=[WEB_SEARCH]), {"x-mock-pause-turn": "1"})
        assert first.stop_reason == "pause_turn"
        assert first.types() == ["text", "server_tool_use", "web_search_tool_result"]
        messages.append({"role": "assistant", "content": first.blocks})
        second = await answer(client, request(messages, tools=[WEB_SEARCH]))
    assert second.stop_reason == "end_turn" and set(second.types()) == {"text"}
    urls = [c["url"] for block in second.blocks for c in block.get("citations", [])]
    assert urls == [item["url"] for item in first.blocks[2]["content"]]
    assert "server_tool_use" not in second.usage  # no second search


# --- refusals ---------------------------------------------------------------------------------------------


async def tool_round(client: httpx.AsyncClient) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A first round with thinking and a tool call: the messages so far and the call."""
    messages = [user("[tool] Oslo")]
    first = await answer(client, request(messages, tools=[WEATHER], thinking=THINKING))
    messages.append({"role": "assistant", "content": first.blocks})
    return messages, first.blocks[-1]


def result_for(tool_use_id: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_use_id, "content": "ok"}]}


async def test_an_unpaired_tool_result_or_tool_use_is_refused_in_the_apis_words() -> None:
    async with offline_client() as client:
        messages, call = await tool_round(client)
        both = {"role": "user", "content": [*result_for(call["id"])["content"], *result_for("toolu_other")["content"]]}
        message = refusal(await post(client, request([*messages, both], tools=[WEATHER], thinking=THINKING)))
        assert message == ("messages.2.content.1: unexpected `tool_use_id` found in `tool_result` blocks: toolu_other."
                           " Each `tool_result` block must have a corresponding `tool_use` block in the previous"
                           " message.")
        message = refusal(await post(client, request([*messages, user("never mind")], tools=[WEATHER],
                                                     thinking=THINKING)))
        assert message == (f"messages.1: `tool_use` ids were found without `tool_result` blocks immediately after:"
                           f" {call['id']}. Each `tool_use` block must have a corresponding `tool_result` block in"
                           " the next message.")
        assert (await post(client, request([*messages, result_for(call["id"])], tools=[WEATHER],
                                           thinking=THINKING))).status_code == 200


async def test_a_changed_thinking_block_is_refused() -> None:
    async with offline_client() as client:
        messages, call = await tool_round(client)
        thinking = dict(messages[1]["content"][0])
        for changed in ({**thinking, "thinking": thinking["thinking"] + "!"},
                        {**thinking, "signature": sign_thinking("something else")},
                        {"type": "thinking", "thinking": thinking["thinking"]}):
            altered = [messages[0], {"role": "assistant", "content": [changed, *messages[1]["content"][1:]]},
                       result_for(call["id"])]
            message = refusal(await post(client, request(altered, tools=[WEATHER], thinking=THINKING)))
            assert message == "messages.1.content.0: Invalid `signature` in `thinking` block"


@pytest.mark.parametrize(("block", "message"), [
    ({"type": "image", "source": {"type": "base64", "media_type": "image/bmp", "data": PNG}},
     "messages.0.content.0.image.source.base64.media_type: Input should be 'image/jpeg', 'image/png', 'image/gif'"
     " or 'image/webp'"),
    ({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "not base64!"}},
     "messages.0.content.0.image.source.base64.data: The image data is not valid base64"),
    ({"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": PNG}},
     "messages.0.content.0.image.source.base64.data: Image does not match the provided media type image/jpeg"),
    ({"type": "image", "source": {"type": "attachment", "id": "att_1"}},
     "messages.0.content.0.image.source: Input tag 'attachment' found using 'type' is not accepted by the offline"
     " model (it takes base64 sources only)"),
    ({"type": "document", "source": {"type": "base64", "media_type": "text/plain", "data": PDF}},
     "messages.0.content.0.document.source.base64.media_type: Input should be 'application/pdf'"),
    ({"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": PNG}},
     "messages.0.content.0.document.source.base64.data: The PDF specified was not valid."),
])
async def test_a_malformed_image_or_document_is_refused(block: dict[str, Any], message: str) -> None:
    async with offline_client() as client:
        body = request([{"role": "user", "content": [block, {"type": "text", "text": "look"}]}])
        assert refusal(await post(client, body)) == message


async def test_well_formed_images_and_documents_are_accepted() -> None:
    blocks = [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
              {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": PDF}},
              {"type": "text", "text": "what is this"}]
    async with offline_client() as client:
        reply = await answer(client, request([{"role": "user", "content": blocks}]))
    assert "what is this" in reply.text()


@pytest.mark.parametrize(("thinking", "max_tokens", "message"), [
    ({"type": "enabled", "budget_tokens": 1000}, 4096,
     "thinking.enabled.budget_tokens: Input should be greater than or equal to 1024"),
    ({"type": "enabled", "budget_tokens": 4096}, 4096,
     "`max_tokens` must be greater than `thinking.budget_tokens`. Please consult our documentation at"
     " https://docs.claude.com/en/docs/build-with-claude/extended-thinking#max-tokens-and-context-window-size"),
])
async def test_a_thinking_budget_out_of_bounds_is_refused(thinking: dict[str, Any], max_tokens: int,
                                                          message: str) -> None:
    async with offline_client() as client:
        body = request([user("hi")], thinking=thinking, max_tokens=max_tokens)
        assert refusal(await post(client, body)) == message


# --- the mock over real HTTP ------------------------------------------------------------------------------


def test_the_mock_upstream_process_answers_and_refuses_the_same_way(make_upstream) -> None:  # type: ignore[no-untyped-def]
    """`python -m server.mock_upstream` serves the same shapes and checks its own signatures (its key is its
    own, so only a round trip through it can tell a signature it issued)."""
    upstream = make_upstream("--delay-ms", "0")
    tools = [WEB_SEARCH, WEATHER]
    with httpx.Client(base_url=upstream.url, timeout=10) as client:
        def stream(body: dict[str, Any], headers: dict[str, str] | None = None) -> Answer:
            return Answer(decode(client.post("/v1/messages", json=body, headers=headers or {})))

        messages = [user("[search] [tool] Bergen")]
        paused = stream(request(messages, tools=tools, thinking=THINKING), {"x-mock-pause-turn": "1"})
        assert paused.stop_reason == "pause_turn" and paused.types()[0] == "thinking"
        messages.append({"role": "assistant", "content": paused.blocks})
        cont = stream(request(messages, tools=tools, thinking=THINKING))
        assert cont.stop_reason == "tool_use" and cont.types()[-1] == "tool_use"
        assert any(block.get("citations") for block in cont.blocks)
        call = cont.blocks[-1]
        messages += [{"role": "assistant", "content": cont.blocks}, result_for(call["id"])]
        final = stream(request(messages, tools=tools, thinking=THINKING))
        assert final.stop_reason == "end_turn" and "returned: “ok”" in final.text()
        # The same history with the thinking text changed by one character: refused.
        forged = [dict(m) for m in messages]
        thinking = dict(paused.blocks[0], thinking=paused.blocks[0]["thinking"] + ".")
        forged[1] = {"role": "assistant", "content": [thinking, *paused.blocks[1:]]}
        res = client.post("/v1/messages", json=request(forged, tools=tools, thinking=THINKING))
        assert refusal(res) == "messages.1.content.0: Invalid `signature` in `thinking` block"
        res = client.post("/v1/messages", json=request([*messages[:2], result_for("toolu_x")], tools=tools))
        assert "unexpected `tool_use_id` found in `tool_result` blocks: toolu_x" in refusal(res)


async def test_search_results_stay_within_allowed_domains() -> None:
    tool = {**WEB_SEARCH, "allowed_domains": ["docs.example.com"]}
    async with offline_client() as client:
        reply = await answer(client, request([user("[search] relay docs")], tools=[tool]))
    assert {item["url"].split("/")[2] for item in reply.blocks[2]["content"]} == {"docs.example.com"}


def test_the_mock_pause_turn_option_pauses_every_search_round(make_upstream) -> None:  # type: ignore[no-untyped-def]
    upstream = make_upstream("--delay-ms", "0", "--pause-turn")
    with httpx.Client(base_url=upstream.url, timeout=10) as client:
        messages = [user("[search] Tromsø aurora")]
        paused = Answer(decode(client.post("/v1/messages", json=request(messages, tools=[WEB_SEARCH]))))
        assert paused.stop_reason == "pause_turn"
        messages.append({"role": "assistant", "content": paused.blocks})
        done = Answer(decode(client.post("/v1/messages", json=request(messages, tools=[WEB_SEARCH]))))
        assert done.stop_reason == "end_turn" and any(block.get("citations") for block in done.blocks)
        plain = Answer(decode(client.post("/v1/messages", json=request([user("no directive")]))))
        assert plain.stop_reason == "end_turn" and plain.types() == ["text"]
