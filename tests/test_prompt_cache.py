"""Prompt caching (issue 18): where the relay marks breakpoints, how the emulated cache answers, what it costs.

The fake upstream checks every request's breakpoints as the API does (tests/fakes.py) and answers with the
figures of the emulated cache (server/upstream/offline.py, PromptCache), so these tests see what a user of the
real API would: which prefix is written, which is read back, and the exact cost.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from bench import prompt_cache as bench
from server.mock_upstream import mock_app
from server.pricing import MILLION, MIN_CACHEABLE_TOKENS, PRICES, cache_read_savings, min_cacheable_tokens
from server.protocol.caching import breakpoint_errors, cache_marked
from server.protocol.frames import SendMessage
from server.protocol.tokens import MESSAGE_OVERHEAD, request_tokens, text_tokens
from server.upstream.anthropic import UpstreamRequest
from server.upstream.offline import OfflineOptions, OfflineTransport, PromptCache, demo_words

from .fakes import FakeUpstream, RecordedRequest, SSEAnswer, anthropic_events, relay_in_process, run_to_end

LONG_SYSTEM = "s" * 20_000  # 5,000 tokens: over every model's minimum
SONNET = "claude-sonnet-4-5"  # minimum 1,024
HAIKU = "claude-haiku-4-5"  # minimum 4,096


def history(turns: int, user_bytes: int = 200) -> list[dict[str, Any]]:
    """A conversation of `turns` user messages with an answer between each: u1, a1, ..., u_turns."""
    messages: list[dict[str, Any]] = []
    for turn in range(1, turns + 1):
        if messages:
            messages.append({"role": "assistant", "content": f"answer {turn - 1}"})
        messages.append({"role": "user", "content": f"question {turn} ".ljust(user_bytes, "?")})
    return messages


def body(messages: list[dict[str, Any]], system: str = LONG_SYSTEM, model: str = SONNET,
         mode: str = "5m") -> dict[str, Any]:
    """The request body the relay sends."""
    return dict(orjson.loads(UpstreamRequest(model, 100, messages, system, prompt_cache=mode).body()))


def marks(request: dict[str, Any]) -> list[tuple[str, int, dict[str, str]]]:
    """Where the request's breakpoints are: ("system", block, marker) or ("message", index, marker)."""
    found = []
    system = request.get("system")
    for index, block in enumerate(system if isinstance(system, list) else []):
        if "cache_control" in block:
            found.append(("system", index, block["cache_control"]))
    for index, message in enumerate(request["messages"]):
        content = message["content"]
        for block in content if isinstance(content, list) else []:
            if "cache_control" in block:
                found.append(("message", index, block["cache_control"]))
    return found


FIVE = {"type": "ephemeral"}
HOUR = {"type": "ephemeral", "ttl": "1h"}


# --- where the relay marks ------------------------------------------------------------------------------


@pytest.mark.parametrize(("turns", "newest"), [(1, 0), (2, 2), (20, 38)])
def test_the_system_prompt_and_the_newest_user_message_are_marked(turns: int, newest: int) -> None:
    """Fails if a mark lands on an older message (turn N+1 would not read turn N's prefix) or a third appears."""
    request = body(history(turns))
    assert marks(request) == [("system", 0, FIVE), ("message", newest, FIVE)]
    assert breakpoint_errors(request) == []
    assert request["system"][0]["text"] == LONG_SYSTEM
    assert request["messages"][newest]["content"][0]["text"] == history(turns)[newest]["content"]


def test_a_continued_answer_marks_the_user_message_before_it() -> None:
    """The newest user message, not the last message: with an assistant prefill last, the mark stays on u."""
    messages = [*history(2), {"role": "assistant", "content": "partial"}]
    assert marks(body(messages)) == [("system", 0, FIVE), ("message", 2, FIVE)]


def test_one_hour_caching_marks_with_the_1h_ttl() -> None:
    assert marks(body(history(3), mode="1h")) == [("system", 0, HOUR), ("message", 4, HOUR)]


