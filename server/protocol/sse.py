"""Server-sent events: bytes -> SSEEvent, and SSE framing for our own streams.

Pure: no I/O. SSEDecoder follows the WHATWG EventSource parsing rules
(https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation)
and gives the same events however the network splits the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ProtocolError

__all__ = ["SSEDecoder", "SSEEvent", "encode_comment", "encode_entry", "encode_event"]

_BOM = b"\xef\xbb\xbf"
_DEFAULT_MAX_LINE_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One dispatched event.

    `event` is "message" when the stream gave no (or an empty) event type; `id` is the
    last event ID as of dispatch, None if the stream never set one; `retry` is the
    reconnection time given inside this event's block, if any.
    """

    event: str
    data: str
    id: str | None
    retry: int | None = None


class SSEDecoder:
    """Incremental SSE parser: feed network chunks to `decode`, call `flush` at the end.

    Args:
        max_line_bytes: the longest line accepted. Only one partial line is ever held,
            so this bounds the memory of a stream.
    """

    __slots__ = (
        "max_line_bytes",
        "last_event_id",
        "retry",
        "_bom_head",
        "_at_start",
        "_after_cr",
        "_pending",
        "_pending_size",
        "_event_type",
        "_data",
        "_id",
        "_event_retry",
    )

    def __init__(self, max_line_bytes: int = _DEFAULT_MAX_LINE_BYTES) -> None:
        self.max_line_bytes = max_line_bytes
        self.last_event_id = ""  # as of the last dispatch (blank line), for Last-Event-ID
        self.retry: int | None = None  # the last valid `retry` field, in milliseconds
        self._bom_head = b""  # up to two bytes that may still turn out to be a BOM
        self._at_start = True
        self._after_cr = False  # the last chunk ended with CR: a leading LF belongs to it
        self._pending: list[bytes] = []  # the partial line, kept in pieces to avoid re-copying
        self._pending_size = 0
        self._event_type = ""
        self._data: list[str] = []
        self._id: str | None = None  # the last event ID buffer
        self._event_retry: int | None = None

    def decode(self, chunk: bytes) -> list[SSEEvent]:
        """Return the events completed by this chunk.

        Raises:
            ProtocolError: a line is longer than `max_line_bytes`.
        """
        if self._at_start:
            chunk = self._strip_bom(chunk)
        if not chunk:
            return []
        if self._after_cr:
            self._after_cr = False
            if chunk[0] == 0x0A:
                chunk = chunk[1:]
        if b"\n" not in chunk and b"\r" not in chunk:
            if chunk:
                self._pending.append(chunk)
                self._pending_size += len(chunk)
                if self._pending_size > self.max_line_bytes:
                    raise self._too_long()
            return []
        if self._pending:
            self._pending.append(chunk)
            chunk = b"".join(self._pending)
            self._pending = []
            self._pending_size = 0
        if b"\r" in chunk:
            self._after_cr = chunk[-1] == 0x0D
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = chunk.split(b"\n")
        rest = lines.pop()
        if rest:
            if len(rest) > self.max_line_bytes:
                raise self._too_long()
            self._pending.append(rest)
            self._pending_size = len(rest)
        return self._process(lines)

    def flush(self) -> list[SSEEvent]:
        """End of stream: an event without its closing blank line is discarded, as the spec says.

        `last_event_id` and `retry` are kept for the next connection, which may start with a BOM again.
        """
        self._at_start = True
        self._bom_head = b""
        self._after_cr = False
        self._pending = []
        self._pending_size = 0
        self._event_type = ""
        self._data = []
        self._event_retry = None
        return []

    def _strip_bom(self, chunk: bytes) -> bytes:
        # Only the first bytes of the stream may be a BOM, and the first chunk may be shorter than it.
        head = self._bom_head + chunk
        if len(head) < len(_BOM) and _BOM.startswith(head):
            self._bom_head = head
            return b""
        self._at_start = False
        self._bom_head = b""
        return head[len(_BOM) :] if head.startswith(_BOM) else head

    def _process(self, lines: list[bytes]) -> list[SSEEvent]:
        events: list[SSEEvent] = []
        max_line_bytes = self.max_line_bytes
        for line in lines:
            if not line:
                if self._data:
                    events.append(
                        SSEEvent(self._event_type or "message", "\n".join(self._data), self._id, self._event_retry)
                    )
                    self._data = []
                    self._event_retry = None
                self._event_type = ""
                self.last_event_id = self._id or ""
                continue
            if len(line) > max_line_bytes:
                raise self._too_long()
            if line[0] == 0x3A:  # ":" starts a comment
                continue
            name, _, raw = line.partition(b":")
            if raw[:1] == b" ":
                raw = raw[1:]
            value = raw.decode("utf-8", "replace")
            if name == b"data":
                self._data.append(value)
            elif name == b"event":
                self._event_type = value
            elif name == b"id":
                if "\0" not in value:
                    self._id = value
            elif name == b"retry":
                if value.isascii() and value.isdigit():
                    self.retry = self._event_retry = int(value)
            # Any other field name is ignored.
        return events

    def _too_long(self) -> ProtocolError:
        return ProtocolError(f"upstream SSE line longer than {self.max_line_bytes} bytes")


