"""Faults at the edges of the process (issue 14): the open-file limit, revoked credentials on open sockets,
concurrent answers against a daily budget.

Real server processes (their open-file limit lowered in the child with setrlimit), real sockets, a real
SQLite file; the two-instance budget race runs on PostgreSQL and Redis (TEST_DATABASE_URLS, TEST_REDIS_URL).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest
import redis.asyncio
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from server.auth import ANONYMOUS, Authenticator, new_secret, secret_hash
from server.budget import LocalLedger, RedisLedger
from server.config import OFFLINE_MODEL, load_settings
from server.pricing import PRICES, Usage, cost_of
from server.protocol.frames import SendMessage
from server.protocol.tokens import request_tokens
from server.store import Reply, Status, Store, new_id

from .conftest import _on_postgresql, stored_cost
from .fakes import relay_in_process
from .relay_clients import expected_words, sse_stream
from .test_access import add_user, bearer, run_cli

WS_PATH = "/api/command-center/ws"
REDIS_URL = os.environ.get("TEST_REDIS_URL", "")
POSTGRES_URLS = [url.strip() for url in os.environ.get("TEST_DATABASE_URLS", "").split(",")
                 if url.strip().startswith(("postgresql:", "postgres:"))]
needs_redis = pytest.mark.skipif(not REDIS_URL, reason="set TEST_REDIS_URL=redis://127.0.0.1:6379/7")
needs_instances = pytest.mark.skipif(
    not (REDIS_URL and POSTGRES_URLS),
    reason="set TEST_REDIS_URL=redis://127.0.0.1:6379/7 and TEST_DATABASE_URLS=postgresql://… to run two instances",
)
HARD_LIMIT = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
# Every stream of the fd tests is one user's: no per-user limit may refuse them, and no lookup is cached.
UNLIMITED = {"RELAY_LIMIT_CONNECTIONS": "0", "RELAY_LIMIT_CONCURRENT_STREAMS": "0",
             "RELAY_LIMIT_REQUESTS_PER_MINUTE": "0", "RELAY_AUTH_CACHE_SECONDS": "0", "RELAY_OFFLINE_WORDS": "5"}


def open_files(soft: int, hard: int) -> Callable[[], None]:
    """A preexec_fn: the server process starts with this open-file limit."""
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture
def many_files() -> Iterator[None]:
    """This test process opens a socket per stream: room for 1,000 of them and more."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"the hard open-file limit ({hard}) leaves no room for 1,000 client sockets")
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096) if hard != resource.RLIM_INFINITY else 4096, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def stream_once(port: int, token: str, message: str) -> str:
    """One SSE answer on a socket of its own: "ok" when it ended `done` with a saved message, else what went wrong."""
    body = json.dumps({"message": message}).encode()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:
        return f"connect: {type(exc).__name__}"
    try:
        writer.write(b"POST /api/command-center/message HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
                     + token.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                     b"Connection: close\r\n\r\n%s" % (len(body), body))
        response = await reader.read()  # to the end: the server closes after the response
    except OSError as exc:
        return f"socket: {type(exc).__name__}"
    finally:
        writer.close()
    if not response:
        return "socket: closed unanswered"
    status = response.split(b" ", 2)[1].decode()
    if status != "200":
        return f"HTTP {status}"
    done = re.search(rb"event: done\ndata: (\{.*?\})\n", response)  # a write never splits an event
    if done is None:
        return "no done event"
    return "ok" if json.loads(done.group(1))["messageId"] else "done without a saved message"


async def streams_at_once(port: int, token: str, count: int) -> Counter[str]:
    async with asyncio.timeout(300):  # a hang guard, not a measure
        outcomes = await asyncio.gather(*(stream_once(port, token, f"stream {i}") for i in range(count)))
    return Counter(outcomes)


def saved_answers(server: Any) -> int:
    return server.count("SELECT COUNT(*) FROM messages WHERE role = 'assistant' AND status = 'complete'")


# ---- Open files ---------------------------------------------------------------------------------


