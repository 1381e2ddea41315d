"""A literal port of the seed note's streaming flow (shared/seed/streaming-flow.md) to Starlette + httpx.

    python -m bench.baselines.seed_relay --port 8100 --database /tmp/seed.db
    (env ANTHROPIC_BASE_URL, ANTHROPIC_API_KEY, RELAY_MODEL)

The baseline every relay figure is a ratio to. It keeps the note's algorithm and its defects on purpose:
- one httpx.AsyncClient with httpx's DEFAULT limits and timeout: 100 connections, so answer 101 waits for
  a free one, and fails (HTTP 500) after httpx's 5 s pool timeout;
- the body read with aiter_bytes, decoded, split on "\\n", the last piece kept as the buffer, each
  "data: " line parsed as JSON; every content_block_delta's delta.text goes out at once as `event: chunk`;
- message_delta output_tokens summed (they are cumulative, so a multi-delta answer is over-counted);
- the cost a float rounded to 6 places; `event: cost`, `event: done` with `{}`;
- the reply saved with a plain insert after the stream, so an answer whose client left is never saved;
- no status check, no error event, no timeout between chunks, no resume.
It speaks just enough of the relay's SSE protocol for bench.loadgen: chunk events with {"text"}, then done.
"""

from __future__ import annotations

import argparse
import codecs
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiosqlite
import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .serve import serve_like_relay

# The note's calculateCost: dollars per million tokens, as floats.
PRICES = {"claude-sonnet-4-5": (3.0, 15.0), "claude-haiku-4-5": (1.0, 5.0)}

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (id TEXT PRIMARY KEY, created_at REAL);
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY, conversation_id TEXT, role TEXT, content TEXT, token_count INTEGER,
    cost TEXT, trace_session_id TEXT, created_at REAL
);
"""


def calculate_cost(model: str, input_tokens: int, output_tokens: int) -> dict[str, float]:
    price_in, price_out = PRICES.get(model, (3.0, 15.0))
    total = input_tokens * price_in / 1e6 + output_tokens * price_out / 1e6
    return {"totalCost": total}


def create_app(database: str, base_url: str, api_key: str, model: str) -> Starlette:
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        db = await aiosqlite.connect(database)
        await db.executescript(SCHEMA)
        await db.commit()
        client = httpx.AsyncClient()  # DEFAULT limits and timeout: that is the point
        state.update(db=db, client=client)
        try:
            yield
        finally:
            await client.aclose()
            await db.close()

    async def stream_message(message: str) -> dict[str, Any]:
        """The note's service: record the turn, call the API with stream: true, return the raw body."""
        db: aiosqlite.Connection = state["db"]
        conversation_id = str(uuid.uuid4())
        trace_session_id = str(uuid.uuid4())
        await db.execute("INSERT INTO conversations (id, created_at) VALUES (?, ?)", (conversation_id, time.time()))
        await db.execute(
            "INSERT INTO messages (id, conversation_id, role, content, created_at) VALUES (?, ?, 'user', ?, ?)",
            (str(uuid.uuid4()), conversation_id, message, time.time()))
        await db.commit()
        request = state["client"].build_request(
            "POST", base_url.rstrip("/") + "/v1/messages",
            headers={"x-api-key": api_key, "anthropic-version": "2023-06-01", "content-type": "application/json"},
            content=json.dumps({"model": model, "max_tokens": 1024, "stream": True,
                                "messages": [{"role": "user", "content": message}]}),
        )
        response = await state["client"].send(request, stream=True)
        return {"body": response, "traceSessionId": trace_session_id, "conversationId": conversation_id,
                "agentModel": model, "startedAt": time.time()}

    async def handle_send_message(request: Request) -> Response:
        """The note's controller."""
        payload = json.loads(await request.body())
        result = await stream_message(payload["message"])

        async def relay() -> AsyncIterator[str]:
            response: httpx.Response = result["body"]
            decoder = codecs.getincrementaldecoder("utf-8")()
            buffer = ""
            full_response = ""
            input_tokens = 0
            output_tokens = 0
            try:
                async for value in response.aiter_bytes():
                    buffer += decoder.decode(value)
                    lines = buffer.split("\n")
                    buffer = lines.pop() or ""
                    for line in lines:
                        if line.startswith("data: "):
                            event = json.loads(line[6:])
                            if event["type"] == "message_start":
                                input_tokens = (event.get("message") or {}).get("usage", {}).get("input_tokens") or 0
                            if event["type"] == "message_delta":
                                output_tokens += (event.get("usage") or {}).get("output_tokens") or 0
                            if event["type"] == "content_block_delta":
                                text = event["delta"]["text"]
                                full_response += text
                                yield f"event: chunk\ndata: {json.dumps({'text': text}, separators=(',', ':'))}\n\n"
                cost = calculate_cost(result["agentModel"], input_tokens, output_tokens)
                summary = {"inputTokens": input_tokens, "outputTokens": output_tokens,
                           "totalCost": round(cost["totalCost"], 6)}
                yield f"event: cost\ndata: {json.dumps(summary, separators=(',', ':'))}\n\n"
                yield "event: done\ndata: {}\n\n"
                db: aiosqlite.Connection = state["db"]
                await db.execute(
                    "INSERT INTO messages (id, conversation_id, role, content, token_count, cost, trace_session_id,"
                    " created_at) VALUES (?, ?, 'assistant', ?, ?, ?, ?, ?)",
                    (str(uuid.uuid4()), result["conversationId"], full_response, output_tokens,
                     f"{cost['totalCost']:.6f}", result["traceSessionId"], time.time()))
                await db.commit()
            finally:
                await response.aclose()  # the note's reply.raw.end(): always close

        return StreamingResponse(relay(), media_type="text/event-stream")

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[Route("/api/command-center/message", handle_send_message, methods=["POST"]),
                             Route("/healthz", healthz)], lifespan=lifespan)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.baselines.seed_relay", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--database", required=True, help="SQLite file")
    args = parser.parse_args()
    # Served as the relay is (same uvicorn settings), so the two differ only in the app.
    serve_like_relay(lambda: create_app(args.database, os.environ.get("ANTHROPIC_BASE_URL", "https://api.anthropic.com"),
                                        os.environ.get("ANTHROPIC_API_KEY", ""),
                                        os.environ.get("RELAY_MODEL", "claude-sonnet-4-5")), args.port)


if __name__ == "__main__":
    main()
