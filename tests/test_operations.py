"""Operations (issue 8) against real server processes: usage reports, metrics, JSON logs, health and readiness."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import SERVER_CWD, SERVER_PYTHON, RelayServer, _clean_env, assert_no_traceback
from .relay_clients import names, sse_read, sse_stream, ws_stream
from .test_access import Team, bearer

TODAY = datetime.now(UTC).date().isoformat()


def metric_values(server: RelayServer, headers: dict[str, str] | None = None) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics, keyed by (name, sorted labels)."""
    res = httpx.get(server.url + "/metrics", headers=headers or {})
    assert res.status_code == 200, res.text
    assert res.headers["content-type"].startswith("text/plain")
    values = {}
    for family in text_string_to_metric_families(res.text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def value(values: dict[tuple[str, tuple], float], name: str, **labels: str) -> float:
    return values.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Team]:
    server = RelayServer(tmp_path_factory.mktemp("ops"), {"RELAY_AUTH_CACHE_SECONDS": "0", "RELAY_LOG_FORMAT": "json"})
    yield Team(server)
    server.stop()
    assert_no_traceback(server)


def usage_cli(server: RelayServer, *args: str) -> str:
    """`deltarelay usage` on the server's database: its standard output."""
    return subprocess.run([SERVER_PYTHON, "-m", "server", "usage", "--database-url", server.database_url,
                           *args], cwd=SERVER_CWD, env=_clean_env({}), capture_output=True, text=True, timeout=60,
                          check=True).stdout


async def saved_answers(server: RelayServer, token: str) -> list[dict[str, Any]]:
    """Every assistant message of the user's conversations, read through the REST API."""
    answers = []
    async with httpx.AsyncClient(base_url=server.url, timeout=30, headers=bearer(token)) as client:
        for conversation in (await client.get("/api/conversations")).json()["conversations"]:
            body = (await client.get(f"/api/conversations/{conversation['id']}/messages")).json()
            answers += [m for m in body["messages"] if m["role"] == "assistant"]
    return answers


def sums(answers: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "messages": len(answers),
        "inputTokens": sum(a["inputTokens"] for a in answers),
        "outputTokens": sum(a["outputTokens"] for a in answers),
        "cost": format(sum((Decimal(a["totalCost"]) for a in answers if a["totalCost"]), Decimal(0)), "f"),
    }


async def test_usage_sums_equal_the_saved_rows_exactly_per_user_and_for_an_admin(team):
    server = team.server
    for n in range(3):
        await sse_stream(server.url, {"message": f"alice asks {n}"}, headers=bearer(team.alice))
    first = await sse_stream(server.url, {"message": "bob asks"}, headers=bearer(team.bob))
    await sse_stream(server.url, {"message": "bob again", "conversationId": first[0][2]["conversationId"]},
                     headers=bearer(team.bob))
    alice_answers = await saved_answers(server, team.alice)
    bob_answers = await saved_answers(server, team.bob)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        async def usage(token: str, **params: str) -> dict[str, Any]:
            res = await client.get("/api/usage", params=params, headers=bearer(token))
            assert res.status_code == 200, res.text
            return dict(res.json())

        own = await usage(team.alice, groupBy="model")
        assert own["scope"] == "own"
        expected = sums(alice_answers)
        assert {k: own["total"][k] for k in expected} == expected
        assert [row["key"] for row in own["rows"]] == ["deltarelay-offline"]

        by_day = await usage(team.bob)
        assert by_day["groupBy"] == "day" and len(by_day["rows"]) == 30 and by_day["to"] == TODAY
        today = by_day["rows"][-1]
        assert today["key"] == TODAY and {k: today[k] for k in expected} == sums(bob_answers)
        assert all(row["messages"] == 0 and row["cost"] == "0" for row in by_day["rows"][:-1])

        everyone = await usage(team.root, groupBy="user")
        assert everyone["scope"] == "all"
        per_user = {row["key"]: row for row in everyone["rows"]}
        assert {k: per_user["alice"][k] for k in expected} == sums(alice_answers)
        assert {k: per_user["bob"][k] for k in expected} == sums(bob_answers)
        assert "root" not in per_user
        only_bob = await usage(team.root, user="bob", groupBy="agent")
        assert only_bob["scope"] == "bob" and only_bob["total"]["cost"] == sums(bob_answers)["cost"]

        # Another user's name is not a way in, and bad parameters are clear 400s.
        assert (await client.get("/api/usage", params={"user": "alice"}, headers=bearer(team.bob))).status_code == 404
        for params in ({"groupBy": "week"}, {"from": "yesterday"}, {"from": "2026-11-24", "to": "2026-11-01"},
                       {"from": "2000-01-01", "to": "2026-01-01"}):
            res = await client.get("/api/usage", params=params, headers=bearer(team.alice))
            assert res.status_code == 400 and res.json()["error"]["code"] == "invalid_request"
        assert (await client.get("/api/usage")).status_code == 401

    # The command line prints the same figures: everyone's by default, as CSV on request.
    table = {row[0]: row for row in csv.reader(io.StringIO(usage_cli(server, "--group-by", "user", "--csv")))}
    assert table["alice"][1:4] == [str(expected["messages"]), str(expected["inputTokens"]),
                                   str(expected["outputTokens"])]
    assert table["alice"][6] == expected["cost"]
    assert table["total"][6] == everyone["total"]["cost"]
    text = usage_cli(server, "--user", "bob")
    assert sums(bob_answers)["cost"] in text and TODAY in text


