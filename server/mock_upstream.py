"""The offline model as its own Anthropic-compatible HTTP server, for development and benchmarks.

    python -m server.mock_upstream --port 9000 [--delay-ms 40] [--words 0] [--error MODE] [--error-message TEXT]
                                   [--stamp] [--api-key KEY] [--context-window TOKENS] [--pause-turn]

Point the relay at it with ANTHROPIC_BASE_URL=http://127.0.0.1:9000 and any ANTHROPIC_API_KEY (or KEY,
when --api-key makes it refuse every other key with the API's 401). A request may override the options
with headers x-mock-delay-ms, x-mock-words, x-mock-error, x-mock-context-window (refuse requests over this
many tokens, as the API refuses one over the model's window). It answers POST /v1/messages and the Models
API (GET /v1/models, GET /v1/models/{id}: the models server/pricing.py has a price for), and
POST /v1/messages/count_tokens with the emulated count (server/protocol/tokens.py). Messages requests
go through the emulated prompt cache (server/upstream/offline.py, PromptCache), one for the server's life.

Beyond plain text (server/upstream/shapes.py; docs/configuration.md, "Thinking, web search, tool calls"): a
request with `thinking: {type: enabled}` starts its answer with a signed thinking block; the directive `[search]`
in the newest user message (with a `web_search_*` tool offered) streams a web search with its results and cited
text; `[tool]` (with client tools) calls the first tool, input built from its input_schema, stop_reason
tool_use; a last message of tool results is answered with text quoting them. The header `x-mock-pause-turn: 1`
makes a `[search]` round stop with pause_turn after the results. Requests the API would refuse (tool results
not paired with the previous tool calls, a thinking signature this process did not issue for that text, a
malformed image or document block, a thinking budget out of bounds) get its 400 invalid_request_error.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import replace
from typing import Any

import orjson

from .pricing import PRICES, resolve_model
from .protocol.tokens import request_tokens
from .upstream.offline import (
    ERROR_MODES,
    OfflineOptions,
    PromptCache,
    anthropic_stream,
    context_refusal,
    error_body,
    error_status,
    request_refusal,
)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def _overrides(options: OfflineOptions, headers: dict[bytes, bytes]) -> OfflineOptions:
    changes: dict[str, Any] = {}
    if b"x-mock-delay-ms" in headers:
        changes["delay_ms"] = float(headers[b"x-mock-delay-ms"])
    if b"x-mock-words" in headers:
        changes["words"] = int(headers[b"x-mock-words"])
    if b"x-mock-error" in headers:
        changes["error"] = headers[b"x-mock-error"].decode()
    if b"x-mock-context-window" in headers:
        changes["context_window"] = int(headers[b"x-mock-context-window"])
    if b"x-mock-pause-turn" in headers:
        changes["pause_turn"] = headers[b"x-mock-pause-turn"] == b"1"
    return replace(options, **changes) if changes else options


def _error(kind: str, message: str) -> bytes:
    return orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})


def _model(model_id: str) -> dict[str, str]:
    return {"type": "model", "id": model_id, "display_name": model_id, "created_at": "2025-01-01T00:00:00Z"}


async def _models(send: Send, path: str, headers: dict[bytes, bytes]) -> None:
    """The Models API: GET /v1/models lists the priced models; GET /v1/models/{id} finds one (aliases too)."""
    if b"anthropic-version" not in headers:
        await _respond(send, 400, _error("invalid_request_error", "anthropic-version: header is required"))
        return
    if path == "/v1/models":
        data = [_model(model_id) for model_id in sorted(PRICES)]
        await _respond(send, 200, orjson.dumps({"data": data, "has_more": False, "first_id": data[0]["id"],
                                                "last_id": data[-1]["id"]}))
        return
    model_id = path[len("/v1/models/"):]
    if resolve_model(model_id) is None:
        await _respond(send, 404, _error("not_found_error", f"model: {model_id}"))
        return
    await _respond(send, 200, orjson.dumps(_model(model_id)))


def mock_app(options: OfflineOptions, fail_first: int = 0,
             api_key: str | None = None) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """A bare ASGI app: as little server work per delta as possible, so it can feed a benchmark.

    `fail_first`: only the first N requests fail with options.error; later ones succeed.
    `api_key`: every API request whose x-api-key differs gets the API's 401 `authentication_error`.
    GET /stats tells what it saw: Messages API requests, answers completed, answers whose client hung up, and
    requests refused for length (context_refusal).
    The app emulates the prompt cache (server/upstream/offline.py, PromptCache): one per app, for its life.
    """
    stats = {"requests": 0, "completed": 0, "disconnected": 0, "refused": 0}
    cache = PromptCache()
    expected_key = None if api_key is None else api_key.encode()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        if scope["method"] == "GET" and scope["path"] == "/stats":
            await _respond(send, 200, orjson.dumps(stats))
            return
        headers = dict(scope["headers"])
        if expected_key is not None and scope["path"].startswith("/v1/") \
                and headers.get(b"x-api-key") != expected_key:
            await _respond(send, 401, _error("authentication_error", "invalid x-api-key"))
            return
        if scope["method"] == "GET" and (scope["path"] == "/v1/models" or scope["path"].startswith("/v1/models/")):
            await _models(send, scope["path"], headers)
            return
        if scope["method"] == "POST" and scope["path"] == "/v1/messages/count_tokens":
            await _count_tokens(receive, send)
            return
        if scope["method"] != "POST" or scope["path"] != "/v1/messages":
            await _respond(send, 404, orjson.dumps({"type": "error", "error": {"type": "not_found_error",
                                                                                 "message": "no such route"}}))
            return
        body = await _read_body(receive)
        stats["requests"] += 1
        try:
            request = orjson.loads(body)
            request_options = _overrides(options, headers)
            if "{x-api-key}" in request_options.error_message:  # an upstream that echoes the key it was sent
                request_options = replace(request_options, error_message=request_options.error_message.replace(
                    "{x-api-key}", headers.get(b"x-api-key", b"").decode(errors="replace")))
            if fail_first and stats["requests"] > fail_first:
                request_options = replace(request_options, error="none")
        except (orjson.JSONDecodeError, ValueError):
            await _respond(send, 400, orjson.dumps({"type": "error", "error": {
                "type": "invalid_request_error", "message": "the body is not valid JSON"}}))
            return
        status = error_status(request_options)
        if status is not None:
            await _respond(send, status, error_body(status), [(b"retry-after", b"1")])
            return
        refusal = request_refusal(request)
        if refusal is None:
            refusal = context_refusal(request, request_options)
            if refusal is not None:
                stats["refused"] += 1
        if refusal is not None:
            await _respond(send, 400, refusal)
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                (b"cache-control", b"no-store")]})
        hung_up = asyncio.Event()

        async def watch_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            hung_up.set()

        watcher = asyncio.create_task(watch_disconnect())
        try:
            async for chunk in anthropic_stream(request, request_options, cache):
                if hung_up.is_set():
                    stats["disconnected"] += 1
                    return
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            stats["completed"] += 1
        finally:
            watcher.cancel()

    return app


async def _read_body(receive: Receive) -> bytes:
    """The request's whole body."""
    body = b""
    while True:
        message = await receive()
        body += bytes(message.get("body", b""))
        if not message.get("more_body"):
            return body


