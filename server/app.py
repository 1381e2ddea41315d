"""The ASGI application: routes, error handling, and the shared clients its lifespan owns."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import api, assets
from .budget import Ledger, LocalLedger, RedisLedger
from .config import Settings
from .core import Relay, save_orphan
from .errors import RelayError
from .hub import Orphan, StreamHub
from .limits import Limits
from .store import Store
from .transports import sse, websocket
from .upstream.anthropic import AnthropicUpstream
from .upstream.offline import OfflineOptions, OfflineTransport

log = logging.getLogger("deltarelay")


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


# The page loads only its own files: no inline script, no framing, no sniffing (issue 6). Images may be blob:
# URLs too: the thumbnails of attachments are object URLs the page's own script made of the user's files.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self';"
    " object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]
# Event streams carry their own headers: wrapping their every write would cost each chunk a layer.
_STREAM_PATHS = ("/api/command-center/message", "/api/command-center/streams/")


class SecurityHeaders:
    """Adds SECURITY_HEADERS to every HTTP answer but the event streams'."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or (path.startswith(_STREAM_PATHS) and not path.endswith("/cancel")):
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def index(request: Request) -> Response:
    return FileResponse(assets.static_dir() / "index.html")


async def usage_page(request: Request) -> Response:
    return FileResponse(assets.static_dir() / "usage.html")


async def favicon(request: Request) -> Response:
    return FileResponse(assets.static_dir() / "favicon.svg", media_type="image/svg+xml")


def make_hub(settings: Settings, store: Store) -> StreamHub:
    """In-process for one instance; with REDIS_URL, the hub that several instances share."""
    sizes = (settings.stream_log_events, settings.stream_retention_seconds, settings.subscriber_queue_events,
             settings.keepalive_seconds, settings.stream_retention_max)
    if settings.redis_url is None:
        return StreamHub(*sizes)
    from .redis_hub import RedisStreamHub

    async def save(orphan: Orphan) -> bool:
        return await save_orphan(store, orphan)

    return RedisStreamHub(settings.redis_url, *sizes, prefix=settings.redis_prefix,
                          lease_seconds=settings.instance_lease_seconds,
                          write_interval=settings.redis_write_ms / 1000, on_orphan=save,
                          on_instance_gone=store.interrupt_instance)


def make_ledger(settings: Settings, hub: StreamHub) -> Ledger:
    """Budget reservations in this process for one instance; with REDIS_URL, in Redis for all of them."""
    if settings.redis_url is None:
        return LocalLedger()
    from .redis_hub import RedisStreamHub

    assert isinstance(hub, RedisStreamHub)
    return RedisLedger(hub.redis, settings.redis_prefix, hub.instance_id, hub._alive_key)


MESSAGE_PATH = "/api/command-center/message"
WEBSOCKET_PATH = "/api/command-center/ws"


# A full collection walks every live object: with 1,000 streams (~150,000 objects) it stopped the event loop for
# 50-90 ms, three or four times in a 17-second run, and set the p99 chunk latency. The oldest generation is
# collected after 100 middle ones (Python's default: 10), about once a minute at that load; the young ones as usual.
GC_THRESHOLDS = (700, 10, 100)


