"""An app that embeds deltarelay: its own (demo) user, signed in by the app, streams through deltarelay.

The app never shares a user table with deltarelay: it signs a short-lived HS256 JWT for its signed-in user at
`GET /token` (PyJWT), with the secret deltarelay was started with (RELAY_JWT_SECRET), and its page passes
`getToken` to the deltarelay client, which sends the token on the WebSocket's first frame and asks for a new
one before it expires. Run it with one command (see README.md):

    RELAY_JWT_SECRET=... RELAY_URL=http://127.0.0.1:8000 python examples/embedding/app.py

Settings (environment): RELAY_JWT_SECRET (required, the relay's), RELAY_URL (default http://127.0.0.1:8000),
TOKEN_SECONDS (the tokens' lifetime, default 300), HOST and PORT (default 127.0.0.1:8001).
"""

from __future__ import annotations

import html
import os
import secrets
import sys
import time
from pathlib import Path

import jwt
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route

from server.assets import client_files

HERE = Path(__file__).parent
SESSION_COOKIE = "example_session"
# The app's own user: a real app takes it from its login; this one signs everyone in as the demo user.
DEMO_USER = {"sub": "demo-user-1", "name": "Demo User"}


def create_app(secret: str, relay_url: str, token_seconds: int) -> Starlette:
    """The app: `/` (signs the visitor in as the demo user, serves the page), `/token` (a JWT for the signed-in
    user; 401 without the app's session), `/page.js`, and deltarelay's client module at `/client/`."""
    sessions: dict[str, dict[str, str]] = {}  # the app's session id -> its user

    async def page(request: Request) -> Response:
        body = (HERE / "index.html").read_text().replace("{{RELAY_URL}}", html.escape(relay_url, quote=True))
        response = HTMLResponse(body, headers={"Cache-Control": "no-store"})
        if request.cookies.get(SESSION_COOKIE) not in sessions:
            session = secrets.token_urlsafe(24)
            sessions[session] = DEMO_USER
            response.set_cookie(SESSION_COOKIE, session, httponly=True, samesite="strict")
        return response

    async def token(request: Request) -> Response:
        user = sessions.get(request.cookies.get(SESSION_COOKIE, ""))
        if user is None:
            return JSONResponse({"error": {"code": "unauthorized", "message": "sign in first"}}, status_code=401)
        now = int(time.time())
        claims = {**user, "iat": now, "exp": now + token_seconds}
        return JSONResponse({"token": jwt.encode(claims, secret, algorithm="HS256")},
                            headers={"Cache-Control": "no-store"})

    async def script(request: Request) -> Response:
        return Response((HERE / "page.js").read_text(), media_type="text/javascript")

    return Starlette(routes=[
        Route("/", page),
        Route("/token", token),
        Route("/page.js", script),
        # The client module as deltarelay serves it, from this origin: a module import from the relay's
        # origin would need CORS headers, which deltarelay does not send. An app with a bundler uses the
        # npm package instead.
        Mount("/client", app=client_files()),
    ])


def main() -> None:
    secret = os.environ.get("RELAY_JWT_SECRET", "")
    if len(secret.encode()) < 32:
        sys.exit("set RELAY_JWT_SECRET to the relay's secret (at least 32 bytes)")
    app = create_app(secret, os.environ.get("RELAY_URL", "http://127.0.0.1:8000").rstrip("/"),
                     int(os.environ.get("TOKEN_SECONDS", "300")))
    uvicorn.run(app, host=os.environ.get("HOST", "127.0.0.1"), port=int(os.environ.get("PORT", "8001")))


if __name__ == "__main__":
    main()
