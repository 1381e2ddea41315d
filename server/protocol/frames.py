"""Client input: WebSocket frames and SSE request bodies -> commands.

Pure: no I/O. Both transports validate here, so the same input gets the same error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from ..attachments import DEFAULT_MAX_ATTACHMENT_BYTES, InlineAttachment, parse_ids, parse_inline
from ..errors import BadRequestError, TooLargeError

_ID_LIMIT = 200


@dataclass(frozen=True, slots=True)
class SendMessage:
    """Start an answer to `message`, in a new conversation unless conversation_id is given."""

    message: str
    agent_id: str | None = None
    conversation_id: str | None = None
    request_id: str | None = None
    # With parent_given, the new message follows the answer parent_message_id (None: a new first message);
    # without, the conversation's active leaf.
    parent_message_id: str | None = None
    parent_given: bool = False
    # Files of the message: sent inline (checked: server/attachments.py), or uploaded before (their ids).
    attachments: tuple[InlineAttachment, ...] = field(default=(), repr=False)
    attachment_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Regenerate:
    """A new answer beside the answer `message_id`: the same user message, the same history."""

    message_id: str
    request_id: str | None = None


@dataclass(frozen=True, slots=True)
class Continue:
    """More of the answer `message_id` (stopped at max_tokens, or cancelled), appended to it."""

    message_id: str
    request_id: str | None = None


# The commands that start an answer.
AnswerCommand = SendMessage | Regenerate | Continue


@dataclass(frozen=True, slots=True)
class Cancel:
    stream_id: str


@dataclass(frozen=True, slots=True)
class Resume:
    stream_id: str
    last_event_id: int


@dataclass(frozen=True, slots=True)
class Ping:
    pass


@dataclass(frozen=True, slots=True)
class Auth:
    """Authenticate (or extend) the socket with a JWT or an API token: browsers cannot set its headers."""

    token: str = field(repr=False)


Command = SendMessage | Regenerate | Continue | Cancel | Resume | Ping | Auth
_TOKEN_LIMIT = 16 * 1024


def parse_json_object(raw: bytes | str) -> dict[str, Any]:
    """A JSON object, or BadRequestError saying what is wrong with it."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequestError("the body is not valid JSON") from None
    if not isinstance(value, dict):
        raise BadRequestError("the body must be a JSON object")
    return value


def _optional_id(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > _ID_LIMIT or not value.isprintable():
        raise BadRequestError(f"{key} must be a non-empty string of at most {_ID_LIMIT} printable characters")
    return value


def _required_id(body: dict[str, Any], key: str) -> str:
    value = _optional_id(body, key)
    if value is None:
        raise BadRequestError(f"{key} is required")
    return value


def parse_send_message(body: dict[str, Any], max_message_bytes: int,
                       max_attachment_bytes: int = DEFAULT_MAX_ATTACHMENT_BYTES) -> SendMessage:
    """The `{message, agentId?, conversationId?, parentMessageId?, requestId?, attachments?, attachmentIds?}`
    of a new answer. A message with files may have no text."""
    message = body.get("message", "" if body.get("attachments") or body.get("attachmentIds") else None)
    if message is None:
        raise BadRequestError("message is required")
    if not isinstance(message, str):
        raise BadRequestError("message must be a string")
    attachments = parse_inline(body.get("attachments"), max_attachment_bytes)
    attachment_ids = parse_ids(body.get("attachmentIds"))
    if not message.strip() and not (attachments or attachment_ids):
        raise BadRequestError("message must not be empty")
    if "\x00" in message:
        # PostgreSQL's text cannot hold NUL; refused on every database alike.
        raise BadRequestError("message must not contain NUL characters")
    size = len(message.encode("utf-8", "surrogatepass"))
    if size > max_message_bytes:
        raise TooLargeError(f"message is {size} bytes; the limit is {max_message_bytes}")
    return SendMessage(
        message=message,
        agent_id=_optional_id(body, "agentId"),
        conversation_id=_optional_id(body, "conversationId"),
        request_id=_optional_id(body, "requestId"),
        parent_message_id=_optional_id(body, "parentMessageId"),
        parent_given="parentMessageId" in body,
        attachments=attachments,
        attachment_ids=attachment_ids,
    )


def parse_answer_body(body: dict[str, Any], max_message_bytes: int,
                      max_attachment_bytes: int = DEFAULT_MAX_ATTACHMENT_BYTES) -> AnswerCommand:
    """The SSE POST body: `{"regenerate": id}`, `{"continue": id}`, or a message (see parse_send_message)."""
    if "regenerate" in body:
        return Regenerate(_required_id(body, "regenerate"), _optional_id(body, "requestId"))
    if "continue" in body:
        return Continue(_required_id(body, "continue"), _optional_id(body, "requestId"))
    return parse_send_message(body, max_message_bytes, max_attachment_bytes)


def parse_event_id(raw: Any) -> int:
    """A resume cursor: the id of the last event the client saw (0: none)."""
    if isinstance(raw, bool):
        raise BadRequestError("lastEventId must be a whole number of 0 or more")
    if isinstance(raw, int):
        value = raw
    elif isinstance(raw, str) and raw.isascii() and raw.isdigit() and len(raw) <= 18:
        value = int(raw)
    else:
        raise BadRequestError("lastEventId must be a whole number of 0 or more")
    if value < 0:
        raise BadRequestError("lastEventId must be a whole number of 0 or more")
    return value


def parse_frame(raw: bytes | str, max_message_bytes: int) -> Command:
    """One WebSocket client frame."""
    return frame_command(parse_json_object(raw), max_message_bytes)


def frame_command(body: dict[str, Any], max_message_bytes: int,
                  max_attachment_bytes: int = DEFAULT_MAX_ATTACHMENT_BYTES) -> Command:
    """The command of a WebSocket client frame already parsed as a JSON object."""
    kind = body.get("type")
    if kind == "message":
        return parse_send_message(body, max_message_bytes, max_attachment_bytes)
    if kind == "regenerate":
        return Regenerate(_required_id(body, "messageId"), _optional_id(body, "requestId"))
    if kind == "continue":
        return Continue(_required_id(body, "messageId"), _optional_id(body, "requestId"))
    if kind == "cancel":
        return Cancel(_required_id(body, "streamId"))
    if kind == "resume":
        return Resume(_required_id(body, "streamId"), parse_event_id(body.get("lastEventId", 0)))
    if kind == "ping":
        return Ping()
    if kind == "auth":
        token = body.get("token")
        if not isinstance(token, str) or not token or len(token) > _TOKEN_LIMIT:
            raise BadRequestError(f"token must be a non-empty string of at most {_TOKEN_LIMIT} characters")
        return Auth(token)
    if kind is None:
        raise BadRequestError("the frame needs a type: message, regenerate, continue, resume, cancel, ping or auth")
    raise BadRequestError("unknown frame type; expected message, regenerate, continue, resume, cancel, ping or auth")


def request_id_of(body: dict[str, Any] | None) -> str | None:
    """The requestId of a frame (parsed, or None when it is not a JSON object) that failed, so that its error
    can be routed."""
    value = body.get("requestId") if body is not None else None
    return value if isinstance(value, str) and 0 < len(value) <= _ID_LIMIT else None
