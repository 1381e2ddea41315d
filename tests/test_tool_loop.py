"""The tool loop in the one streaming core: a real Relay and SQLite, the Messages API a FakeUpstream replaying
recorded tool_use streams, and the app's toolsUrl a real HTTP server on loopback that checks each call's
HMAC signature."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import importlib.util
import json
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import websockets

from server.config import Agent
from server.core import Relay
from server.protocol.frames import Continue, SendMessage

from .fakes import (
    FakeUpstream,
    RecordedRequest,
    SSEAnswer,
    anthropic_events,
    api_error,
    collect,
    collect_until,
    relay_in_process,
)
from .raw_upstream import Server
from .relay_clients import loads, sse_read, sse_read_first, sse_stream, ws_read_until_end, ws_stream

STREAMS = Path(__file__).parent / "data" / "anthropic-streams"
SECRET = "tools-secret-of-the-test-app"
WEATHER = {"name": "get_weather", "description": "The weather at a place",
           "input_schema": {"type": "object", "properties": {"location": {"type": "string"}},
                            "required": ["location"]}}


def recorded(name: str) -> SSEAnswer:
    """A recorded real stream, replayed as one HTTP chunk."""
    return SSEAnswer([(STREAMS / f"{name}.sse").read_bytes()])


def text_answer(texts: list[str], **script: Any) -> SSEAnswer:
    return SSEAnswer(anthropic_events(texts, **script))


ToolReply = tuple[int, bytes] | None  # None: never answer (the call hangs until the relay lets go)


class ToolServer:
    """The app's toolsUrl on 127.0.0.1: each POST is recorded with whether its signature verified, and
    answered by `respond(call)` (HTTP status and body), one request per connection."""

    def __init__(self, respond: Callable[[dict[str, Any]], ToolReply]) -> None:
        self.respond = respond
        self.bodies: list[bytes] = []
        self.headers: list[dict[str, str]] = []
        self.bad_signatures = 0
        self.called = asyncio.Event()
        self.closed = asyncio.Event()  # a hanging call's connection was closed by the relay
        self.server = Server(self._serve)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}/tools"

    async def __aenter__(self) -> ToolServer:
        await self.server.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.__aexit__(*exc)
        assert self.bad_signatures == 0, "a tool call arrived without a valid X-Deltarelay-Signature"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {name.strip().lower(): value.strip() for name, _, value in
                   (line.partition(":") for line in lines[1:] if line)}
        body = await reader.readexactly(int(headers["content-length"]))
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(headers.get("x-deltarelay-signature", ""), expected):
            self.bad_signatures += 1
        self.bodies.append(body)
        self.headers.append(headers)
        self.called.set()
        reply = self.respond(orjson.loads(body)["call"])
        if reply is None:
            while await reader.read(1024):
                pass
            self.closed.set()
            return
        status, content = reply
        writer.write(b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close"
                     b"\r\n\r\n%s" % (status, len(content), content))
        await writer.drain()


def ok(content: Any, is_error: bool = False) -> ToolReply:
    return 200, orjson.dumps({"content": content, "isError": is_error})


def agent(tools_url: str, model: str = "claude-opus-4-1", **fields: Any) -> Agent:
    return Agent("weather", model, max_tokens=2048, prompt_cache="off", tools=(WEATHER,), tools_url=tools_url,
                 **fields)


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream() as fake:
        yield fake


async def run(relay: Relay, text: str = "What's the weather in San Francisco?", **command: Any
              ) -> list[tuple[int, str, dict[str, Any]]]:
    stream = await relay.start(SendMessage(text, agent_id="weather", **command))
    return await collect(relay.hub, stream.id)


def names(events: list[tuple[int, str, dict[str, Any]]]) -> list[str]:
    return [name for _, name, _ in events]


def messages_of(request: RecordedRequest) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = request.json()["messages"]
    return messages


async def saved(relay: Relay, events: list[tuple[int, str, dict[str, Any]]]) -> list[dict[str, Any]]:
    return await relay.store.list_messages(events[0][2]["conversationId"])


async def test_two_round_loop_calls_the_signed_tool_and_sends_its_result_back(tmp_path, upstream):
    """One start, one cost, one done over two upstream requests; the app gets exactly the documented body,
    signed; the second request carries the first round's content and the result, paired by tool_use_id."""
    async with ToolServer(lambda call: ok("15 degrees and foggy")) as tools:
        upstream.answer(recorded("docs_tool_use"),
                        text_answer(["It is 15 degrees", " and foggy."], model="claude-opus-4-1",
                                    input_tokens=600, output_tokens=20))
        async with relay_in_process(tmp_path, upstream, agents=(agent(tools.url),), tools_secret=SECRET) as relay:
            events = await run(relay)
            rows = await saved(relay, events)

    assert names(events).count("start") == 1 and names(events).count("done") == 1
    assert names(events).count("cost") == 1 and names(events)[-2:] == ["cost", "done"]
    result = next(data for _, name, data in events if name == "tool_result")
    assert result == {"id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "isError": False, "content": "15 degrees and foggy"}
    assert events[-1][2]["stopReason"] == "end_turn"
    # The app's request: exactly these bytes were signed and sent.
    assert tools.bodies == [orjson.dumps({
        "conversationId": events[0][2]["conversationId"], "messageId": events[0][2]["messageId"],
        "user": {"id": None, "name": "anonymous"},
        "call": {"id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "name": "get_weather",
                 "input": {"location": "San Francisco, CA", "unit": "fahrenheit"}}})]
    assert tools.headers[0]["content-type"] == "application/json"
    first, second = upstream.requests
    assert first.json()["tools"] == [WEATHER]
    assistant = {"role": "assistant", "content": [
        {"type": "text", "text": "Okay, let's check the weather for San Francisco, CA:"},
        {"type": "tool_use", "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "name": "get_weather",
         "input": {"location": "San Francisco, CA", "unit": "fahrenheit"}}]}
    results = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
                                            "content": "15 degrees and foggy", "is_error": False}]}
    assert messages_of(second) == [*messages_of(first), assistant, results]
    answer = rows[1]
    assert answer["content"] == "Okay, let's check the weather for San Francisco, CA:It is 15 degrees and foggy."
    assert orjson.loads(answer["blocks"]) == [
        assistant, results,
        {"role": "assistant", "content": [{"type": "text", "text": "It is 15 degrees and foggy."}]}]