@pytest.mark.skipif(HARD_LIMIT != resource.RLIM_INFINITY and HARD_LIMIT < 4096,
                    reason=f"the hard open-file limit ({HARD_LIMIT}) leaves no room to raise the soft one")
async def test_a_thousand_streams_complete_three_runs_in_a_row_at_a_soft_limit_of_1024(make_server, many_files):
    """1,000 concurrent SSE streams of one token, its lookup never cached, three runs: every one completes.

    Fails before the fix: every request read the token through a new aiosqlite connection (a thread and a file
    each) and all 1,000 got a 500 (`unable to open database file`), in every run. Fails without the raise of the
    soft limit (cli.raise_open_file_limit): 1,000 sockets and the process's own files pass 1,024, and the
    connections past it are dropped at accept.
    """
    server = make_server(UNLIMITED, preexec_fn=open_files(1024, HARD_LIMIT))
    token = add_user(server.database_url, "crowd")
    for run in range(3):
        assert await streams_at_once(server.port, token, 1000) == Counter({"ok": 1000}), f"run {run + 1}"
    assert saved_answers(server) == 3000
    assert f"open files: soft limit raised from 1024 to {HARD_LIMIT} (the hard limit)" in server.log()


async def test_at_a_hard_limit_of_1024_connections_past_it_are_dropped_at_accept_and_never_get_a_500(
        make_server, many_files):
    """The limit cannot be raised: 1,000 concurrent streams, three runs. Every connection the server took is
    answered and saved; only the ones past the limit are closed unanswered at accept, never an HTTP error.

    Fails before the fix: all 1,000 got a 500 in every run. Fails if a pooled read connection opens the WAL on
    its first query instead of at connect, or the writer spills its savepoint journal to a temporary file
    (`PRAGMA temp_store=MEMORY` in the writer): those are 500s once sockets take every descriptor. (With reads
    through `databases` and single flight, about one read connection is open at a time and this passes: the
    test of the pool itself is test_sqlite_reads_open_no_file_when_the_process_has_no_descriptor_left.)
    """
    server = make_server(UNLIMITED, preexec_fn=open_files(1024, 1024))
    token = add_user(server.database_url, "crowd")
    answered = 0
    for run in range(3):
        outcomes = await streams_at_once(server.port, token, 1000)
        dropped = {outcome for outcome in outcomes if outcome != "ok"}
        assert dropped <= {"socket: closed unanswered", "socket: ConnectionResetError"}, (run, outcomes)
        # The process holds about 40 files of its own (its database connections among them).
        assert outcomes["ok"] >= 900, (run, outcomes)
        answered += outcomes["ok"]
    assert saved_answers(server) == answered
    assert "open files: limit 1024 (hard limit 1024)" in server.log()
    assert "unable to open database file" not in server.log()


def test_the_start_says_when_the_hard_limit_cannot_hold_the_upstream_pool(make_server):
    """With an API key each answer holds an upstream connection and, usually, a client one: at a hard limit of 1024
    the default pool (4,096) cannot be held, and the start says which setting to lower. Fails without
    cli.check_open_file_limit."""
    upstream = {"ANTHROPIC_API_KEY": "sk-test", "ANTHROPIC_BASE_URL": "http://127.0.0.1:9"}  # never called
    server = make_server(upstream, preexec_fn=open_files(1024, 1024))
    warning = re.search(r"WARNING deltarelay: open files: the limit of 1024 cannot hold "
                        r"RELAY_UPSTREAM_MAX_CONNECTIONS=4096 answers.*lower RELAY_UPSTREAM_MAX_CONNECTIONS to (\d+)",
                        server.log())
    assert warning is not None, server.log()
    advised = warning.group(1)
    assert 400 <= int(advised) < 512
    server.stop()
    fitting = make_server({**upstream, "RELAY_UPSTREAM_MAX_CONNECTIONS": advised}, preexec_fn=open_files(1024, 1024))
    assert "cannot hold" not in fitting.log()


