"""The embedding app's users: JWTs it signs (a shared secret or its JWKS), and a trusted proxy's user header.

Verification is PyJWT's; this module only chooses the keys and the algorithms, from the settings and never
from the token: HS256/384/512 with RELAY_JWT_SECRET, RS256/384/512, ES256/384 and EdDSA with the keys of
RELAY_JWKS_URL. So `alg: none`, an HS token when only a JWKS is configured, and a public key used as an HMAC
secret are all refused. The JWKS is fetched with httpx (PyJWKClient is synchronous urllib, which would block
the event loop) and parsed by PyJWT's PyJWKSet.

No I/O here but the JWKS fetch; nothing secret is logged (reasons only, never a token).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import httpx

from .config import Settings
from .errors import TokenExpiredError, UnauthorizedError

if TYPE_CHECKING:
    import jwt

log = logging.getLogger("deltarelay.identity")

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
JWKS_ALGORITHMS = ("RS256", "RS384", "RS512", "ES256", "ES384", "EdDSA")
KEY_FAMILIES = {"RSA": ("RS256", "RS384", "RS512"), "EC": ("ES256", "ES384"), "OKP": ("EdDSA",)}  # by kty
# Three base64url parts, the first two non-empty: how a JWT is told from a `drt_` API token.
_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
NO_ISSUER = "(none)"  # the issuer of a token without `iss` (only when RELAY_JWT_ISSUER is unset)
MAX_TOKEN_CHARS = 16 * 1024


def looks_like_jwt(token: str) -> bool:
    return len(token) <= MAX_TOKEN_CHARS and _JWT_SHAPE.fullmatch(token) is not None


@dataclass(frozen=True, slots=True)
class Claims:
    """Who a valid token names: the user is (issuer, subject)."""

    issuer: str
    subject: str
    name: str
    admin: bool
    expires_at: int  # the token's `exp`, Unix seconds


def _refused(reason: str) -> UnauthorizedError:
    log.info("JWT refused: %s", reason)
    return UnauthorizedError("this token is not valid")


class Jwks:
    """The keys of a JWKS URL by `kid`, fetched at start and again for an unknown kid at most every
    refetch_seconds; keys already fetched keep working while the URL is down."""

    def __init__(self, url: str, refetch_seconds: float, client: httpx.AsyncClient | None = None) -> None:
        self.url = url
        self.refetch_seconds = refetch_seconds
        self._client = client or httpx.AsyncClient(timeout=5.0, trust_env=False)
        self._keys: dict[str | None, jwt.PyJWK] = {}
        self._fetched_at = -float("inf")
        self._fetching: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """The first fetch; a JWKS that cannot be read now is a warning, and is asked again on demand."""
        await self.refresh()
        if not self._keys:
            log.warning("RELAY_JWKS_URL %s gave no usable keys at start: tokens signed with its keys are refused"
                        " until it does (asked again at most every %g s)", self.url, self.refetch_seconds)

    async def close(self) -> None:
        await self._client.aclose()

    async def refresh(self) -> None:
        """Fetch the keys unless a fetch ran within refetch_seconds; concurrent callers share one fetch."""
        if time.monotonic() - self._fetched_at < self.refetch_seconds:
            return
        if self._fetching is None or self._fetching.done():
            self._fetching = asyncio.create_task(self._fetch())
        await asyncio.shield(self._fetching)

    async def _fetch(self) -> None:
        import jwt  # imported only where tokens are configured: PyJWT brings cryptography, about 9 MB of RSS

        self._fetched_at = time.monotonic()
        try:
            response = await self._client.get(self.url)
            response.raise_for_status()
            found = jwt.PyJWKSet.from_dict(response.json())
        except (httpx.HTTPError, ValueError, jwt.PyJWTError) as exc:
            log.warning("could not read the JWKS at %s: %s", self.url, str(exc).splitlines()[0][:200])
            return
        keys = {key.key_id: key for key in found.keys if key.key_type in KEY_FAMILIES}  # never an "oct" secret
        self._keys = keys
        log.info("JWKS %s: %d keys", self.url, len(keys))

    async def key(self, kid: str | None) -> jwt.PyJWK | None:
        """The key for `kid` (None: the only key of a one-key set), fetching again for an unknown one."""
        found = self._find(kid)
        if found is None:
            await self.refresh()
            found = self._find(kid)
        return found

    def _find(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        return self._keys.get(kid)


class TokenVerifier:
    """Checks JWTs against the configured secret and JWKS and names their user."""

    def __init__(self, settings: Settings, jwks: Jwks | None = None) -> None:
        self.settings = settings
        self.jwks = jwks
        if jwks is None and settings.jwks_url:
            self.jwks = Jwks(settings.jwks_url, settings.jwks_refetch_seconds)

    @property
    def configured(self) -> bool:
        return bool(self.settings.jwt_secret or self.jwks)

    async def verify(self, token: str) -> Claims:
        """The claims of a valid token.

        Raises:
            TokenExpiredError: its `exp` has passed (beyond the leeway).
            UnauthorizedError: anything else wrong; the reason goes to the log in one line.
        """
        if not self.configured:
            raise _refused("no RELAY_JWT_SECRET or RELAY_JWKS_URL is set")
        import jwt  # as in Jwks._fetch: a server without JWT settings never loads PyJWT and cryptography

        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise _refused(f"malformed ({exc})") from None
        alg = header.get("alg")
        key: Any
        if alg in HMAC_ALGORITHMS and self.settings.jwt_secret:
            key, algorithms = self.settings.jwt_secret, list(HMAC_ALGORITHMS)
        elif alg in JWKS_ALGORITHMS and self.jwks is not None:
            kid = header.get("kid")
            if kid is not None and not isinstance(kid, str):
                raise _refused("kid is not a string")
            found = await self.jwks.key(kid)
            if found is None:
                raise _refused(f"unknown kid {str(kid)[:64]!r}")
            if alg not in KEY_FAMILIES.get(found.key_type or "", ()):
                raise _refused(f"algorithm {alg} does not fit the {found.key_type} key {str(kid)[:64]!r}")
            key, algorithms = found.key, [alg]
        else:
            raise _refused(f"algorithm {str(alg)[:20]!r} is not accepted here")
        settings = self.settings
        options: dict[str, Any] = {"require": ["exp", "sub"] + (["iss"] if settings.jwt_issuer else [])
                                   + (["aud"] if settings.jwt_audience else [])}
        if not settings.jwt_audience:
            options["verify_aud"] = False
        try:
            payload = jwt.decode(token, key, algorithms=algorithms, audience=settings.jwt_audience,
                                 issuer=settings.jwt_issuer, leeway=settings.jwt_leeway_seconds,
                                 options=cast(Any, options))  # a TypedDict in newer PyJWT only
        except jwt.ExpiredSignatureError:
            log.info("JWT refused: expired")
            raise TokenExpiredError("this token has expired; get a new one") from None
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            raise _refused(str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__) from None
        return self._claims(payload)

    def _claims(self, payload: dict[str, Any]) -> Claims:
        sub, exp, iss = payload.get("sub"), payload.get("exp"), payload.get("iss")
        if not isinstance(sub, str) or not sub or len(sub) > 255:
            raise _refused("sub must be a non-empty string of at most 255 characters")
        if not isinstance(exp, (int, float)) or isinstance(exp, bool):
            raise _refused("exp must be a number")
        if iss is not None and (not isinstance(iss, str) or len(iss) > 255):
            raise _refused("iss must be a string of at most 255 characters")
        name = payload.get(self.settings.jwt_name_claim)
        if not isinstance(name, str) or not name.strip():
            name = sub
        return Claims(iss or NO_ISSUER, sub, name.strip()[:64], payload.get(self.settings.jwt_admin_claim) is True,
                      int(exp))


class TrustedHeader:
    """RELAY_TRUSTED_USER_HEADER from a peer inside RELAY_TRUSTED_PROXIES names the user; from any other peer
    it is ignored, and logged once per peer."""

    def __init__(self, settings: Settings) -> None:
        assert settings.trusted_user_header
        self.user_header = settings.trusted_user_header.lower().encode("latin-1")
        self.admin_header = (settings.trusted_admin_header or "").lower().encode("latin-1") or None
        self.issuer = "proxy:" + settings.trusted_user_header.lower()
        self.networks = settings.networks
        self._ignored: set[str] = set()

    def trusted(self, peer: str | None) -> bool:
        if peer is None:
            return False
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in network for network in self.networks)

    def ignored(self, peer: str | None) -> None:
        """A peer outside the trusted ranges sent the header: say so once per peer (the log stays bounded)."""
        key = peer or "?"
        if key in self._ignored:
            return
        if len(self._ignored) > 10_000:
            self._ignored.clear()
        self._ignored.add(key)
        log.warning("ignored %s from %s: that peer is not in RELAY_TRUSTED_PROXIES", self.user_header.decode(),
                    key[:64])
