"""`deltarelay check`: is this deployment ready for traffic? Each dependency is reached as the server reaches it.

I/O at the edges (the database, Redis, the upstream), each check under its own time limit, all at once.
Nothing is left changed: the database writes are rolled back and nothing is migrated, the Redis key is
deleted, and the upstream request spends no tokens. No secret reaches the report: URLs are masked, the API
key shows its last four characters at most, and every line is scrubbed of the secrets the settings hold.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import httpx
import orjson

from .config import ENV_NAMES, OFFLINE_MODEL, Settings, masked_url
from .errors import one_line
from .store import Probe, Store, migration_versions, sqlite_path
from .upstream.anthropic import AnthropicUpstream


@dataclass(frozen=True, slots=True)
class Check:
    """One line of the report: what was checked, whether it passed, and why in a few words."""

    name: str
    ok: bool
    detail: str


def masked_key(key: str) -> str:
    """`sk-ant-…abcd`: the key's kind and its last four characters; a key under 16 characters shows none."""
    if len(key) < 16:
        return f"set ({len(key)} characters, not shown)"
    return ("sk-ant-" if key.startswith("sk-ant-") else "") + "…" + key[-4:]


async def run_checks(settings: Settings, seconds: float) -> list[Check]:
    """Every check of a deployment, in report order; each may take `seconds`, and they run at once."""
    (database, users), redis, upstream = await asyncio.gather(
        check_database(settings, seconds), check_redis(settings, seconds), check_upstream(settings, seconds))
    return [database, redis, upstream, check_access(settings, users)]


async def check_database(settings: Settings, seconds: float) -> tuple[Check, int | None]:
    """Reads through the pool, then the writer's rolled-back write (Store.probe); and the active users."""
    store = Store(settings.database_url)
    shown = masked_url(store.url)
    if store.is_sqlite:
        path, new_file = await asyncio.to_thread(_sqlite_file, store.url)
        if new_file is not None:
            return new_file, 0
        shown = f"SQLite file {path}"
    try:
        async with asyncio.timeout(seconds):
            await store.connect(migrate=False)
            await store.ping()
            probe = await store.probe()
    except TimeoutError:
        return Check("database", False, f"{shown}: no answer within {seconds:g} s"), None
    except Exception as exc:
        # The store wraps what the driver said in a user-facing StorageUnavailableError: an operator wants the cause.
        return Check("database", False, f"{shown}: {one_line(exc.__cause__ or exc)}"), None
    finally:
        try:
            await store.disconnect()
        except Exception:
            pass  # what failed has been said above
    detail = f"{shown} ({probe.server}): read; the writer {probe.wrote}, then rolled back; {_schema(probe)}"
    return Check("database", True, detail), probe.users


def _sqlite_file(url: str) -> tuple[Path, Check | None]:
    """The SQLite file, and when it does not exist yet the check of its directory (the server creates it at
    start, so the directory must take a new file)."""
    path = Path(sqlite_path(url)).resolve()
    return path, None if path.exists() else _new_sqlite_file(path)


def _new_sqlite_file(path: Path) -> Check:
    if not path.parent.is_dir():
        return Check("database", False, f"SQLite file {path}: its directory does not exist")
    try:
        handle, scratch = tempfile.mkstemp(dir=path.parent, prefix=".deltarelay-check-")
        os.close(handle)
        os.unlink(scratch)
    except OSError as exc:
        return Check("database", False, f"SQLite file {path} does not exist, and its directory does not let the"
                                        f" server create it ({exc.strerror})")
    versions = migration_versions()
    return Check("database", True, f"SQLite file {path} does not exist yet: the server creates it, with the schema"
                                   f" (migrations {_versions(versions)}), at start (its directory takes new files)")