async def test_sqlite_reads_open_no_file_when_the_process_has_no_descriptor_left(tmp_path):
    """Reads go through the pool's connections, opened (WAL included) at connect: with not one file descriptor
    left, 200 concurrent reads all succeed. Fails with reads through `databases` (Store.reads = Store.db), which
    opens a connection per read: `unable to open database file`."""
    store = Store(f"sqlite:///{tmp_path}/reads.db", pool_size=4)
    await store.connect()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        await store.add_user("alice", "a" * 64)
        lowest_free = os.open(os.devnull, os.O_RDONLY)  # a new descriptor takes the lowest free number
        os.close(lowest_free)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
        with pytest.raises(OSError):
            os.open(os.devnull, os.O_RDONLY)  # no file can be opened now
        async with asyncio.timeout(60):
            users = await asyncio.gather(*(store.user_by_token_hash("a" * 64) for _ in range(200)))
            listings = await asyncio.gather(*(store.list_conversations(None) for _ in range(20)))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        await store.disconnect()
    assert all(user is not None and user["name"] == "alice" for user in users)
    assert listings == [[]] * 20


async def test_concurrent_lookups_of_one_token_and_of_open_mode_make_one_read_each(tmp_path):
    """100 requests with one token while its lookup is not cached: one database read (single flight), and the
    next request reads again. Fails without the SingleFlight in Authenticator: 100 reads each."""
    store = Store(f"sqlite:///{tmp_path}/auth.db")
    await store.connect()
    try:
        token = new_secret()
        await store.add_user("alice", secret_hash(token))
        auth = Authenticator(load_settings({}, database_url=store.url, auth_cache_seconds=0), store)
        reads: Counter[str] = Counter()

        def counted(name: str, read: Any) -> Any:
            async def counting(*args: Any) -> Any:
                reads[name] += 1
                return await read(*args)
            return counting

        store.user_by_token_hash = counted("token", store.user_by_token_hash)  # type: ignore[method-assign]
        store.active_user_count = counted("open", store.active_user_count)  # type: ignore[method-assign]
        scope = {"type": "http", "method": "GET", "headers": [(b"authorization", f"Bearer {token}".encode())]}
        users = await asyncio.gather(*(auth.user(scope) for _ in range(100)))
        assert {user.name for user in users} == {"alice"} and reads["token"] == 1
        await auth.user(scope)
        assert reads["token"] == 2  # nothing is cached with RELAY_AUTH_CACHE_SECONDS=0
        assert await asyncio.gather(*(auth.open_mode() for _ in range(100))) == [False] * 100
        assert reads["open"] == 1
    finally:
        await store.disconnect()


# ---- Revoked credentials on an open WebSocket ---------------------------------------------------


async def wait_for_answer(server: Any, stream_id: str) -> tuple[str, str]:
    """(status, content) of a stream's answer once it is no longer streaming."""
    async with asyncio.timeout(60):
        while True:
            rows = server.rows("SELECT status, content FROM messages WHERE stream_id = ? AND role = 'assistant'",
                               stream_id)
            if rows and rows[0][0] != "streaming":
                return rows[0][0], rows[0][1]
            await asyncio.sleep(0.05)  # noqa: ASYNC110 - the answer is another process's


async def read_until_closed(socket: Any) -> ConnectionClosed:
    """Read frames until the server closes the socket; the timeout guards a socket that is never closed."""
    try:
        async with asyncio.timeout(30):
            while True:
                await socket.recv()
    except ConnectionClosed as closed:
        return closed