class RelayApp(Starlette):
    """Starlette, with the two streaming endpoints taken before its middleware and router.

    POST /api/command-center/message (SSE): for a function endpoint Starlette wraps `send` three times (server
    errors, the exception middleware, the route's own exception wrapper) and builds a Request in each of two
    layers: every chunk of every SSE stream went through those wrappers. Here that endpoint gets the same
    outcomes directly: a RelayError becomes its JSON error, any other exception before the response a logged
    500 and then the server's own report, as ServerErrorMiddleware does.

    The WebSocket (/api/command-center/ws): the middleware only passes a socket through, but each layer kept
    a coroutine for the socket's life (about 1.5 KB a socket) and cost every start its calls.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == MESSAGE_PATH and scope["method"] == "POST":
            scope["app"] = self
            await self._post_message(scope, receive, send)
        elif scope["type"] == "websocket" and scope["path"] == WEBSOCKET_PATH:
            scope["app"] = self
            await websocket.WebSocketEndpoint()(scope, receive, send)
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
        store = Store(settings.database_url, group_commit=settings.sqlite_group_commit_ms / 1000,
                      pool_size=settings.database_pool_size,
                      synchronous_answers=settings.postgres_synchronous_commit)
        await store.connect()
        hub = make_hub(settings, store)
        try:
            await store.hold_instance(hub.instance_id)
            await hub.open()
            # Only answers no live instance is generating: another instance's running ones are left alone
            # (alive in the hub's eyes or holding their lease in the database, as a process draining does).
            left = await store.interrupt_unfinished(await hub.live_instances())
        except BaseException:
            await hub.close()
            await store.disconnect()
            raise
        if left:
            log.warning("marked %d answers left unfinished by an earlier run as interrupted", left)
        offline = transport is None and settings.offline
        upstream = AnthropicUpstream(settings, transport or upstream_transport(settings),
                                     base_url="http://offline-model.invalid" if offline else None)
        if upstream.proxy is not None:
            log.info("upstream requests go through the proxy %s", upstream.proxy)
        app.state.store = store
        app.state.hub = hub
        relay = Relay(settings, store, upstream, hub, Limits(settings, store, make_ledger(settings, hub)))
        app.state.relay = relay
        await relay.auth.start()  # the JWKS's first fetch (a JWKS that is down is a warning, not a stop)
        if await relay.auth.open_mode():
            log.warning("open mode: no users exist, so anyone who can reach %s:%d may use this server and spend;"
                        " add one with `deltarelay users add NAME`", settings.host, settings.port)
        app.state.settings = settings
        progress = asyncio.create_task(relay.save_progress(), name="partial-saves")
        # Everything made at start lives for the process: keep it out of every later collection.
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        try:
            yield
        finally:
            await hub.shutdown(settings.shutdown_grace_seconds)
            progress.cancel()
            await relay.limits.aclose()  # the budget entries of the answers just saved, before Redis goes
            await hub.close()
            await upstream.aclose()
            await relay.auth.close()
            await store.disconnect()

    routes = [
        Route("/", index),
        Route("/favicon.ico", favicon),
        Route("/healthz", api.healthz),
        Route("/readyz", api.readyz),
        Route("/metrics", api.metrics),
        Route("/usage", usage_page),
        Route("/api/usage", api.usage),
        Route("/api/session", api.get_session, methods=["GET"]),
        Route("/api/session", api.create_session, methods=["POST"]),
        Route("/api/session", api.delete_session, methods=["DELETE"]),
        Route("/api/conversations", api.list_conversations),
        Route("/api/attachments", api.upload_attachment, methods=["POST"]),
        Route("/api/attachments/{attachment_id}", api.get_attachment),
        Route("/api/conversations/{conversation_id}", api.update_conversation, methods=["PATCH"]),
        Route("/api/conversations/{conversation_id}", api.delete_conversation, methods=["DELETE"]),
        Route("/api/conversations/{conversation_id}/messages", api.list_messages),
        Route("/api/conversations/{conversation_id}/active-leaf", api.set_active_leaf, methods=["PUT"]),
        Route(MESSAGE_PATH, sse.post_message, methods=["POST"]),  # taken by RelayApp first; here for 405s
        Route("/api/command-center/streams/{stream_id}", sse.get_stream),
        Route("/api/command-center/streams/{stream_id}/cancel", sse.cancel_stream, methods=["POST"]),
        WebSocketRoute(WEBSOCKET_PATH, websocket.WebSocketEndpoint()),  # taken by RelayApp first
        Mount("/static", assets.static_files(), name="static"),
        Mount("/client", assets.client_files(), name="client"),
    ]
    return RelayApp(
        routes=routes,
        lifespan=lifespan,
        middleware=[Middleware(SecurityHeaders)],
        exception_handlers={RelayError: relay_error, HTTPException: http_error, Exception: internal_error},
    )
