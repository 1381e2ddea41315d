"""The ASGI application: routes, error handling, and the shared clients its lifespan owns."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from . import api
from .config import Settings
from .core import Relay
from .errors import RelayError
from .hub import StreamHub
from .store import Store
from .transports import sse, websocket
from .upstream.anthropic import AnthropicUpstream
from .upstream.offline import OfflineOptions, OfflineTransport

log = logging.getLogger("deltarelay")

ROOT = Path(__file__).resolve().parent.parent
STATIC = ROOT / "static"
CLIENT = ROOT / "client"


def upstream_transport(settings: Settings) -> httpx.AsyncBaseTransport | None:
    """The offline model when there is no API key; else httpx's own network transport."""
    if settings.offline:
        return OfflineTransport(OfflineOptions(delay_ms=settings.offline_delay_ms, words=settings.offline_words))
    return None


async def relay_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RelayError)
    headers = {"retry-after": str(int(exc.retry_after + 0.999))} if exc.retry_after else None
    return JSONResponse(exc.to_json(), status_code=exc.status, headers=headers)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return JSONResponse({"error": {"code": code, "message": str(exc.detail)}}, status_code=exc.status_code,
                        headers=exc.headers)


async def internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"error": {"code": "internal_error", "message": "internal server error"}}, status_code=500)


async def index(request: Request) -> Response:
    return FileResponse(STATIC / "index.html")


async def favicon(request: Request) -> Response:
    return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")


MESSAGE_PATH = "/api/command-center/message"


class RelayApp(Starlette):
    """Starlette, with POST /api/command-center/message (SSE) taken before its middleware and router.

    For a function endpoint Starlette wraps `send` three times (server errors, the exception middleware,
    the route's own exception wrapper) and builds a Request in each of two layers: every chunk of every
    SSE stream went through those wrappers. Here that endpoint gets the same outcomes directly: a
    RelayError becomes its JSON error, any other exception before the response a logged 500 and then the
    server's own report, as ServerErrorMiddleware does. (The WebSocket endpoint has two wrappers per frame;
    taking it too measured no difference, so it stays a route.)
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == MESSAGE_PATH and scope["method"] == "POST":
            scope["app"] = self
            await self._post_message(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)

    async def _post_message(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive, send)
        try:
            response = await sse.post_message(request)
        except RelayError as exc:
            response = await relay_error(request, exc)
        except Exception as exc:
            await (await internal_error(request, exc))(scope, receive, send)
            raise
        await response(scope, receive, send)


def create_app(settings: Settings, transport: httpx.AsyncBaseTransport | None = None) -> Starlette:
    """The app for `settings`; `transport` replaces the upstream's network (tests)."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        store = Store(settings.database_url, group_commit=settings.sqlite_group_commit_ms / 1000)
        await store.connect()
        left = await store.interrupt_unfinished()
        if left:
            log.warning("marked %d answers left unfinished by an earlier run as interrupted", left)
        offline = transport is None and settings.offline
        upstream = AnthropicUpstream(settings, transport or upstream_transport(settings),
                                     base_url="http://offline-model.invalid" if offline else None)
        hub = StreamHub(settings.stream_log_events, settings.stream_retention_seconds,
                        settings.subscriber_queue_events, settings.keepalive_seconds,
                        settings.stream_retention_max)
        hub.start()
        app.state.store = store
        app.state.hub = hub
        app.state.relay = Relay(settings, store, upstream, hub)
        app.state.settings = settings
        # Everything made at start lives for the process: keep it out of every later collection.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            await hub.shutdown(settings.shutdown_grace_seconds)
            await upstream.aclose()
            await store.disconnect()

    routes = [
        Route("/", index),
        Route("/favicon.ico", favicon),
        Route("/healthz", api.healthz),
        Route("/api/conversations", api.list_conversations),
        Route("/api/conversations/{conversation_id}/messages", api.list_messages),
        Route(MESSAGE_PATH, sse.post_message, methods=["POST"]),  # taken by RelayApp first; here for 405s
        Route("/api/command-center/streams/{stream_id}", sse.get_stream),
        Route("/api/command-center/streams/{stream_id}/cancel", sse.cancel_stream, methods=["POST"]),
        WebSocketRoute("/api/command-center/ws", websocket.WebSocketEndpoint()),
        Mount("/static", StaticFiles(directory=STATIC, check_dir=False), name="static"),
        Mount("/client", StaticFiles(directory=CLIENT, check_dir=False), name="client"),
    ]
    return RelayApp(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={RelayError: relay_error, HTTPException: http_error, Exception: internal_error},
    )
