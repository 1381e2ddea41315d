"""REST: sessions, conversations, messages, health. Snake_case rows become camelCase JSON here."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from decimal import Decimal
from typing import Any
from urllib.parse import quote

import orjson
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .attachments import InlineAttachment, checked_media_type, clean_name
from .auth import SESSION_COOKIE, User
from .core import Relay
from .errors import BadRequestError, NotFoundError
from .metrics import CONTENT_TYPE
from .protocol.frames import parse_json_object
from .redis_hub import RedisStreamHub
from .store.conversations import encode_cursor
from .transports.sse import read_body
from .usage import parse_query, report_json, usage_rows


def _money(value: Any) -> str | None:
    """Exact decimal text: JSON numbers would become floats in most clients."""
    if value is None:
        return None
    return format(Decimal(value), "f")


def conversation_json(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "title": row["title"],
        "agentId": row["agent_id"],
        "createdAt": row["created_at"],
        "updatedAt": row["updated_at"],
        "messageCount": row["message_count"],
        "ownerId": row["owner_id"],
        "totalCost": _money(row["total_cost"]),
        "activeLeafId": row["active_leaf_id"],
    }


def message_json(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "conversationId": row["conversation_id"],
        "parentId": row["parent_id"],
        "siblingIndex": row.get("sibling_index", 0),
        "siblingCount": row.get("sibling_count", 1),
        "role": row["role"],
        "content": row["content"],
        "thinking": row["thinking"],
        # The API messages the row stands for (content blocks: thinking, tool calls and results, searches,
        # citations, attachment references); None: `content` is all of it.
        "blocks": orjson.loads(row["blocks"]) if row.get("blocks") else None,
        "model": row["model"],
        "status": row["status"],
        "stopReason": row["stop_reason"],
        "inputTokens": row["input_tokens"],
        "outputTokens": row["output_tokens"],
        "cacheCreationInputTokens": row["cache_creation_input_tokens"],
        "cacheReadInputTokens": row["cache_read_input_tokens"],
        "totalCost": _money(row["cost"]),
        "costEstimated": bool(row["cost_estimated"]),
        "errorCode": row["error_code"],
        "streamId": row["stream_id"],
        "traceSessionId": row["trace_session_id"],
        "taskTraceId": row["task_trace_id"],
        "createdAt": row["created_at"],
        "completedAt": row["completed_at"],
    }


LIST_LIMIT, LIST_MAX = 50, 200
TITLE_MAX = 200


def _limit(raw: str | None) -> int:
    if raw is None or raw == "":
        return LIST_LIMIT
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= LIST_MAX:
        raise BadRequestError(f"limit must be a whole number from 1 to {LIST_MAX}")
    return int(raw)


async def list_conversations(request: Request) -> Response:
    """GET /api/conversations?limit=&before=&q=: the caller's conversations, newest updated first, a page at a
    time (`nextBefore` is the cursor of the next page, null on the last), titles holding `q` (any case);
    an admin's `?all=1` lists everyone's."""
    relay: Relay = request.app.state.relay
    user = await relay.admit(request.scope)
    params = request.query_params
    every_owner = user.admin and params.get("all") in ("1", "true")
    limit = _limit(params.get("limit"))
    query = params.get("q") or None
    if query is not None and len(query) > TITLE_MAX:
        raise BadRequestError(f"q must be at most {TITLE_MAX} characters")
    rows = await relay.store.list_conversations(user.id, limit + 1, every_owner, params.get("before") or None,
                                                query)
    page = rows[:limit]
    return JSONResponse({"conversations": [conversation_json(row) for row in page],
                         "nextBefore": encode_cursor(page[-1]) if len(rows) > limit else None})


async def _visible(relay: Relay, user: User, conversation_id: str) -> dict[str, Any]:
    """A conversation this user may see.

    Raises:
        NotFoundError: none by that id, or another user's.
    """
    conversation = await relay.store.get_conversation(conversation_id)
    if not user.can_see(conversation["owner_id"]):
        raise NotFoundError(f"conversation {conversation_id} not found")
    return conversation


async def _messages_body(relay: Relay, conversation_id: str, path: bool) -> dict[str, Any]:
    conversation = await relay.store.get_conversation(conversation_id)
    rows = await relay.store.list_messages(conversation_id, path=path)
    return {"conversation": conversation_json(conversation), "activeLeafId": conversation["active_leaf_id"],
            "messages": [message_json(row) for row in rows]}


async def list_messages(request: Request) -> Response:
    """GET /api/conversations/{id}/messages[?path=active]: every message (parents before children), or only
    the path from the root to the active leaf."""
    relay: Relay = request.app.state.relay
    user = await relay.admit(request.scope)
    conversation_id = request.path_params["conversation_id"]
    await _visible(relay, user, conversation_id)
    path = request.query_params.get("path")
    if path not in (None, "", "active", "all"):
        raise BadRequestError("path must be active (or left out, for every message)")
    return JSONResponse(await _messages_body(relay, conversation_id, path == "active"))


async def set_active_leaf(request: Request) -> Response:
    """PUT /api/conversations/{id}/active-leaf {"messageId"}: switch branch (to the newest leaf under it)."""
    relay: Relay = request.app.state.relay
    user = await relay.admit(request.scope)
    conversation_id = request.path_params["conversation_id"]
    body = parse_json_object(await read_body(request, 4096))
    message_id = body.get("messageId")
    if not isinstance(message_id, str) or not message_id:
        raise BadRequestError("messageId is required")
    await _visible(relay, user, conversation_id)
    await relay.store.set_active_leaf(conversation_id, message_id)
    return JSONResponse(await _messages_body(relay, conversation_id, True))


async def update_conversation(request: Request) -> Response:
    """PATCH /api/conversations/{id} {"title"}: rename (1 to 200 characters once trimmed)."""
    relay: Relay = request.app.state.relay
    user = await relay.admit(request.scope)
    conversation_id = request.path_params["conversation_id"]
    body = parse_json_object(await read_body(request, 8192))
    title = body.get("title")
    if not isinstance(title, str) or not 1 <= len(title.strip()) <= TITLE_MAX or "\x00" in title:
        raise BadRequestError(f"title must be text of 1 to {TITLE_MAX} characters once trimmed")
    await _visible(relay, user, conversation_id)
    await relay.store.rename_conversation(conversation_id, title.strip())
    return JSONResponse(conversation_json(await relay.store.get_conversation(conversation_id)))


async def delete_conversation(request: Request) -> Response:
    """DELETE /api/conversations/{id}: cancel its running answers (on any instance), then delete it and its
    messages; what it spent stays in usage."""
    relay: Relay = request.app.state.relay
    user = await relay.admit(request.scope)
    conversation_id = request.path_params["conversation_id"]
    await _visible(relay, user, conversation_id)
    cancelled = await relay.delete_conversation(conversation_id)
    return JSONResponse({"id": conversation_id, "deleted": True, "cancelledStreamIds": cancelled})


def user_json(user: User) -> dict[str, Any]:
    return {"name": user.name, "admin": user.admin, "anonymous": user.id is None}


async def get_session(request: Request) -> Response:
    """Who the caller is: 401 when they must sign in first (the page then shows its sign-in form)."""
    relay: Relay = request.app.state.relay
    user = await relay.admit(request.scope)
    return JSONResponse({"user": user_json(user)})


async def create_session(request: Request) -> Response:
    """POST /api/session {"token"}: trade an API token or a JWT for an HttpOnly session cookie (browsers); a
    JWT's session (the cookie and its row) ends no later than the token's exp.

    The token travels in the body, never in a URL; the cookie is SameSite=Strict, so other
    sites' pages cannot send it.
    """
    relay: Relay = request.app.state.relay
    relay.auth.check_origin(request.scope)
    body = parse_json_object(await read_body(request, 4096))
    token = body.get("token")
    if not isinstance(token, str) or not token:
        raise BadRequestError("token is required: the API token `deltarelay users add` printed, or your app's JWT")
    user, secret, max_age = await relay.auth.sign_in(token)
    relay.limits.request(user)
    response = JSONResponse({"user": user_json(user)})
    response.set_cookie(SESSION_COOKIE, secret, max_age=max_age, path="/", httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")
    return response


async def delete_session(request: Request) -> Response:
    """Sign out: the session ends in the database, and the cookie is cleared."""
    relay: Relay = request.app.state.relay
    relay.auth.check_origin(request.scope)
    await relay.auth.sign_out(request.scope["headers"])
    response = JSONResponse({"signedOut": True})
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return response


async def usage(request: Request) -> Response:
    """GET /api/usage?from=&to=&groupBy=day|model|agent|user[&user=NAME]: the caller's own; an admin's, everyone's."""
    relay: Relay = request.app.state.relay
    user = await relay.admit(request.scope)
    params = request.query_params
    query = parse_query(params.get("from"), params.get("to"), params.get("groupBy"))
    owner_id, every_owner, scope = user.id, user.admin, "all" if user.admin else "own"
    name = params.get("user")
    if name is not None and name != user.name:
        found = await relay.store.user_id_by_name(name) if user.admin else None
        if found is None:
            raise NotFoundError(f"user {name[:64]} not found")
        owner_id, every_owner, scope = found, False, name
    elif name is not None:
        every_owner, scope = False, "own"
    rows = await usage_rows(relay.store, query, owner_id, every_owner)
    return JSONResponse(report_json(query, rows, scope))


