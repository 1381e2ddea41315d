"""Who is asking: API tokens (Authorization: Bearer) and browser sessions (an HttpOnly cookie).

Tokens and session secrets are 256-bit random strings shown once; the database keeps
their SHA-256 only. A salted slow hash guards guessable passwords; a random 256-bit
secret cannot be guessed, so a fast hash loses nothing and keeps every request cheap.

With no active user the server is open (one anonymous user), but only where the
settings allow it: bound to a loopback address, or RELAY_ALLOW_ANONYMOUS=1.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from starlette.requests import cookie_parser
from starlette.types import Scope

from .config import Settings
from .errors import ForbiddenError, UnauthorizedError
from .flight import SingleFlight
from .store import Store

log = logging.getLogger("deltarelay.auth")

TOKEN_PREFIX = "drt_"
SESSION_PREFIX = "drs_"
SESSION_COOKIE = "deltarelay_session"
_SECRET_LIMIT = 200  # longer than any secret we issue: refuse before hashing megabytes
TOKEN, SESSION = "token:", "session:"  # the kinds of secret, as prefixes of their cache keys


@dataclass(frozen=True, slots=True)
class User:
    """The one asking. `id` None is the anonymous user of open mode."""

    id: str | None
    name: str
    admin: bool = False

    def can_see(self, owner_id: str | None) -> bool:
        """Whether this user may read (and watch, and cancel) what owner_id owns."""
        return self.admin or owner_id == self.id


ANONYMOUS = User(None, "anonymous")


def new_secret(prefix: str = TOKEN_PREFIX) -> str:
    return prefix + secrets.token_urlsafe(32)


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def valid_user_name(name: str) -> bool:
    return 0 < len(name) <= 64 and all(c.isascii() and (c.isalnum() or c in "._@-") for c in name)


def _user(row: dict[str, Any]) -> User:
    return User(str(row["id"]), str(row["name"]), bool(row["is_admin"]))


def header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str | None:
    """One header of an ASGI scope, decoded as latin-1 as HTTP allows."""
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


def own_origin(scope: Scope) -> str:
    """The origin a browser sends for a page this server served: scheme://host[:port]."""
    host = header(scope["headers"], b"host") or ""
    secure = scope.get("scheme") in ("https", "wss")
    return f"{'https' if secure else 'http'}://{host}".lower()


class Watched(Protocol):
    """An open connection that authenticated once (a WebSocket): its credential is checked again while open."""

    scope: Scope
    user: User

    def credential_ended(self) -> None:
        """The credential no longer gives `user`: revoked, expired, signed out, or open mode ended."""