def _schema(probe: Probe) -> str:
    if not probe.applied:
        text = f"empty: the server creates the schema (migrations {_versions(probe.known)}) at start"
    elif probe.pending:
        at = f"at revision {max(probe.applied):04d}, " if probe.applied else ""
        text = (f"{at}migrations {_versions(probe.pending)} pending: the server applies them at start (check does"
                " not)")
    else:
        text = f"schema up to date (revision {probe.known[-1]:04d})"
    if probe.unknown:
        text += (f"; it also has migrations {_versions(probe.unknown)}, which this version does not know (a newer"
                 " deltarelay migrated it)")
    return text


def _versions(versions: list[int]) -> str:
    return ", ".join(str(version) for version in versions)


async def check_redis(settings: Settings, seconds: float) -> Check:
    """PING, then SET (with a TTL), GET and DEL of a scratch key under the deployment's prefix."""
    if settings.redis_url is None:
        return Check("redis", True, "not used (REDIS_URL unset): one instance, streams in process")
    import redis.asyncio
    from redis.exceptions import ResponseError

    shown = masked_url(settings.redis_url)
    key = f"{settings.redis_prefix}:check:{secrets.token_hex(8)}"
    value = secrets.token_hex(8).encode()
    client = redis.asyncio.from_url(settings.redis_url, socket_connect_timeout=seconds, socket_timeout=seconds)
    version = ""
    try:
        async with asyncio.timeout(seconds):
            await client.ping()
            try:
                version = str((await client.info("server")).get("redis_version", ""))
            except ResponseError:
                pass  # INFO is turned off on some managed services: the version stays unknown
            await client.set(key, value, ex=60)
            read = await client.get(key)
            await client.delete(key)
    except TimeoutError:
        return Check("redis", False, f"{shown}: no answer within {seconds:g} s")
    except Exception as exc:
        return Check("redis", False, f"{shown}: {one_line(exc)}")
    finally:
        await client.aclose()
    if read != value:
        return Check("redis", False, f"{shown}: a key read back differs from what was written")
    if version and int(version.split(".")[0]) < 5:
        return Check("redis", False, f"{shown}: Redis {version}; the hub needs Redis 5 or later (streams)")
    server = f" (Redis {version})" if version else ""
    return Check("redis", True, f"{shown}{server}: PING; SET with a 60 s TTL, GET and DEL of a scratch key")


async def check_upstream(settings: Settings, seconds: float) -> Check:
    """GET /v1/models/{model} for every agent's model, through the client the streams use.

    The Models API needs the key and the version header as the Messages API does, and resolves the
    model (or alias) the agents name, without a model call: no tokens are spent.
    """
    if settings.offline:
        return Check("upstream", True, f"offline: no ANTHROPIC_API_KEY, so the built-in model {OFFLINE_MODEL}"
                                       " answers; nothing to reach")
    base = settings.anthropic_base_url.rstrip("/")
    models = sorted({agent.model for agent in settings.agents})
    upstream = AnthropicUpstream(settings)
    try:
        async with asyncio.timeout(seconds):
            answers = await asyncio.gather(*(upstream.get("/v1/models/" + quote(model, safe="")) for model in models))
    except TimeoutError:
        return Check("upstream", False, f"{base}: no answer within {seconds:g} s")
    except httpx.TransportError as exc:
        return Check("upstream", False, f"{base}: cannot reach it ({one_line(exc)})")
    finally:
        await upstream.aclose()
    found, problems = [], []
    for model, (status, body) in zip(models, answers, strict=True):
        kind, message = _api_error(body)
        if status == 200:
            resolved = _json(body).get("id")
            found.append(model if resolved in (None, model) else f"{model} (= {resolved})")
        elif status in (401, 403):
            what = "refused" if status == 401 else "not allowed to read the Models API"
            return Check("upstream", False, f"{base}: the API key is {what} ({status} {kind}: {message})")
        elif status == 404:
            problems.append(f"{model} is not found (404 {kind}: {message}; or ANTHROPIC_BASE_URL is not the"
                            " API's root)")
        else:
            problems.append(f"{model}: HTTP {status} {kind}: {message}")
    if problems:
        return Check("upstream", False, f"{base}: " + "; ".join(problems))
    return Check("upstream", True, f"{base}: the key is accepted and the model{'s' if len(found) > 1 else ''}"
                                   f" {', '.join(found)} found (GET /v1/models/{{id}}, which spends no tokens)")


