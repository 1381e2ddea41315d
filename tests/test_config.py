"""Settings: defaults, validation with one clear line, agents."""

from __future__ import annotations

import json

import pytest
from databases import DatabaseURL

from server.config import ConfigError, database_url, load_settings, masked_url
from server.store import asyncpg_dsn, databases_url, sqlite_path


def test_defaults_run_offline_on_a_local_sqlite_file():
    settings = load_settings({})
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert settings.database_url == "sqlite:///deltarelay.db"
    assert settings.offline
    assert settings.agent(None).model == "deltarelay-offline"
    assert settings.upstream_max_connections > 100  # httpx's default of 100 would queue the 101st stream
    assert settings.redis_url is None  # one instance, streams in process


def test_redis_url_is_read_from_the_environment():
    settings = load_settings({"REDIS_URL": "redis://127.0.0.1:6379/3", "RELAY_REDIS_PREFIX": "prod"})
    assert (settings.redis_url, settings.redis_prefix) == ("redis://127.0.0.1:6379/3", "prod")


def test_an_api_key_switches_to_the_configured_model():
    settings = load_settings({"ANTHROPIC_API_KEY": "sk-x", "RELAY_MODEL": "claude-haiku-4-5"})
    assert not settings.offline
    assert settings.agent("default").model == "claude-haiku-4-5"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PORT": "http"}, "PORT must be a whole number, got 'http'"),
        ({"PORT": "0"}, "PORT must be greater than 0, got '0'"),
        ({"RELAY_IDLE_TIMEOUT": "nan"}, "RELAY_IDLE_TIMEOUT must be a finite number, got 'nan'"),
        ({"RELAY_OFFLINE_DELAY_MS": "-1"}, "RELAY_OFFLINE_DELAY_MS must be 0 or more, got '-1'"),
        ({"DATABASE_URL": "mysql://x"}, "DATABASE_URL must start with sqlite:// or postgresql:// (sqlite+aiosqlite://,"
                                        " postgres:// and postgresql+asyncpg:// mean the same), got 'mysql'"),
        ({"ANTHROPIC_BASE_URL": "ftp://x"}, "ANTHROPIC_BASE_URL must be an http:// or https:// URL"),
        ({"REDIS_URL": "http://x"}, "REDIS_URL must start with redis://, rediss:// or unix://, got 'http'"),
        ({"RELAY_REDIS_PREFIX": "a b"}, "RELAY_REDIS_PREFIX must be a non-empty word without spaces"),
        ({"RELAY_INSTANCE_LEASE_SECONDS": "0"}, "RELAY_INSTANCE_LEASE_SECONDS must be greater than 0, got '0'"),
    ],
)
def test_invalid_settings_fail_with_one_line_naming_the_variable(env, message):
    with pytest.raises(ConfigError) as caught:
        load_settings(env)
    assert str(caught.value) == message


def test_agents_file_adds_agents_with_their_own_model_and_prompt(tmp_path):
    path = tmp_path / "agents.json"
    path.write_text(json.dumps({"agents": [
        {"id": "poet", "model": "claude-haiku-4-5", "system": "Answer in verse.", "maxTokens": 200},
        {"id": "plain"},
    ]}))
    settings = load_settings({"RELAY_AGENTS_FILE": str(path)})
    poet = settings.agent("poet")
    assert (poet.model, poet.system, poet.max_tokens) == ("claude-haiku-4-5", "Answer in verse.", 200)
    assert settings.agent("plain").model == "deltarelay-offline"
    assert settings.agent("default") is not None
    assert settings.agent("nobody") is None


def test_a_broken_agents_file_is_a_config_error(tmp_path):
    path = tmp_path / "agents.json"
    path.write_text('{"agents": [{"model": "x"}]}')
    with pytest.raises(ConfigError, match="RELAY_AGENTS_FILE"):
        load_settings({"RELAY_AGENTS_FILE": str(path)})
    with pytest.raises(ConfigError, match="cannot be read"):
        load_settings({"RELAY_AGENTS_FILE": str(tmp_path / "missing.json")})


def test_prompt_caching_is_5m_by_default_and_set_per_agent_or_for_all(tmp_path):
    """RELAY_PROMPT_CACHE is every agent's default, an agent's promptCache overrides it. Fails if the default
    stops being 5m, or the agents file's value (or the variable) is not passed on."""
    path = tmp_path / "agents.json"
    path.write_text(json.dumps({"agents": [{"id": "hour", "promptCache": "1h"}, {"id": "plain"}]}))
    assert load_settings({}).agent(None).prompt_cache == "5m"
    settings = load_settings({"RELAY_AGENTS_FILE": str(path), "RELAY_PROMPT_CACHE": "off"})
    assert [settings.agent(name).prompt_cache for name in ("default", "hour", "plain")] == ["off", "1h", "off"]