async def metrics(request: Request) -> Response:
    """Prometheus text format. Signed-in admins (Bearer token in the scrape config) or open mode only."""
    relay: Relay = request.app.state.relay
    user = await relay.auth.user(request.scope)
    if not user.admin and user.id is not None:
        raise NotFoundError("not found")
    return Response(relay.metrics.render(), media_type=CONTENT_TYPE)


async def healthz(request: Request) -> Response:
    """The process is up and its event loop answers: for liveness probes, which restart on failure."""
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Ready for traffic: the database answers and takes writes (and Redis answers, when configured), and the
    server is not shutting down."""
    relay: Relay = request.app.state.relay
    checks: dict[str, str] = {}
    try:
        await relay.store.ping()
        checks["database"] = "ok" if await relay.store.writable() else "not_writable"
    except Exception:
        checks["database"] = "unreachable"
    hub = relay.hub
    if isinstance(hub, RedisStreamHub):
        # Without Redis this instance cannot serve other instances' streams, nor they its own.
        try:
            await hub.redis.ping()
            checks["redis"] = "ok"
        except Exception:
            checks["redis"] = "unreachable"
    checks["accepting"] = "ok" if hub.accepting else "shutting_down"
    ready = all(value == "ok" for value in checks.values())
    return JSONResponse({"status": "ready" if ready else "unavailable", **checks}, status_code=200 if ready else 503)


def attachment_json(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "name": row["name"], "mediaType": row.get("mediaType", row.get("media_type")),
            "size": row["size"]}


async def upload_attachment(request: Request) -> Response:
    """POST /api/attachments (multipart/form-data, one file in the field `file`): save an image or a PDF for a
    later message's `attachmentIds`; 201 {id, name, mediaType, size}. The media type is the one its bytes
    name (415 unsupported_media_type otherwise, or when the part's Content-Type claims another); over
    RELAY_MAX_ATTACHMENT_BYTES (or an image over the API's 5 MB) is 413 too_large. Nothing is saved on any
    refusal."""
    relay: Relay = request.app.state.relay
    user = await relay.admit(request.scope)
    limit = relay.settings.max_attachment_bytes
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise BadRequestError("send the file as multipart/form-data in a field named file")
    body = await read_body(request, limit + 64 * 1024)  # the file and its part's headers

    async def chunks() -> AsyncGenerator[bytes, None]:
        yield body

    try:
        form = await MultiPartParser(request.headers, chunks(), max_files=1, max_fields=8).parse()
    except (MultiPartException, ValueError) as error:
        raise BadRequestError(f"the multipart body cannot be read: {error}") from None
    try:
        part = form.get("file")
        if not isinstance(part, UploadFile):
            raise BadRequestError("the multipart body needs a file in the field named file")
        data = await part.read()
        claimed = part.content_type
        name = clean_name(part.filename)
    finally:
        await form.close()
    media_type = checked_media_type(data, claimed, limit)
    saved = await relay.store.add_attachment(user.id, InlineAttachment(name, media_type, data))
    return JSONResponse(attachment_json(saved), status_code=201)


async def get_attachment(request: Request) -> Response:
    """GET /api/attachments/{id}: the file's bytes, with the media type checked at upload (the caller's own;
    another user's is 404)."""
    relay: Relay = request.app.state.relay
    user = await relay.admit(request.scope)
    found = await relay.store.get_attachment(request.path_params["attachment_id"], user.id)
    quoted = found["name"].replace("\\", "_").replace('"', "_")
    return Response(found["data"], media_type=found["media_type"], headers={
        "cache-control": "private, max-age=86400", "x-content-type-options": "nosniff",
        "content-disposition": f"inline; filename*=UTF-8''{quote(quoted)}", "etag": f'"{found["sha256"]}"'})
