"""The built-in offline model: a demo that speaks the Anthropic stream format byte for byte.

Without an API key the relay's httpx client gets OfflineTransport, so a demo answer
takes exactly the path a real one does: HTTP response, bytes, SSE decoding, ReplyState.
The same generator serves `python -m server.mock_upstream` as a real HTTP server.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, overload

import httpx
import orjson

from ..config import OFFLINE_MODEL
from ..pricing import min_cacheable_tokens, model_limits
from ..protocol.caching import LOOKBACK_BLOCKS, breakpoint_errors, breakpoints
from ..protocol.tokens import content_blocks, prefix_tokens, request_tokens
from .shapes import Block, plan, request_error

ERROR_MODES = (
    "none",
    "http-400", "http-401", "http-429", "http-500", "http-529",
    "overloaded-first",  # event: error before any content
    "overloaded-midstream",  # event: error after half the deltas
    "cut-midstream",  # the connection ends after half the deltas, no message_stop
)

_FILLER = (
    "streaming relays send each word the moment the model writes it so people read while the answer is"
    " still being written and nothing waits for the end"
).split()


@dataclass(frozen=True, slots=True)
class OfflineOptions:
    """How the offline model answers."""

    delay_ms: float = 40.0  # pause before each text delta
    words: int = 0  # text deltas per answer; 0: the demo answer's natural length
    repeat: int = 1  # each delta is its word this many times (big deltas for load tests)
    error: str = "none"
    error_message: str = "Overloaded"  # the message of the overloaded-* modes' `error` event
    stamp: bool = False  # each delta carries "seq:send_time_ns " for latency benchmarks
    context_window: int = 0  # refuse requests over this many tokens; 0: the model's window (server/pricing.py)
    pause_turn: bool = False  # a `[search]` round stops with pause_turn after the results (server/upstream/shapes.py)


def demo_words(messages: list[dict[str, Any]], words: int = 0, repeat: int = 1) -> list[str]:
    """The demo answer as text deltas, one word each; deterministic for a given history."""
    if words > 0:
        return [("" if i == 0 else " ") + " ".join([_FILLER[i % len(_FILLER)]] * repeat) for i in range(words)]
    last = _text_of(messages[-1]) if messages else ""
    quoted = " ".join(last.split()[:8])
    if len(last.split()) > 8:
        quoted += " …"
    turn = sum(1 for m in messages if m.get("role") == "user")
    text = (
        "This is deltarelay's offline demo model: no ANTHROPIC_API_KEY is set, so this answer is made up"
        f" locally and streamed word by word in the Anthropic format. You wrote: “{quoted}”."
        f" This is turn {turn} of the conversation. Set ANTHROPIC_API_KEY to talk to a real model."
    )
    parts = text.split(" ")
    return [parts[0]] + [" " + word for word in parts[1:]]


def _text_of(message: dict[str, Any]) -> str:
    content = message.get("content", "")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(block.get("text", "")) for block in content if isinstance(block, dict))
    return ""


def _event(name: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def error_status(options: OfflineOptions) -> int | None:
    """The HTTP status the request fails with, for the http-NNN error modes."""
    if options.error.startswith("http-"):
        return int(options.error[5:])
    return None


def error_body(status: int) -> bytes:
    kinds = {400: "invalid_request_error", 401: "authentication_error", 429: "rate_limit_error",
             500: "api_error", 529: "overloaded_error"}
    kind = kinds.get(status, "api_error")
    return orjson.dumps({"type": "error", "error": {"type": kind, "message": f"offline model: simulated {kind}"}})


def context_refusal(request: dict[str, Any], options: OfflineOptions) -> bytes | None:
    """The API's 400 body for a request that does not fit the model's context window, or None when it fits.

    Tokens are counted by the emulated rule (server/protocol/tokens.py). As the API does (see
    server/context.py for the sources): an input over the window is "prompt is too long: N tokens > M
    maximum"; an input that fits but leaves less than max_tokens is "input length and `max_tokens` exceed
    context limit: N + K > M, ...".
    """
    window = options.context_window or model_limits(str(request.get("model") or OFFLINE_MODEL)).context_window
    tokens = request_tokens(request)
    max_tokens = request.get("max_tokens")
    if tokens > window:
        message = f"prompt is too long: {tokens} tokens > {window} maximum"
    elif isinstance(max_tokens, int) and tokens + max_tokens > window:
        message = (f"input length and `max_tokens` exceed context limit: {tokens} + {max_tokens} > {window},"
                   " decrease input length or `max_tokens` and try again")
    else:
        return None
    return orjson.dumps({"type": "error", "error": {"type": "invalid_request_error", "message": message}})


def breakpoint_refusal(request: dict[str, Any]) -> bytes | None:
    """The API's 400 body for a request whose cache breakpoints it would refuse; None: they are valid."""
    errors = breakpoint_errors(request)
    if not errors:
        return None
    return orjson.dumps({"type": "error", "error": {"type": "invalid_request_error", "message": errors[0]}})