def test_a_wrong_prompt_cache_stops_the_start_with_one_line(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_settings({"RELAY_PROMPT_CACHE": "2h"})
    assert str(caught.value) == "RELAY_PROMPT_CACHE must be off, 5m or 1h, got '2h'"
    path = tmp_path / "agents.json"
    path.write_text(json.dumps({"agents": [{"id": "support", "promptCache": True}]}))
    with pytest.raises(ConfigError) as caught:
        load_settings({"RELAY_AGENTS_FILE": str(path)})
    assert str(caught.value) == (f"RELAY_AGENTS_FILE {str(path)!r} is not a valid agents file: agent 'support':"
                                 " promptCache must be off, 5m or 1h, got True")


@pytest.mark.parametrize(("given", "canonical"), [
    ("sqlite:///deltarelay.db", "sqlite:///deltarelay.db"),
    ("sqlite+aiosqlite:///deltarelay.db", "sqlite:///deltarelay.db"),
    ("SQLite+aiosqlite:////srv/relay/data.db", "sqlite:////srv/relay/data.db"),
    ("postgresql://relay:pw@db.internal:5432/relay", "postgresql://relay:pw@db.internal:5432/relay"),
    ("postgres://relay:pw@db.internal:5432/relay", "postgresql://relay:pw@db.internal:5432/relay"),
    ("postgresql+asyncpg://relay@db.internal/relay", "postgresql://relay@db.internal/relay"),
    # What hosts hand out: libpq's sslmode is kept; the databases library's ssl= is the same setting.
    ("postgres://u:p@h:5432/d?sslmode=require", "postgresql://u:p@h:5432/d?sslmode=require"),
    ("postgresql://u@h/d?ssl=true", "postgresql://u@h/d?sslmode=verify-full"),
    ("postgresql://u@h/d?ssl=false", "postgresql://u@h/d?sslmode=disable"),
    ("postgresql://u@h/d?max_size=4&ssl=prefer&min_size=1", "postgresql://u@h/d?sslmode=prefer&min_size=1&max_size=4"),
])
def test_database_urls_have_one_form_per_database(given, canonical):
    """Fails before the fix: sqlite+aiosqlite:// and postgresql+asyncpg:// were refused, postgres:// kept as given,
    and ?ssl= passed through unchanged."""
    assert load_settings({"DATABASE_URL": given}).database_url == canonical
    assert database_url(canonical) == canonical


@pytest.mark.parametrize(("url", "says"), [
    ("postgresql+psycopg2://u:secretpw@h/d", "got 'postgresql+psycopg2'"),
    ("mysql://u:secretpw@h/d", "got 'mysql'"),
    ("sqlite+pysqlite:///x.db", "got 'sqlite+pysqlite'"),
    ("sqlite:x.db", "got 'sqlite'"),
    ("sqlite://host/x.db", "three slashes, then the file"),
    ("sqlite:///x.db?mode=ro", "takes no parameters"),
    ("sqlite:///:memory:", "must name a file"),
    ("sqlite:///", "must name a file"),
    ("postgresql://u:secretpw@h:port/d", "port that is not a number"),
    ("postgresql://u:secretpw@h/d?channel_binding=require", "parameter 'channel_binding' is not supported"),
    ("postgresql://u:secretpw@h/d?sslmode=sometimes", "sslmode must be one of disable, allow, prefer"),
    ("postgresql://u:secretpw@h/d?ssl=true&sslmode=disable", "ssl and sslmode are one setting"),
    ("postgresql://u:secretpw@h/d?max_size=0", "max_size must be a whole number above 0"),
])
def test_other_database_urls_are_refused_with_one_line_that_never_holds_the_password(url, says):
    """Fails before the fix for every row but mysql: they were accepted (and failed later, or were ignored)."""
    with pytest.raises(ConfigError) as caught:
        load_settings({"DATABASE_URL": url})
    message = str(caught.value)
    assert says in message and "DATABASE_URL" in message
    assert "secretpw" not in message and "\n" not in message


@pytest.mark.parametrize("url", [
    "sqlite:///relative.db", "sqlite:////absolute/dir/x.db", "sqlite:///with%20space.db", "sqlite:///a%3Fb%23c.db",
])
def test_the_sqlite_writer_and_the_read_pool_open_the_same_file(url):
    """The writer thread opens sqlite_path(url); databases opens its own reading of the URL: they must agree.
    Fails if sqlite_path stops percent-decoding (with%20space.db)."""
    assert sqlite_path(url) == DatabaseURL(databases_url(url)).database


def test_the_drivers_get_the_canonical_url_in_the_form_each_reads():
    """databases reads ssl= (not sslmode=) and asyncpg.connect reads libpq's form without the pool sizes.
    Fails before the fix: databases_url passed sslmode through, which databases ignores."""
    url = "postgres://u:p%40ss@h:5432/d?sslmode=require&max_size=3"
    assert databases_url(url) == "postgresql+asyncpg://u:p%40ss@h:5432/d?ssl=require&max_size=3"
    parsed = DatabaseURL(databases_url(url))
    assert (parsed.password, parsed.options) == ("p@ss", {"ssl": "require", "max_size": "3"})
    assert asyncpg_dsn(url) == "postgresql://u:p%40ss@h:5432/d?sslmode=require"
    assert databases_url("sqlite:///x.db") == "sqlite+aiosqlite:///x.db"


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://relay:s3cret@db:5432/relay", "postgresql://relay:***@db:5432/relay"),
    ("postgresql://relay@db/relay?sslmode=require", "postgresql://relay@db/relay?sslmode=require"),
    ("redis://:s3cret@cache:6379/0", "redis://:***@cache:6379/0"),
    ("rediss://default:s3cret@cache:6380/0?password=s3cret", "rediss://default:***@cache:6380/0?password=***"),
    ("postgresql://relay:s3/cr#et@db/relay", "postgresql://relay:***@db/relay"),  # not percent-encoded
    ("sqlite:////srv/x.db", "sqlite:////srv/x.db"),
])
def test_masked_urls_keep_everything_but_the_password(url, shown):
    assert masked_url(url) == shown