async def test_a_revoked_users_open_websocket_is_closed_with_4401_and_its_running_answer_is_saved(make_server):
    """The socket authenticated at its handshake and pings keep it alive; after `deltarelay users revoke` it is
    closed with 4401 (within RELAY_AUTH_CACHE_SECONDS=1; the test's timeout only guards a hang), and the answer it
    was reading goes on and is saved whole. Fails without Authenticator.watch: the socket stays open."""
    server = make_server({"RELAY_AUTH_CACHE_SECONDS": "1", "RELAY_OFFLINE_DELAY_MS": "25",
                          "RELAY_OFFLINE_WORDS": "200"})  # a 5-second answer
    token = add_user(server.database_url, "leaver")
    async with websockets.connect(server.ws_url + WS_PATH, additional_headers=bearer(token)) as socket:
        await socket.send(json.dumps({"type": "message", "message": "a long answer"}))
        frames: list[dict[str, Any]] = []
        async with asyncio.timeout(30):
            while sum(frame["event"] == "chunk" for frame in frames) < 5:
                frames.append(json.loads(await socket.recv()))
        stream_id = frames[0]["streamId"]
        assert (await asyncio.to_thread(run_cli, server.database_url, "revoke", "leaver")).returncode == 0
        closed = await read_until_closed(socket)
    assert closed.rcvd is not None and closed.rcvd.code == 4401
    assert await wait_for_answer(server, stream_id) == ("complete", expected_words(200))
    with pytest.raises(InvalidStatus):
        async with websockets.connect(server.ws_url + WS_PATH, additional_headers=bearer(token)):
            pass


async def test_a_websocket_opened_with_a_session_is_closed_with_4401_when_the_session_ends(make_server):
    """Signing out (DELETE /api/session) ends the session: a socket it opened is closed with 4401. Fails without
    Authenticator.watch."""
    server = make_server({"RELAY_AUTH_CACHE_SECONDS": "1"})
    token = add_user(server.database_url, "browser")
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        signed_in = await client.post("/api/session", json={"token": token})
        assert signed_in.status_code == 200, signed_in.text
        cookie = "; ".join(f"{name}={value}" for name, value in client.cookies.items())
        async with websockets.connect(server.ws_url + WS_PATH, additional_headers={"Cookie": cookie}) as socket:
            await socket.send('{"type": "ping"}')
            assert json.loads(await socket.recv()) == {"event": "pong"}
            assert (await client.delete("/api/session")).status_code == 200
            closed = await read_until_closed(socket)
    assert closed.rcvd is not None and closed.rcvd.code == 4401


# ---- The daily budget against concurrent answers ------------------------------------------------

# Every answer of the budget tests: a 40-byte message (10 input tokens, by the offline model's count and by the
# relay's estimate) and 20 output tokens, at most 20 (RELAY_MAX_TOKENS): its cost is its worst case.
MESSAGE = "a budget race, forty bytes of message..."
WORDS = 20
# The offline model counts the message's 40 bytes and the message's overhead (server/protocol/tokens.py).
COST = cost_of(Usage(input_tokens=request_tokens({"messages": [{"role": "user", "content": MESSAGE}]}),
                     output_tokens=WORDS), OFFLINE_MODEL)
assert len(MESSAGE.encode()) == 40 and COST == Decimal("0.000114")
# One answer is spent before the race, and 5.5 answers' worth is left: six can be admitted while the worst cases
# held stay under it, and the day ends half an answer over the budget, less than one answer's worst case.
BUDGET = COST * Decimal("6.5")
RACE = {"RELAY_BUDGET_PER_DAY": format(BUDGET, "f"), "RELAY_OFFLINE_WORDS": str(WORDS),
        "RELAY_MAX_TOKENS": str(WORDS), "RELAY_OFFLINE_DELAY_MS": "25"}


async def start_many(urls: list[str], count: int) -> Counter[str]:
    """`count` answers started at once (202, not read), spread over the instances: how each start went."""
    async def start(client: httpx.AsyncClient) -> str:
        response = await client.post("/api/command-center/message", json={"message": MESSAGE},
                                     headers={"Accept": "application/json"})
        if response.status_code == 202:
            return "started"
        return f"{response.status_code} {response.json()['error']['code']}"

    clients = [httpx.AsyncClient(base_url=url, timeout=60) for url in urls]
    try:
        async with asyncio.timeout(60):
            outcomes = await asyncio.gather(*(start(clients[i % len(clients)]) for i in range(count)))
    finally:
        for client in clients:
            await client.aclose()
    return Counter(outcomes)