def request_refusal(request: dict[str, Any]) -> bytes | None:
    """The API's 400 body for a request refused for its shape (server/upstream/shapes.py, `request_error`:
    tool results unpaired with tool calls, a thinking signature not issued for its text, a malformed image or
    document block, a thinking budget out of bounds) or for its cache breakpoints; None: acceptable.

    The in-process transport and `server.mock_upstream` both refuse through this one function.
    """
    message = request_error(request)
    if message is None:
        return breakpoint_refusal(request)
    return orjson.dumps({"type": "error", "error": {"type": "invalid_request_error", "message": message}})


class TextDeltas(Sequence[dict[str, Any]]):
    """The text_delta of each piece of a plain answer, made as it is streamed: a benchmark's answer of 100,000
    words to each of 500 streams would otherwise hold 50 million delta dicts at once."""

    __slots__ = ("_texts",)

    def __init__(self, texts: list[str]) -> None:
        self._texts = texts

    def __len__(self) -> int:
        return len(self._texts)

    @overload
    def __getitem__(self, index: int) -> dict[str, Any]: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[dict[str, Any]]: ...

    def __getitem__(self, index: int | slice) -> dict[str, Any] | Sequence[dict[str, Any]]:
        if isinstance(index, slice):
            return TextDeltas(self._texts[index])
        return {"type": "text_delta", "text": self._texts[index]}


TTL_SECONDS = {"5m": 300.0, "1h": 3600.0}


@dataclass(slots=True)
class _Entry:
    tokens: int
    ttl: float
    expires: float


