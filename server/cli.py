"""Command line: `deltarelay` (or `python -m server`) runs the server."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from types import FrameType
from typing import Any

from .config import ConfigError, Settings, load_settings


def _serve_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="address to bind (HOST, default 127.0.0.1)")
    parser.add_argument("--port", help="port to bind (PORT, default 8000)")
    parser.add_argument("--database-url", help="sqlite:///file.db or postgresql://... (DATABASE_URL)")
    parser.add_argument("--model", help="default model (RELAY_MODEL)")
    parser.add_argument("--log-level", help="critical, error, warning, info or debug (RELAY_LOG_LEVEL)")


def serve(settings: Settings) -> None:
    import uvicorn

    from .app import create_app

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per upstream request is noise at scale
    log = logging.getLogger("deltarelay")
    if settings.offline:
        log.warning("no ANTHROPIC_API_KEY: answers come from the built-in offline demo model")
    log.info("deltarelay on http://%s:%d (database %s)", settings.host, settings.port,
             settings.database_url.split("@")[-1])
    app = create_app(settings)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # SIGTERM: refuse new answers at once; running ones get the grace period.
            hub = getattr(app.state, "hub", None)
            if hub is not None:
                hub.begin_shutdown()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.access_log,
        loop="auto",  # uvloop when installed
        http="auto",  # httptools when installed
        ws=quiet_websocket_protocol(settings),
        ws_ping_interval=settings.keepalive_seconds,
        # Answers are small text frames: compression costs more CPU than it saves, and a zlib context per socket.
        ws_per_message_deflate=False,
        lifespan="on",
        timeout_graceful_shutdown=max(1, int(settings.shutdown_grace_seconds)),
    )
    Server(config).run()


def quiet_websocket_protocol(settings: Settings) -> type:
    """uvicorn's websockets-sansio protocol without its INFO lines per WebSocket, unless the access log is on.

    Every WebSocket logged two lines at INFO through uvicorn's error logger: uvicorn's
    '"WebSocket /path" [accepted]' (an access-log line, logged even with the access log off) and the
    websockets library's "connection open". At 500 new sockets a second that was ~9% of the relay's CPU
    (formatting, the caller's frame lookup, a write per line). Warnings and errors still show; with
    RELAY_ACCESS_LOG=1 or at debug level, everything does.
    """
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    # Not under "uvicorn.": uvicorn's logging setup resets the levels of its loggers' children.
    socket_log = logging.getLogger("deltarelay.websockets")
    quiet = not settings.access_log and settings.log_level.lower() != "debug"
    socket_log.setLevel(logging.WARNING if quiet else logging.NOTSET)

    class Protocol(WebSocketsSansIOProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.logger = socket_log
            self.conn.logger = socket_log

    return Protocol


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deltarelay", description="Stream model answers to browsers.")
    sub = parser.add_subparsers(dest="command")
    _serve_parser(parser)
    _serve_parser(sub.add_parser("serve", help="run the server (the default)"))
    args = parser.parse_args(argv)
    try:
        settings = load_settings(
            host=args.host, port=args.port, database_url=args.database_url, model=args.model,
            log_level=args.log_level,
        )
    except ConfigError as exc:
        print(f"deltarelay: {exc}", file=sys.stderr)
        return 2
    serve(settings)
    return 0