async def test_cost_is_the_sum_of_the_rounds_usage_priced_by_hand(tmp_path, upstream):
    """claude-opus-4-1 is $15 per million input tokens and $75 per million output: round one (the recording)
    472 in, 89 out; round two 600 in, 20 out. Mutation: pricing only the last round fails it."""
    async with ToolServer(lambda call: ok("15 degrees")) as tools:
        upstream.answer(recorded("docs_tool_use"),
                        text_answer(["Fifteen."], model="claude-opus-4-1", input_tokens=600, output_tokens=20))
        async with relay_in_process(tmp_path, upstream, agents=(agent(tools.url),), tools_secret=SECRET) as relay:
            events = await run(relay)
            rows = await saved(relay, events)
    by_hand = (Decimal(472) * 15 + Decimal(89) * 75 + Decimal(600) * 15 + Decimal(20) * 75) / 1_000_000
    cost = next(data for _, name, data in events if name == "cost")
    assert (cost["inputTokens"], cost["outputTokens"]) == (1072, 109)
    assert cost["totalCost"] == by_hand == Decimal("0.024255")
    assert "estimated" not in cost
    # The context meter shows the last request's input, not the rounds' sum.
    assert 0 < cost["contextTokens"] < cost["inputTokens"] + cost["cacheCreationInputTokens"] + cost[
        "cacheReadInputTokens"]
    assert Decimal(str(rows[1]["cost"])) == by_hand
    assert (rows[1]["input_tokens"], rows[1]["output_tokens"]) == (1072, 109)


async def test_the_saved_blocks_go_back_unchanged_in_the_next_turn(tmp_path, upstream):
    async with ToolServer(lambda call: ok([{"type": "text", "text": "15 degrees"}])) as tools:
        upstream.answer(recorded("docs_tool_use"), text_answer(["Fifteen."]), text_answer(["You're welcome."]))
        async with relay_in_process(tmp_path, upstream, agents=(agent(tools.url),), tools_secret=SECRET) as relay:
            events = await run(relay)
            blocks = orjson.loads((await saved(relay, events))[1]["blocks"])
            await run(relay, "Thanks!", conversation_id=events[0][2]["conversationId"])
    third = messages_of(upstream.requests[2])
    assert third == [messages_of(upstream.requests[0])[0], *blocks, {"role": "user", "content": "Thanks!"}]
    assert third[2]["content"][0]["content"] == [{"type": "text", "text": "15 degrees"}]  # the app's blocks