def encode_event(name: str | None, data: str | bytes, id: int | str | None = None) -> bytes:
    """Frame one event as `id: ...\nevent: ...\ndata: ...\n\n`.

    Data with line breaks becomes several `data:` lines; a decoder gives it back with
    every line break (CRLF, CR or LF) as LF, because SSE cannot carry CR. Bytes data is
    framed as it is, without a round trip through text.

    Raises:
        ValueError: `name` or `id` contains a line break, or `id` contains NUL.
    """
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if 10 in raw or 13 in raw:  # LF, CR
        raw = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\ndata: ")
    if name:
        if "\n" in name or "\r" in name:
            raise ValueError("an SSE event name cannot contain a line break")
        if type(id) is int:  # the relay's own events: one formatting, one copy of the data
            return b"id: %d\nevent: %b\ndata: %b\n\n" % (id, name.encode("utf-8"), raw)
        frame = b"event: %b\ndata: %b\n\n" % (name.encode("utf-8"), raw)
    else:
        frame = b"data: %b\n\n" % raw
    if id is not None:
        text = str(id)
        if "\n" in text or "\r" in text or "\0" in text:
            raise ValueError("an SSE id cannot contain a line break or NUL")
        frame = b"id: %b\n%b" % (text.encode("utf-8"), frame)
    return frame


# Event names encode_entry has checked, with the bytes around them: names come from the code, a handful.
_ENTRY_HEADS: dict[str, bytes] = {}


def encode_entry(id: int, name: str, data: bytes) -> bytes:
    """Frame one numbered event with UTF-8 data, exactly as encode_event does: the relay's SSE responses frame
    every logged event with it (hub.Framer's argument order).

    Raises:
        ValueError: `name` contains a line break.
    """
    if 10 in data or 13 in data:  # LF, CR: several data lines (an int test is a memchr, a bytes one is not)
        return encode_event(name, data, id)
    head = _ENTRY_HEADS.get(name)
    if head is None:
        if "\n" in name or "\r" in name:
            raise ValueError("an SSE event name cannot contain a line break")
        head = b"\nevent: %b\ndata: " % name.encode("utf-8") if name else b"\ndata: "
        if len(_ENTRY_HEADS) < 256:
            _ENTRY_HEADS[name] = head
    return b"id: %d%b%b\n\n" % (id, head, data)


def encode_comment(text: str) -> bytes:
    """Frame a comment (`: text\\n\\n`), which decoders ignore: a keepalive."""
    raw = text.encode("utf-8")
    if b"\n" in raw or b"\r" in raw:
        raw = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\n: ")
    return b": " + raw + b"\n\n"