def _json(body: bytes) -> dict[str, Any]:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _api_error(body: bytes) -> tuple[str, str]:
    """The Anthropic error's type and message (short), or what the body was instead."""
    error = _json(body).get("error")
    if isinstance(error, dict):
        return str(error.get("type", "error")), " ".join(str(error.get("message", "")).split())[:200]
    return "error", "the body is not an Anthropic error" if body else "no body"


def check_access(settings: Settings, users: int | None) -> Check:
    """Whether the server would start as configured: users, or open mode where it is allowed."""
    where = f"{settings.host}:{settings.port}"
    if users:
        return Check("access", True, f"{users} active user{'s' if users > 1 else ''}: every request signs in")
    if settings.host_identity:
        return Check("access", True, "the app's users (a JWT secret, a JWKS or a trusted proxy header): every"
                                     " request signs in")
    if settings.loopback:
        return Check("access", True, f"open mode: no users, so {where} (loopback only) serves without sign-in")
    if settings.allow_anonymous:
        return Check("access", True, f"no users and RELAY_ALLOW_ANONYMOUS=1: anyone who reaches {where} may use it")
    if users is None:
        return Check("access", False, f"{settings.host} is reachable from other machines and the users could not"
                                      " be counted (the database check failed)")
    return Check("access", False, f"no users exist and {settings.host} is reachable from other machines: the server"
                                  " would not start (add one with `deltarelay users add NAME`, bind to 127.0.0.1,"
                                  " or set RELAY_ALLOW_ANONYMOUS=1)")


def configuration(settings: Settings) -> dict[str, str | None]:
    """Every setting by its environment variable, as the server would run with it; secrets masked."""
    shown: dict[str, str | None] = {}
    for f in fields(Settings):
        name = ENV_NAMES.get(f.name)
        if name is None:
            continue
        value = getattr(settings, f.name)
        if value is None:
            text = "unset (offline model)" if f.name == "anthropic_api_key" else None
        elif f.name == "anthropic_api_key":
            text = masked_key(value)
        elif f.name in ("database_url", "redis_url"):
            text = masked_url(value)
        elif isinstance(value, bool):
            text = "1" if value else "0"
        elif isinstance(value, float):
            text = f"{value:g}"
        elif value == "":
            text = "(empty)"
        elif f.name == "system_prompt":
            text = f"set ({len(value)} characters, not shown)"  # an operator's text, not ours to print
        elif f.name in ("jwt_secret", "tools_secret"):
            text = f"set ({len(value.encode())} bytes, not shown)"
        else:
            text = str(value)
        shown[name] = text
    return shown


def changed(settings: Settings) -> list[str]:
    """The environment variables whose setting is not the default, in the configuration's order."""
    default = Settings()
    return [name for field_name, name in ENV_NAMES.items()
            if getattr(settings, field_name) != getattr(default, field_name)]


def secrets_of(settings: Settings) -> list[str]:
    """The secrets the settings hold (API key, passwords in URLs), as written and percent-decoded."""
    found = [settings.anthropic_api_key or "", settings.jwt_secret or "", settings.tools_secret or ""]
    for url in (settings.database_url, settings.redis_url or ""):
        if "://" not in url:
            continue
        rest = url.split("://", 1)[1]
        userinfo = rest[:rest.rfind("@")] if "@" in rest else ""
        if ":" in userinfo:
            password = userinfo.split(":", 1)[1]
            found += [password, unquote(password)]
        for part in urlsplit(url).query.split("&"):
            name, _, value = part.partition("=")
            if "password" in name.lower() and value:
                found += [value, unquote(value)]
    return sorted({secret for secret in found if len(secret) >= 4}, key=len, reverse=True)


def scrub(text: str, hidden: list[str]) -> str:
    """`text` with every secret in `hidden` replaced by ***."""
    for secret in hidden:
        text = text.replace(secret, "***")
    return text