async def test_a_slow_tool_times_out_into_an_error_result_the_model_sees(tmp_path, upstream):
    async with ToolServer(lambda call: None) as tools:
        upstream.answer(recorded("docs_tool_use"), text_answer(["The weather service is slow."]))
        async with relay_in_process(tmp_path, upstream, agents=(agent(tools.url),), tools_secret=SECRET,
                                    tools_timeout=0.3) as relay:
            events = await run(relay)
        async with asyncio.timeout(10):
            await tools.closed.wait()  # the relay gave up the call's connection
    result = next(data for _, name, data in events if name == "tool_result")
    assert result["isError"] is True
    assert result["content"] == "the tool get_weather did not answer within 0.3 seconds"
    sent = messages_of(upstream.requests[1])[-1]["content"]
    assert sent == [{"type": "tool_result", "tool_use_id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
                     "content": result["content"], "is_error": True}]
    assert events[-1][1] == "done" and events[-1][2]["stopReason"] == "end_turn"


async def test_a_failing_tool_and_a_malformed_answer_become_error_results_in_call_order(tmp_path, upstream):
    """The recording asks for two calls in one round: they run concurrently, a 500 and a body that is not
    JSON, and each becomes an is_error result, in the calls' order."""
    replies = {"c": (500, b'{"detail": "internal secret stack trace"}'), "f": (200, b"not json")}
    async with ToolServer(lambda call: replies[call["input"]["units"]]) as tools:
        upstream.answer(recorded("rec_sonnet35_text_then_tool_use"), text_answer(["Sorry, no weather."]))
        async with relay_in_process(tmp_path, upstream,
                                    agents=(agent(tools.url, model="claude-3-5-sonnet-20241022"),),
                                    tools_secret=SECRET) as relay:
            events = await run(relay)
    results = [data for _, name, data in events if name == "tool_result"]
    assert results == [
        {"id": "toolu_01QYZ2sgjBq1oG8iryEt8QjR", "isError": True,
         "content": "the tool get_weather failed: its endpoint answered HTTP 500"},
        {"id": "toolu_01Lu9hbRKgrZqvHFutZxCNnZ", "isError": True,
         "content": "the tool get_weather gave a malformed answer"}]
    sent = messages_of(upstream.requests[1])[-1]["content"]
    assert [(block["tool_use_id"], block["is_error"]) for block in sent] == [
        ("toolu_01QYZ2sgjBq1oG8iryEt8QjR", True), ("toolu_01Lu9hbRKgrZqvHFutZxCNnZ", True)]
    assert events[-1][2]["stopReason"] == "end_turn"


async def test_the_app_may_answer_is_error_itself(tmp_path, upstream):
    async with ToolServer(lambda call: ok("no such city", is_error=True)) as tools:
        upstream.answer(recorded("docs_tool_use"), text_answer(["I could not find it."]))
        async with relay_in_process(tmp_path, upstream, agents=(agent(tools.url),), tools_secret=SECRET) as relay:
            events = await run(relay)
            metrics = relay.metrics.render().decode()
    assert next(data for _, name, data in events if name == "tool_result")["isError"] is True
    assert messages_of(upstream.requests[1])[-1]["content"][0]["is_error"] is True
    assert 'deltarelay_tool_calls_total{result="error"} 1.0' in metrics


async def test_max_tool_rounds_ends_the_answer_with_the_last_stop_reason(tmp_path, upstream):
    """With maxToolRounds 1 the second tool_use is not run: the answer ends `tool_use`, and its saved blocks
    answer that call with an error result, so the next turn's history is one the API takes."""
    async with ToolServer(lambda call: ok("15 degrees")) as tools:
        upstream.answer(recorded("docs_tool_use"), recorded("docs_tool_use"))
        async with relay_in_process(tmp_path, upstream, agents=(agent(tools.url, max_tool_rounds=1),),
                                    tools_secret=SECRET) as relay:
            events = await run(relay)
            rows = await saved(relay, events)
    assert len(upstream.requests) == 2 and len(tools.bodies) == 1
    assert names(events).count("tool_result") == 1
    assert events[-1][2]["stopReason"] == "tool_use"
    blocks = orjson.loads(rows[1]["blocks"])
    assert [message["role"] for message in blocks] == ["assistant", "user", "assistant", "user"]
    assert blocks[-1]["content"] == [{"type": "tool_result", "tool_use_id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
                                      "content": "not run: the answer reached its limit of tool rounds",
                                      "is_error": True}]
    assert rows[1]["stop_reason"] == "tool_use" and rows[1]["status"] == "complete"


