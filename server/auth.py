"""Who is asking: API tokens (Authorization: Bearer) and browser sessions (an HttpOnly cookie).

Tokens and session secrets are 256-bit random strings shown once; the database keeps
their SHA-256 only. A salted slow hash guards guessable passwords; a random 256-bit
secret cannot be guessed, so a fast hash loses nothing and keeps every request cheap.

With no active user the server is open (one anonymous user), but only where the
settings allow it: bound to a loopback address, or RELAY_ALLOW_ANONYMOUS=1, and never
when the embedding app's users are configured (a JWT secret, a JWKS or a trusted
proxy header; see identity.py). Those users are (issuer, subject) rows made on first
sight, looked up through the same kind of cache as tokens.
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
from .identity import Claims, TokenVerifier, TrustedHeader, looks_like_jwt
from .store import Store

log = logging.getLogger("deltarelay.auth")

TOKEN_PREFIX = "drt_"
SESSION_PREFIX = "drs_"
SESSION_COOKIE = "deltarelay_session"
_SECRET_LIMIT = 200  # longer than any secret we issue: refuse before hashing megabytes
TOKEN, SESSION = "token:", "session:"  # the kinds of secret, as prefixes of their cache keys
IDENTITY = "identity:"  # the cache key prefix of the app's users: identity:ISSUER NUL SUBJECT


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
        self.tokens = TokenVerifier(settings)
        self.proxy = TrustedHeader(settings) if settings.trusted_user_header else None
        self._identity_reads: SingleFlight[str, User] = SingleFlight()

    async def start(self) -> None:
        if self.tokens.jwks is not None:
            await self.tokens.jwks.start()

    async def close(self) -> None:
        if self.tokens.jwks is not None:
            await self.tokens.jwks.close()

    @property
    def recheck_seconds(self) -> float:
        return max(self.settings.auth_cache_seconds / 2, 0.25)

    async def open_mode(self, max_age: float | None = None) -> bool:
        """No active user exists and the settings allow anonymous use (known at most max_age seconds ago)."""
        if not (self.settings.loopback or self.settings.allow_anonymous) or self.settings.host_identity:
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
            UnauthorizedError: no valid credentials, and the server is not open (TokenExpiredError: an
                expired JWT).
            ForbiddenError: a cookie-authenticated request from another site's page.
        """
        return (await self.credential(scope, max_age))[0]

    async def credential(self, scope: Scope, max_age: float | None = None) -> tuple[User, int | None]:
        """user(), and the `exp` of the JWT that named them (None: a token, a session, a proxy or open mode)."""
        headers = scope["headers"]
        if scope["type"] == "websocket":
            # Every handshake, Bearer or not: another site's page must not drive a socket (CSWSH).
            self.check_origin(scope)
        if self.proxy is not None:
            proxied = await self._proxied_user(scope, max_age)
            if proxied is not None:
                return proxied, None
        authorization = header(headers, b"authorization")
        if authorization is not None:
            # Browsers never add this header on their own, so another site's page cannot make use of it.
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise UnauthorizedError("the Authorization header must be: Bearer <token>")
            return await self.token_user(token.strip(), max_age)
        # A cookie (or open mode) rides along on any site's request: changes must come from an allowed page.
        if scope["type"] == "http" and scope.get("method") not in ("GET", "HEAD"):
            self.check_origin(scope)
        session = session_secret(headers)
        if session is not None:
            user = await self._lookup(session, SESSION, max_age)
            if user is not None:
                return user, None
            if not await self.open_mode(max_age):
                raise UnauthorizedError("your session has ended; sign in again")
        if await self.open_mode(max_age):
            if not self.settings.allow_anonymous and not _loopback_host(header(headers, b"host")):
                # DNS rebinding: another site's name pointed at 127.0.0.1 must not reach an open server.
                raise ForbiddenError("an open server answers only requests addressed to localhost")
            return ANONYMOUS, None
        raise UnauthorizedError("sign in: send Authorization: Bearer <token>, or POST the token to /api/session")

    async def token_user(self, token: str, max_age: float | None = None) -> tuple[User, int | None]:
        """The user of a JWT (told by its shape) or of a `drt_` API token, and the JWT's `exp`.

        Raises:
            TokenExpiredError: an expired JWT.
            UnauthorizedError: any other JWT or token that is not valid.
        """
        if looks_like_jwt(token) and self.tokens.configured:
            claims = await self.tokens.verify(token)
            return await self.identity_user(claims, max_age), claims.expires_at
        user = await self._lookup(token, TOKEN, max_age)
        if user is None:
            raise UnauthorizedError("this token is not valid (unknown or revoked)")
        return user, None

    async def identity_user(self, claims: Claims, max_age: float | None = None) -> User:
        """The app's user (issuer, subject): made on first sight, renamed (and made admin or not) as the
        newest claims say; the database is asked at most every auth_cache_seconds unless they change.

        Raises:
            UnauthorizedError: that user was revoked (`deltarelay users revoke`).
        """
        key = f"{IDENTITY}{claims.issuer}\0{claims.subject}"
        age = self.settings.auth_cache_seconds if max_age is None else max_age
        cached = self._cache.get(key)
        wanted = (claims.name, claims.admin)
        if (cached is None or time.monotonic() - cached[0] >= age or cached[1] is None
                or (cached[1].name, cached[1].admin) != wanted):
            return await self._identity_reads.run(key + f"\0{claims.name}\0{claims.admin}",
                                                  lambda: self._read_identity(key, claims))
        return cached[1]

    async def _read_identity(self, key: str, claims: Claims) -> User:
        started = time.monotonic()
        try:
            row = await self.store.identity_user(claims.issuer, claims.subject, claims.name, claims.admin)
        except ValueError:
            raise
        except Exception:
            # Two instances (or two names) made the same user at once: the unique index let one win; read it.
            row = await self.store.identity_user(claims.issuer, claims.subject, claims.name, claims.admin)
        if len(self._cache) > 10_000:
            self._cache.clear()
        if row["revoked_at"] is not None:
            self._cache[key] = (started, None)
            log.info("refused a revoked user of issuer %s", claims.issuer[:100])
            raise UnauthorizedError("this user was revoked")
        user = _user(row)
        self._cache[key] = (started, user)
        return user

    async def _proxied_user(self, scope: Scope, max_age: float | None) -> User | None:
        """The user a trusted proxy's header names; None when there is no header, or it came from a peer
        outside RELAY_TRUSTED_PROXIES (ignored, and logged once per peer)."""
        proxy = self.proxy
        assert proxy is not None
        name = header(scope["headers"], proxy.user_header)
        if name is None:
            return None
        client = scope.get("client")
        peer = str(client[0]) if client else None
        if not proxy.trusted(peer):
            proxy.ignored(peer)
            return None
        name = name.strip()
        if not name or len(name) > 255:
            raise UnauthorizedError(f"the {proxy.user_header.decode()} header names no user")
        admin = False
        if proxy.admin_header is not None:
            admin = (header(scope["headers"], proxy.admin_header) or "").strip().lower() in ("1", "true", "yes")
        return await self.identity_user(Claims(proxy.issuer, name, name[:64], admin, 0), max_age)

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
        """A new session for a valid API token or JWT: (user, the session secret for the cookie, its max-age in
        seconds). A JWT's session ends no later than its `exp`.

        Raises:
            UnauthorizedError: the token is not valid (TokenExpiredError: an expired JWT).
        """
        if not token:
            raise UnauthorizedError("this token is not valid (unknown or revoked)")
        user, exp = await self.token_user(token)
        if user.id is None:
            raise UnauthorizedError("this token is not valid (unknown or revoked)")
        secret = new_secret(SESSION_PREFIX)
        now = datetime.now(UTC)
        ends = now + timedelta(hours=self.settings.session_hours)
        if exp is not None:
            ends = min(ends, datetime.fromtimestamp(exp, UTC))
        if ends <= now:
            # Inside the leeway, but already past exp: a session would end before it began.
            raise UnauthorizedError("this token has expired; get a new one", code="token_expired", retryable=True)
        await self.store.create_session(secret_hash(secret), user.id, ends.strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
        return user, secret, max(1, int((ends - now).total_seconds()))

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