def test_caching_off_sends_no_breakpoint_and_the_same_body_as_before() -> None:
    """Fails if `off` marks anything: the body is byte for byte the uncached one."""
    request = UpstreamRequest(SONNET, 100, history(20), LONG_SYSTEM, prompt_cache="off")
    assert b"cache_control" not in request.body()
    assert orjson.loads(request.body())["system"] == LONG_SYSTEM


def test_no_breakpoint_ends_a_prefix_below_the_models_minimum() -> None:
    """Exactly at the minimum is marked, one token under is not. Fails if the minimum check goes (or is off
    by one): the API would cache nothing there."""
    minimum = MIN_CACHEABLE_TOKENS[HAIKU]
    at_minimum = "s" * (minimum * 4)
    assert marks(body([{"role": "user", "content": "hi"}], at_minimum, HAIKU)) == [
        ("system", 0, FIVE), ("message", 0, FIVE)]
    under = "s" * ((minimum - 1) * 4)
    assert marks(body([], under, HAIKU)) == []
    # The system prompt alone is too short, the conversation with it is not: only the message is marked.
    messages = [{"role": "user", "content": "q" * 40}]  # 4 + 10 tokens
    request = body(messages, under, HAIKU)
    assert marks(request) == [("message", 0, FIVE)] and request["system"] == under
    # A message ending exactly at the minimum is marked, one token shorter is not.
    exact = [{"role": "user", "content": "q" * ((minimum - MESSAGE_OVERHEAD) * 4)}]
    assert marks(body(exact, "", HAIKU)) == [("message", 0, FIVE)]
    exact[0]["content"] = exact[0]["content"][4:]
    assert marks(body(exact, "", HAIKU)) == []
    # Nothing long enough: the request is the uncached one.
    assert body(history(2), "short", HAIKU) == body(history(2), "short", HAIKU, mode="off")


def test_marking_leaves_the_callers_history_as_it_was() -> None:
    """The core's history list is sent again on a retry: fails if body() marks it in place."""
    messages = history(3)
    before = orjson.dumps(messages)
    request = UpstreamRequest(SONNET, 100, messages, LONG_SYSTEM, prompt_cache="5m")
    request.body()
    assert orjson.dumps(messages) == before
    assert request.body() == request.body()


def test_marking_keeps_the_token_count_and_block_lists() -> None:
    """A marked body counts the same tokens as the unmarked one; a list content gets its last block marked."""
    messages = [{"role": "user", "content": [{"type": "text", "text": "a" * 5000}, {"type": "text", "text": "b"}]}]
    request = cache_marked({"model": SONNET, "messages": messages, "system": [{"type": "text", "text": "x"}]}, "5m")
    assert request["messages"][0]["content"][0] == {"type": "text", "text": "a" * 5000}
    assert request["messages"][0]["content"][1]["cache_control"] == FIVE
    assert "cache_control" not in request["system"][0]  # one token: far below the minimum
    assert request_tokens(request) == request_tokens({"model": SONNET, "messages": messages, "system": "x"})


def test_every_priced_model_has_a_minimum_and_an_unknown_one_gets_the_largest() -> None:
    assert set(MIN_CACHEABLE_TOKENS) == set(PRICES)
    assert min_cacheable_tokens("claude-haiku-4-5-20251001") == 4096
    assert min_cacheable_tokens("claude-3-5-haiku-latest") == 2048
    assert min_cacheable_tokens("claude-someday-9") == max(MIN_CACHEABLE_TOKENS.values())


# --- the API's rules, as the fake upstream and the emulation apply them ---------------------------------


def test_breakpoints_the_api_refuses_are_found() -> None:
    """More than 4, an unknown ttl or type, a 1h after a 5m; the request-level automatic mark counts too."""
    blocks = [{"type": "text", "text": str(n), "cache_control": FIVE} for n in range(5)]
    assert breakpoint_errors({"messages": [{"role": "user", "content": blocks}]}) == [
        "A maximum of 4 blocks with cache_control may be provided. Found 5."]
    assert breakpoint_errors({"messages": [{"role": "user", "content": blocks[:4]}], "cache_control": FIVE}) == []
    later_hour = [{"type": "text", "text": "a", "cache_control": FIVE}, {"type": "text", "text": "b",
                                                                         "cache_control": HOUR}]
    assert breakpoint_errors({"messages": [{"role": "user", "content": later_hour}]}) == [
        "a ttl='1h' cache_control block must not come after a ttl='5m' cache_control block"]
    assert breakpoint_errors({"messages": [{"role": "user", "content": later_hour[::-1]}]}) == []
    bad = [{"type": "text", "text": "a", "cache_control": {"type": "ephemeral", "ttl": "2h"}},
           {"type": "text", "text": "b", "cache_control": {"type": "persistent"}}]
    assert len(breakpoint_errors({"messages": [{"role": "user", "content": bad}]})) == 2


