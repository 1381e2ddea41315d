"""Settings: defaults, validation with one clear line, agents."""

from __future__ import annotations

import json

import pytest

from server.config import ConfigError, load_settings


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
        ({"DATABASE_URL": "mysql://x"}, "DATABASE_URL must start with sqlite:// or postgresql://, got 'mysql'"),
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
