"""REST: conversations, messages, health. Snake_case rows become camelCase JSON here."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .hub import StreamHub
from .redis_hub import RedisStreamHub
from .store import Store


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
        "totalCost": _money(row["total_cost"]),
    }


def message_json(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "conversationId": row["conversation_id"],
        "role": row["role"],
        "content": row["content"],
        "thinking": row["thinking"],
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


async def list_conversations(request: Request) -> Response:
    store: Store = request.app.state.store
    rows = await store.list_conversations()
    return JSONResponse({"conversations": [conversation_json(row) for row in rows]})


async def list_messages(request: Request) -> Response:
    store: Store = request.app.state.store
    conversation_id = request.path_params["conversation_id"]
    conversation = await store.get_conversation(conversation_id)
    rows = await store.list_messages(conversation_id)
    return JSONResponse({"conversation": conversation_json(conversation),
                         "messages": [message_json(row) for row in rows]})


async def healthz(request: Request) -> Response:
    store: Store = request.app.state.store
    hub: StreamHub = request.app.state.hub
    body = {"status": "ok", "database": "ok"}
    try:
        await store.ping()
    except Exception:
        body.update(status="unavailable", database="unreachable")
    if isinstance(hub, RedisStreamHub):
        # Without Redis this instance cannot serve other instances' streams, nor they its own.
        try:
            await hub.redis.ping()
            body["redis"] = "ok"
        except Exception:
            body.update(status="unavailable", redis="unreachable")
    return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)