async def test_usage_report_cli_and_metrics_show_what_cache_reads_saved(make_server):
    """A conversation whose turns read the cached prefix (the offline model emulates the cache; the default
    agent caches for 5 minutes): the report, the command line and /metrics give the cache reads and the money
    they saved against uncached input, exactly. Fails if the savings are left out or priced wrongly."""
    server = make_server({"RELAY_SYSTEM_PROMPT": "s" * 20_000, "RELAY_OFFLINE_DELAY_MS": "0"})
    first = await sse_stream(server.url, {"message": "first question"})
    for text in ("second question", "third question"):
        await sse_stream(server.url, {"message": text, "conversationId": first[0][2]["conversationId"]})
    answers = []
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        conversation = (await client.get(f"/api/conversations/{first[0][2]['conversationId']}/messages")).json()
        answers = [m for m in conversation["messages"] if m["role"] == "assistant"]
        report = (await client.get("/api/usage", params={"groupBy": "model"})).json()
    reads = [a["cacheReadInputTokens"] for a in answers]
    assert reads[0] == 0 and all(read > 5000 for read in reads[1:])  # turns 2 and 3 read the prefix before them
    saved = sum(reads) * (Decimal("1") - Decimal("0.10")) / 1_000_000  # deltarelay-offline: Haiku 4.5's prices
    row = report["rows"][0]
    assert row["key"] == "deltarelay-offline" and row["cacheReadInputTokens"] == sum(reads)
    assert Decimal(row["cacheSavings"]) == saved and report["total"]["cacheSavings"] == row["cacheSavings"]
    table = list(csv.reader(io.StringIO(usage_cli(server, "--group-by", "model", "--csv"))))
    assert table[0][5:] == ["cache read tokens", "cost (USD)", "cache savings (USD)"]
    assert table[-1][0] == "total" and table[-1][5] == str(sum(reads)) and Decimal(table[-1][7]) == saved
    metrics = metric_values(server)
    assert value(metrics, "deltarelay_tokens_total", model="deltarelay-offline", kind="cache_read") == sum(reads)
    assert value(metrics, "deltarelay_cache_savings_dollars_total", model="deltarelay-offline") == \
        pytest.approx(float(saved))


async def test_json_logs_have_a_line_per_stream_start_and_end_with_its_fields_and_no_message_text(team):
    server = team.server
    secret_words = "my bank password is hunter2"
    events = await sse_stream(server.url, {"message": secret_words}, headers=bearer(team.alice))
    stream_id = events[0][2]["streamId"]
    log = server.log()
    assert secret_words not in log and team.alice not in log
    lines = [json.loads(line) for line in log.splitlines() if line.strip()]  # every line is one JSON object
    mine = [line for line in lines if line.get("streamId") == stream_id]
    assert [line["event"] for line in mine] == ["stream_start", "stream_end"]
    start, end = mine
    assert start["user"] == "alice" and start["model"] == "deltarelay-offline" and start["level"] == "info"
    assert end["status"] == "complete" and end["outputTokens"] == events[-2][2]["outputTokens"]
    assert Decimal(end["cost"]) == events[-2][2]["totalCost"]
    assert end["timeToFirstTokenMs"] >= 0 and end["durationMs"] >= end["timeToFirstTokenMs"]
    assert end["chunks"] == names(events).count("chunk")
    answers = {a["streamId"]: a for a in await saved_answers(server, team.alice)}
    assert end["taskTraceId"] == answers[stream_id]["taskTraceId"] == stream_id
    assert end["traceSessionId"] == answers[stream_id]["traceSessionId"] == start["traceSessionId"]


def test_metrics_are_for_admins_once_users_exist(team):
    server = team.server
    assert httpx.get(server.url + "/metrics").status_code == 401
    assert httpx.get(server.url + "/metrics", headers=bearer(team.bob)).status_code == 404
    assert metric_values(server, bearer(team.root))


