"""ReplyState: Anthropic Messages stream events in, relay events out.

Pure: no I/O, no await. The caller decodes SSE and passes each event's
`event:` field and data string; ReplyState parses the JSON, accumulates the answer,
thinking, tool calls, server tool blocks, citations and usage, and returns the relay
events to send; content_blocks() gives the response back in the API's shape for the
next request of a tool loop. error_for_status maps an upstream HTTP error answer to an
UpstreamError the same way.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from email.utils import parsedate_to_datetime
from typing import Any

import orjson

from server.errors import ProtocolError, UpstreamError
from server.events import Chunk, Citation, Cost, RelayEvent, Search, SearchResults, Thinking, ToolInput, ToolUse
from server.pricing import Usage, cost_of

#: Upstream error messages are capped: they reach users and the database.
MAX_ERROR_MESSAGE = 500

# Fixed messages for auth failures: the upstream's own text is never echoed there,
# so nothing about the key can leak.
_AUTH_MESSAGE = "the upstream rejected the API key"
_PERMISSION_MESSAGE = "the upstream API key is not allowed to make this request"

#: Relay error code -> (retryable, HTTP status a transport uses for it).
_CODES: dict[str, tuple[bool, int]] = {
    "overloaded": (True, 503),
    "rate_limited": (True, 429),
    "upstream_error": (True, 502),
    "invalid_request": (False, 400),
    "auth": (False, 502),  # the server's key is at fault, not the user
    "not_found": (False, 404),
    "too_large": (False, 413),
}

#: Anthropic `error.type` -> relay error code.
_ERROR_TYPES: dict[str, str] = {
    "overloaded_error": "overloaded",
    "rate_limit_error": "rate_limited",
    "api_error": "upstream_error",
    "invalid_request_error": "invalid_request",
    "authentication_error": "auth",
    "permission_error": "auth",
    "not_found_error": "not_found",
    "request_too_large": "too_large",
}

_STATUSES: dict[int, str] = {
    400: "invalid_request",
    401: "auth",
    403: "auth",
    404: "not_found",
    413: "too_large",
    429: "rate_limited",
    500: "upstream_error",
    502: "upstream_error",
    503: "upstream_error",
    529: "overloaded",
}

# Usage fields taken as they are; the nested ones are read separately.
_FLAT_USAGE = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


def estimate_tokens(byte_count: int) -> int:
    """A rough token count for `byte_count` bytes of UTF-8 output: one token per 4 bytes, rounded up."""
    return (byte_count + 3) // 4


class TextParts:
    """Text that grows by small pieces: one append each, folded every 16 pieces.

    A list of every delta costs an object header per delta (about 4x the text of a
    typical answer); folded, an answer being written costs about its own size. Every
    16, not 64: the pieces not yet folded were 2.3 KB of each stream at 1,000 streams.
    """

    __slots__ = ("_folded", "_pieces")

    def __init__(self) -> None:
        self._folded: list[str] = []
        self._pieces: list[str] = []

    def add(self, text: str) -> None:
        pieces = self._pieces
        pieces.append(text)
        if len(pieces) >= 16:
            self._folded.append("".join(pieces))
            pieces.clear()

    def value(self) -> str:
        return "".join(self._folded) + "".join(self._pieces)

    def __bool__(self) -> bool:
        return bool(self._folded or self._pieces)

    def mark(self) -> int:
        """A position between two pieces: everything added so far is before it (see between)."""
        if self._pieces:
            self._folded.append("".join(self._pieces))
            self._pieces.clear()
        return len(self._folded)

    def between(self, start: int, end: int) -> str:
        """The text added between two marks."""
        return "".join(self._folded[start:end])


# Blocks whose input streams as input_json_delta.
_TOOL_BLOCKS = frozenset({"tool_use", "server_tool_use"})
# Server tool result blocks: complete in their content_block_start, kept as received.
_RESULT_BLOCKS = frozenset({"web_search_tool_result", "web_fetch_tool_result"})
# Server tools a `search` event stands for, and the input field that is its query.
_SEARCH_QUERY = {"web_search": "query", "web_fetch": "url"}


class _Block:
    """One content block of the response being read: what content_blocks() needs of it, and no copy of its text.

    A text or thinking block's text is the part of the reply's TextParts between its two marks.
    """

    __slots__ = ("citations", "data", "end", "error", "parts", "result_event", "start", "stopped", "type")

    def __init__(self, block_type: str, data: dict[str, Any]) -> None:
        self.type = block_type
        self.data = data  # the content_block of content_block_start, as received
        self.start = 0
        self.end: int | None = None
        self.parts: list[str] = []  # input_json_delta pieces, or signature pieces
        self.citations: list[dict[str, Any]] = []
        self.stopped = False
        self.error = False  # a tool block whose input JSON did not parse
        self.result_event: SearchResults | None = None


class ReplyState:
    """One reply's stream: feed it upstream events, get relay events back.

    Args:
        requested_model: the model the request asked for; prices the reply when
            the upstream does not name its model in message_start.
        context_window, truncated_messages: carried into the cost event.
        citation_base: the citations the answer already has (earlier rounds of a tool loop): this response's
            first citation is number citation_base + 1.
    """

    def __init__(self, requested_model: str, context_window: int | None = None, truncated_messages: int = 0,
                 citation_base: int = 0) -> None:
        self.requested_model = requested_model
        # Carried into the cost event (contextWindow, truncatedMessages): what the core planned for this request.
        self.context_window = context_window
        self.truncated_messages = truncated_messages
        self.upstream_model: str | None = None
        self.message_id: str | None = None
        self.stop_reason: str | None = None
        self.finished = False
        self._text = TextParts()
        self.chunk_count = 0  # text chunks relayed (metrics read it)
        self._thinking = TextParts()
        self._other_output_bytes = 0  # tool input JSON: output tokens, never text
        self._blocks: dict[int, str] = {}
        self._content: dict[int, _Block] = {}
        self.citation_base = citation_base
        self.citation_count = citation_base  # the answer's citations so far, this response's included
        self._relayed_other = False  # a tool, search or citation event went out
        self._malformed_tool: str | None = None  # the id of a tool block whose input JSON did not parse
        self._usage: dict[str, int] = {}
        self.usage_reports = 0  # usage objects taken so far: `usage` can have changed only when this grew
        self._output_tokens_final = False

    def feed(self, event_type: str, data: str) -> list[RelayEvent]:
        """The relay events for one upstream SSE event.

        Raises:
            ProtocolError: the data is not JSON, or not shaped like the API's events.
            UpstreamError: the upstream sent an `error` event.
        """
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise ProtocolError("the upstream sent an event that is not valid JSON") from None
        if not isinstance(payload, dict):
            raise ProtocolError("the upstream sent an event that is not a JSON object")
        kind = payload.get("type", event_type)
        try:
            # The hot path: a text delta is one lookup chain, one append, one Chunk.
            if kind == "content_block_delta":
                delta = payload["delta"]
                delta_type = delta["type"]
                if delta_type == "text_delta":
                    text = delta["text"]
                    if not isinstance(text, str):
                        raise ProtocolError("the upstream sent a text delta without text")
                    if text:
                        self._text.add(text)
                        self.chunk_count += 1
                        return [Chunk(text)]
                    return []
                return self._other_delta(payload["index"], delta_type, delta)
            if kind == "content_block_stop":
                return self._block_stop(payload["index"])
            if kind == "ping":
                return []
            if kind == "content_block_start":
                return self._block_start(payload["index"], payload["content_block"])
            if kind == "message_start":
                self._message_start(payload["message"])
                return []
            if kind == "message_delta":
                self._message_delta(payload)
                return []
            if kind == "message_stop":
                if self._malformed_tool is not None and self.stop_reason != "max_tokens":
                    raise ProtocolError(f"the upstream sent tool input that is not JSON ({self._malformed_tool[:60]})")
                self.finished = True
                return []
            if kind == "error":
                raise _stream_error(payload.get("error"))
        except (KeyError, TypeError, AttributeError):
            raise ProtocolError(f"the upstream sent a malformed {str(kind)[:40]!r} event") from None
        # Unknown event types are ignored: the API may add new ones.
        return []

    def _other_delta(self, index: int, delta_type: str, delta: dict[str, Any]) -> list[RelayEvent]:
        if delta_type == "thinking_delta":
            thinking = delta["thinking"]
            if not isinstance(thinking, str):
                raise ProtocolError("the upstream sent a thinking delta without thinking")
            if thinking:
                self._thinking.add(thinking)
                return [Thinking(thinking)]
        elif delta_type == "input_json_delta":
            partial = delta["partial_json"]
            if not isinstance(partial, str):
                raise ProtocolError("the upstream sent an input_json_delta without partial_json")
            # Tool input is not part of the answer, but it counts when estimating output.
            self._other_output_bytes += len(partial.encode())
            block = self._content.get(index)
            if block is not None and block.type in _TOOL_BLOCKS and partial:
                block.parts.append(partial)
                if block.type == "tool_use":
                    self._relayed_other = True
                    return [ToolInput(block.data["id"], partial)]
        elif delta_type == "signature_delta":
            signature = delta["signature"]
            if not isinstance(signature, str):
                raise ProtocolError("the upstream sent a signature delta without a signature")
            block = self._content.get(index)
            if block is not None and block.type == "thinking":
                block.parts.append(signature)
        elif delta_type == "citations_delta":
            citation = delta["citation"]
            if not isinstance(citation, dict):
                raise ProtocolError("the upstream sent a citations delta without a citation")
            block = self._content.get(index)
            if block is not None and block.type == "text":
                block.citations.append(citation)
            return [self._citation(citation)]
        # Unknown delta types: nothing to relay.
        return []

    def _citation(self, citation: dict[str, Any]) -> Citation:
        self.citation_count += 1
        self._relayed_other = True
        cited = citation.get("cited_text")
        cited_text = cited if isinstance(cited, str) else ""
        if "url" in citation or citation.get("type") == "web_search_result_location":
            return Citation(self.citation_count, _str(citation.get("url")), _str(citation.get("title")), cited_text)
        # A document's citation (char_location, page_location, content_block_location, ...): no url.
        title = _str(citation.get("document_title"))
        return Citation(self.citation_count, None, title, cited_text, title)

    def _block_start(self, index: int, block: dict[str, Any]) -> list[RelayEvent]:
        block_type = block["type"]
        if not isinstance(block_type, str):
            raise ProtocolError("the upstream sent a content block without a type")
        self._blocks[index] = block_type
        content = self._content[index] = _Block(block_type, block)
        if block_type == "text":
            content.start = self._text.mark()
            relayed: list[RelayEvent] = []
            text = block.get("text")
            if isinstance(text, str) and text:
                self._text.add(text)
                relayed.append(Chunk(text))
            citations = block.get("citations")
            if isinstance(citations, list):
                for citation in citations:
                    if not isinstance(citation, dict):
                        raise ProtocolError("the upstream sent a citation that is not an object")
                    content.citations.append(citation)
                    relayed.append(self._citation(citation))
            return relayed
        if block_type == "thinking":
            content.start = self._thinking.mark()
            signature = block.get("signature")
            if isinstance(signature, str) and signature:
                content.parts.append(signature)
            thinking = block.get("thinking")
            if isinstance(thinking, str) and thinking:
                self._thinking.add(thinking)
                return [Thinking(thinking)]
        elif block_type in _TOOL_BLOCKS:
            if not isinstance(block["id"], str) or not isinstance(block["name"], str):
                raise ProtocolError(f"the upstream sent a {block_type} block without an id or name")
        elif block_type in _RESULT_BLOCKS:
            content.result_event = _search_results(block)
        return []

    def _block_stop(self, index: int) -> list[RelayEvent]:
        block = self._content.get(index)
        if block is None or block.stopped:
            return []
        block.stopped = True
        block_type = block.type
        if block_type == "text":
            block.end = self._text.mark()
        elif block_type == "thinking":
            block.end = self._thinking.mark()
        elif block_type in _TOOL_BLOCKS:
            joined = "".join(block.parts)
            tool_input: Any = block.data.get("input") or {}
            if joined:
                try:
                    tool_input = orjson.loads(joined)
                except orjson.JSONDecodeError:
                    tool_input = None
            if not isinstance(tool_input, dict):
                # Cut short (max_tokens): the block is incomplete, not a call. Anything else is an error,
                # raised at message_stop once the stop reason is known.
                block.error = True
                self._malformed_tool = block.data["id"]
                return []
            block.data = {"type": block_type, "id": block.data["id"], "name": block.data["name"],
                          "input": tool_input}
            self._relayed_other = True
            if block_type == "tool_use":
                return [ToolUse(block.data["id"], block.data["name"], tool_input)]
            field = _SEARCH_QUERY.get(block.data["name"])
            if field is not None:
                return [Search(block.data["id"], block.data["name"], _str(tool_input.get(field)))]
        elif block.result_event is not None:
            self._relayed_other = True
            return [block.result_event]
        return []

    def _message_start(self, message: dict[str, Any]) -> None:
        model = message.get("model")
        if isinstance(model, str) and model:
            self.upstream_model = model
        message_id = message.get("id")
        if isinstance(message_id, str):
            self.message_id = message_id
        usage = message.get("usage")
        if isinstance(usage, dict):
            self._take_usage(usage)

    def _message_delta(self, payload: dict[str, Any]) -> None:
        delta = payload.get("delta")
        if isinstance(delta, dict):
            stop_reason = delta.get("stop_reason")
            if isinstance(stop_reason, str):
                self.stop_reason = stop_reason
        usage = payload.get("usage")
        if isinstance(usage, dict):
            self._take_usage(usage)
            if _count(usage.get("output_tokens")) is not None:
                self._output_tokens_final = True

    def _take_usage(self, usage: dict[str, Any]) -> None:
        # message_delta usage is cumulative: every field present replaces the
        # earlier value, never adds to it.
        self.usage_reports += 1
        for field in _FLAT_USAGE:
            value = _count(usage.get(field))
            if value is not None:
                self._usage[field] = value
        cache_creation = usage.get("cache_creation")
        if isinstance(cache_creation, dict):
            for wire, field in (
                ("ephemeral_5m_input_tokens", "cache_creation_5m_input_tokens"),
                ("ephemeral_1h_input_tokens", "cache_creation_1h_input_tokens"),
            ):
                value = _count(cache_creation.get(wire))
                if value is not None:
                    self._usage[field] = value
        server_tool_use = usage.get("server_tool_use")
        if isinstance(server_tool_use, dict):
            value = _count(server_tool_use.get("web_search_requests"))
            if value is not None:
                self._usage["web_search_requests"] = value

    @property
    def text(self) -> str:
        """The answer so far: every text delta, joined."""
        return self._text.value()

    @property
    def thinking(self) -> str:
        """The extended thinking so far, never part of the answer."""
        return self._thinking.value()

    @property
    def usage(self) -> Usage:
        """The latest usage the upstream reported; zeros for what it did not."""
        return Usage(**self._usage)

    @property
    def model(self) -> str:
        """The model that prices the reply: the upstream's, else the requested one."""
        return self.upstream_model or self.requested_model

    @property
    def has_content(self) -> bool:
        """Whether any text, thinking, tool, search or citation event went out: after that, a retry would repeat it."""
        return bool(self._text or self._thinking or self._relayed_other)

    def content_blocks(self) -> list[dict[str, Any]]:
        """This response's content in the API's shape, to send back as an assistant message.

        In index order: each block whose content_block_stop arrived, and a text block still open (a cancelled
        answer's last words). text `{type, text}` (+ `citations` as the API sent them, when it sent any; a text
        block without text or citations is left out, the API refuses empty ones), thinking `{type, thinking,
        signature}` (the signature byte for byte), redacted_thinking `{type, data}`, tool_use and server_tool_use
        `{type, id, name, input}` with the parsed input, web_search_tool_result and web_fetch_tool_result as
        received. A tool block whose input was cut short, and block types not named here, are left out.
        """
        blocks: list[dict[str, Any]] = []
        for index in sorted(self._content):
            block = self._content[index]
            block_type = block.type
            if block_type == "text":
                end = block.end if block.end is not None else self._text.mark()
                text = self._text.between(block.start, end)
                if text or block.citations:
                    entry: dict[str, Any] = {"type": "text", "text": text}
                    if block.citations:
                        entry["citations"] = list(block.citations)
                    blocks.append(entry)
            elif not block.stopped or block.error:
                continue
            elif block_type == "thinking":
                blocks.append({"type": "thinking", "thinking": self._thinking.between(block.start, block.end or 0),
                               "signature": "".join(block.parts)})
            elif block_type == "redacted_thinking":
                blocks.append({"type": "redacted_thinking", "data": block.data.get("data")})
            elif block_type in _TOOL_BLOCKS or block_type in _RESULT_BLOCKS:
                blocks.append(block.data)
        return blocks

    def tool_calls(self) -> list[dict[str, Any]]:
        """The completed client tool calls of this response, in order: `{id, name, input}` each."""
        return [{"id": block.data["id"], "name": block.data["name"], "input": block.data["input"]}
                for _, block in sorted(self._content.items())
                if block.type == "tool_use" and block.stopped and not block.error]

    @property
    def block_types(self) -> list[str]:
        """The content block types, in index order."""
        return [self._blocks[index] for index in sorted(self._blocks)]

    def total_cost(self) -> Decimal | None:
        """The exact cost of the usage so far; None when the model has no price."""
        return cost_of(self.usage, self.model)

    def cost_event(self, estimated: bool = False) -> Cost:
        """A Cost event for the usage so far.

        Args:
            estimated: the answer was cancelled or failed. Unless a message_delta
                already gave the real count, output_tokens is then estimated from
                the text, thinking and tool input received (see estimate_tokens),
                never taken from message_start's placeholder, and the event says
                `estimated`.
        """
        usage = self.usage
        estimated = estimated and not self._output_tokens_final
        if estimated:
            received = len(self.text.encode()) + len(self.thinking.encode()) + self._other_output_bytes
            usage = replace(usage, output_tokens=estimate_tokens(received))
        return Cost(
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cache_creation_input_tokens=usage.cache_creation_input_tokens,
            cache_read_input_tokens=usage.cache_read_input_tokens,
            total_cost=cost_of(usage, self.model),
            model=self.model,
            estimated=estimated,
            context_window=self.context_window,
            truncated_messages=self.truncated_messages,
        )


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _search_results(block: dict[str, Any]) -> SearchResults:
    """The search_results event of a web_search_tool_result or web_fetch_tool_result block."""
    tool_use_id = block["tool_use_id"]
    if not isinstance(tool_use_id, str):
        raise ProtocolError("the upstream sent a server tool result without a tool_use_id")
    content = block.get("content")
    if isinstance(content, dict):
        content_type = content.get("type")
        if isinstance(content_type, str) and content_type.endswith("_tool_result_error"):
            return SearchResults(tool_use_id, (), _str(content.get("error_code")) or "unknown")
        # web_fetch_result: one page, titled by the document it holds.
        document = content.get("content")
        title = _str(document.get("title")) if isinstance(document, dict) else None
        return SearchResults(tool_use_id, ({"url": _str(content.get("url")), "title": title},))
    if isinstance(content, list):
        return SearchResults(tool_use_id, tuple(
            {"url": _str(item.get("url")), "title": _str(item.get("title"))}
            for item in content if isinstance(item, dict) and item.get("type") == "web_search_result"))
    raise ProtocolError("the upstream sent a server tool result without content")


