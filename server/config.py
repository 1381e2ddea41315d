"""Settings: environment variables and command-line flags, read once, validated, frozen.

Every setting has an environment variable; the most used ones are also flags of
`python -m server`. Invalid configuration fails at start with one clear line
(ConfigError), never later with a traceback.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import httpx

from .protocol.caching import PROMPT_CACHE_MODES
from .upstream.proxies import ProxyConfigError, ProxyEnvironment

OFFLINE_MODEL = "deltarelay-offline"
#: An agents file's server tool type -> the API's tool type (https://platform.claude.com/docs/en/agents-and-tools/
#: tool-use/web-search-tool and .../web-fetch-tool).
SERVER_TOOL_TYPES = {"web_search": "web_search_20250305", "web_fetch": "web_fetch_20250910"}
#: The anthropic-beta value an API server tool type needs (web search needs none).
SERVER_TOOL_BETAS = {"web_fetch_20250910": "web-fetch-2025-09-10"}
#: The API's smallest extended thinking budget.
MIN_THINKING_BUDGET = 1024
DEFAULT_BASE_URL = "https://api.anthropic.com"


class ConfigError(Exception):
    """A setting is invalid; the message names the variable and what it accepts."""


@dataclass(frozen=True, slots=True)
class Agent:
    """A named assistant: which model answers, with which system prompt and output limit."""

    id: str
    model: str
    system: str = ""
    max_tokens: int = 1024
    prompt_cache: str = "5m"  # "off", "5m" or "1h": the TTL of the cache breakpoints its requests mark
    # A conversation grown past the model's context window: "truncate" drops its oldest turns from the request,
    # "error" refuses the message with context_too_long (server/context.py).
    context_policy: str = "truncate"
    # Extended thinking's budget in tokens (>= 1024, < max_tokens); None: thinking off.
    thinking_budget: int | None = None
    # Anthropic's server tools in the API's form ({"type": "web_search_20250305", "name": "web_search", ...}).
    server_tools: tuple[dict[str, Any], ...] = ()
    # The embedding app's tools (Anthropic tool definitions: name, description, input_schema), run at tools_url.
    tools: tuple[dict[str, Any], ...] = ()
    tools_url: str | None = None
    max_tool_rounds: int = 8  # upstream requests past the first, for tool calls and pause_turn, per answer
    betas: tuple[str, ...] = ()  # extra anthropic-beta values (the server tools' own are added per request)

    @property
    def request_tools(self) -> list[dict[str, Any]]:
        """The request's `tools`: the server tools first, then the app's."""
        return [*self.server_tools, *self.tools]

    @property
    def request_betas(self) -> tuple[str, ...]:
        """The request's anthropic-beta values: the agent's own, then those its server tools need."""
        betas = list(self.betas)
        for tool in self.server_tools:
            beta = SERVER_TOOL_BETAS.get(str(tool.get("type")))
            if beta is not None and beta not in betas:
                betas.append(beta)
        return tuple(betas)


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    database_url: str = "sqlite:///deltarelay.db"
    anthropic_api_key: str | None = None
    anthropic_base_url: str = DEFAULT_BASE_URL
    model: str = "claude-sonnet-4-5"
    max_tokens: int = 1024
    system_prompt: str = ""
    agents_file: str | None = None
    prompt_cache: str = "5m"  # the agents' default: "off", "5m" or "1h"
    max_message_bytes: int = 32 * 1024
    # Each attached file, and one message's files together (server/attachments.py: 24 MiB, the API's 32 MB
    # request limit less base64's growth; images are also held to the API's 5 MB of base64).
    max_attachment_bytes: int = 24 * 1024 * 1024
    # httpx's default pool holds 100 connections and would queue the 101st stream.
    upstream_max_connections: int = 4096
    sqlite_group_commit_ms: float = 5.0  # under load, SQLite writes wait this long to share a transaction
    database_pool_size: int = 10  # connections for reads (SQLite: opened at start; PostgreSQL: the pool, + 1)
    # PostgreSQL only: the answers' own writes (a turn's start, progress, the final save) wait for their WAL
    # flush when True. False: SQLite's promise under synchronous=NORMAL (docs/deployment.md, "Durability").
    postgres_synchronous_commit: bool = False
    upstream_transport: str = "http1"  # "http1" (built in, least CPU), "aiohttp" (httpx-aiohttp) or "httpx"
    connect_timeout: float = 10.0
    first_event_timeout: float = 60.0
    idle_timeout: float = 60.0
    offline_delay_ms: float = 40.0
    offline_words: int = 0  # 0: the demo answer's natural length
    stream_log_events: int = 20_000
    stream_retention_seconds: float = 300.0
    stream_retention_max: int = 1000  # finished streams kept for resumes: memory stays flat however many end
    subscriber_queue_events: int = 2000  # a reader this far behind is dropped and resumes from the log
    keepalive_seconds: float = 15.0
    cancel_on_disconnect: bool = False  # default: a dropped connection never stops a paid-for answer
    retry_attempts: int = 3
    retry_base_delay: float = 0.5
    retry_max_wait: float = 10.0
    shutdown_grace_seconds: float = 20.0
    # While the database cannot take writes: an answer's end waits this long for its save, then ends with a
    # retryable `storage_unavailable` error while the save is retried for up to save_retry_seconds.
    save_wait_seconds: float = 10.0
    save_retry_seconds: float = 600.0
    partial_save_seconds: float = 3.0  # a running answer's text so far is saved this often (0: never)
    log_level: str = "info"
    log_format: str = "text"  # "text" for people, "json" for one JSON object a line
    access_log: bool = False  # one line per request; streams get their own start/end lines
    # Access control (issue 6). With no users the server is open, and only on a loopback address.
    allow_anonymous: bool = False
    allowed_origins: str = ""  # comma-separated extra origins for WebSocket and cookie-authenticated requests
    session_hours: float = 720.0
    auth_cache_seconds: float = 5.0  # how long a checked token or session is trusted before asking the database
    # The embedding app's users (issue 16): JWTs it signs, or a header an identity-aware proxy sets.
    jwt_secret: str | None = None  # HS256/384/512
    jwks_url: str | None = None  # RS256/384/512, ES256/384, EdDSA
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_leeway_seconds: float = 30.0
    jwt_admin_claim: str = "admin"
    jwt_name_claim: str = "name"
    jwks_refetch_seconds: float = 30.0  # an unknown kid fetches the JWKS again at most this often
    trusted_user_header: str | None = None
    trusted_proxies: str = ""  # comma-separated CIDRs whose requests may carry trusted_user_header
    trusted_admin_header: str | None = None
    ws_auth_timeout_seconds: float = 10.0  # a socket without credentials must send `auth` this soon
    ws_max_frame_bytes: int = 256 * 1024
    ws_max_streams: int = 16  # streams one socket may follow at once
    # Connections before they are anyone's (issue 14): what a request head may hold and how long it may take.
    max_header_bytes: int = 32 * 1024  # request line and headers together; more is a 431
    max_headers: int = 100
    header_timeout_seconds: float = 15.0  # from the connection (or the request's first byte) to a whole head
    max_unauthenticated_connections: int = 256  # past it the oldest is closed; 0: no limit
    write_timeout_seconds: float = 30.0  # a peer that reads nothing this long while writes wait is closed
    # Per-user limits; 0 turns one off.
    limit_requests_per_minute: int = 600
    limit_concurrent_streams: int = 32
    limit_connections: int = 64
    budget_per_day: str | None = None  # dollars per user per UTC day, e.g. "5.00"; unset: no budget
    max_history_messages: int = 1000
    context_policy: str = "truncate"  # the agents' default: "truncate" or "error" (Agent.context_policy)
    # With a real key, ask POST /v1/messages/count_tokens when the estimate is within its margin of the window.
    count_tokens: bool = False
    # Several instances: stream logs, fan-out and cancels through Redis (unset: in-process, one instance).
    redis_url: str | None = None
    redis_prefix: str = "deltarelay"  # the start of every Redis key: deployments sharing a Redis stay apart
    # Events reach Redis in writes at most this often: what arrives meanwhile shares one round trip.
    redis_write_ms: float = 10.0
    instance_lease_seconds: float = 3.0  # an instance silent this long is dead: its answers end as interrupted
    # The embedding app's tools (issue 19): the key their calls are signed with, and each call's time limit.
    tools_secret: str | None = None
    tools_timeout: float = 10.0
    agents: tuple[Agent, ...] = field(default=())
    # HTTPS_PROXY, HTTP_PROXY, ALL_PROXY, NO_PROXY (either case), as httpx reads them; none unless loaded.
    proxies: ProxyEnvironment = field(default_factory=ProxyEnvironment)

    @property
    def offline(self) -> bool:
        """No API key: answers come from the built-in offline model."""
        return not self.anthropic_api_key

    @property
    def default_model(self) -> str:
        return OFFLINE_MODEL if self.offline else self.model

    @property
    def origins(self) -> frozenset[str]:
        return frozenset(o.strip().rstrip("/").lower() for o in self.allowed_origins.split(",") if o.strip())

    @property
    def networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """RELAY_TRUSTED_PROXIES as networks (validated at start)."""
        return tuple(ipaddress.ip_network(c.strip(), strict=False) for c in self.trusted_proxies.split(",")
                     if c.strip())

    @property
    def host_identity(self) -> bool:
        """The embedding app's users are configured (a JWT secret, a JWKS or a trusted header): never open."""
        return bool(self.jwt_secret or self.jwks_url or self.trusted_user_header)

    @property
    def daily_budget(self) -> Decimal | None:
        return None if self.budget_per_day is None else Decimal(self.budget_per_day)

    @property
    def loopback(self) -> bool:
        """Bound to a loopback address only: nobody else can reach the port."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host.strip("[]")).is_loopback
        except ValueError:
            return False

    def agent(self, agent_id: str | None) -> Agent | None:
        """The agent by id; None picks the default agent."""
        wanted = agent_id or "default"
        for agent in self.agents:
            if agent.id == wanted:
                return agent
        return None

    def with_agents(self) -> Settings:
        """Settings whose agents include the default one (and the agents file's)."""
        agents: dict[str, Agent] = {
            "default": Agent("default", self.default_model, self.system_prompt, self.max_tokens,
                             context_policy=self.context_policy, prompt_cache=self.prompt_cache)
        }
        if self.agents_file:
            for agent in _read_agents_file(self.agents_file, self.default_model, self.max_tokens,
                                           default_context_policy=self.context_policy, prompt_cache=self.prompt_cache):
                agents[agent.id] = agent
        for agent in self.agents:
            agents[agent.id] = agent
        return replace(self, agents=tuple(agents.values()))


ENV_NAMES: dict[str, str] = {
    "host": "HOST",
    "port": "PORT",
    "database_url": "DATABASE_URL",
    "anthropic_api_key": "ANTHROPIC_API_KEY",
    "anthropic_base_url": "ANTHROPIC_BASE_URL",
    "model": "RELAY_MODEL",
    "max_tokens": "RELAY_MAX_TOKENS",
    "system_prompt": "RELAY_SYSTEM_PROMPT",
    "agents_file": "RELAY_AGENTS_FILE",
    "prompt_cache": "RELAY_PROMPT_CACHE",
    "max_message_bytes": "RELAY_MAX_MESSAGE_BYTES",
    "max_attachment_bytes": "RELAY_MAX_ATTACHMENT_BYTES",
    "upstream_max_connections": "RELAY_UPSTREAM_MAX_CONNECTIONS",
    "upstream_transport": "RELAY_UPSTREAM_TRANSPORT",
    "sqlite_group_commit_ms": "RELAY_SQLITE_GROUP_COMMIT_MS",
    "database_pool_size": "RELAY_DATABASE_POOL_SIZE",
    "postgres_synchronous_commit": "RELAY_POSTGRES_SYNCHRONOUS_COMMIT",
    "connect_timeout": "RELAY_CONNECT_TIMEOUT",
    "first_event_timeout": "RELAY_FIRST_EVENT_TIMEOUT",
    "idle_timeout": "RELAY_IDLE_TIMEOUT",
    "offline_delay_ms": "RELAY_OFFLINE_DELAY_MS",
    "offline_words": "RELAY_OFFLINE_WORDS",
    "stream_log_events": "RELAY_STREAM_LOG_EVENTS",
    "stream_retention_seconds": "RELAY_STREAM_RETENTION_SECONDS",
    "stream_retention_max": "RELAY_STREAM_RETENTION_MAX",
    "subscriber_queue_events": "RELAY_SUBSCRIBER_QUEUE_EVENTS",
    "keepalive_seconds": "RELAY_KEEPALIVE_SECONDS",
    "cancel_on_disconnect": "RELAY_CANCEL_ON_DISCONNECT",
    "retry_attempts": "RELAY_RETRY_ATTEMPTS",
    "retry_base_delay": "RELAY_RETRY_BASE_DELAY",
    "retry_max_wait": "RELAY_RETRY_MAX_WAIT",
    "shutdown_grace_seconds": "RELAY_SHUTDOWN_GRACE_SECONDS",
    "save_wait_seconds": "RELAY_SAVE_WAIT_SECONDS",
    "save_retry_seconds": "RELAY_SAVE_RETRY_SECONDS",
    "partial_save_seconds": "RELAY_PARTIAL_SAVE_SECONDS",
    "log_level": "RELAY_LOG_LEVEL",
    "log_format": "RELAY_LOG_FORMAT",
    "access_log": "RELAY_ACCESS_LOG",
    "allow_anonymous": "RELAY_ALLOW_ANONYMOUS",
    "allowed_origins": "RELAY_ALLOWED_ORIGINS",
    "session_hours": "RELAY_SESSION_HOURS",
    "auth_cache_seconds": "RELAY_AUTH_CACHE_SECONDS",
    "jwt_secret": "RELAY_JWT_SECRET",
    "jwks_url": "RELAY_JWKS_URL",
    "jwt_issuer": "RELAY_JWT_ISSUER",
    "jwt_audience": "RELAY_JWT_AUDIENCE",
    "jwt_leeway_seconds": "RELAY_JWT_LEEWAY_SECONDS",
    "jwt_admin_claim": "RELAY_JWT_ADMIN_CLAIM",
    "jwt_name_claim": "RELAY_JWT_NAME_CLAIM",
    "jwks_refetch_seconds": "RELAY_JWKS_REFETCH_SECONDS",
    "trusted_user_header": "RELAY_TRUSTED_USER_HEADER",
    "trusted_proxies": "RELAY_TRUSTED_PROXIES",
    "trusted_admin_header": "RELAY_TRUSTED_ADMIN_HEADER",
    "ws_auth_timeout_seconds": "RELAY_WS_AUTH_TIMEOUT_SECONDS",
    "ws_max_frame_bytes": "RELAY_WS_MAX_FRAME_BYTES",
    "ws_max_streams": "RELAY_WS_MAX_STREAMS",
    "max_header_bytes": "RELAY_MAX_HEADER_BYTES",
    "max_headers": "RELAY_MAX_HEADERS",
    "header_timeout_seconds": "RELAY_HEADER_TIMEOUT_SECONDS",
    "max_unauthenticated_connections": "RELAY_MAX_UNAUTHENTICATED_CONNECTIONS",
    "write_timeout_seconds": "RELAY_WRITE_TIMEOUT_SECONDS",
    "limit_requests_per_minute": "RELAY_LIMIT_REQUESTS_PER_MINUTE",
    "limit_concurrent_streams": "RELAY_LIMIT_CONCURRENT_STREAMS",
    "limit_connections": "RELAY_LIMIT_CONNECTIONS",
    "budget_per_day": "RELAY_BUDGET_PER_DAY",
    "max_history_messages": "RELAY_MAX_HISTORY_MESSAGES",
    "context_policy": "RELAY_CONTEXT_POLICY",
    "count_tokens": "RELAY_COUNT_TOKENS",
    "redis_url": "REDIS_URL",
    "redis_prefix": "RELAY_REDIS_PREFIX",
    "redis_write_ms": "RELAY_REDIS_WRITE_MS",
    "instance_lease_seconds": "RELAY_INSTANCE_LEASE_SECONDS",
    "tools_secret": "RELAY_TOOLS_SECRET",
    "tools_timeout": "RELAY_TOOLS_TIMEOUT",
}

_POSITIVE = {
    "port", "max_tokens", "max_message_bytes", "max_attachment_bytes", "upstream_max_connections", "connect_timeout",
    "first_event_timeout", "idle_timeout", "stream_log_events", "subscriber_queue_events", "keepalive_seconds",
    "stream_retention_max", "session_hours", "ws_max_frame_bytes", "ws_max_streams", "max_history_messages",
    "instance_lease_seconds", "database_pool_size",
    "max_header_bytes", "max_headers", "header_timeout_seconds", "write_timeout_seconds",
    "ws_auth_timeout_seconds", "tools_timeout",
}
_NON_NEGATIVE = {
    "offline_delay_ms", "offline_words", "stream_retention_seconds", "retry_attempts", "retry_base_delay",
    "retry_max_wait", "shutdown_grace_seconds", "auth_cache_seconds", "save_wait_seconds", "save_retry_seconds",
    "partial_save_seconds", "limit_requests_per_minute",
    "limit_concurrent_streams", "limit_connections", "sqlite_group_commit_ms", "redis_write_ms",
    "max_unauthenticated_connections", "jwt_leeway_seconds", "jwks_refetch_seconds",
}
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _convert(name: str, kind: Any, raw: str) -> Any:
    env = ENV_NAMES[name]
    if kind in (bool, "bool"):
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise ConfigError(f"{env} must be 1 or 0 (true or false), got {raw!r}")
    if kind in (int, "int"):
        try:
            value: Any = int(raw)
        except ValueError:
            raise ConfigError(f"{env} must be a whole number, got {raw!r}") from None
    elif kind in (float, "float"):
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{env} must be a number, got {raw!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{env} must be a finite number, got {raw!r}")
    else:
        value = raw
    if name in _POSITIVE and value <= 0:
        raise ConfigError(f"{env} must be greater than 0, got {raw!r}")
    if name in _NON_NEGATIVE and value < 0:
        raise ConfigError(f"{env} must be 0 or more, got {raw!r}")
    return value


def load_settings(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Settings from the environment, then explicit overrides (command-line flags, tests).

    Raises:
        ConfigError: a value is invalid; its message is one line naming the variable.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in fields(Settings):
        env = ENV_NAMES.get(f.name)
        if env is None:
            continue
        raw = environ.get(env)
        if raw is None or raw == "":
            continue
        values[f.name] = _convert(f.name, f.type, raw)
    values["proxies"] = ProxyEnvironment.from_environ(environ)
    for name, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, str) and name in ENV_NAMES:
            kind = next(f.type for f in fields(Settings) if f.name == name)
            value = _convert(name, kind, value)
        values[name] = value
    settings = Settings(**values)
    settings = replace(settings, database_url=database_url(settings.database_url))
    _validate(settings)
    settings = settings.with_agents()
    if settings.tools_secret is None and any(agent.tools for agent in settings.agents):
        names = ", ".join(agent.id for agent in settings.agents if agent.tools)
        raise ConfigError(f"RELAY_TOOLS_SECRET must be set: agent {names} has tools, and their calls are signed"
                          " with it")
    return settings


SQLITE_SCHEMES = ("sqlite", "sqlite+aiosqlite")
POSTGRESQL_SCHEMES = ("postgresql", "postgres", "postgresql+asyncpg")
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_ACCEPTED = ("DATABASE_URL must start with sqlite:// or postgresql:// (sqlite+aiosqlite://, postgres:// and"
             " postgresql+asyncpg:// mean the same)")


def database_url(url: str) -> str:
    """The one form of a DATABASE_URL: `sqlite:///FILE` or `postgresql://USER:PASSWORD@HOST:PORT/DB?sslmode=MODE`.

    `sqlite+aiosqlite://` means `sqlite://`; `postgres://` and `postgresql+asyncpg://` mean `postgresql://`.
    A PostgreSQL URL may carry `sslmode` (libpq's modes; asyncpg's default is prefer), `min_size` and
    `max_size` (the read pool); the databases library's `ssl=true|false|MODE` becomes
    `sslmode=verify-full|disable|MODE`, which is what asyncpg makes of it.

    Raises:
        ConfigError: another database or driver, a SQLite URL naming a host, no file or an in-memory
            database, or a parameter the drivers would ignore. The message never holds the password.
    """
    scheme, separator, rest = url.partition("://")
    scheme = scheme.lower()
    if not separator or scheme not in SQLITE_SCHEMES + POSTGRESQL_SCHEMES:
        raise ConfigError(f"{_ACCEPTED}, got {url.split(':')[0]!r}")
    if scheme in SQLITE_SCHEMES:
        return "sqlite://" + _sqlite_rest(rest)
    return _postgresql_url(url)


def _sqlite_rest(rest: str) -> str:
    if not rest.startswith("/"):
        raise ConfigError("DATABASE_URL for SQLite is sqlite:///relative.db or sqlite:////absolute.db:"
                          " three slashes, then the file")
    if "?" in rest or "#" in rest:
        raise ConfigError("DATABASE_URL for SQLite takes no parameters: write ? and # in a file name as %3F and %23")
    file = unquote(rest[1:])
    if not file or file == ":memory:":
        raise ConfigError("DATABASE_URL for SQLite must name a file (an in-memory database would not be shared"
                          " by the writer and the readers)")
    return rest


def _postgresql_url(url: str) -> str:
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise ConfigError("DATABASE_URL has a port that is not a number") from None
    if parts.fragment:
        raise ConfigError("DATABASE_URL has a '#': write it as %23 (in a password, say)")
    options: dict[str, str] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name in options or (name in ("ssl", "sslmode") and "sslmode" in options):
            raise ConfigError(f"DATABASE_URL gives {name} twice (ssl and sslmode are one setting)")
        if name == "ssl":
            name, value = "sslmode", {"true": "verify-full", "false": "disable"}.get(value.lower(), value)
        if name == "sslmode":
            if value not in SSL_MODES:
                raise ConfigError(f"DATABASE_URL sslmode must be one of {', '.join(SSL_MODES)}, got {value!r}")
        elif name in ("min_size", "max_size"):
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"DATABASE_URL {name} must be a whole number above 0, got {value!r}")
        else:
            raise ConfigError(f"DATABASE_URL parameter {name!r} is not supported: PostgreSQL URLs take sslmode,"
                              " min_size and max_size")
        options[name] = value
    query = urlencode(sorted(options.items(), key=lambda item: ("sslmode", "min_size", "max_size").index(item[0])))
    return urlunsplit(("postgresql", parts.netloc, parts.path, query, ""))


def masked_url(url: str) -> str:
    """`url` fit to print: the password in it, and any parameter named like one, become ***.

    Everything up to the last `@` is taken for the user and password, so a password holding `/`, `?` or `#`
    is masked too.
    """
    scheme, separator, rest = url.partition("://")
    if not separator:
        return url
    at = rest.rfind("@")
    if at >= 0:
        user, colon, _ = rest[:at].partition(":")
        rest = (f"{user}:***" if colon else user) + rest[at:]
    address, question, query = rest.partition("?")
    if question:
        pairs = [(name, "***" if "password" in name.lower() else value)
                 for name, value in parse_qsl(query, keep_blank_values=True)]
        rest = address + "?" + urlencode(pairs, safe="*")
    return f"{scheme}://{rest}"


def _validate(settings: Settings) -> None:
    if not settings.anthropic_base_url.startswith(("http://", "https://")):
        raise ConfigError("ANTHROPIC_BASE_URL must be an http:// or https:// URL")
    if settings.upstream_transport not in ("http1", "aiohttp", "httpx"):
        raise ConfigError("RELAY_UPSTREAM_TRANSPORT must be http1, aiohttp or httpx")
    if not settings.offline:
        try:
            settings.proxies.proxy_for(httpx.URL(settings.anthropic_base_url))
        except ProxyConfigError as exc:
            raise ConfigError(str(exc)) from None
        except httpx.InvalidURL:
            raise ConfigError("ANTHROPIC_BASE_URL is not a valid URL") from None
    if settings.budget_per_day is not None:
        try:
            budget = Decimal(settings.budget_per_day)
        except InvalidOperation:
            budget = Decimal(-1)
        if not budget.is_finite() or budget < 0:
            raise ConfigError(f"RELAY_BUDGET_PER_DAY must be an amount of dollars such as 5.00, got "
                              f"{settings.budget_per_day!r}")
    for origin in settings.origins:
        if not origin.startswith(("http://", "https://")) or origin.count("/") != 2:
            raise ConfigError(f"RELAY_ALLOWED_ORIGINS entries must look like https://example.com, got {origin!r}")
    if settings.prompt_cache not in PROMPT_CACHE_MODES:
        raise ConfigError(f"RELAY_PROMPT_CACHE must be off, 5m or 1h, got {settings.prompt_cache!r}")
    if settings.log_format not in ("text", "json"):
        raise ConfigError("RELAY_LOG_FORMAT must be text or json")
    if settings.redis_url is not None and not settings.redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(
            f"REDIS_URL must start with redis://, rediss:// or unix://, got {settings.redis_url.split(':')[0]!r}"
        )
    if not settings.redis_prefix or any(c.isspace() for c in settings.redis_prefix):
        raise ConfigError("RELAY_REDIS_PREFIX must be a non-empty word without spaces")
    _validate_identity(settings)
    if settings.context_policy not in CONTEXT_POLICIES:
        raise ConfigError(f"RELAY_CONTEXT_POLICY must be truncate or error, got {settings.context_policy!r}")
    if settings.log_level.lower() not in ("critical", "error", "warning", "info", "debug"):
        raise ConfigError("RELAY_LOG_LEVEL must be one of critical, error, warning, info, debug")


#: What an agent does with a conversation longer than its model's context window (see server/context.py).
CONTEXT_POLICIES = ("truncate", "error")

JWT_SECRET_BYTES = 32  # HS256's output size: a shorter secret is weaker than the signature it makes


def _validate_identity(settings: Settings) -> None:
    if settings.jwt_secret is not None and len(settings.jwt_secret.encode()) < JWT_SECRET_BYTES:
        raise ConfigError(f"RELAY_JWT_SECRET must be at least {JWT_SECRET_BYTES} bytes (it signs HS256/384/512"
                          f" tokens), got {len(settings.jwt_secret.encode())}")
    if settings.jwks_url is not None and not settings.jwks_url.startswith(("http://", "https://")):
        raise ConfigError("RELAY_JWKS_URL must be an http:// or https:// URL")
    for env, claim in (("RELAY_JWT_ADMIN_CLAIM", settings.jwt_admin_claim),
                       ("RELAY_JWT_NAME_CLAIM", settings.jwt_name_claim)):
        if not claim.strip():
            raise ConfigError(f"{env} must name a claim")
    for env, name in (("RELAY_TRUSTED_USER_HEADER", settings.trusted_user_header),
                      ("RELAY_TRUSTED_ADMIN_HEADER", settings.trusted_admin_header)):
        if name is not None and not (name.isascii() and all(c.isalnum() or c in "-_" for c in name)):
            raise ConfigError(f"{env} must be a header name such as X-Forwarded-User, got {name!r}")
    if settings.trusted_admin_header and not settings.trusted_user_header:
        raise ConfigError("RELAY_TRUSTED_ADMIN_HEADER needs RELAY_TRUSTED_USER_HEADER")
    if settings.trusted_user_header and not settings.trusted_proxies.strip():
        raise ConfigError("RELAY_TRUSTED_USER_HEADER needs RELAY_TRUSTED_PROXIES: the CIDRs of the proxies that"
                          " set it (e.g. 10.0.0.5/32)")
    for cidr in settings.trusted_proxies.split(","):
        if cidr.strip():
            try:
                ipaddress.ip_network(cidr.strip(), strict=False)
            except ValueError:
                raise ConfigError(f"RELAY_TRUSTED_PROXIES entries must be CIDRs such as 10.0.0.0/8, got"
                                  f" {cidr.strip()!r}") from None


def _read_agents_file(path: str, default_model: str, default_max_tokens: int,
                      default_context_policy: str = "truncate", prompt_cache: str = "5m") -> list[Agent]:
    """Agents from a JSON file: {"agents": [{"id", "model"?, "system"?, "maxTokens"?, "promptCache"?,
    "contextPolicy"?, "thinking"?, "serverTools"?, "tools"?, "toolsUrl"?, "maxToolRounds"?, "betas"?}]}."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
        entries = document["agents"]
        agents = []
        for entry in entries:
            agent_id = entry["id"]
            max_tokens = int(entry.get("maxTokens", default_max_tokens))
            if not isinstance(agent_id, str) or not agent_id or max_tokens <= 0:
                raise ValueError("each agent needs a non-empty id and a positive maxTokens")
            context_policy = entry.get("contextPolicy", default_context_policy)
            if context_policy not in CONTEXT_POLICIES:
                raise ValueError(f"agent {agent_id}: contextPolicy must be truncate or error, got {context_policy!r}")
            agents.append(
                Agent(agent_id, str(entry.get("model", default_model)), str(entry.get("system", "")), max_tokens,
                      context_policy=context_policy,
                      prompt_cache=_agent_prompt_cache(agent_id, entry.get("promptCache", prompt_cache)),
                      **_agent_tools(agent_id, entry, max_tokens))
            )
        return agents
    except OSError as exc:
        raise ConfigError(f"RELAY_AGENTS_FILE {path!r} cannot be read: {exc.strerror}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"RELAY_AGENTS_FILE {path!r} is not a valid agents file: {exc}") from None


def _agent_prompt_cache(agent_id: str, value: Any) -> str:
    """An agents-file entry's `promptCache`.

    Raises:
        ValueError: not one of off, 5m, 1h (named with the agent, so the start fails with one line).
    """
    if value not in PROMPT_CACHE_MODES:
        raise ValueError(f"agent {agent_id!r}: promptCache must be off, 5m or 1h, got {value!r}")
    return str(value)


def _agent_tools(agent_id: str, entry: dict[str, Any], max_tokens: int) -> dict[str, Any]:
    """An agents-file entry's thinking, server tools, app tools, toolsUrl, maxToolRounds and betas, as Agent
    fields.

    Raises:
        ValueError: one of them is not what the API (or the relay) accepts, named with the agent.
    """
    name = f"agent {agent_id!r}"
    values: dict[str, Any] = {}
    thinking = entry.get("thinking")
    if thinking not in (None, False):
        budget = thinking.get("budgetTokens") if isinstance(thinking, dict) else None
        if type(budget) is not int:
            raise ValueError(f"{name}: thinking must be {{\"budgetTokens\": N}} or false, got {thinking!r}")
        if budget < MIN_THINKING_BUDGET:
            raise ValueError(f"{name}: thinking budgetTokens must be at least {MIN_THINKING_BUDGET}, got {budget}")
        if budget >= max_tokens:
            raise ValueError(f"{name}: thinking budgetTokens ({budget}) must be less than maxTokens ({max_tokens})")
        values["thinking_budget"] = budget
    server_tools = []
    for tool in _list(name, "serverTools", entry.get("serverTools", [])):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind not in SERVER_TOOL_TYPES:
            raise ValueError(f"{name}: serverTools type must be web_search or web_fetch, got {kind!r}")
        assert isinstance(tool, dict)
        api_tool: dict[str, Any] = {"type": SERVER_TOOL_TYPES[kind], "name": kind}
        for key, api_key in (("maxUses", "max_uses"), ("allowedDomains", "allowed_domains"),
                             ("blockedDomains", "blocked_domains")):
            if key in tool:
                api_tool[api_key] = tool[key]
        unknown = set(tool) - {"type", "maxUses", "allowedDomains", "blockedDomains"}
        if unknown:
            raise ValueError(f"{name}: serverTools {kind} takes type, maxUses, allowedDomains and blockedDomains,"
                             f" not {', '.join(sorted(unknown))}")
        max_uses = api_tool.get("max_uses")
        if max_uses is not None and (type(max_uses) is not int or max_uses < 1):
            raise ValueError(f"{name}: serverTools {kind} maxUses must be a whole number above 0, got {max_uses!r}")
        for key in ("allowed_domains", "blocked_domains"):
            domains = api_tool.get(key)
            if domains is not None and (not isinstance(domains, list)
                                        or not all(isinstance(d, str) and d for d in domains)):
                raise ValueError(f"{name}: serverTools {kind} {key} must be a list of domains")
        server_tools.append(api_tool)
    values["server_tools"] = tuple(server_tools)
    tools = []
    for tool in _list(name, "tools", entry.get("tools", [])):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str) or not tool["name"]:
            raise ValueError(f"{name}: each tool needs a name")
        schema = tool.get("input_schema", tool.get("inputSchema"))
        if not isinstance(schema, dict):
            raise ValueError(f"{name}: tool {tool['name']!r} needs an input_schema (a JSON schema object)")
        definition: dict[str, Any] = {"name": tool["name"]}
        if "description" in tool:
            definition["description"] = str(tool["description"])
        definition["input_schema"] = schema
        tools.append(definition)
    values["tools"] = tuple(tools)
    tools_url = entry.get("toolsUrl")
    if tools and tools_url is None:
        raise ValueError(f"{name}: tools need a toolsUrl, where the app runs them")
    if tools_url is not None:
        if not isinstance(tools_url, str) or not _tools_url_allowed(tools_url):
            raise ValueError(f"{name}: toolsUrl must be an https:// URL (or http:// on a loopback address), got"
                             f" {tools_url!r}")
        values["tools_url"] = tools_url
    rounds = entry.get("maxToolRounds", 8)
    if type(rounds) is not int or rounds < 1:
        raise ValueError(f"{name}: maxToolRounds must be a whole number of at least 1, got {rounds!r}")
    values["max_tool_rounds"] = rounds
    betas = _list(name, "betas", entry.get("betas", []))
    if not all(isinstance(beta, str) and beta and "," not in beta and beta.isprintable() for beta in betas):
        raise ValueError(f"{name}: betas must be a list of anthropic-beta values such as \"web-fetch-2025-09-10\"")
    values["betas"] = tuple(betas)
    return values


def _list(name: str, key: str, value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(f"{name}: {key} must be a list, got {value!r}")
    return value


def _tools_url_allowed(url: str) -> bool:
    """https://, or http:// to a loopback host (the app beside the relay)."""
    try:
        parts = httpx.URL(url)
    except httpx.InvalidURL:
        return False
    if not parts.host:
        return False
    if parts.scheme == "https":
        return True
    if parts.scheme != "http":
        return False
    if parts.host == "localhost":
        return True
    try:
        return ipaddress.ip_address(parts.host.strip("[]")).is_loopback
    except ValueError:
        return False