async def spent_when_all_ended(rows: Callable[[str], list[tuple[Any, ...]]]) -> Decimal:
    async with asyncio.timeout(60):
        while rows("SELECT COUNT(*) FROM messages WHERE status = 'streaming'")[0][0]:  # noqa: ASYNC110
            await asyncio.sleep(0.05)  # the answers are other processes'
    return sum((stored_cost(row[0]) or Decimal(0) for row in rows("SELECT cost FROM messages WHERE cost IS NOT NULL")),
               Decimal(0))


def assert_within_one_worst_case(outcomes: Counter[str], spent: Decimal) -> None:
    assert spent <= BUDGET + COST, (outcomes, spent / COST)
    assert set(outcomes) == {"started", "402 budget_exceeded"}, outcomes
    assert outcomes["started"] >= 1


async def test_32_answers_started_at_once_end_at_most_one_worst_case_over_the_budget(make_server):
    """One instance. Fails before the fix (the check counted finished costs only): all 32 start and the day ends
    at 33 answers' cost, 5 times the budget."""
    server = make_server(RACE)
    first = await sse_stream(server.url, {"message": MESSAGE})
    assert first[-2][2]["totalCost"] == COST
    outcomes = await start_many([server.url], 32)
    assert_within_one_worst_case(outcomes, await spent_when_all_ended(server.rows))