def _count(value: Any) -> int | None:
    # bool is an int subclass; a count is a plain non-negative int or absent.
    if type(value) is int and value >= 0:
        return value
    return None


def _upstream_error(code: str, message: str, retry_after: float | None = None) -> UpstreamError:
    retryable, status = _CODES[code]
    return UpstreamError(
        message[:MAX_ERROR_MESSAGE],
        code=code,
        retryable=retryable,
        status=status,
        retry_after=retry_after if retryable else None,
    )


def _stream_error(error: Any) -> UpstreamError:
    """The UpstreamError for the `error` object of an `error` event."""
    error_type = error.get("type") if isinstance(error, dict) else None
    code = _ERROR_TYPES.get(error_type, "upstream_error") if isinstance(error_type, str) else "upstream_error"
    if code == "auth":
        message = _PERMISSION_MESSAGE if error_type == "permission_error" else _AUTH_MESSAGE
    else:
        message = _error_message(error, "the upstream reported an error")
    return _upstream_error(code, message)


# Anything shaped like a credential: Anthropic keys, our tokens and sessions, bearer values, JWTs, long opaque
# strings.
_SECRET_SHAPES = re.compile(
    r"sk-ant-[\w-]+|dr[ts]_[\w-]+|(?i:bearer)\s+\S+|eyJ[\w-]*\.[\w-]*\.[\w-]*|[A-Za-z0-9_\-+/=]{40,}")