TOOL = {"name": "get_weather", "description": "The weather", "input_schema": {"type": "object"}}


@pytest.mark.parametrize(("entry", "message"), [
    ({"thinking": {"budgetTokens": 1000}}, "thinking budgetTokens must be at least 1024, got 1000"),
    ({"thinking": {"budgetTokens": 4096}, "maxTokens": 4096},
     "thinking budgetTokens (4096) must be less than maxTokens (4096)"),
    ({"thinking": {"budget": 2000}}, "thinking must be {\"budgetTokens\": N} or false, got {'budget': 2000}"),
    ({"serverTools": [{"type": "code_execution"}]},
     "serverTools type must be web_search or web_fetch, got 'code_execution'"),
    ({"serverTools": [{"type": "web_search", "maxUses": 0}]},
     "serverTools web_search maxUses must be a whole number above 0, got 0"),
    ({"tools": [{"description": "x", "input_schema": {}}], "toolsUrl": "https://app.example/t"},
     "each tool needs a name"),
    ({"tools": [{"name": "t"}], "toolsUrl": "https://app.example/t"},
     "tool 't' needs an input_schema (a JSON schema object)"),
    ({"tools": [TOOL]}, "tools need a toolsUrl, where the app runs them"),
    ({"tools": [TOOL], "toolsUrl": "http://app.example/t"},
     "toolsUrl must be an https:// URL (or http:// on a loopback address), got 'http://app.example/t'"),
    ({"maxToolRounds": 0}, "maxToolRounds must be a whole number of at least 1, got 0"),
])
def test_each_tools_mistake_in_the_agents_file_stops_the_start_with_one_line(tmp_path, entry, message):
    path = tmp_path / "agents.json"
    path.write_text(json.dumps({"agents": [{"id": "helper", **entry}]}))
    with pytest.raises(ConfigError) as caught:
        load_settings({"RELAY_AGENTS_FILE": str(path), "RELAY_TOOLS_SECRET": "s"})
    assert str(caught.value) == f"RELAY_AGENTS_FILE {str(path)!r} is not a valid agents file: agent 'helper': {message}"
    assert "\n" not in str(caught.value)


def test_agent_tools_thinking_and_server_tools_are_read_in_the_api_form(tmp_path):
    path = tmp_path / "agents.json"
    path.write_text(json.dumps({"agents": [{
        "id": "helper", "maxTokens": 8000, "thinking": {"budgetTokens": 2048},
        "serverTools": [{"type": "web_search", "maxUses": 5, "allowedDomains": ["example.com"]},
                        {"type": "web_fetch"}],
        "tools": [{"name": "t", "inputSchema": {"type": "object"}}], "toolsUrl": "http://127.0.0.1:9000/tools",
        "maxToolRounds": 3, "betas": ["context-1m-2025-08-07"]}]}))
    settings = load_settings({"RELAY_AGENTS_FILE": str(path), "RELAY_TOOLS_SECRET": "s", "RELAY_TOOLS_TIMEOUT": "2.5"})
    agent = settings.agent("helper")
    assert agent is not None
    assert agent.thinking_budget == 2048 and agent.max_tool_rounds == 3
    assert agent.request_tools == [
        {"type": "web_search_20250305", "name": "web_search", "max_uses": 5, "allowed_domains": ["example.com"]},
        {"type": "web_fetch_20250910", "name": "web_fetch"},
        {"name": "t", "input_schema": {"type": "object"}}]
    assert agent.request_betas == ("context-1m-2025-08-07", "web-fetch-2025-09-10")
    assert (settings.tools_secret, settings.tools_timeout) == ("s", 2.5)
    assert settings.agent(None).tools == () and settings.agent(None).thinking_budget is None


def test_tools_without_a_tools_secret_stop_the_start(tmp_path):
    path = tmp_path / "agents.json"
    path.write_text(json.dumps({"agents": [{"id": "helper", "tools": [TOOL], "toolsUrl": "https://app.example/t"}]}))
    with pytest.raises(ConfigError) as caught:
        load_settings({"RELAY_AGENTS_FILE": str(path)})
    assert str(caught.value) == ("RELAY_TOOLS_SECRET must be set: agent helper has tools, and their calls are signed"
                                 " with it")
    with pytest.raises(ConfigError) as caught:
        load_settings({"RELAY_TOOLS_TIMEOUT": "0"})
    assert str(caught.value) == "RELAY_TOOLS_TIMEOUT must be greater than 0, got '0'"