async def test_pause_turn_is_sent_back_and_continued(tmp_path, upstream):
    upstream.answer(text_answer(["Searching the web"], stop_reason="pause_turn"),
                    text_answer([": it is sunny."]))
    async with relay_in_process(tmp_path, upstream, agents=(agent("https://app.example/tools"),),
                                tools_secret=SECRET) as relay:
        events = await run(relay)
        rows = await saved(relay, events)
    first, second = upstream.requests
    assert messages_of(second) == [*messages_of(first),
                                   {"role": "assistant", "content": [{"type": "text", "text": "Searching the web"}]}]
    assert events[-1][2]["stopReason"] == "end_turn"
    assert rows[1]["content"] == "Searching the web: it is sunny."
    assert rows[1]["blocks"] is None  # plain text in every round: the row's text says it all


async def test_cancel_during_a_tool_call_closes_it_and_ends_done_cancelled_with_an_estimated_cost(
        tmp_path, upstream):
    async with ToolServer(lambda call: None) as tools:
        upstream.answer(recorded("docs_tool_use"))
        async with relay_in_process(tmp_path, upstream, agents=(agent(tools.url),), tools_secret=SECRET,
                                    tools_timeout=30) as relay:
            stream = await relay.start(SendMessage("weather?", agent_id="weather"))
            async with asyncio.timeout(10):
                await tools.called.wait()
            assert relay.hub.cancel(stream.id) is True
            events = await collect(relay.hub, stream.id)
            rows = await saved(relay, events)
            async with asyncio.timeout(10):
                await tools.closed.wait()  # the cancel closed the tool call's connection
    assert names(events)[-2:] == ["cost", "done"]
    assert events[-1][2]["stopReason"] == "cancelled"
    cost = events[-2][2]
    assert cost["estimated"] is True and (cost["inputTokens"], cost["outputTokens"]) == (472, 89)
    assert "tool_result" not in names(events)
    assert len(upstream.requests) == 1
    assert rows[1]["status"] == "cancelled" and rows[1]["cost_estimated"] == 1
    blocks = orjson.loads(rows[1]["blocks"])
    assert blocks[-1]["content"][0]["content"] == "not run: the answer was cancelled"


async def test_a_plain_answer_saves_no_blocks_and_sends_no_tools_fields(tmp_path, upstream):
    """An agent without tools or thinking: the request is as before (no tools, thinking or beta header), and the
    answer's row keeps blocks NULL (old rows and new plain ones alike)."""
    upstream.answer(text_answer(["Hello"]))
    async with relay_in_process(tmp_path, upstream) as relay:
        stream = await relay.start(SendMessage("hi"))
        events = await collect(relay.hub, stream.id)
        rows = await saved(relay, events)
    body = upstream.requests[0].json()
    assert "tools" not in body and "thinking" not in body
    assert "anthropic-beta" not in upstream.requests[0].headers
    assert rows[1]["blocks"] is None