async def test_the_offline_model_refuses_breakpoints_as_the_api_does() -> None:
    transport = OfflineTransport(OfflineOptions(delay_ms=0))
    blocks = [{"type": "text", "text": str(n), "cache_control": FIVE} for n in range(5)]
    async with httpx.AsyncClient(transport=transport, base_url="http://offline") as client:
        res = await client.post("/v1/messages", json={"model": "deltarelay-offline", "max_tokens": 10,
                                                      "messages": [{"role": "user", "content": blocks}]})
    assert res.status_code == 400
    assert res.json()["error"] == {"type": "invalid_request_error",
                                   "message": "A maximum of 4 blocks with cache_control may be provided. Found 5."}


# --- the emulated cache ---------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def split(usage: dict[str, Any]) -> tuple[int, int, int, int]:
    """(input, 5m written, 1h written, read), checking the total write is the split's sum."""
    creation = usage["cache_creation"]
    assert usage["cache_creation_input_tokens"] == creation["ephemeral_5m_input_tokens"] + \
        creation["ephemeral_1h_input_tokens"]
    return (usage["input_tokens"], creation["ephemeral_5m_input_tokens"], creation["ephemeral_1h_input_tokens"],
            usage["cache_read_input_tokens"])


def test_turn_two_reads_the_prefix_turn_one_wrote() -> None:
    """Fails if the emulation forgets a written prefix, or reads only at the breakpoints (no lookback)."""
    cache = PromptCache(Clock())
    first, second = body(history(1)), body(history(2))
    assert split(cache.usage(first)) == (0, request_tokens(first), 0, 0)
    assert split(cache.usage(second)) == (0, request_tokens(second) - request_tokens(first), 0, request_tokens(first))
    # The same turn again reads all of it.
    assert split(cache.usage(second)) == (0, 0, 0, request_tokens(second))


def test_an_expired_prefix_is_written_again_and_a_hit_restarts_its_ttl() -> None:
    """Fails if entries never expire, expire early, or a read does not refresh them."""
    clock = Clock()
    cache = PromptCache(clock)
    request = body(history(1))
    total = request_tokens(request)
    cache.usage(request)
    clock.now += 299
    assert split(cache.usage(request)) == (0, 0, 0, total)  # read: its 5 minutes start again
    clock.now += 299
    assert split(cache.usage(request))[3] == total
    clock.now += 301
    assert split(cache.usage(request)) == (0, total, 0, 0)  # expired: written again


def test_one_hour_entries_last_an_hour_and_are_counted_as_1h_writes() -> None:
    clock = Clock()
    cache = PromptCache(clock)
    request = body(history(1), mode="1h")
    total = request_tokens(request)
    assert split(cache.usage(request)) == (0, 0, total, 0)
    clock.now += 3599
    assert split(cache.usage(request))[3] == total
    clock.now += 3601
    assert split(cache.usage(request)) == (0, 0, total, 0)


def test_a_1h_system_prompt_and_a_5m_conversation_split_the_write() -> None:
    system = [{"type": "text", "text": LONG_SYSTEM, "cache_control": HOUR}]
    messages = [{"role": "user", "content": [{"type": "text", "text": "q" * 400, "cache_control": FIVE}]},
                {"role": "user", "content": "not cached"}]
    request = {"model": SONNET, "system": system, "messages": messages}
    assert split(PromptCache(Clock()).usage(request)) == (
        MESSAGE_OVERHEAD + text_tokens("not cached"), MESSAGE_OVERHEAD + 100, 5000, 0)


