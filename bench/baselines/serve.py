"""Serve any ASGI app exactly as the relay serves itself: server.cli.serve with its uvicorn settings.

The baselines must differ from the relay only in the app, so they do not copy uvicorn's options (which
change as the relay is tuned: ws_per_message_deflate, for one) but run the relay's own serve() with
server.app.create_app swapped for their app.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import server.app
from server.cli import serve
from server.config import load_settings


def serve_like_relay(make_app: Callable[[], Any], port: int, host: str = "127.0.0.1") -> None:
    """Run `make_app()` under the relay's uvicorn configuration until SIGTERM."""
    settings = load_settings(host=host, port=str(port))
    app = make_app()
    server.app.create_app = lambda _settings, *args, **kwargs: app
    serve(settings)
