"""A bare Starlette WebSocket endpoint served as the relay is (same uvicorn settings): the idle-socket floor.

    python -m bench.baselines.bare_ws --port 8200 [--protocol uvicorn|relay]

--protocol uvicorn (the default, the floor issue 5 names): uvicorn's own websockets-sansio protocol;
relay: the relay's trimmed subclass of it, to show what the trimming alone saves a bare endpoint.

GET /ws accepts and then only waits for frames (a "ping" text frame gets "pong"); GET /healthz answers ok.
"""

from __future__ import annotations

import argparse

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from .serve import serve_like_relay


async def endpoint(websocket: WebSocket) -> None:
    await websocket.accept()
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        if message.get("text") == "ping":
            await websocket.send_text("pong")


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


app = Starlette(routes=[WebSocketRoute("/ws", endpoint), Route("/healthz", healthz)])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.baselines.bare_ws", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=8200)
    parser.add_argument("--protocol", choices=["uvicorn", "relay"], default="uvicorn")
    args = parser.parse_args()
    serve_like_relay(lambda: app, args.port, websocket_protocol=args.protocol)


if __name__ == "__main__":
    main()