def test_below_the_minimum_nothing_is_written_and_models_do_not_share_entries() -> None:
    cache = PromptCache(Clock())
    short = {"model": HAIKU, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "q" * 4000, "cache_control": FIVE}]}]}
    assert split(cache.usage(short)) == (request_tokens(short), 0, 0, 0)
    assert split(cache.usage(short)) == (request_tokens(short), 0, 0, 0)
    sonnet = body(history(1))
    cache.usage(sonnet)
    assert split(cache.usage(sonnet | {"model": "claude-opus-4-1"}))[3] == 0


def test_the_cache_keeps_at_most_max_entries() -> None:
    cache = PromptCache(Clock(), max_entries=10)
    for n in range(30):
        cache.usage(body([{"role": "user", "content": f"{n} " + "q" * 5000}], system=""))
    assert len(cache) <= 10


async def test_mock_upstream_emulates_the_cache_across_requests() -> None:
    """`python -m server.mock_upstream` keeps one cache for its life: the second turn reads the first."""
    app = mock_app(OfflineOptions(delay_ms=0))
    first, second = body(history(1)), body(history(2))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://mock") as client:
        usages = []
        for request in (first, second):
            res = await client.post("/v1/messages", json=request)
            assert res.status_code == 200
            start = next(line for line in res.text.splitlines() if line.startswith("data:") and "message_start" in line)
            usages.append(orjson.loads(start[5:])["message"]["usage"])
        assert usages[1]["cache_read_input_tokens"] == request_tokens(first)
        written = usages[1]["cache_creation"]["ephemeral_5m_input_tokens"]
        assert written == request_tokens(second) - request_tokens(first)
        res = await client.post("/v1/messages", json={"model": SONNET, "max_tokens": 1, "messages": [
            {"role": "user", "content": [{"type": "text", "text": "x", "cache_control": {"type": "ephemeral",
                                                                                           "ttl": "1d"}}]}]})
        assert res.status_code == 400 and res.json()["error"]["type"] == "invalid_request_error"


# --- through the relay ----------------------------------------------------------------------------------


def emulated(cache: PromptCache) -> Any:
    """Answer each request "ok" with the usage the emulated cache gives it."""
    def answer(request: RecordedRequest) -> SSEAnswer:
        payload = request.json()
        return SSEAnswer(anthropic_events(["ok"], model=payload["model"], usage=cache.usage(payload)))
    return answer


async def converse(relay: Any, turns: int) -> list[dict[str, Any]]:
    """`turns` messages in one conversation; each answer's cost event."""
    costs = []
    conversation_id = None
    for turn in range(1, turns + 1):
        events = await run_to_end(relay, SendMessage(f"question {turn} ".ljust(200, "?"),
                                                     conversation_id=conversation_id))
        conversation_id = events[0][2]["conversationId"]
        costs.append(next(data for _, name, data in events if name == "cost"))
    return costs


async def test_twenty_turns_through_the_relay_mark_read_and_cost_as_the_api_would(tmp_path: Path) -> None:
    """The recorded bodies of 20 turns: two breakpoints each (system, newest user message), every one valid
    (the fake refuses others); each turn reads exactly the previous turn's request and pays the 5m write price
    for the rest. Fails if marks move, the default mode stops being 5m, or the cost ignores the split."""
    cache = PromptCache(Clock())
    async with FakeUpstream() as upstream:
        upstream.answer_each(emulated(cache))
        async with relay_in_process(tmp_path, upstream, model=HAIKU, system_prompt=LONG_SYSTEM) as relay:
            costs = await converse(relay, 20)
    bodies = [request.json() for request in upstream.requests]
    assert len(bodies) == 20
    price = PRICES[HAIKU]
    for turn, (request, cost) in enumerate(zip(bodies, costs, strict=True), start=1):
        assert marks(request) == [("system", 0, FIVE), ("message", 2 * turn - 2, FIVE)]
        read = request_tokens(bodies[turn - 2]) if turn > 1 else 0
        written = request_tokens(request) - read
        assert (cost["inputTokens"], cost["cacheCreationInputTokens"], cost["cacheReadInputTokens"]) == (
            0, written, read)
        assert cost["totalCost"] == (written * price.cache_write_5m + read * price.cache_read
                                     + 1 * price.output) / MILLION