class PromptCache:
    """The emulated prompt cache: per model, the request prefixes that ended at a breakpoint, with their TTL.

    A prefix is the hash of every block up to and including one (in reading order, each with its role;
    cache_control left out, a string content the same as one text block), counted by server/protocol/tokens.py.
    For a request, as the API does (server/protocol/caching.py has the rules):

    - read: the longest remembered, unexpired prefix ending at a breakpoint or at one of the LOOKBACK_BLOCKS
      block boundaries before one; a hit restarts its TTL;
    - written: the tokens past the read prefix up to the last breakpoint whose prefix reaches the model's
      minimum (MIN_CACHEABLE_TOKENS), each stretch at the TTL of the breakpoint that ends it; those prefixes
      are remembered for their TTL;
    - input: the request's tokens less both.

    `clock` gives seconds (tests move it). At most `max_entries` prefixes are kept: past it the expired ones are
    dropped, or the oldest one when none has expired.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_entries: int = 100_000) -> None:
        self.clock = clock
        self.max_entries = max_entries
        self._entries: dict[tuple[str, bytes], _Entry] = {}

    def __len__(self) -> int:
        """Prefixes remembered now, expired ones not yet dropped included."""
        return len(self._entries)

    def usage(self, request: dict[str, Any]) -> dict[str, Any]:
        """The message_start usage of the request: input, cache write (with its 5m/1h split) and read tokens."""
        total = request_tokens(request)
        marks = breakpoints(request)
        if not marks:
            return _usage(total, 0, 0, 0)
        model = str(request.get("model") or OFFLINE_MODEL)
        totals = [tokens for _, tokens in prefix_tokens(request)]
        hashes = _prefix_hashes(request)
        now = self.clock()
        read, read_at = 0, -1
        for position, _ in marks:
            for candidate in range(position, max(position - LOOKBACK_BLOCKS, -1), -1):
                entry = self._entries.get((model, hashes[candidate]))
                if entry is not None and entry.expires > now and totals[candidate] > read:
                    read, read_at = totals[candidate], candidate
        if read_at >= 0:
            entry = self._entries[(model, hashes[read_at])]
            entry.expires = now + entry.ttl
        minimum = min_cacheable_tokens(model)
        written = {"5m": 0, "1h": 0}
        covered = read
        for position, mark in marks:
            ttl = str(mark.get("ttl", "5m"))
            if totals[position] < minimum or position <= read_at:
                continue
            written[ttl] += totals[position] - covered
            covered = totals[position]
            self._remember((model, hashes[position]), totals[position], TTL_SECONDS[ttl], now)
        return _usage(total - read - written["5m"] - written["1h"], written["5m"], written["1h"], read)

    def _remember(self, key: tuple[str, bytes], tokens: int, ttl: float, now: float) -> None:
        old = self._entries.pop(key, None)
        ttl = max(ttl, old.ttl) if old is not None else ttl
        self._entries[key] = _Entry(tokens, ttl, now + ttl)
        if len(self._entries) > self.max_entries:
            for stale in [k for k, e in self._entries.items() if e.expires <= now] or [next(iter(self._entries))]:
                del self._entries[stale]


def _usage(input_tokens: int, written_5m: int, written_1h: int, read: int) -> dict[str, Any]:
    return {"input_tokens": input_tokens, "cache_creation_input_tokens": written_5m + written_1h,
            "cache_read_input_tokens": read,
            "cache_creation": {"ephemeral_5m_input_tokens": written_5m, "ephemeral_1h_input_tokens": written_1h}}


def _prefix_hashes(request: dict[str, Any]) -> list[bytes]:
    """The running hash after each block, in prefix_tokens' order (system blocks, then each message's)."""
    hashes: list[bytes] = []
    running = hashlib.sha256(str(request.get("model", "")).encode())

    def add(role: str, block: Any) -> None:
        if isinstance(block, str):
            block = {"type": "text", "text": block}
        if isinstance(block, dict):
            block = {key: value for key, value in block.items() if key != "cache_control"}
        running.update(orjson.dumps([role, block], option=orjson.OPT_SORT_KEYS))
        hashes.append(running.copy().digest())

    for block in content_blocks(request.get("system")):
        add("system", block)
    for message in request.get("messages") or []:
        if not isinstance(message, dict):
            continue
        running.update(b"\x00message")  # a message boundary: two messages differ from one with both blocks
        for block in content_blocks(message.get("content")):
            add(str(message.get("role")), block)
    return hashes


async def anthropic_stream(request: dict[str, Any], options: OfflineOptions,
                           cache: PromptCache | None = None) -> AsyncIterator[bytes]:
    """The SSE body of one streamed Messages API response, paced like a real model.

    With `cache`, its usage figures are the emulated prompt cache's; without, every input token is uncached.
    What it answers (a plain demo answer, or thinking, a web search with citations, a tool call, the text after
    tool results) is `plan` in server/upstream/shapes.py. Output tokens: one per text delta, plus the emulated
    count (server/protocol/tokens.py) of each thinking text and each tool call's input JSON.
    """
    messages = request.get("messages") or []
    model = str(request.get("model") or OFFLINE_MODEL)
    answer = plan(request, pause=options.pause_turn)
    blocks = answer.blocks
    if blocks is None:
        deltas = demo_words(messages, options.words, options.repeat)
        blocks = [Block({"type": "text", "text": ""}, TextDeltas(deltas), len(deltas))]
    usage = cache.usage(request) if cache is not None else _usage(request_tokens(request), 0, 0, 0)
    delay = options.delay_ms / 1000
    yield _event("message_start", {
        "type": "message_start",
        "message": {
            "id": "msg_offline_" + uuid.uuid4().hex[:20], "type": "message", "role": "assistant", "content": [],
            "model": model, "stop_reason": None, "stop_sequence": None,
            "usage": {**usage, "output_tokens": 1},
        },
    })
    overloaded = {"type": "error", "error": {"type": "overloaded_error", "message": options.error_message}}
    if options.error == "overloaded-first":
        yield _event("error", overloaded)
        return
    half = sum(len(block.deltas) for block in blocks) // 2
    seq = 0
    for index, block in enumerate(blocks):
        yield _event("content_block_start", {"type": "content_block_start", "index": index,
                                             "content_block": block.start})
        if index == 0:
            yield _event("ping", {"type": "ping"})
        for delta in block.deltas:
            if seq == half and options.error == "overloaded-midstream":
                yield _event("error", overloaded)
                return
            if seq == half and options.error == "cut-midstream":
                return
            # Even at pace 0, give the loop a turn per delta as a network read would: no stream hogs it.
            await asyncio.sleep(delay)
            if options.stamp and delta.get("type") == "text_delta":
                delta = {"type": "text_delta", "text": f"{seq}:{time.time_ns()} "}
            yield _event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
            seq += 1
        yield _event("content_block_stop", {"type": "content_block_stop", "index": index})
    final_usage: dict[str, Any] = {"output_tokens": sum(block.output_tokens for block in blocks)}
    if answer.web_search_requests:
        final_usage["server_tool_use"] = {"web_search_requests": answer.web_search_requests}
    yield _event("message_delta", {
        "type": "message_delta", "delta": {"stop_reason": answer.stop_reason, "stop_sequence": None},
        "usage": final_usage,
    })
    yield _event("message_stop", {"type": "message_stop"})


class _Body(httpx.AsyncByteStream):
    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self._chunks = chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._chunks:
            yield chunk

    async def aclose(self) -> None:
        await self._chunks.aclose()  # type: ignore[attr-defined]


class OfflineTransport(httpx.AsyncBaseTransport):
    """An httpx transport that answers POST /v1/messages with the offline model's stream (or its refusal:
    `request_refusal`, then `context_refusal`), and POST /v1/messages/count_tokens with the emulated count.

    A request header `x-mock-pause-turn: 1` makes a `[search]` round stop with pause_turn, as in the mock."""

    def __init__(self, options: OfflineOptions | None = None, cache: PromptCache | None = None) -> None:
        self.options = options or OfflineOptions()
        self.cache = cache or PromptCache()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path.endswith("/v1/messages/count_tokens"):
            return httpx.Response(200, json={"input_tokens": request_tokens(orjson.loads(await request.aread()))})
        if request.method != "POST" or not request.url.path.endswith("/v1/messages"):
            return httpx.Response(404, json={"type": "error", "error": {"type": "not_found_error",
                                                                        "message": "offline model: no such route"}})
        status = error_status(self.options)
        if status is not None:
            return httpx.Response(status, content=error_body(status), headers={"retry-after": "1"})
        payload = orjson.loads(await request.aread())
        options = self.options
        if request.headers.get("x-mock-pause-turn") == "1":
            options = replace(options, pause_turn=True)
        refusal = request_refusal(payload) or context_refusal(payload, options)
        if refusal is not None:
            return httpx.Response(400, content=refusal, headers={"content-type": "application/json"})
        return httpx.Response(
            200,
            headers={"content-type": "text/event-stream; charset=utf-8"},
            stream=_Body(anthropic_stream(payload, options, self.cache)),
        )