@pytest.mark.parametrize("transport", ["http1", "aiohttp", "httpx"])
async def test_thinking_server_tools_and_betas_reach_the_api_on_every_transport(tmp_path, upstream, transport):
    web = Agent("weather", "claude-opus-4-1", max_tokens=4096, prompt_cache="5m", thinking_budget=2048,
                server_tools=({"type": "web_search_20250305", "name": "web_search", "max_uses": 5},
                              {"type": "web_fetch_20250910", "name": "web_fetch"}),
                tools=(WEATHER,), tools_url="https://app.example/tools", betas=("context-1m-2025-08-07",))
    upstream.answer(text_answer(["Hi"]), text_answer(["Again"]))
    async with relay_in_process(tmp_path, upstream, agents=(web,), tools_secret=SECRET,
                                upstream_transport=transport) as relay:
        await run(relay, "x" * 20_000)
        stream = await relay.start(SendMessage("plain"))
        await collect(relay.hub, stream.id)
    first, plain = upstream.requests
    body = first.json()
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    assert [tool["name"] for tool in body["tools"]] == ["web_search", "web_fetch", "get_weather"]
    assert first.headers["anthropic-beta"] == "context-1m-2025-08-07,web-fetch-2025-09-10"
    # The cache breakpoints still land on the system prompt / newest user message, never on a tool.
    assert "cache_control" in body["messages"][-1]["content"][-1]
    assert all("cache_control" not in tool for tool in body["tools"])
    assert "anthropic-beta" not in plain.headers  # the header is per request, not left on the connection


async def test_cancel_between_rounds_saves_both_rounds(tmp_path, upstream):
    """A cancel while round two streams: round one's content and result are kept, round two's text so far."""
    second = SSEAnswer(anthropic_events(["Fif", "teen", " never"])[:4], then="hang")
    async with ToolServer(lambda call: ok("15 degrees")) as tools:
        upstream.answer(recorded("docs_tool_use"), second)
        async with relay_in_process(tmp_path, upstream, agents=(agent(tools.url),), tools_secret=SECRET) as relay:
            stream = await relay.start(SendMessage("weather?", agent_id="weather"))
            await collect_until(relay.hub, stream.id, lambda events: any(
                name == "chunk" and data["text"] == "Fif" for _, name, data in events))
            assert relay.hub.cancel(stream.id) is True
            events = await collect(relay.hub, stream.id)
            rows = await saved(relay, events)
    assert events[-1][2]["stopReason"] == "cancelled"
    assert rows[1]["content"] == "Okay, let's check the weather for San Francisco, CA:Fif"
    blocks = orjson.loads(rows[1]["blocks"])
    assert [message["role"] for message in blocks] == ["assistant", "user", "assistant"]
    assert blocks[-1]["content"] == [{"type": "text", "text": "Fif"}]


# --- end to end: the real server process, over SSE and WebSocket -------------------------------------------