# A secret cut by the length cap leaves at least this much of itself at the end of a message to be masked.
_SECRET_TAIL = 6


def safe_message(text: str) -> str:
    """Upstream words fit to show a user: one line, printable, bounded, with credential-shaped strings masked."""
    text = "".join(c if c.isprintable() else " " for c in text[: MAX_ERROR_MESSAGE * 2])
    return _SECRET_SHAPES.sub("[redacted]", " ".join(text.split()))[:MAX_ERROR_MESSAGE]


def redact(text: str, secrets: Iterable[str]) -> str:
    """`text` with each of `secrets` masked, whatever its shape, and credential shapes too.

    `text` may have been through safe_message, whose shapes can mask part of a secret and leave the rest
    ("key-sk-ant-xyz" becomes "key-[redacted]"): that form is masked whole as well. A message cut at its
    length cap may end with the start of a secret: that start is masked too.
    """
    for secret in secrets:
        if not secret:
            continue
        forms = {secret, _SECRET_SHAPES.sub("[redacted]", secret)} - {"[redacted]"}
        for form in forms:
            text = text.replace(form, "[redacted]")
        for form in forms:
            for length in range(min(len(form) - 1, len(text)), _SECRET_TAIL - 1, -1):
                if text.endswith(form[:length]):
                    text = text[:-length] + "[redacted]"
                    break
    return _SECRET_SHAPES.sub("[redacted]", text)


