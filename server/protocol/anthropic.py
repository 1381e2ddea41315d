"""ReplyState: Anthropic Messages stream events in, relay events out.

Pure: no I/O, no await. The caller decodes SSE and passes each event's
`event:` field and data string; ReplyState parses the JSON, accumulates the answer,
thinking and usage, and returns the relay events to send. error_for_status maps an
upstream HTTP error answer to an UpstreamError the same way.
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
from server.events import Chunk, Cost, RelayEvent, Thinking
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


class ReplyState:
    """One reply's stream: feed it upstream events, get relay events back.

    Args:
        requested_model: the model the request asked for; prices the reply when
            the upstream does not name its model in message_start.
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
        self._usage: dict[str, int] = {}
        self._output_tokens_final = False
        # Stand-in (replaced by the decoder's): each block as the API would take it back, and which stopped.
        self.citation_count = citation_base
        self._content: dict[int, dict[str, Any]] = {}
        self._partial_json: dict[int, list[str]] = {}
        self._stopped: set[int] = set()

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
                        block = self._content.get(payload["index"])
                        if block is not None:
                            block["text"] += text
                        return [Chunk(text)]
                    return []
                self._other_block_delta(payload["index"], delta_type, delta)
                return self._other_delta(delta_type, delta)
            if kind == "ping":
                return []
            if kind == "content_block_stop":
                self._block_stop(payload["index"])
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
                if self.finished:
                    return []
                self.finished = True
                return []
            if kind == "error":
                raise _stream_error(payload.get("error"))
        except (KeyError, TypeError, AttributeError):
            raise ProtocolError(f"the upstream sent a malformed {str(kind)[:40]!r} event") from None
        # Unknown event types are ignored: the API may add new ones.
        return []

    def _other_delta(self, delta_type: str, delta: dict[str, Any]) -> list[RelayEvent]:
        if delta_type == "thinking_delta":
            thinking = delta["thinking"]
            if not isinstance(thinking, str):
                raise ProtocolError("the upstream sent a thinking delta without thinking")
            if thinking:
                self._thinking.add(thinking)
                return [Thinking(thinking)]
        elif delta_type == "input_json_delta":
            # Tool input is not part of the answer, but it counts when estimating output.
            self._other_output_bytes += len(str(delta.get("partial_json", "")).encode())
        # signature_delta, citations_delta and unknown delta types: nothing to relay.
        return []

    def _other_block_delta(self, index: int, delta_type: str, delta: dict[str, Any]) -> None:
        block = self._content.get(index)
        if block is None:
            return
        if delta_type == "thinking_delta":
            block["thinking"] = block.get("thinking", "") + str(delta["thinking"])
        elif delta_type == "signature_delta":
            block["signature"] = block.get("signature", "") + str(delta["signature"])
        elif delta_type == "input_json_delta":
            self._partial_json.setdefault(index, []).append(str(delta.get("partial_json", "")))
        elif delta_type == "citations_delta":
            block.setdefault("citations", []).append(delta["citation"])
            self.citation_count += 1

    def _block_stop(self, index: int) -> None:
        block = self._content.get(index)
        if block is None:
            return
        self._stopped.add(index)
        if block["type"] in ("tool_use", "server_tool_use") and index in self._partial_json:
            joined = "".join(self._partial_json.pop(index))
            try:
                block["input"] = orjson.loads(joined) if joined.strip() else {}
            except orjson.JSONDecodeError:
                raise ProtocolError("the upstream sent a tool call whose input is not JSON") from None

    def content_blocks(self) -> list[dict[str, Any]]:
        """This response's content in the API's shape, to send back as an assistant message: the blocks
        whose content_block_stop arrived, and a trailing text block cut short (a cancelled answer)."""
        blocks = []
        for index in sorted(self._content):
            block = self._content[index]
            if index in self._stopped or (block["type"] == "text" and index == max(self._content)):
                if block["type"] == "text" and not block.get("citations"):
                    block = {"type": "text", "text": block["text"]}
                blocks.append(block)
        return blocks

    def tool_calls(self) -> list[dict[str, Any]]:
        """The completed client tool calls, `{id, name, input}`, in order."""
        return [{"id": block["id"], "name": block["name"], "input": block.get("input", {})}
                for index, block in sorted(self._content.items())
                if block["type"] == "tool_use" and index in self._stopped]

    def _block_start(self, index: int, block: dict[str, Any]) -> list[RelayEvent]:
        block_type = block["type"]
        self._blocks[index] = block_type
        kept = dict(block)
        if block_type == "text":
            kept["text"] = str(block.get("text") or "")
            if isinstance(block.get("citations"), list):
                self.citation_count += len(block["citations"])
        elif block_type == "thinking":
            kept["thinking"] = str(block.get("thinking") or "")
            kept.setdefault("signature", "")
        self._content[index] = kept
        if block_type == "text":
            text = block.get("text")
            if isinstance(text, str) and text:
                self._text.add(text)
                return [Chunk(text)]
        elif block_type == "thinking":
            thinking = block.get("thinking")
            if isinstance(thinking, str) and thinking:
                self._thinking.add(thinking)
                return [Thinking(thinking)]
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
        """Whether any text or thinking arrived: after that, a retry would repeat it."""
        return bool(self._text or self._thinking)

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