@pytest.mark.parametrize("transport", ["sse", "websocket"])
async def test_a_tool_loop_end_to_end_on_both_transports_with_an_exact_resume(tmp_path, upstream, make_server,
                                                                              transport):
    """`python -m server` with an agent whose tool runs at a signed loopback toolsUrl: one start, the tool's
    result, the second round's text, one cost, one done; reading the stream again from the event before the
    tool_result gives exactly the same tail; REST returns the saved blocks."""
    async with ToolServer(lambda call: ok("15 degrees")) as tools:
        upstream.answer(recorded("docs_tool_use"), text_answer(["It is 15 degrees."]))
        agents = tmp_path / "agents.json"
        agents.write_text(orjson.dumps({"agents": [{
            "id": "weather", "model": "claude-opus-4-1", "maxTokens": 2048, "promptCache": "off",
            "tools": [WEATHER], "toolsUrl": tools.url}]}).decode())
        server = make_server({"ANTHROPIC_API_KEY": "sk-test-e2e", "ANTHROPIC_BASE_URL": upstream.base_url,
                              "RELAY_AGENTS_FILE": str(agents), "RELAY_TOOLS_SECRET": SECRET})
        body = {"message": "What's the weather in San Francisco?", "agentId": "weather"}
        if transport == "sse":
            events = await sse_stream(server.url, body)
        else:
            events = await ws_stream(server.ws_url, body)
        start = events[0][2]
        tail_from = next(event_id for event_id, name, _ in events if name == "tool_result") - 1
        again = await sse_read(server.url, start["streamId"], last_event_id=tail_from)
        async with httpx.AsyncClient(base_url=server.url) as client:
            listed = (await client.get(f"/api/conversations/{start['conversationId']}/messages")).json()
    event_names = [name for _, name, _ in events]
    assert event_names[0] == "start" and event_names[-2:] == ["cost", "done"]
    assert event_names.count("start") == event_names.count("cost") == event_names.count("done") == 1
    assert next(data for _, name, data in events if name == "tool_result") == {
        "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "isError": False, "content": "15 degrees"}
    assert "".join(data["text"] for _, name, data in events if name == "chunk") == (
        "Okay, let's check the weather for San Francisco, CA:It is 15 degrees.")
    assert [(event_id, name, data) for event_id, name, data in events if event_id > tail_from] == again
    messages = listed["messages"] if isinstance(listed, dict) else listed
    answer = next(message for message in messages if message["role"] == "assistant")
    assert [message["role"] for message in answer["blocks"]] == ["assistant", "user", "assistant"]
    assert len(upstream.requests) == 2 and len(tools.bodies) == 1


async def test_a_failed_request_of_a_later_round_is_retried_before_its_first_content(tmp_path, upstream):
    """The retry policy holds per request: round two's 529 is retried, the answer goes on unrepeated."""
    async with ToolServer(lambda call: ok("15 degrees")) as tools:
        upstream.answer(recorded("docs_tool_use"), api_error(529, "overloaded_error", "Overloaded"),
                        text_answer(["Fifteen."]))
        async with relay_in_process(tmp_path, upstream, agents=(agent(tools.url),), tools_secret=SECRET,
                                    retry_attempts=1, retry_base_delay=0.01) as relay:
            events = await run(relay)
    assert len(upstream.requests) == 3
    assert messages_of(upstream.requests[2]) == messages_of(upstream.requests[1])
    assert names(events).count("tool_result") == 1 and events[-1][2]["stopReason"] == "end_turn"
    assert len(tools.bodies) == 1


async def test_continuing_a_tool_answer_keeps_its_blocks_and_adds_the_new_text(tmp_path, upstream):
    """A tool answer stopped at max_tokens, continued: the continue's request carries the saved rounds (and
    the text so far as the assistant's turn), and the saved blocks are the old ones followed by the new text."""
    async with ToolServer(lambda call: ok("15 degrees")) as tools:
        upstream.answer(recorded("docs_tool_use"), text_answer(["It is 15"], stop_reason="max_tokens"),
                        text_answer([" degrees."]))
        async with relay_in_process(tmp_path, upstream, agents=(agent(tools.url),), tools_secret=SECRET) as relay:
            events = await run(relay)
            answer_id = events[0][2]["messageId"]
            stream = await relay.start(Continue(answer_id))
            continued = await collect(relay.hub, stream.id)
            rows = await saved(relay, events)
    assert continued[-1][2]["stopReason"] == "end_turn"
    sent = messages_of(upstream.requests[2])
    assert [message["role"] for message in sent] == ["user", "assistant", "user", "assistant"]
    assert sent[-1]["content"] == [{"type": "text", "text": "It is 15"}]
    assert rows[1]["content"] == "Okay, let's check the weather for San Francisco, CA:It is 15 degrees."
    blocks = orjson.loads(rows[1]["blocks"])
    assert blocks[-1] == {"role": "assistant", "content": [{"type": "text", "text": "It is 15"},
                                                           {"type": "text", "text": " degrees."}]}
    assert [message["role"] for message in blocks] == ["assistant", "user", "assistant"]


@pytest.mark.parametrize("transport", ["sse", "websocket"])
async def test_cancel_during_a_tool_call_end_to_end_on_both_transports(tmp_path, upstream, make_server, transport):
    """A tool that never answers, the answer cancelled while its call runs (REST cancel for SSE, a cancel frame
    on the socket): the call's connection is closed, the stream ends `done` cancelled with an estimated cost."""
    async with ToolServer(lambda call: None) as tools:
        upstream.answer(recorded("docs_tool_use"))
        agents = tmp_path / "agents.json"
        agents.write_text(orjson.dumps({"agents": [{
            "id": "weather", "model": "claude-opus-4-1", "maxTokens": 2048, "promptCache": "off",
            "tools": [WEATHER], "toolsUrl": tools.url}]}).decode())
        server = make_server({"ANTHROPIC_API_KEY": "sk-test-e2e", "ANTHROPIC_BASE_URL": upstream.base_url,
                              "RELAY_AGENTS_FILE": str(agents), "RELAY_TOOLS_SECRET": SECRET,
                              "RELAY_TOOLS_TIMEOUT": "60"})
        body = {"message": "weather?", "agentId": "weather"}
        if transport == "sse":
            first = await sse_read_first(server.url, body, 1)
            stream_id = first[0][2]["streamId"]
            async with asyncio.timeout(10):
                await tools.called.wait()
            async with httpx.AsyncClient(base_url=server.url) as client:
                cancelled = await client.post(f"/api/command-center/streams/{stream_id}/cancel")
            assert cancelled.status_code < 300, cancelled.text
            events = await sse_read(server.url, stream_id)
        else:
            async with websockets.connect(server.ws_url + "/api/command-center/ws") as socket:
                await socket.send(orjson.dumps({"type": "message", **body}).decode())
                start = orjson.loads(await socket.recv())
                stream_id = start["streamId"]
                async with asyncio.timeout(10):
                    await tools.called.wait()
                await socket.send(orjson.dumps({"type": "cancel", "streamId": stream_id}).decode())
                events = [(start["id"], start["event"], start["data"]), *await ws_read_until_end(socket, stream_id)]
        async with asyncio.timeout(10):
            await tools.closed.wait()
    assert [name for _, name, _ in events][-2:] == ["cost", "done"]
    assert events[-1][2]["stopReason"] == "cancelled"
    assert events[-2][2]["estimated"] is True
    assert "tool_result" not in [name for _, name, _ in events]
    assert len(upstream.requests) == 1


# --- end to end on the offline model: needs i19-shapes' `[tool]` directive (server/upstream/shapes.py) ------

needs_shapes = pytest.mark.skipif(importlib.util.find_spec("server.upstream.shapes") is None,
                                  reason="the offline model's [tool] directive (issue 19, i19-shapes) is not here")


@needs_shapes
@pytest.mark.parametrize("transport", ["sse", "websocket"])
async def test_the_offline_model_calls_the_tool_and_takes_its_result_on_both_transports(tmp_path, make_server,
                                                                                        transport):
    """No API key: `[tool]` makes the offline model call the agent's first tool; the relay runs it at the signed
    toolsUrl and sends the result back, which the offline model checks as the API would (paired with its
    tool_use id) before it answers in text: a wrong second request would end the stream with an error."""
    async with ToolServer(lambda call: ok("15 degrees")) as tools:
        agents = tmp_path / "agents.json"
        agents.write_text(orjson.dumps({"agents": [{
            "id": "weather", "maxTokens": 2048, "tools": [WEATHER], "toolsUrl": tools.url}]}).decode())
        server = make_server({"RELAY_AGENTS_FILE": str(agents), "RELAY_TOOLS_SECRET": SECRET,
                              "RELAY_OFFLINE_DELAY_MS": "0"})
        body = {"message": "[tool] What's the weather?", "agentId": "weather"}
        events = await (sse_stream(server.url, body) if transport == "sse" else ws_stream(server.ws_url, body))
    event_names = [name for _, name, _ in events]
    assert event_names.count("start") == event_names.count("cost") == event_names.count("done") == 1, events
    result = next(data for _, name, data in events if name == "tool_result")
    assert result["isError"] is False and result["content"] == "15 degrees"
    assert events[-1][1] == "done" and events[-1][2]["stopReason"] == "end_turn"
    assert len(tools.bodies) == 1
    call = orjson.loads(tools.bodies[0])["call"]
    assert call["name"] == "get_weather" and isinstance(call["input"].get("location"), str)


async def read_until(transport: str, server: Any, body: dict[str, Any], last: str) -> list[tuple[int, str, Any]]:
    """Send `body` on `transport` and read its events up to the first `last` event, then drop the connection
    (the answer goes on without a reader)."""
    events: list[tuple[int, str, Any]] = []
    if transport == "websocket":
        async with websockets.connect(server.ws_url + "/api/command-center/ws") as socket:
            await socket.send(orjson.dumps({"type": "message", **body}).decode())
            async with asyncio.timeout(30):
                while not events or events[-1][1] != last:
                    frame = json.loads(await socket.recv(), parse_float=Decimal)
                    events.append((frame["id"], frame["event"], frame["data"]))
        return events
    from httpx_sse import aconnect_sse
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        async with aconnect_sse(client, "POST", "/api/command-center/message", json=body) as source:
            async for event in source.aiter_sse():
                events.append((int(event.id), event.event, loads(event.data)))
                if event.event == last:
                    break
    return events


@pytest.mark.parametrize("transport", ["sse", "websocket"])
async def test_thinking_a_web_search_and_an_app_tool_in_one_answer_with_exact_cost_and_resume(
        tmp_path, make_server, transport):
    """The issue's acceptance: an agent with thinking, web search and one app tool, no API key (the offline
    model). One answer thinks, searches the web, cites its sources, calls the app's tool and answers with its
    result: one start, one cost, one done. The reader leaves after the search results and resumes on SSE by
    event id: what it read plus the resumed tail is exactly the stream's log replayed after done. The cost is
    the summed tokens plus one web search priced by hand, and what REST saved. Mutation: a tool loop that
    emitted a cost per upstream request, or a resume off by one event, fails it."""
    from server.pricing import Usage, cost_of

    async with ToolServer(lambda call: ok("18 degrees and sunny")) as tools:
        agents = tmp_path / "agents.json"
        agents.write_text(orjson.dumps({"agents": [{
            "id": "researcher", "model": "claude-sonnet-4-5", "maxTokens": 4096,
            "thinking": {"budgetTokens": 2048}, "serverTools": [{"type": "web_search", "maxUses": 3}],
            "tools": [WEATHER], "toolsUrl": tools.url}]}).decode())
        server = make_server({"RELAY_AGENTS_FILE": str(agents), "RELAY_TOOLS_SECRET": SECRET,
                              "RELAY_OFFLINE_DELAY_MS": "5"})
        body = {"message": "[search] [tool] Paris weather today", "agentId": "researcher"}
        first = await read_until(transport, server, body, "search_results")
        stream_id = first[0][2]["streamId"]
        tail = await sse_read(server.url, stream_id, last_event_id=first[-1][0])
        whole = await sse_read(server.url, stream_id, last_event_id=0)
        async with httpx.AsyncClient(base_url=server.url) as client:
            listed = (await client.get(f"/api/conversations/{first[0][2]['conversationId']}/messages")).json()
    assert first + tail == whole
    assert [event_id for event_id, _, _ in whole] == list(range(1, len(whole) + 1))
    event_names = [name for _, name, _ in whole]
    assert event_names.count("start") == event_names.count("cost") == event_names.count("done") == 1
    for name in ("thinking", "search", "search_results", "citation", "tool_input", "tool_use", "tool_result"):
        assert name in event_names, (name, event_names)
    order = [event_names.index(name) for name in ("thinking", "search", "search_results", "citation", "tool_use",
                                                 "tool_result")]
    assert order == sorted(order) and event_names[-2:] == ["cost", "done"]
    search = next(data for _, name, data in whole if name == "search")
    assert search["name"] == "web_search" and search["query"] == "Paris weather today"
    results = next(data for _, name, data in whole if name == "search_results")["results"]
    cited = {data["url"] for _, name, data in whole if name == "citation"}
    assert results and cited <= {result["url"] for result in results}
    assert next(data for _, name, data in whole if name == "tool_result")["content"] == "18 degrees and sunny"
    text = "".join(data["text"] for _, name, data in whole if name == "chunk")
    assert "18 degrees and sunny" in text  # the model saw the tool's result
    cost = next(data for _, name, data in whole if name == "cost")
    usage = Usage(input_tokens=cost["inputTokens"], output_tokens=cost["outputTokens"],
                  cache_creation_input_tokens=cost["cacheCreationInputTokens"],
                  cache_read_input_tokens=cost["cacheReadInputTokens"], web_search_requests=1)
    assert Decimal(str(cost["totalCost"])) == cost_of(usage, "claude-sonnet-4-5")
    assert "estimated" not in cost
    # The context meter shows the last request's input, not the rounds' sum.
    assert 0 < cost["contextTokens"] < cost["inputTokens"] + cost["cacheCreationInputTokens"] + cost[
        "cacheReadInputTokens"]
    messages = listed["messages"] if isinstance(listed, dict) else listed
    answer = next(message for message in messages if message["role"] == "assistant")
    assert Decimal(answer["totalCost"]) == Decimal(str(cost["totalCost"])) and answer["content"] == text
    kinds = [block["type"] for message in answer["blocks"] for block in message["content"]]
    for kind in ("thinking", "server_tool_use", "web_search_tool_result", "tool_use", "tool_result", "text"):
        assert kind in kinds, (kind, kinds)
    assert len(tools.bodies) == 1