def _error_message(error: Any, default: str) -> str:
    # The upstream's own words help ("max_tokens: must be at most 64000"), once made safe to pass on.
    message = error.get("message") if isinstance(error, dict) else None
    if isinstance(message, str) and message.strip():
        return safe_message(message) or default
    return default


# The API's two refusals for length (see server/context.py for where they were seen):
# "prompt is too long: 219898 tokens > 200000 maximum" and
# "input length and `max_tokens` exceed context limit: 199759 + 8192 > 200000, decrease input length or ...".
_PROMPT_TOO_LONG = re.compile(r"prompt is too long: (\d+) tokens > (\d+) maximum")
_INPUT_AND_MAX_TOKENS = re.compile(r"input length and `?max_tokens`? exceed context limit: (\d+) \+ \d+ > (\d+)")


def context_refusal(message: str) -> tuple[int, int] | None:
    """(input tokens, context window) from an upstream refusal for length; None for any other message."""
    found = _PROMPT_TOO_LONG.search(message) or _INPUT_AND_MAX_TOKENS.search(message)
    return (int(found[1]), int(found[2])) if found else None


def error_for_status(
    status: int, body: bytes, retry_after: str | None, *, now: datetime | None = None
) -> UpstreamError:
    """The UpstreamError for an upstream HTTP error answer.

    Args:
        status: the HTTP status, 4xx or 5xx.
        body: the answer's body; its Anthropic `error.message` is used when it
            parses, except for auth errors, which get a fixed message.
        retry_after: the Retry-After header, seconds or an HTTP date.
        now: the current time, to turn an HTTP date into seconds (default: now, UTC).
    """
    code = _STATUSES.get(status)
    if code is None:
        code = "invalid_request" if 400 <= status < 500 else "upstream_error"
    if code == "auth":
        message = _PERMISSION_MESSAGE if status == 403 else _AUTH_MESSAGE
    else:
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            parsed = None
        error = parsed.get("error") if isinstance(parsed, dict) else None
        message = _error_message(error, f"the upstream answered HTTP {status}")
        refusal = context_refusal(message) if status == 400 else None
        if refusal is not None:
            # Not the user's malformed request: the conversation outgrew the window (the core learns from it).
            return UpstreamError(message[:MAX_ERROR_MESSAGE], code="context_too_long", retryable=False, status=413,
                                 details={"inputTokens": refusal[0], "contextWindow": refusal[1]})
    return _upstream_error(code, message, parse_retry_after(retry_after, now=now))


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header value (seconds or an HTTP date); None if unusable."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(seconds, 0.0)