async def _count_tokens(receive: Receive, send: Send) -> None:
    """The token-counting endpoint: {"input_tokens": N} by the emulated rule."""
    body = await _read_body(receive)
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError:
        await _respond(send, 400, _error("invalid_request_error", "the body is not valid JSON"))
        return
    if not isinstance(request, dict):
        await _respond(send, 400, _error("invalid_request_error", "the body must be a JSON object"))
        return
    await _respond(send, 200, orjson.dumps({"input_tokens": request_tokens(request)}))


async def _respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m server.mock_upstream", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--delay-ms", type=float, default=40.0, help="pause before each text delta")
    parser.add_argument("--words", type=int, default=0, help="text deltas per answer (0: the demo answer)")
    parser.add_argument("--repeat", type=int, default=1, help="each delta is its word this many times")
    parser.add_argument("--error", choices=ERROR_MODES, default="none", help="fail every request this way")
    parser.add_argument("--error-message", default="Overloaded",
                        help="the message of the overloaded-* modes' error event; {x-api-key} echoes the request's key")
    parser.add_argument("--fail-first", type=int, default=0, help="with --error: only the first N requests fail")
    parser.add_argument("--stamp", action="store_true", help="each delta is 'seq:send_time_ns ' (benchmarks)")
    parser.add_argument("--api-key", help="refuse every other x-api-key with a 401, as the API does")
    parser.add_argument("--pause-turn", action="store_true",
                        help="every [search] round stops with pause_turn after the results (header x-mock-pause-turn)")
    parser.add_argument("--context-window", type=int, default=0,
                        help="refuse requests over this many tokens (0: the model's context window)")
    args = parser.parse_args()
    import uvicorn

    options = OfflineOptions(delay_ms=args.delay_ms, words=args.words, repeat=args.repeat, error=args.error,
                             error_message=args.error_message, stamp=args.stamp, context_window=args.context_window,
                             pause_turn=args.pause_turn)
    uvicorn.run(mock_app(options, args.fail_first, args.api_key), host=args.host, port=args.port, log_level="warning",
                lifespan="on", access_log=False)


if __name__ == "__main__":
    main()