class Authenticator:
    """Turns a request's credentials into a User; caches answers for auth_cache_seconds.

    The cache bounds the database reads per request to about one per user per few seconds;
    a revoked token therefore works for at most auth_cache_seconds more on each instance.
    Concurrent lookups of one secret (or of open mode) share one read. An open WebSocket
    authenticated only at its handshake: while watched, its credential is checked again
    every recheck_seconds against answers at most that old, so the socket learns of a revoke
    within auth_cache_seconds (at least 0.5 s).
    """

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self._cache: dict[str, tuple[float, User | None]] = {}  # kind + digest -> (read at, user)
        self._open_read_at = -float("inf")
        self._open = False
        self._user_reads: SingleFlight[str, User | None] = SingleFlight()
        self._open_reads: SingleFlight[str, bool] = SingleFlight()
        self._watched: set[Watched] = set()
        self._rechecks: asyncio.Task[None] | None = None

    @property
    def recheck_seconds(self) -> float:
        return max(self.settings.auth_cache_seconds / 2, 0.25)

    async def open_mode(self, max_age: float | None = None) -> bool:
        """No active user exists and the settings allow anonymous use (known at most max_age seconds ago)."""
        if not (self.settings.loopback or self.settings.allow_anonymous):
            return False
        age = self.settings.auth_cache_seconds if max_age is None else max_age
        if time.monotonic() - self._open_read_at >= age:
            return await self._open_reads.run("open", self._read_open_mode)
        return self._open

    async def _read_open_mode(self) -> bool:
        started = time.monotonic()
        self._open = await self.store.active_user_count() == 0
        self._open_read_at = started
        return self._open

    async def user(self, scope: Scope, max_age: float | None = None) -> User:
        """The user behind a request or WebSocket handshake; cached answers at most max_age seconds old
        (default auth_cache_seconds).

        Raises:
            UnauthorizedError: no valid credentials, and the server is not open.
            ForbiddenError: a cookie-authenticated request from another site's page.
        """
        headers = scope["headers"]
        if scope["type"] == "websocket":
            # Every handshake, Bearer or not: another site's page must not drive a socket (CSWSH).
            self.check_origin(scope)
        authorization = header(headers, b"authorization")
        if authorization is not None:
            # Browsers never add this header on their own, so another site's page cannot make use of it.
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise UnauthorizedError("the Authorization header must be: Bearer <token>")
            user = await self._lookup(token.strip(), TOKEN, max_age)
            if user is None:
                raise UnauthorizedError("this token is not valid (unknown or revoked)")
            return user
        # A cookie (or open mode) rides along on any site's request: changes must come from an allowed page.
        if scope["type"] == "http" and scope.get("method") not in ("GET", "HEAD"):
            self.check_origin(scope)
        session = session_secret(headers)
        if session is not None:
            user = await self._lookup(session, SESSION, max_age)
            if user is not None:
                return user
            if not await self.open_mode(max_age):
                raise UnauthorizedError("your session has ended; sign in again")
        if await self.open_mode(max_age):
            if not self.settings.allow_anonymous and not _loopback_host(header(headers, b"host")):
                # DNS rebinding: another site's name pointed at 127.0.0.1 must not reach an open server.
                raise ForbiddenError("an open server answers only requests addressed to localhost")
            return ANONYMOUS
        raise UnauthorizedError("sign in: send Authorization: Bearer <token>, or POST the token to /api/session")

    def check_origin(self, scope: Scope) -> None:
        """Refuse a browser request whose page came from a site that is not this one or an allowed one.

        Requests without Origin come from non-browser clients, which cross-site attacks cannot use.
        """
        origin = header(scope["headers"], b"origin")
        if origin is None:
            return
        origin = origin.rstrip("/").lower()
        if origin == own_origin(scope) or origin in self.settings.origins:
            return
        raise ForbiddenError(f"requests from {origin[:100]} are not allowed (set RELAY_ALLOWED_ORIGINS)")

    async def _lookup(self, secret: str, kind: str, max_age: float | None = None) -> User | None:
        """The user of a token (kind TOKEN) or session secret (SESSION); None: unknown, revoked or expired."""
        if len(secret) > _SECRET_LIMIT:
            return None
        # Keyed by kind too: a session secret sent as a token is not a token.
        key = kind + secret_hash(secret)
        age = self.settings.auth_cache_seconds if max_age is None else max_age
        cached = self._cache.get(key)
        if cached is None or time.monotonic() - cached[0] >= age:
            return await self._user_reads.run(key, lambda: self._read(key, kind))
        return cached[1]

    async def _read(self, key: str, kind: str) -> User | None:
        started = time.monotonic()  # the answer is as old as the read's start
        find = self.store.user_by_token_hash if kind == TOKEN else self.store.user_by_session_hash
        row = await find(key[len(kind):])
        if len(self._cache) > 10_000:  # unknown secrets are cached too: keep a flood of them bounded
            self._cache.clear()
        user = None if row is None else _user(row)
        self._cache[key] = (started, user)
        return user

    # --- open WebSockets: their credential, checked again while they are open ---

    def watch(self, connection: Watched) -> None:
        """Check `connection`'s credential every recheck_seconds until unwatch(); one task for all of them."""
        self._watched.add(connection)
        if self._rechecks is None or self._rechecks.done():
            self._rechecks = asyncio.create_task(self._recheck_loop(), name="auth-recheck")

    def unwatch(self, connection: Watched) -> None:
        self._watched.discard(connection)

    async def _recheck_loop(self) -> None:
        while self._watched:
            await asyncio.sleep(self.recheck_seconds)
            await self.recheck()

    async def recheck(self) -> int:
        """Tell each watched connection whose credential no longer gives its user; how many were told."""
        ended = 0
        for connection in list(self._watched):
            if connection not in self._watched:
                continue
            try:
                user: User | None = await self.user(connection.scope, max_age=self.recheck_seconds)
            except (UnauthorizedError, ForbiddenError):
                user = None
            except Exception as exc:  # the database is away: keep the sockets, ask again next time
                log.warning("could not check the credentials of open WebSockets: %s", exc)
                return ended
            if user != connection.user:
                self._watched.discard(connection)
                connection.credential_ended()
                ended += 1
        return ended

    async def sign_in(self, token: str) -> tuple[User, str, int]:
        """A new session for a valid token: (user, the session secret for the cookie, its max-age in seconds).

        Raises:
            UnauthorizedError: the token is not valid.
        """
        user = await self._lookup(token, TOKEN) if token else None
        if user is None or user.id is None:
            raise UnauthorizedError("this token is not valid (unknown or revoked)")
        secret = new_secret(SESSION_PREFIX)
        lifetime = timedelta(hours=self.settings.session_hours)
        expires = (datetime.now(UTC) + lifetime).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        await self.store.create_session(secret_hash(secret), user.id, expires)
        return user, secret, int(lifetime.total_seconds())

    async def sign_out(self, headers: Iterable[tuple[bytes, bytes]]) -> None:
        secret = session_secret(headers)
        if secret is not None and len(secret) <= _SECRET_LIMIT:
            digest = secret_hash(secret)
            self._cache.pop(SESSION + digest, None)
            await self.store.delete_session(digest)


def _loopback_host(host: str | None) -> bool:
    if not host:
        return True  # HTTP/1.0 clients send none; browsers always do
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def session_secret(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    cookie = header(headers, b"cookie")
    if not cookie:
        return None
    return cookie_parser(cookie).get(SESSION_COOKIE) or None