@pytest.fixture
def own_database() -> Iterator[str]:
    """A PostgreSQL database of this test's own: the budget counts every answer in it. Ask for it before
    make_server, so that the servers stop before it is dropped."""
    server = POSTGRES_URLS[0]
    name = f"relay_budget_{uuid.uuid4().hex[:12]}"
    _on_postgresql(server, f"CREATE DATABASE {name}")
    yield server.rsplit("/", 1)[0] + "/" + name
    _on_postgresql(server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@needs_instances
async def test_32_answers_started_at_once_on_two_instances_end_at_most_one_worst_case_over(own_database,
                                                                                           make_server):
    """Two instances sharing PostgreSQL and Redis, 16 starts on each at once. Fails with a ledger per instance
    (budget.LocalLedger on both): each admits six, and the day ends at 13 answers' cost."""
    shared = {**RACE, "DATABASE_URL": own_database, "REDIS_URL": REDIS_URL,
              "RELAY_REDIS_PREFIX": f"test-{uuid.uuid4().hex[:12]}", "RELAY_INSTANCE_LEASE_SECONDS": "1"}
    a, b = make_server(shared), make_server(shared)
    first = await sse_stream(a.url, {"message": MESSAGE})
    assert first[-2][2]["totalCost"] == COST
    outcomes = await start_many([a.url, b.url], 32)

    def rows(sql: str) -> list[tuple[Any, ...]]:
        return _on_postgresql(own_database, sql)

    assert_within_one_worst_case(outcomes, await spent_when_all_ended(rows))


@pytest.fixture(params=["sqlite", "postgresql"])
def any_database(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/worst.db"
        return
    if not POSTGRES_URLS:
        pytest.skip("set TEST_DATABASE_URLS=postgresql://postgres@127.0.0.1:5432/test to run on PostgreSQL")
    name = f"relay_worst_{uuid.uuid4().hex[:12]}"
    _on_postgresql(POSTGRES_URLS[0], f"CREATE DATABASE {name}")
    yield POSTGRES_URLS[0].rsplit("/", 1)[0] + "/" + name
    _on_postgresql(POSTGRES_URLS[0], f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.mark.parametrize("prompt_cache", ["off", "5m", "1h"])
async def test_an_answers_worst_case_counts_the_conversation_it_sends(any_database, tmp_path, prompt_cache):
    """max_tokens at the output price, plus the system prompt, the conversation so far and the message at one
    token per 4 UTF-8 bytes, at the input price or, with prompt caching on, at the cache write price of the
    agent's TTL (every input token could be written). Fails if the history (store.history_bytes) is left out,
    or if a cached agent's input is priced as plain input (a reservation below what the answer can cost)."""
    async with relay_in_process(tmp_path, database_url=any_database, budget_per_day="1",
                                system_prompt="Be brief.", prompt_cache=prompt_cache) as relay:
        turn = await relay.store.begin_turn(conversation_id=None, agent_id="default", user_text="héllo wörld",
                                            model="claude-sonnet-4-5", stream_id=new_id(), task_trace_id="t")
        await relay.store.save_reply(turn.assistant_message_id, Reply(
            "ünïcode answer", "", "claude-sonnet-4-5", Status.COMPLETE, "end_turn", 1, 2, 0, 0, Decimal("0.0001")))
        agent = relay.settings.agent(None)
        assert agent is not None and agent.model == "claude-sonnet-4-5"
        worst = await relay._worst_case(agent, SendMessage("next", conversation_id=turn.conversation_id), ANONYMOUS)
        sent = len("Be brief.") + len("héllo wörld".encode()) + len("ünïcode answer".encode()) + len("next")
        price = PRICES[agent.model]
        input_price = {"off": price.input, "5m": price.cache_write_5m, "1h": price.cache_write_1h}[prompt_cache]
        assert worst == ((sent + 3) // 4 * input_price + agent.max_tokens * price.output) / 1_000_000
        assert await relay.store.history_bytes(turn.conversation_id, "another user") == 0


def test_a_ledger_counts_a_saved_answer_until_the_spend_read_after_it_includes_it():
    """LocalLedger: a running answer holds its worst case; saved, it holds its cost for spend reads made before
    the save (`since` earlier than the settle), and nothing for reads made after, which count it themselves."""
    moment = [0]
    ledger = LocalLedger(clock=lambda: moment[0])

    def reserve(answer: str, room: int, since: int) -> tuple[bool, int, int]:
        return asyncio.run(ledger.reserve("alice", answer, 100, room, since))

    assert reserve("one", 150, since=0) == (True, 0, 0)
    assert reserve("two", 150, since=0) == (True, 100, 0)
    assert reserve("three", 150, since=0) == (False, 200, 0)  # 200 held, not under 150
    moment[0] = 10
    ledger.settle("alice", "one", 40)
    ledger.release("alice", "two")
    assert reserve("four", 150, since=5) == (True, 0, 40)  # the read at 5 missed the save at 10
    assert reserve("five", 150, since=20) == (True, 100, 0)  # the read at 20 has it
    moment[0] = 10 + 61_000_000  # a minute later the saved entry is gone for every read
    assert reserve("six", 1000, since=0) == (True, 200, 0)


@needs_redis
async def test_the_running_answers_of_an_instance_without_a_lease_hold_their_worst_case_in_redis():
    """RedisLedger: an instance whose lease is gone (it died) leaves entries that still count, at their worst
    case, while another instance saves those answers. Fails if such entries were dropped: the second
    answer would be admitted."""
    client = redis.asyncio.Redis.from_url(REDIS_URL, decode_responses=True)
    prefix = f"test-{uuid.uuid4().hex[:12]}"

    def alive(instance: str) -> str:
        return f"{prefix}:alive:{instance}"

    try:
        await client.set(alive("live"), "1", ex=60)
        dead = RedisLedger(client, prefix, "dead", alive)
        live = RedisLedger(client, prefix, "live", alive)
        since = await live.now()
        assert await dead.reserve("bob", "orphan", 100, 200, since) == (True, 0, 0)
        assert await live.reserve("bob", "one", 100, 200, since) == (True, 0, 100)  # counted, as settled
        assert await live.reserve("bob", "two", 100, 200, since) == (False, 100, 100)
        live.settle("bob", "one", 30)
        await live.aclose()
        assert await live.reserve("bob", "three", 100, 200, since) == (True, 0, 130)
        fields = await client.hgetall(f"{prefix}:budget:bob")
        assert fields["one"].startswith("30 live ") and fields["three"] == "100 live 0"
    finally:
        await client.delete(f"{prefix}:budget:bob", alive("live"))
        await client.aclose()