async def test_one_hour_caching_is_priced_at_the_1h_write_price(tmp_path: Path) -> None:
    """Fails if the 1h split is dropped on the way (a 1h write would be priced at the 5m rate)."""
    cache = PromptCache(Clock())
    async with FakeUpstream() as upstream:
        upstream.answer_each(emulated(cache))
        async with relay_in_process(tmp_path, upstream, model=SONNET, system_prompt=LONG_SYSTEM,
                                    prompt_cache="1h") as relay:
            costs = await converse(relay, 2)
    first, second = (request.json() for request in upstream.requests)
    assert marks(first) == [("system", 0, HOUR), ("message", 0, HOUR)]
    price = PRICES[SONNET]
    assert costs[0]["totalCost"] == (request_tokens(first) * price.cache_write_1h + price.output) / MILLION
    assert costs[1]["totalCost"] == ((request_tokens(second) - request_tokens(first)) * price.cache_write_1h
                                     + request_tokens(first) * price.cache_read + price.output) / MILLION
    assert costs[0]["totalCost"] != (request_tokens(first) * price.cache_write_5m + price.output) / MILLION


async def test_an_agent_with_caching_off_sends_no_breakpoints(tmp_path: Path) -> None:
    async with FakeUpstream() as upstream:
        upstream.answer_each(emulated(PromptCache(Clock())))
        async with relay_in_process(tmp_path, upstream, model=SONNET, system_prompt=LONG_SYSTEM,
                                    prompt_cache="off") as relay:
            costs = await converse(relay, 3)
    assert all(b"cache_control" not in request.body for request in upstream.requests)
    assert [cost["cacheReadInputTokens"] for cost in costs] == [0, 0, 0]


# --- the 20-turn benchmark ------------------------------------------------------------------------------


def expected_runs(turns: int) -> tuple[bench.Run, bench.Run]:
    """The benchmark's figures worked out from the rule alone: turn n's request is the system prompt, n user
    messages and n-1 answers; cached, turn 1 writes all of it and turn n reads turn n-1's request and writes
    the answer and message added since. No emulation code is used, only the tokenizer and the demo answers."""
    system = text_tokens(bench.SYSTEM_PROMPT)
    off, on = bench.Run("off"), bench.Run("5m")
    messages: list[dict[str, Any]] = []
    previous = 0
    price = PRICES["deltarelay-offline"]
    for turn in range(1, turns + 1):
        messages.append({"role": "user", "content": bench.user_message(turn)})
        tokens = system + sum(MESSAGE_OVERHEAD + text_tokens(m["content"]) for m in messages)
        words = demo_words(messages)
        for run in (off, on):
            run.answers += 1
            run.output_tokens += len(words)
        off.input_tokens += tokens
        off.cost += (tokens * price.input + len(words) * price.output) / MILLION
        on.cache_write_tokens += tokens - previous
        on.cache_read_tokens += previous
        on.cost += ((tokens - previous) * price.cache_write_5m + previous * price.cache_read
                    + len(words) * price.output) / MILLION
        messages.append({"role": "assistant", "content": "".join(words)})
        previous = tokens
    return off, on


async def test_the_twenty_turn_benchmark_costs_exactly_what_the_rule_says(tmp_path: Path) -> None:
    """The figures in README.md and docs/configuration.md (`python -m bench.prompt_cache`). Fails if the
    marks, the emulation, the decoding or the pricing of any turn changes."""
    off = await bench.conversation("off", directory=tmp_path)
    on = await bench.conversation("5m", directory=tmp_path)
    assert (off, on) == expected_runs(20)
    assert (off.input_tokens, off.output_tokens, off.cost) == (126350, 1040, Decimal("0.131550"))
    assert (on.input_tokens, on.cache_write_tokens, on.cache_read_tokens, on.cost) == (
        0, 7581, 118769, Decimal("0.02655315"))
    assert off.cost - on.cost == Decimal("0.10499685")


def test_cache_read_savings_are_exact() -> None:
    assert cache_read_savings(1_000_000, "claude-sonnet-4-5") == Decimal("2.70")
    assert cache_read_savings(118769, "deltarelay-offline") == Decimal("0.1068921")
    assert cache_read_savings(5, "no-such-model") is None
