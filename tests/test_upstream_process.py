"""The relay against a separate Anthropic-compatible server process (the mock upstream)."""

from __future__ import annotations

import subprocess

from .conftest import SERVER_CWD, SERVER_PYTHON, _clean_env
from .relay_clients import names, sse_stream, text_of, ws_stream


async def test_relay_streams_from_a_real_upstream_server_with_an_api_key(make_server, make_upstream):
    upstream = make_upstream("--words", "30", "--delay-ms", "0")
    relay = make_server({"ANTHROPIC_API_KEY": "sk-ant-test-key", "ANTHROPIC_BASE_URL": upstream.url,
                         "RELAY_MODEL": "claude-haiku-4-5"})

    events = await ws_stream(relay.ws_url, {"message": "through the network"})

    assert names(events)[-1] == "done"
    assert len(text_of(events).split()) == 30
    assert events[0][2]["model"] == "claude-haiku-4-5"
    cost = events[-2][2]
    # Haiku 4.5: $1 input and $5 output per million tokens, exactly.
    assert cost["totalCost"] == (cost["inputTokens"] * 1 + cost["outputTokens"] * 5) / type(cost["totalCost"])(10**6)


async def test_upstream_error_mid_stream_is_an_error_event_and_the_partial_answer_is_saved(make_server, make_upstream):
    upstream = make_upstream("--words", "10", "--delay-ms", "0", "--error", "overloaded-midstream")
    relay = make_server({"ANTHROPIC_API_KEY": "sk-ant-test-key", "ANTHROPIC_BASE_URL": upstream.url})

    events = await sse_stream(relay.url, {"message": "this will break"})

    assert names(events) == ["start"] + ["chunk"] * 5 + ["cost", "error"]
    error = events[-1][2]
    assert (error["code"], error["retryable"]) == ("overloaded", True)
    assert events[-2][2]["estimated"] is True
    assert relay.rows("SELECT content, status, error_code FROM messages WHERE id = ?", error["messageId"]) == [
        (text_of(events), "error", "overloaded")]
    assert "sk-ant-test-key" not in relay.log()


async def test_upstream_http_error_is_an_error_event_that_never_echoes_the_key(make_server, make_upstream):
    upstream = make_upstream("--error", "http-401")
    relay = make_server({"ANTHROPIC_API_KEY": "sk-ant-secret-key", "ANTHROPIC_BASE_URL": upstream.url})

    events = await sse_stream(relay.url, {"message": "who am i"})

    assert names(events) == ["start", "error"]
    assert events[-1][2]["code"] == "auth"
    assert "sk-ant-secret-key" not in str(events)


def test_invalid_configuration_fails_at_start_with_one_clear_line():
    result = subprocess.run([SERVER_PYTHON, "-m", "server"], cwd=SERVER_CWD, capture_output=True, text=True,
                            env=_clean_env({"PORT": "eighty"}), timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["deltarelay: PORT must be a whole number, got 'eighty'"]
