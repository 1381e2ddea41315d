"""The relay's events: start chunk thinking tool_input tool_use tool_result citation search search_results cost
done error, and their wire JSON.

Python is snake_case, the wire is camelCase; the conversion happens here only.
Each event is encoded to JSON once, when it enters a stream's log; both transports
frame those same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any, ClassVar

import orjson

from .errors import RelayError


def decimal_json(value: Decimal | None) -> orjson.Fragment | None:
    """An exact JSON number for a Decimal: no float ever touches money."""
    if value is None:
        return None
    return orjson.Fragment(format(value, "f").encode())


@dataclass(frozen=True, slots=True)
class Start:
    name: ClassVar[str] = "start"
    stream_id: str
    conversation_id: str
    model: str
    message_id: str | None = None  # the answer being written (for a continue, the answer continued)
    parent_id: str | None = None  # its parent: the user message
    user_message_id: str | None = None  # the user message: new for a send, existing for regenerate/continue
    truncated_messages: int = 0  # the conversation's oldest messages not sent to the model (context window)

    def to_wire(self) -> dict[str, Any]:
        return {"streamId": self.stream_id, "conversationId": self.conversation_id, "model": self.model,
                "messageId": self.message_id, "parentId": self.parent_id, "userMessageId": self.user_message_id,
                "truncatedMessages": self.truncated_messages}


@dataclass(frozen=True, slots=True)
class Chunk:
    name: ClassVar[str] = "chunk"
    text: str

    def to_wire(self) -> dict[str, Any]:
        return {"text": self.text}


@dataclass(frozen=True, slots=True)
class Thinking:
    name: ClassVar[str] = "thinking"
    text: str

    def to_wire(self) -> dict[str, Any]:
        return {"text": self.text}


@dataclass(frozen=True, slots=True)
class ToolInput:
    """A piece of a client tool call's input JSON as the model writes it (the pieces joined are its input).

    Never empty: the API's empty input_json_delta pieces are not relayed.
    """
    name: ClassVar[str] = "tool_input"
    id: str
    partial_json: str

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "partialJson": self.partial_json}


@dataclass(frozen=True, slots=True)
class ToolUse:
    """A client tool call whose input is complete: the tool loop runs it."""
    name: ClassVar[str] = "tool_use"
    id: str
    tool: str  # the tool's name (`name` is the event's)
    input: dict[str, Any]

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.tool, "input": self.input}


@dataclass(frozen=True, slots=True)
class ToolResult:
    """What the app's toolsUrl answered for a tool call (or the error result that stands for it)."""
    name: ClassVar[str] = "tool_result"
    id: str
    is_error: bool
    content: str | list[dict[str, Any]]

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "isError": self.is_error, "content": self.content}


@dataclass(frozen=True, slots=True)
class Citation:
    """One citation of the answer's text: `index` is its number in the whole answer, 1-based, in stream order.

    A web search result has a url and title; a document citation has no url, its title is the document's title
    and `document_title` says it is a document's (the wire then carries `documentTitle`).
    """
    name: ClassVar[str] = "citation"
    index: int
    url: str | None
    title: str | None
    cited_text: str
    document_title: str | None = None

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"index": self.index, "url": self.url, "title": self.title,
                                "citedText": self.cited_text}
        if self.document_title is not None:
            wire["documentTitle"] = self.document_title
        return wire


@dataclass(frozen=True, slots=True)
class Search:
    """A server tool call: `tool` is web_search (query: what was searched) or web_fetch (query: the url)."""
    name: ClassVar[str] = "search"
    id: str
    tool: str
    query: str | None

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.tool, "query": self.query}


@dataclass(frozen=True, slots=True)
class SearchResults:
    """A server tool's results, `id` being its call's: each result's url and title, or the API's error code."""
    name: ClassVar[str] = "search_results"
    id: str
    results: tuple[dict[str, str | None], ...]
    error: str | None = None

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"id": self.id, "results": list(self.results)}
        if self.error is not None:
            wire["error"] = self.error
        return wire


@dataclass(frozen=True, slots=True)
class Cost:
    name: ClassVar[str] = "cost"
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int
    total_cost: Decimal | None
    model: str
    estimated: bool = False
    # The model's context window, and how many of the conversation's oldest messages this request left out;
    # None: not known (the wire then has neither, nor contextTokens).
    context_window: int | None = None
    truncated_messages: int = 0
    # The input of the answer's last request when it made several (a tool loop: each round sends the whole
    # conversation so far, so the summed tokens above are not the context's size); None: one request.
    last_request_tokens: int | None = None

    @property
    def context_tokens(self) -> int:
        """The context the answer's last request filled, as the upstream counted it: input, cache writes and
        cache reads."""
        if self.last_request_tokens is not None:
            return self.last_request_tokens
        return self.input_tokens + self.cache_creation_input_tokens + self.cache_read_input_tokens

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "inputTokens": self.input_tokens,
            "outputTokens": self.output_tokens,
            "cacheCreationInputTokens": self.cache_creation_input_tokens,
            "cacheReadInputTokens": self.cache_read_input_tokens,
            "totalCost": decimal_json(self.total_cost),
            "model": self.model,
        }
        if self.estimated:
            wire["estimated"] = True
        if self.context_window is not None:
            wire["contextTokens"] = self.context_tokens
            wire["contextWindow"] = self.context_window
            wire["truncatedMessages"] = self.truncated_messages
        return wire


@dataclass(frozen=True, slots=True)
class Done:
    name: ClassVar[str] = "done"
    conversation_id: str
    message_id: str | None
    stop_reason: str | None

    def to_wire(self) -> dict[str, Any]:
        return {
            "conversationId": self.conversation_id,
            "messageId": self.message_id,
            "stopReason": self.stop_reason,
        }


@dataclass(frozen=True, slots=True)
class Error:
    name: ClassVar[str] = "error"
    code: str
    message: str
    retryable: bool
    retry_after: float | None = None
    message_id: str | None = None
    details: dict[str, Any] | None = None  # e.g. {"limit": "concurrent_streams"} or {"spent": "1.20"}

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"code": self.code, "message": self.message, "retryable": self.retryable}
        if self.retry_after is not None:
            wire["retryAfter"] = self.retry_after
        if self.message_id is not None:
            wire["messageId"] = self.message_id
        if self.details:
            wire.update(self.details)
        return wire


def error_event(exc: RelayError) -> Error:
    """The `error` event that tells a client what a RelayError tells an HTTP client."""
    return Error(exc.code, exc.message, exc.retryable, exc.retry_after, exc.message_id, exc.details)


RelayEvent = (Start | Chunk | Thinking | ToolInput | ToolUse | ToolResult | Citation | Search | SearchResults | Cost
              | Done | Error)

TERMINAL_EVENTS = frozenset({"done", "error"})


def encode_data(event: RelayEvent) -> bytes:
    """The event's `data` as compact JSON bytes, to be copied or written and dropped (see kept_json)."""
    return orjson.dumps(event.to_wire())


def kept_json(value: Any) -> bytes:
    """`value` as compact JSON in bytes of its own size: for a value held as long as a stream or a socket.

    orjson 3.12 and later returns each result in a buffer of at least 4 KB, and a result kept alive keeps all of
    it: 3.5 KB of RSS for a 34-byte stream id (measured: 100,000 kept results, /proc/self/statm). A result that is
    written or copied and then dropped needs no copy.
    """
    return bytes(memoryview(orjson.dumps(value)))