async def test_metrics_move_as_streams_run_resume_get_cancelled_and_fail(make_server, make_upstream):
    upstream = make_upstream("--words", "20", "--delay-ms", "0")
    server = make_server({"RELAY_OFFLINE_DELAY_MS": "30", "RELAY_OFFLINE_WORDS": "40"})
    before = metric_values(server)

    events = await sse_stream(server.url, {"message": "count me"})
    chunks = names(events).count("chunk")
    ws_events = await ws_stream(server.ws_url, {"message": "count me too"})
    after = metric_values(server)
    assert value(after, "deltarelay_streams_started_total") - value(before, "deltarelay_streams_started_total") == 2
    assert value(after, "deltarelay_streams_finished_total", status="complete") == 2
    assert value(after, "deltarelay_chunks_relayed_total") == chunks + names(ws_events).count("chunk")
    assert value(after, "deltarelay_time_to_first_token_seconds_count") == 2
    assert value(after, "deltarelay_stream_duration_seconds_count") == 2
    output = events[-2][2]["outputTokens"] + ws_events[-2][2]["outputTokens"]
    assert value(after, "deltarelay_tokens_total", model="deltarelay-offline", kind="output") == output
    cost = events[-2][2]["totalCost"] + ws_events[-2][2]["totalCost"]
    assert value(after, "deltarelay_cost_dollars_total", model="deltarelay-offline") == pytest.approx(float(cost))

    # While a client reads a running stream, it is active on its transport; a resume and a cancel are counted.
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        started = (await client.post("/api/command-center/message", json={"message": "watch me"},
                                     headers={"Accept": "application/json"})).json()
        reader = asyncio.create_task(sse_read(server.url, started["streamId"]))
        async with asyncio.timeout(10):
            while True:
                if value(metric_values(server), "deltarelay_active_streams", transport="sse") == 1:
                    break
                await asyncio.sleep(0.02)  # waiting for the reader to attach
        assert value(metric_values(server), "deltarelay_streams_generating") == 1
        await client.post(f"/api/command-center/streams/{started['streamId']}/cancel")
        watched = await reader
    assert watched[-1][2]["stopReason"] == "cancelled"
    later = metric_values(server)
    assert value(later, "deltarelay_resumes_total", transport="sse") == 1
    assert value(later, "deltarelay_streams_finished_total", status="cancelled") == 1
    assert value(later, "deltarelay_active_streams", transport="sse") == 0
    assert value(later, "deltarelay_streams_generating") == 0

    # An upstream that fails before the first delta: each attempt is an upstream error, each retry a retry.
    failing = make_upstream("--error", "http-529")
    broken = make_server({"ANTHROPIC_API_KEY": "sk-ant-x", "ANTHROPIC_BASE_URL": failing.url,
                          "RELAY_RETRY_ATTEMPTS": "2", "RELAY_RETRY_BASE_DELAY": "0.01"})
    events = await sse_stream(broken.url, {"message": "fail please"})
    assert events[-1][1] == "error" and events[-1][2]["code"] == "overloaded"
    failed = metric_values(broken)
    assert value(failed, "deltarelay_upstream_errors_total", code="overloaded") == 3
    assert value(failed, "deltarelay_upstream_retries_total") == 2
    assert value(failed, "deltarelay_streams_finished_total", status="error") == 1
    assert upstream.url  # the first upstream stayed unused: the offline model served the first server


async def test_limit_refusals_are_counted_by_limit(make_server):
    server = make_server({"RELAY_LIMIT_REQUESTS_PER_MINUTE": "2"})
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        for _ in range(4):
            await client.get("/api/conversations")
    assert value(metric_values(server), "deltarelay_limit_refusals_total", limit="requests_per_minute") == 2


def test_healthz_is_liveness_and_readyz_turns_503_while_shutting_down(make_server):
    server = make_server({"RELAY_OFFLINE_DELAY_MS": "50", "RELAY_OFFLINE_WORDS": "200",
                          "RELAY_SHUTDOWN_GRACE_SECONDS": "10"})
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(server.url + "/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "ready", "database": "ok", "accepting": "ok"}
    started = httpx.post(server.url + "/api/command-center/message", json={"message": "long one"},
                         headers={"Accept": "application/json"})
    assert started.status_code == 202
    server.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while (draining := httpx.get(server.url + "/readyz")).status_code != 503 and time.monotonic() < deadline:
        time.sleep(0.02)  # waiting for the signal to arrive
    assert draining.json()["accepting"] == "shutting_down"
    assert httpx.get(server.url + "/healthz").status_code == 200
    server.proc.wait(timeout=30)


@pytest.mark.parametrize(("env", "says"), [
    ({"DATABASE_URL": "postgres://postgres:pw-never-shown@127.0.0.1:1/nowhere"},
     "cannot open the database postgresql://postgres:***@127.0.0.1:1/nowhere"),
    ({"REDIS_URL": "redis://:pw-never-shown@127.0.0.1:1/0"}, "cannot reach Redis at redis://:***@127.0.0.1:1/0"),
])
def test_an_unreachable_database_or_redis_stops_the_start_with_one_line(tmp_path, env, says):
    base = {"DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}"}
    result = subprocess.run([SERVER_PYTHON, "-m", "server", "--port", "1"], cwd=SERVER_CWD,
                            env=_clean_env({**base, **env}), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and says in result.stderr and "Traceback" not in result.stderr
    assert "pw-never-shown" not in result.stderr
