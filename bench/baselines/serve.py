"""Serve any ASGI app exactly as the relay serves itself: server.cli.serve with its uvicorn settings.

The baselines must differ from the relay only in the app, so they do not copy uvicorn's options (which
change as the relay is tuned: ws_per_message_deflate, for one) but run the relay's own serve() with
server.app.create_app swapped for their app. One exception on request: `websocket_protocol="uvicorn"` serves
WebSockets with uvicorn's own websockets-sansio protocol (only its per-socket log lines silenced, as the
relay's are), not the relay's trimmed subclass (server/transports/ws_protocol.py), which is part of what the
relay's memory figures measure.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import server.app
import server.cli
from server.cli import serve
from server.config import load_settings


def serve_like_relay(make_app: Callable[[], Any], port: int, host: str = "127.0.0.1",
                     websocket_protocol: str = "relay") -> None:
    """Run `make_app()` under the relay's uvicorn configuration until SIGTERM."""
    if websocket_protocol == "uvicorn":
        server.cli.relay_websocket_protocol = _uvicorn_websocket_protocol  # type: ignore[assignment]
    settings = load_settings(host=host, port=str(port))
    app = make_app()
    server.app.create_app = lambda _settings, *args, **kwargs: app
    serve(settings)


def _uvicorn_websocket_protocol(quiet: bool, guard: object = None) -> type:
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    quiet_log = logging.getLogger("bench.websockets")
    quiet_log.setLevel(logging.WARNING)

    class UvicornWebSocketProtocol(WebSocketsSansIOProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.logger = self.conn.logger = quiet_log

    return UvicornWebSocketProtocol