def report(settings: Settings, checks: list[Check]) -> dict[str, Any]:
    """The report as JSON-ready data: ready, the checks, the configuration and the agents."""
    return {
        "ready": all(check.ok for check in checks),
        "checks": [{"name": check.name, "ok": check.ok, "detail": check.detail} for check in checks],
        "configuration": configuration(settings),
        "agents": [{"id": agent.id, "model": agent.model, "maxTokens": agent.max_tokens,
                    "systemPromptChars": len(agent.system), "promptCache": agent.prompt_cache,
                    "thinkingBudget": agent.thinking_budget,
                    "serverTools": [tool["name"] for tool in agent.server_tools],
                    "tools": [tool["name"] for tool in agent.tools],
                    "toolsUrl": masked_url(agent.tools_url) if agent.tools_url else None,
                    "maxToolRounds": agent.max_tool_rounds}
                   for agent in settings.agents],
    }


def render(settings: Settings | None, checks: list[Check]) -> str:
    """The report for people: a line per check, then the configuration (`*`: not the default) and agents."""
    lines = [f"{'ok' if check.ok else 'FAIL':<5} {check.name:<9} {check.detail}" for check in checks]
    if settings is not None:
        set_here = set(changed(settings))
        lines += ["", "configuration (*: not the default)"]
        for name, text in configuration(settings).items():
            lines.append(f"{'*' if name in set_here else ' '} {name:<32} {'unset' if text is None else text}")
        lines += ["", "agents"]
        width = max(len(agent.id) for agent in settings.agents)
        for agent in settings.agents:
            system = f", system prompt of {len(agent.system)} characters" if agent.system else ""
            extras = ""
            if agent.thinking_budget is not None:
                extras += f", thinking {agent.thinking_budget} tokens"
            if agent.server_tools:
                extras += ", " + " and ".join(tool["name"] for tool in agent.server_tools)
            if agent.tools and agent.tools_url:
                extras += (f", tools {', '.join(tool['name'] for tool in agent.tools)} at"
                           f" {masked_url(agent.tools_url)} ({agent.max_tool_rounds} rounds at most)")
            lines.append(f"  {agent.id:<{width}}  model {agent.model}, max_tokens {agent.max_tokens}{system}"
                         f", prompt cache {agent.prompt_cache}{extras}")
    failed = [check.name for check in checks if not check.ok]
    lines += ["", f"not ready: {', '.join(failed)} failed" if failed else "ready"]
    return "\n".join(lines)


def check_command(settings: Settings, seconds: float, as_json: bool) -> int:
    """`deltarelay check`: print the report; 0 when every check passed, else 1."""
    # The report says what failed; the libraries' log lines (a writer's failed batch) would only repeat it.
    logging.getLogger().handlers[:] = [logging.NullHandler()]
    set_here = changed(settings)
    differ = f"{len(set_here)} differs" if len(set_here) == 1 else f"{len(set_here)} differ"
    listed = ": " + ", ".join(set_here) if set_here else ""
    checks = [Check("settings", True, f"valid; {differ} from the defaults{listed}"),
              *asyncio.run(run_checks(settings, seconds))]
    # A driver's error message could quote what it was given: no secret of the settings gets through.
    hidden = secrets_of(settings)
    checks = [Check(check.name, check.ok, scrub(check.detail, hidden)) for check in checks]
    if as_json:
        data = report(settings, checks)
        data["configuration"] = {name: None if text is None else scrub(text, hidden)
                                 for name, text in data["configuration"].items()}
        print(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
    else:
        print(scrub(render(settings, checks), hidden))
    return 0 if all(check.ok for check in checks) else 1


def settings_failed(message: str, as_json: bool) -> int:
    """The report when the settings themselves are invalid: that one line, and not ready."""
    checks = [Check("settings", False, message)]
    if as_json:
        print(orjson.dumps({"ready": False, "checks": [{"name": "settings", "ok": False, "detail": message}],
                            "configuration": None, "agents": None}, option=orjson.OPT_INDENT_2).decode())
    else:
        print(render(None, checks))
    return 1
