"""Store on a real database: a SQLite file, and PostgreSQL for each URL in TEST_DATABASE_URLS."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import sqlite3
import subprocess
import threading
from collections.abc import AsyncIterator
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import orjson
import pytest
from databases import Database

from server.attachments import InlineAttachment
from server.errors import BadRequestError, ConflictError, NotFoundError
from server.store import (
    ONE,
    FinishedElsewhereError,
    Query,
    Reply,
    Status,
    Store,
    Turn,
    UsageRow,
    asyncpg_dsn,
    databases_url,
    new_id,
    schema,
)
from server.store.conversations import encode_cursor
from server.store.schema import revisions
from server.store.sqlite_writer import use_wal

from .conftest import (
    SCHEMA_TABLES,
    SERVER_CWD,
    SERVER_PYTHON,
    _clean_env,
    _on_postgresql,
    new_postgresql_database,
)

# Comma-separated, e.g. postgresql://postgres@127.0.0.1:5432/test; the tests drop their tables at the end.
SERVER_URLS = [url.strip() for url in os.environ.get("TEST_DATABASE_URLS", "").split(",") if url.strip()]
TABLES = SCHEMA_TABLES
# Without a server named, the PostgreSQL runs show up as skipped, never silently absent.
DATABASE_PARAMS = ["sqlite", *SERVER_URLS] if SERVER_URLS else [
    "sqlite",
    pytest.param("postgresql://", marks=pytest.mark.skip(
        reason="set TEST_DATABASE_URLS=postgresql://postgres@127.0.0.1:5432/test to run on PostgreSQL")),
]


async def drop_tables(url: str) -> None:
    """Empty the test's own database (a test that builds two schemas in it, one after the other)."""
    database = Database(databases_url(url))
    await database.connect()
    try:
        for table in TABLES:
            await database.execute(f"DROP TABLE IF EXISTS {table}")
    finally:
        await database.disconnect()


@pytest.fixture(params=DATABASE_PARAMS, ids=lambda url: url.split(":")[0])
async def url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A database URL with no tables in it yet: a new SQLite file, or a new PostgreSQL database dropped after
    (so that runs sharing the server never meet each other's tables)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/store.db"
        return
    url, drop = await asyncio.to_thread(new_postgresql_database, request.param)
    try:
        yield url
    finally:
        await asyncio.to_thread(_on_postgresql, request.param, drop)


@pytest.fixture
async def store(url: str) -> AsyncIterator[Store]:
    store = Store(url)
    await store.connect()
    yield store
    await store.disconnect()


async def turn(store: Store, text: str, conversation_id: str | None = None) -> Turn:
    return await store.begin_turn(
        conversation_id=conversation_id, agent_id="default", user_text=text, model="claude-haiku-4-5",
        stream_id=new_id(), trace_session_id="session", task_trace_id="task",
    )


def reply(content: str, status: Status = Status.COMPLETE, cost: Decimal | None = Decimal("0.000025")) -> Reply:
    return Reply(
        content=content, thinking="", model="claude-haiku-4-5", status=status,
        stop_reason="end_turn" if status is Status.COMPLETE else None, input_tokens=10, output_tokens=3,
        cache_creation_input_tokens=0, cache_read_input_tokens=0, cost=cost,
    )


async def answer(store: Store, text: str, content: str, conversation_id: str | None = None, **kwargs: Any) -> Turn:
    """One user message and its saved answer."""
    started = await turn(store, text, conversation_id)
    await store.save_reply(started.assistant_message_id, reply(content, **kwargs))
    return started


# --- migrations -------------------------------------------------------------------------------------


LEGACY_MIGRATIONS = Path(__file__).parent / "data" / "legacy_migrations"  # what the old runner applied


def legacy_statements(sql: str) -> list[str]:
    """The old runner's split of a migration file into statements (no semicolons inside its literals)."""
    lines = [line for line in sql.splitlines() if not line.lstrip().startswith("--")]
    return [statement.strip() for statement in "\n".join(lines).split(";") if statement.strip()]


async def make_legacy_database(url: str, versions: int) -> None:
    """A database as the hand-made runner left it with its first `versions` SQL files applied."""
    database = Database(databases_url(url))
    await database.connect()
    try:
        await database.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)")
        for path in sorted(LEGACY_MIGRATIONS.glob("*.sql"))[:versions]:
            for statement in legacy_statements(path.read_text(encoding="utf-8")):
                await database.execute(statement)
            await database.execute("INSERT INTO schema_migrations (version, applied_at) VALUES (:v, 'then')",
                                   {"v": int(path.name.split("_", 1)[0])})
    finally:
        await database.disconnect()


async def schema_of(url: str) -> list[tuple[Any, ...]]:
    """Every table, column (type, default, nullability), index and foreign key, but Alembic's own table."""
    database = Database(databases_url(url))
    await database.connect()
    try:
        if url.startswith("sqlite"):
            rows = await database.fetch_all("SELECT type, name, sql FROM sqlite_master"
                                            " WHERE tbl_name NOT IN ('alembic_version', 'schema_migrations')"
                                            " ORDER BY name")
        else:
            rows = [*await database.fetch_all(
                "SELECT table_name, column_name, ordinal_position, data_type, column_default, is_nullable"
                " FROM information_schema.columns WHERE table_schema = current_schema()"
                " AND table_name NOT IN ('alembic_version', 'schema_migrations') ORDER BY 1, 3"),
                *await database.fetch_all(
                "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema()"
                " AND tablename NOT IN ('alembic_version', 'schema_migrations') ORDER BY 1, 2"),
                *await database.fetch_all(
                "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint"
                " WHERE connamespace = current_schema()::regnamespace AND conrelid::regclass::text"
                " NOT IN ('alembic_version', 'schema_migrations') ORDER BY 1, 2")]
        return [tuple(row) for row in rows]
    finally:
        await database.disconnect()


async def test_migrations_apply_once_and_record_the_head_revision(url, caplog):
    """Fails if a start re-applies a revision (the second start would log it) or records another revision."""
    caplog.set_level(logging.INFO, logger="deltarelay.store")
    first = Store(url)
    await first.connect()
    applied = await first.db.fetch_all("SELECT version_num FROM alembic_version")
    await first.disconnect()
    assert [row[0] for row in applied] == [revisions()[-1]]
    assert [r.getMessage() for r in caplog.records] == [f"applied migration {rev}" for rev in revisions()]

    caplog.clear()
    second = Store(url)
    await second.connect()
    again = await second.db.fetch_all("SELECT version_num FROM alembic_version")
    await second.disconnect()
    assert [row[0] for row in again] == [revisions()[-1]]
    assert caplog.records == []


def test_the_revisions_read_from_file_names_are_the_line_alembic_walks():
    """revisions() reads migrations/versions/ without Alembic: fails when a file's number and its revision id
    differ, or a revision's down_revision is not the one before it."""
    from alembic.script import ScriptDirectory

    from server.store.schema import alembic_config

    walked = ScriptDirectory.from_config(alembic_config()).walk_revisions()
    assert tuple(reversed([script.revision for script in walked])) == revisions()


async def test_a_start_at_the_head_revision_never_imports_alembic(url):
    """Importing Alembic (with Mako and SQLAlchemy's ORM) adds about 18 MB to a process: a server whose
    database is at the head revision does without it. Fails when Store.connect runs Alembic every start."""
    first = Store(url)
    await first.connect()
    await first.disconnect()
    probe = ("import asyncio, sys; from server.store import Store\n"
             "async def main():\n"
             f"    store = Store({url!r}); await store.connect(); await store.disconnect()\n"
             "asyncio.run(main()); print(sorted(m for m in sys.modules if m.split('.')[0] in ('alembic', 'mako')))")
    out = (await asyncio.to_thread(subprocess.run, [SERVER_PYTHON, "-c", probe], cwd=SERVER_CWD,
                                   env=_clean_env({}), capture_output=True, text=True, timeout=60, check=True)).stdout
    assert out.strip() == "[]"


async def test_the_revisions_make_exactly_the_schema_the_old_sql_files_made(url, tmp_path):
    """Every table, column type, default, index and foreign key the four old SQL files made, Alembic's revisions
    make too (0005 changes it on purpose, so this compares at 0004). Fails if a revision drops a NOT NULL, a
    default, an index or a REFERENCES."""
    await make_legacy_database(url, 4)
    old = await schema_of(url)
    await drop_tables(url)
    await schema.run_on(url, lambda connection: schema.upgrade(connection, "0004"))
    new = await schema_of(url)
    assert old and new == old


async def test_two_stores_starting_together_migrate_once(url):
    """On PostgreSQL the migration lock makes them take turns (without it the second collides creating the
    tables: `duplicate key value violates unique constraint "pg_type_typname_nsp_index"`); SQLite's
    BEGIN IMMEDIATE does the same for a file. Without the lock, the PostgreSQL case fails or hangs (seen both)."""
    stores = [Store(url), Store(url)]
    await asyncio.gather(*(store.connect() for store in stores))
    try:
        assert await stores[0].db.fetch_all("SELECT version_num FROM alembic_version") != []
        assert len(await stores[1].db.fetch_all("SELECT version_num FROM alembic_version")) == 1
    finally:
        for store in stores:
            await store.disconnect()


def test_a_new_file_goes_to_wal_once_another_connections_write_ends(tmp_path):
    """Changing the journal mode takes no busy wait (sqlite3 says `database is locked` at once while another
    connection holds a write): the second of two stores starting on one new file met that in its writer."""
    path = str(tmp_path / "new.db")
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("CREATE TABLE first_migration (id INTEGER)")
    starting = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        starting.execute("PRAGMA journal_mode=WAL")
    released = threading.Timer(0.3, holder.execute, ("COMMIT",))
    released.start()
    try:
        use_wal(starting)
        assert starting.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert starting.execute("SELECT count(*) FROM first_migration").fetchone()[0] == 0
    finally:
        released.join()
        starting.close()
        holder.close()


@pytest.mark.parametrize("versions", [1, 4])
async def test_a_database_of_the_old_runner_is_stamped_and_upgraded_at_start_without_losing_rows(url, versions):
    """A database the hand-made runner made (its SQL files, its schema_migrations) starts at the revision it
    had: fails if the start re-runs 0001 (`table conversations already exists`), loses a row, or leaves
    schema_migrations behind for an old version to trust."""
    await make_legacy_database(url, versions)
    database = Database(databases_url(url))
    await database.connect()
    try:
        await database.execute("INSERT INTO conversations (id, agent_id, title, created_at, updated_at)"
                               " VALUES ('c1', 'default', 'Old talk', 't0', 't1')")
        for seq, role, content, status, cost in [(0, "user", "Hi 🙂", "complete", None),
                                                 (1, "assistant", "Hello there.", "complete", "0.00001234"),
                                                 (2, "user", "More?", "complete", None),
                                                 (3, "assistant", "Half", "streaming", None)]:
            await database.execute(
                "INSERT INTO messages (id, conversation_id, seq, role, content, status, cost, created_at)"
                " VALUES (:id, 'c1', :seq, :role, :content, :status, :cost, 't')",
                {"id": f"m{seq}", "seq": seq, "role": role, "content": content, "status": status, "cost": cost})
    finally:
        await database.disconnect()

    store = Store(url)
    await store.connect()
    try:
        versions_now = [row[0] for row in await store.db.fetch_all("SELECT version_num FROM alembic_version")]
        messages = await store.list_messages("c1")
        # An answer an old (single) instance left streaming names no instance: it counts as gone.
        assert await store.interrupt_unfinished({"some-live-instance"}) == 1
        left = await store.get_message("m3")
        legacy = await store.db.fetch_val(
            "SELECT COUNT(*) FROM sqlite_master WHERE name = 'schema_migrations'" if url.startswith("sqlite") else
            "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = current_schema()"
            " AND table_name = 'schema_migrations'")
    finally:
        await store.disconnect()
    assert versions_now == [revisions()[-1]]
    assert legacy == 0
    assert [(m["seq"], m["role"], m["content"], m["status"], m["cost"]) for m in messages] == [
        (0, "user", "Hi 🙂", "complete", None), (1, "assistant", "Hello there.", "complete", "0.00001234"),
        (2, "user", "More?", "complete", None), (3, "assistant", "Half", "streaming", None),
    ]
    assert left is not None and (left["status"], left["content"]) == ("interrupted", "Half")


async def test_downgrade_to_base_and_upgrade_again_leave_the_head_schema(url):
    """Every revision's downgrade undoes its upgrade: fails if one leaves a table or column behind (the upgrade
    after it would then fail creating it again) or cannot run on this database."""
    await schema.run_on(url, schema.upgrade)
    head = await schema_of(url)
    await schema.run_on(url, lambda connection: schema.downgrade(connection, "base"))
    assert await schema_of(url) == []
    await schema.run_on(url, schema.upgrade)
    assert await schema_of(url) == head


async def database_at(url: str, revision: str) -> Database:
    await schema.run_on(url, lambda connection: schema.upgrade(connection, revision))
    database = Database(databases_url(url))
    await database.connect()
    return database


# Costs as revision 0004's code wrote them, format(cost, "f") of what pricing.py makes: the smallest (one
# cached token of claude-3-haiku), trailing zeros, a whole number, a large one, and a sum of many.
OLD_COSTS = ["0.00000003", "0.000015", "0.30", "1", "0", "12345678.901234567", "0.000003750", "2.50000325",
             *(format(Decimal(i) * Decimal("0.00000375") + Decimal("0.0001"), "f") for i in range(200))]


async def test_migration_0005_converts_every_old_text_cost_without_changing_its_value(url):
    """Every cost the old code saved reads back equal (as Decimal) after 0005, and again after its downgrade.
    Fails if the conversion goes through a float (0.000003750 * 1e9 is 3749.9999999999995) or drops a digit."""
    database = await database_at(url, "0004")
    try:
        await database.execute("INSERT INTO conversations (id, agent_id, title, created_at, updated_at)"
                               " VALUES ('c', 'default', 'Old', 't', 't')")
        for seq, cost in enumerate([*OLD_COSTS, None]):
            await database.execute(
                "INSERT INTO messages (id, conversation_id, seq, role, content, status, cost, created_at)"
                " VALUES (:id, 'c', :seq, 'assistant', '', 'complete', :cost, 't')",
                {"id": f"m{seq}", "seq": seq, "cost": cost})
    finally:
        await database.disconnect()

    store = Store(url)
    await store.connect()
    try:
        messages = await store.list_messages("c")
        total = (await store.get_conversation("c"))["total_cost"]
        kind = await store.db.fetch_val(
            "SELECT typeof(cost) FROM messages WHERE id = 'm0'" if url.startswith("sqlite") else
            "SELECT data_type FROM information_schema.columns WHERE table_schema = current_schema()"
            " AND table_name = 'messages' AND column_name = 'cost'")
    finally:
        await store.disconnect()
    assert kind == ("integer" if url.startswith("sqlite") else "numeric")
    assert [None if m["cost"] is None else Decimal(m["cost"]) for m in messages] == [
        *(Decimal(cost) for cost in OLD_COSTS), None]
    assert total == sum((Decimal(cost) for cost in OLD_COSTS), Decimal(0))

    await schema.run_on(url, lambda connection: schema.downgrade(connection, "0004"))
    database = Database(databases_url(url))
    await database.connect()
    try:
        back = [row[0] for row in await database.fetch_all("SELECT cost FROM messages ORDER BY seq")]
    finally:
        await database.disconnect()
    assert all(isinstance(cost, str) for cost in back[:-1])
    assert [None if cost is None else Decimal(cost) for cost in back] == [*(Decimal(c) for c in OLD_COSTS), None]


async def test_migration_0005_refuses_a_cost_finer_than_a_nano_dollar_on_sqlite(tmp_path):
    """Rounding it would change money: fails if the migration rounds (or truncates) instead of stopping, or
    leaves the database half converted."""
    url = f"sqlite:///{tmp_path}/fine.db"
    database = await database_at(url, "0004")
    try:
        await database.execute("INSERT INTO conversations (id, agent_id, title, created_at, updated_at)"
                               " VALUES ('c', 'default', 'Old', 't', 't')")
        await database.execute("INSERT INTO messages (id, conversation_id, seq, role, content, status, cost,"
                               " created_at) VALUES ('m', 'c', 0, 'assistant', '', 'complete', '0.0000000001', 't')")
    finally:
        await database.disconnect()
    with pytest.raises(RuntimeError, match="finer than a nano-dollar"):
        await schema.run_on(url, schema.upgrade)
    database = Database(databases_url(url))
    await database.connect()
    try:
        assert await database.fetch_val("SELECT version_num FROM alembic_version") == "0004"
        assert await database.fetch_val("SELECT cost FROM messages") == "0.0000000001"
    finally:
        await database.disconnect()


async def test_a_cost_finer_than_a_nano_dollar_is_refused_and_saves_nothing(store):
    """No price makes one (test_pricing); were one to appear, it must not be rounded into the database."""
    started = await turn(store, "fine")
    with pytest.raises(ValueError, match="finer than a nano-dollar"):
        await store.save_reply(started.assistant_message_id, reply("x", cost=Decimal("0.0000000001")))
    assert (await store.get_message(started.assistant_message_id) or {})["status"] == "streaming"


async def test_usage_and_spend_are_summed_by_the_database_exactly(store):
    """The report's groups and the budget's spend equal the Decimal sums of the saved costs. Fails if a sum
    goes through floats (0.1 + 0.2 style drift over 300 costs) or a group key changes."""
    costs = [Decimal("0.1") + i * Decimal("0.000000007") for i in range(300)]
    for i, cost in enumerate(costs):
        started = await store.begin_turn(conversation_id=None, agent_id=f"agent{i % 3}", user_text="q",
                                         model=f"model{i % 2}", stream_id=new_id(), task_trace_id="t")
        await store.save_reply(started.assistant_message_id, replace(reply("a", cost=cost), model=f"model{i % 2}"))
    unpriced = await turn(store, "free")
    await store.save_reply(unpriced.assistant_message_id, reply("a", cost=None))
    rows = await store.usage("0000", "9999", "agent")
    assert [(row.key, row.messages, row.cost, row.unpriced) for row in rows] == [
        *((f"agent{k}", 100, sum(costs[k::3], Decimal(0)), 0) for k in range(3)), ("default", 1, Decimal(0), 1)]
    by_model = {row.key: (row.messages, row.cost) for row in await store.usage("0000", "9999", "model")}
    assert by_model == {"model0": (150, sum(costs[0::2], Decimal(0))), "model1": (150, sum(costs[1::2], Decimal(0))),
                        "claude-haiku-4-5": (1, Decimal(0))}
    assert sum(row.output_tokens for row in rows) == 3 * 301
    assert await store.spent_since(None, "0000") == sum(costs, Decimal(0))


async def test_usage_reports_what_cache_reads_saved_exactly_per_model_price(store):
    """saved = cache read tokens x (input price - cache read price), per model, summed exactly. Fails if the
    savings use one model's price for another's tokens, go through floats, or count an unpriced model."""
    reads = {"claude-sonnet-4-5": [118_769, 7, 1_000_001], "claude-haiku-4-5": [3, 5_000], "unpriced-model": [99]}
    for model, counts in reads.items():
        for n, tokens in enumerate(counts):
            started = await store.begin_turn(conversation_id=None, agent_id=f"agent{n % 2}", user_text="q",
                                             model=model, stream_id=new_id(), task_trace_id="t")
            await store.save_reply(started.assistant_message_id, replace(
                reply("a"), model=model, cache_read_input_tokens=tokens))
    by_model = {row.key: (row.cache_read_input_tokens, row.cache_savings)
                for row in await store.usage("0000", "9999", "model")}
    sonnet = sum(reads["claude-sonnet-4-5"])
    haiku = sum(reads["claude-haiku-4-5"])
    assert by_model == {"claude-sonnet-4-5": (sonnet, Decimal(sonnet) * Decimal("2.70") / 1_000_000),
                        "claude-haiku-4-5": (haiku, Decimal(haiku) * Decimal("0.90") / 1_000_000),
                        "unpriced-model": (99, Decimal(0))}
    assert by_model["claude-sonnet-4-5"][1] == Decimal("3.0206979")
    by_agent = {row.key: row.cache_savings for row in await store.usage("0000", "9999", "agent")}
    assert by_agent == {"agent0": ((118_769 + 1_000_001) * Decimal("2.70") + 3 * Decimal("0.90")) / 1_000_000,
                        "agent1": (7 * Decimal("2.70") + 5_000 * Decimal("0.90")) / 1_000_000}
    assert by_agent["agent1"] == Decimal("0.0045189")


# --- history ----------------------------------------------------------------------------------------


async def test_history_alternates_user_and_assistant_turns(store):
    first = await answer(store, "first question", "First answer.")
    second = await turn(store, "second question", first.conversation_id)

    assert first.history == [{"role": "user", "content": "first question"}]
    assert second.history == [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "First answer."},
        {"role": "user", "content": "second question"},
    ]
    saved = await store.list_messages(first.conversation_id)
    assert [(m["seq"], m["role"], m["status"]) for m in saved] == [
        (0, "user", "complete"), (1, "assistant", "complete"), (2, "user", "complete"), (3, "assistant", "streaming"),
    ]


async def test_history_drops_empty_answers_and_merges_the_user_turns_around_them(store):
    first = await answer(store, "first question", "", status=Status.ERROR, cost=None)
    second = await turn(store, "second question", first.conversation_id)
    with pytest.raises(ConflictError) as refused:  # its answer is still being written
        await turn(store, "third question", first.conversation_id)
    assert refused.value.code == "busy"
    assert refused.value.details["streamId"] == (await store.get_message(second.assistant_message_id) or {})[
        "stream_id"]
    await store.save_reply(second.assistant_message_id, reply("", Status.INTERRUPTED, None))  # nothing came
    third = await turn(store, "third question", first.conversation_id)

    assert second.history == [{"role": "user", "content": "first question\n\nsecond question"}]
    assert third.history == [{"role": "user", "content": "first question\n\nsecond question\n\nthird question"}]


async def test_an_answer_saved_with_blocks_goes_back_as_those_messages_byte_for_byte(store):
    """An answer's blocks (a tool round: thinking with its signature, a tool call, its result, the final text)
    are the history the next turn sends, unchanged; a user message's blocks are its content; REST rows carry
    them. Mutation: _history sending `content` for a row with blocks fails it."""
    signature = "EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds+/+" + "=" * 3
    rounds = [
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "The user wants the weather.", "signature": signature},
            {"type": "tool_use", "id": "toolu_01", "name": "weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": "18 C",
                                      "is_error": False}]},
        {"role": "assistant", "content": [{"type": "text", "text": "It is 18 C in Paris."}]},
    ]
    first = await turn(store, "weather in Paris?")
    await store.save_reply(first.assistant_message_id, replace(reply("It is 18 C in Paris."), blocks=rounds))
    dot = b"\x89PNG\r\n\x1a\n" + b"\x00" * 8
    uploaded = await store.add_attachment(None, InlineAttachment("dot.png", "image/png", dot))
    picture = [{"type": "image", "source": {"type": "attachment", "id": uploaded["id"]}},
               {"type": "text", "text": "and?"}]
    second = await store.begin_turn(
        conversation_id=first.conversation_id, agent_id="default", user_text="and?", model="claude-haiku-4-5",
        stream_id=new_id(), trace_session_id="session", task_trace_id="task", user_blocks=picture)

    # The reference is saved; the history sends the file as the API's base64 block (server/store/attachments.py).
    sent = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                        "data": base64.b64encode(dot).decode()}}
    assert second.history == [{"role": "user", "content": "weather in Paris?"}, rounds[0], rounds[1], rounds[2],
                              {"role": "user", "content": [sent, picture[1]]}]
    # Its saved input is the rounds' sum, no one request's count: the next turn's estimate does not learn from it.
    assert second.counted is None
    saved = await store.list_messages(first.conversation_id)
    assert [m["blocks"] is not None for m in saved] == [False, True, True, False]
    assert orjson.loads(saved[1]["blocks"]) == rounds
    assert saved[1]["content"] == "It is 18 C in Paris."


async def test_history_keeps_the_partial_text_of_a_cancelled_answer(store):
    first = await answer(store, "first question", "Half an ans", status=Status.CANCELLED)
    second = await turn(store, "go on", first.conversation_id)

    assert second.history == [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "Half an ans"},
        {"role": "user", "content": "go on"},
    ]


async def test_unknown_conversation_saves_nothing_and_the_writer_goes_on(store):
    with pytest.raises(NotFoundError):
        await turn(store, "hello", conversation_id=new_id())
    assert await store.db.fetch_val("SELECT COUNT(*) FROM messages") == 0
    assert await store.db.fetch_val("SELECT COUNT(*) FROM conversations") == 0

    started = await answer(store, "hello", "Hi!")
    assert [m["content"] for m in await store.list_messages(started.conversation_id)] == ["hello", "Hi!"]


async def test_under_load_sqlite_writes_share_a_transaction_and_a_failing_one_saves_nothing(tmp_path):
    store = Store(f"sqlite:///{tmp_path}/group.db", group_commit=1.0)  # the sleep is the test's own
    await store.connect()
    assert await store.writable()  # a write batch just now: the next write counts as "under load"
    writer = store._writer
    lingering, go_on = threading.Event(), threading.Event()
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:  # the writer thread waits here until the test has queued the rest
        sleeps.append(seconds)
        lingering.set()
        go_on.wait(10)

    writer._sleep = sleep  # type: ignore[union-attr]
    try:
        first = asyncio.ensure_future(turn(store, "first"))
        await asyncio.to_thread(lingering.wait, 10)
        bad = asyncio.ensure_future(turn(store, "to nowhere", conversation_id=new_id()))
        second = asyncio.ensure_future(turn(store, "second"))
        await asyncio.sleep(0)
        go_on.set()
        one, two = await first, await second
        with pytest.raises(NotFoundError):
            await bad
        assert sleeps == [1.0]  # one batch: the three operations shared the wait
        texts = [row[0] for row in await store.db.fetch_all("SELECT content FROM messages WHERE role = 'user'")]
        assert sorted(texts) == ["first", "second"]
        assert one.conversation_id != two.conversation_id
        assert await store.db.fetch_val("SELECT COUNT(*) FROM conversations") == 2
    finally:
        go_on.set()
        await store.disconnect()


# --- finishing messages -----------------------------------------------------------------------------


async def test_interrupt_unfinished_marks_streaming_answers_interrupted(store):
    done = await answer(store, "finished", "All done.")
    left = await turn(store, "left streaming")

    assert await store.interrupt_unfinished() == 1
    assert await store.interrupt_unfinished() == 0

    interrupted = await store.get_message(left.assistant_message_id)
    assert interrupted is not None
    assert (interrupted["status"], interrupted["content"]) == ("interrupted", "")
    assert interrupted["completed_at"] is not None
    complete = await store.get_message(done.assistant_message_id)
    assert complete is not None and complete["status"] == "complete"


async def test_interrupt_unfinished_spares_the_answers_of_live_instances(store):
    mine = await store.begin_turn(conversation_id=None, agent_id="default", user_text="a", model="m",
                                  stream_id=new_id(), task_trace_id="t", instance_id="live")
    theirs = await store.begin_turn(conversation_id=None, agent_id="default", user_text="b", model="m",
                                    stream_id=new_id(), task_trace_id="t", instance_id="dead")

    assert await store.interrupt_unfinished({"live", "another"}) == 1

    assert (await store.get_message(mine.assistant_message_id) or {})["status"] == "streaming"
    assert (await store.get_message(theirs.assistant_message_id) or {})["status"] == "interrupted"
    assert await store.interrupt_instance("live") == 1
    assert await store.interrupt_instance("live") == 0
    assert (await store.get_message(mine.assistant_message_id) or {})["status"] == "interrupted"


async def test_a_message_is_finished_exactly_once_and_a_save_that_matches_no_row_raises(store):
    """Reverting save_reply to return False (the no-row case core.py took for success) fails this."""
    started = await turn(store, "hello")
    await store.save_reply(started.assistant_message_id, reply("First save."))
    with pytest.raises(FinishedElsewhereError):
        await store.save_reply(started.assistant_message_id, reply("", status=Status.ERROR))
    with pytest.raises(FinishedElsewhereError):
        await store.save_reply(new_id(), reply("no such message"))

    saved = await store.get_message(started.assistant_message_id)
    assert saved is not None
    assert (saved["content"], saved["status"]) == ("First save.", "complete")


async def test_a_save_retried_after_its_commit_went_through_finds_its_own_write(store):
    """A commit whose reply was lost with the connection is retried: the same `finished_at` counts as done.
    Dropping the `completed_at = :t` arm of save_reply's WHERE fails this."""
    started = await turn(store, "hello")
    record = replace(reply("Saved once."), finished_at="2026-11-24T10:00:00.000000Z")
    await store.save_reply(started.assistant_message_id, record)
    await store.save_reply(started.assistant_message_id, record)
    with pytest.raises(FinishedElsewhereError):
        await store.save_reply(started.assistant_message_id, replace(record, finished_at=None))


async def test_progress_is_saved_while_streaming_and_never_over_a_finished_answer(store):
    """Dropping `AND status = :streaming` from save_progress's UPDATE fails this."""
    running, finished = await turn(store, "running"), await turn(store, "finished")
    await store.save_reply(finished.assistant_message_id, reply("The whole answer."))
    partial = replace(reply("The wh", status=Status.STREAMING, cost=Decimal("0.00001")), cost_estimated=True)

    await store.save_progress([(running.assistant_message_id, partial), (finished.assistant_message_id, partial)])

    row = await store.get_message(running.assistant_message_id) or {}
    assert (row["status"], row["content"], row["input_tokens"], row["cost"], row["cost_estimated"]) == (
        "streaming", "The wh", 10, "0.00001", 1)
    assert row["completed_at"] is None
    done = await store.get_message(finished.assistant_message_id) or {}
    assert (done["status"], done["content"]) == ("complete", "The whole answer.")
    assert await store.interrupt_unfinished() == 1
    left = await store.get_message(running.assistant_message_id) or {}
    assert (left["status"], left["content"], left["cost"]) == ("interrupted", "The wh", "0.00001")


async def test_a_batch_of_progress_saves_gives_each_answer_its_own_values(store):
    """Each row of a batch gets its own text, tokens and cost (None stays NULL), whatever the batch's order;
    a finished answer in the batch is left alone. Fails when PostgreSQL's one-statement batch pairs the
    arrays wrongly (a column's array out of step with the ids) or drops its `status` check."""
    turns = [await turn(store, f"answer {n}") for n in range(3)]
    await store.save_reply(turns[2].assistant_message_id, reply("Finished."))
    partials = [
        replace(reply("Ça va — 第一", Status.STREAMING, Decimal("0.000123")), output_tokens=7),
        replace(reply("second", Status.STREAMING, None), output_tokens=3, cost_estimated=True),
        reply("over a finished one", Status.STREAMING, Decimal("1")),
    ]
    await store.save_progress([(t.assistant_message_id, p) for t, p in zip(reversed(turns), reversed(partials),
                                                                           strict=True)])
    rows = [await store.get_message(t.assistant_message_id) or {} for t in turns]
    assert [(r["content"], r["output_tokens"], r["cost"], r["cost_estimated"]) for r in rows[:2]] == [
        ("Ça va — 第一", 7, "0.000123", 0), ("second", 3, None, 1)]
    assert (rows[2]["status"], rows[2]["content"]) == ("complete", "Finished.")


async def test_a_start_spares_the_answers_of_a_process_that_holds_its_lease(url):
    """A second Store on the same database stands for a second process. Making _lease_held answer False
    fails this: the other process's running answer would be marked interrupted."""
    first, second = Store(url), Store(url)
    await first.connect()
    await second.connect()
    try:
        await first.hold_instance("first")
        await second.hold_instance("second")
        mine = await first.begin_turn(conversation_id=None, agent_id="default", user_text="a", model="m",
                                      stream_id=new_id(), task_trace_id="t", instance_id="first")
        gone = await first.begin_turn(conversation_id=None, agent_id="default", user_text="b", model="m",
                                      stream_id=new_id(), task_trace_id="t", instance_id="crashed")

        assert await second.interrupt_unfinished({"second"}) == 1
        assert await second.interrupt_instance("first") == 0

        assert (await second.get_message(mine.assistant_message_id) or {})["status"] == "streaming"
        assert (await second.get_message(gone.assistant_message_id) or {})["status"] == "interrupted"
        await first.disconnect()  # the process ends: its lease goes with it
        assert await second.interrupt_unfinished({"second"}) == 1
        assert (await second.get_message(mine.assistant_message_id) or {})["status"] == "interrupted"
    finally:
        await first.disconnect()
        await second.disconnect()


# --- money ------------------------------------------------------------------------------------------


async def test_smallest_and_longest_costs_survive_a_round_trip_exactly(store):
    """The longest cost a price makes has nine decimals (whole nano-dollars: see test_pricing)."""
    tiny = await answer(store, "tiny", "a", cost=Decimal("0.00000001"))
    long = await answer(store, "long", "b", cost=Decimal("12345678.901234567"))
    unpriced = await answer(store, "unpriced", "c", cost=None)

    assert (await store.list_messages(tiny.conversation_id))[1]["cost"] == "0.00000001"
    assert (await store.list_messages(long.conversation_id))[1]["cost"] == "12345678.901234567"
    assert (await store.list_messages(unpriced.conversation_id))[1]["cost"] is None
    tiny_total = (await store.get_conversation(tiny.conversation_id))["total_cost"]
    assert isinstance(tiny_total, Decimal) and tiny_total == Decimal("0.00000001")
    assert (await store.get_conversation(unpriced.conversation_id))["total_cost"] is None


async def test_costs_saved_through_the_store_add_up_to_the_exact_sum(store):
    # cost i = 0.1 + i * 0.00000001 for i in 1..100: exactly 10.0000505.
    conversations, turns = 4, 25

    async def conversation(first: int) -> str:
        conversation_id = None
        for i in range(first, first + turns):
            started = await answer(store, f"q{i}", f"a{i}", conversation_id,
                                   cost=Decimal("0.1") + i * Decimal("0.00000001"))
            conversation_id = started.conversation_id
        assert conversation_id is not None
        return conversation_id

    ids = await asyncio.gather(*(conversation(1 + c * turns) for c in range(conversations)))

    totals = [(await store.get_conversation(conversation_id))["total_cost"] for conversation_id in ids]
    assert totals[0] == Decimal("2.50000325")  # 25 * 0.1 + (1 + ... + 25) * 0.00000001
    assert sum(totals, Decimal(0)) == Decimal("10.0000505")
    listed = await store.list_conversations(limit=conversations)
    assert sum((c["total_cost"] for c in listed), Decimal(0)) == Decimal("10.0000505")
    assert {c["message_count"] for c in listed} == {2 * turns}


async def test_two_thousand_stored_costs_add_up_to_the_exact_sum(store):
    started = await turn(store, "q0")
    costs = [Decimal("0.1") + i * Decimal("0.00000001") for i in range(1, 2001)]

    def insert() -> Any:
        for i, cost in enumerate(costs):
            yield Query(
                "INSERT INTO messages (id, conversation_id, seq, role, content, status, cost, created_at)"
                " VALUES (:id, :conv, :seq, 'assistant', 'a', 'complete', :cost, 't')",
                {"id": new_id(), "conv": started.conversation_id, "seq": 2 + i, "cost": store._cost_param(cost)},
            )

    await store.write(insert())

    total = (await store.get_conversation(started.conversation_id))["total_cost"]
    # 2000 * 0.1 + (1 + ... + 2000) * 0.00000001 = 200 + 0.02001
    assert isinstance(total, Decimal) and total == Decimal("200.02001")


def db_cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`deltarelay db ...` with DATABASE_URL set, as an operator runs it."""
    return subprocess.run([SERVER_PYTHON, "-m", "server", "db", *args], cwd=SERVER_CWD,
                          env=_clean_env({"DATABASE_URL": url}), capture_output=True, text=True, timeout=60)


async def test_db_command_upgrades_downgrades_and_reports_the_revision(url):
    """What docs/operations.md shows: fails if `db upgrade REV` goes past REV, `downgrade` leaves a table,
    `current` names another revision than alembic_version holds, or a database of the old runner is not
    recognised."""
    head = revisions()[-1]
    assert db_cli(url, "current").stdout.startswith("none: an empty database")
    upgraded = db_cli(url, "upgrade", "0002")
    assert upgraded.returncode == 0, upgraded.stderr
    assert upgraded.stdout.splitlines() == ["applied 0001, 0002", f"0002 (head is {head})"]
    assert db_cli(url, "upgrade").stdout.splitlines()[-1] == f"{head} (head)"
    assert await schema_of(url) != []
    assert db_cli(url, "downgrade", "base").returncode == 0
    assert await schema_of(url) == []
    history = db_cli(url, "history").stdout.splitlines()
    assert [line.split()[0] for line in history] == list(revisions())

    await drop_tables(url)
    await make_legacy_database(url, 3)
    legacy = db_cli(url, "current").stdout.strip()
    assert legacy == (f"0003 (head is {head}); recorded by the old migration runner in schema_migrations:"
                      " the next upgrade stamps it")
    assert db_cli(url, "upgrade").stdout.splitlines() == [f"applied {', '.join(revisions()[3:])}", f"{head} (head)"]


async def test_postgresql_writes_run_concurrently_each_in_its_own_transaction(url):
    """A write waiting on a lock does not hold up the others, and rolls back alone. Fails with the single
    writer task (the second write queues behind the first until the lock goes: the timeout), or if the two
    shared a transaction (the failing one would undo the other)."""
    if url.startswith("sqlite"):
        pytest.skip("SQLite keeps its single writer thread (one transaction per batch)")
    store = Store(url)
    await store.connect()
    holder = await asyncpg.connect(asyncpg_dsn(url))
    try:
        await holder.execute("SELECT pg_advisory_lock(15015)")

        def blocked() -> Any:
            yield Query("SELECT pg_advisory_xact_lock(15015)", {}, ONE)
            yield Query("UPDATE write_probe SET written_at = 'blocked' WHERE id = 1")
            raise RuntimeError("this one fails after its lock")

        waiting = asyncio.ensure_future(store.write(blocked()))
        async with asyncio.timeout(10):  # until the first write waits for the lock (a state of the server's)
            while not await holder.fetchval(  # noqa: ASYNC110 (the waiting is PostgreSQL's)
                    "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"):
                await asyncio.sleep(0.01)
        async with asyncio.timeout(10):
            started = await turn(store, "not held up")  # commits while the first write waits for its lock
        assert not waiting.done()
        await holder.execute("SELECT pg_advisory_unlock(15015)")
        with pytest.raises(RuntimeError, match="fails after its lock"):
            await waiting
        assert await store.db.fetch_val("SELECT written_at FROM write_probe") != "blocked"
        assert [m["content"] for m in await store.list_messages(started.conversation_id)] == ["not held up", ""]
    finally:
        await holder.close()
        await store.disconnect()


def test_postgresql_statements_get_positional_parameters_numbered_once_per_name():
    """What the PostgreSQL writer sends asyncpg: fails when a cast (::NUMERIC) or a colon inside a string
    literal is taken for a parameter, or when a repeated name gets a second number."""
    from server.store.postgres_writer import positional

    sql, names = positional("UPDATE m SET cost = :cost::NUMERIC, a = :t, b = :t WHERE k = 'x:y' || :id")
    assert sql == "UPDATE m SET cost = $1::NUMERIC, a = $2, b = $2 WHERE k = 'x:y' || $3"
    assert names == ("cost", "t", "id")
    assert positional("SELECT 1") == ("SELECT 1", ())


@pytest.mark.parametrize("synchronous_answers", [False, True])
async def test_only_an_answers_own_writes_skip_the_wal_flush_on_postgresql(url, synchronous_answers):
    """A turn's start, its progress and its final save commit with `synchronous_commit = off` (unless the
    setting asks for the flush); a user, like every other write, always waits for it. Fails when begin_turn,
    save_progress or save_reply goes through write(), when add_user goes through answer_write(), or when the
    setting is ignored."""
    if url.startswith("sqlite"):
        pytest.skip("SQLite's writer commits with synchronous=NORMAL whatever the write")
    store = Store(url, synchronous_answers=synchronous_answers)
    await store.connect()
    seen: list[str] = []
    run = store._writer.run  # type: ignore[union-attr]

    def observed(operation: Any, **options: Any) -> Any:
        def with_setting() -> Any:
            row = yield Query("SHOW synchronous_commit", {}, ONE)
            seen.append(row[0])
            return (yield from operation)

        return run(with_setting(), **options)

    store._writer.run = observed  # type: ignore[union-attr,method-assign]
    try:
        started = await turn(store, "durable?")
        await store.save_progress([(started.assistant_message_id, reply("half", Status.STREAMING, None))])
        await store.save_reply(started.assistant_message_id, reply("whole"))
        await store.add_user("ada", "0" * 64)
    finally:
        await store.disconnect()
    answers = "on" if synchronous_answers else "off"
    assert seen == [answers, answers, answers, "on"]


async def test_an_answers_start_and_final_save_are_one_statement_each_on_postgresql(url, monkeypatch):
    """What the pool's connections are sent (asyncpg's query logger): a new conversation's turn start is one
    statement and its final save another, with no BEGIN, SET or COMMIT around them; a follow-up turn reads in
    a transaction; a batch of progress saves is one statement too; a user's write turns the WAL flush back
    on for its own. Fails when begin_turn sends its inserts apart, when save_progress sends a row at a time,
    when a statement marked `alone` is wrapped in a transaction, when the writer sets synchronous_commit for
    an answer's write although its session has it already, or when a released connection gets asyncpg's
    default reset statement again."""
    if url.startswith("sqlite"):
        pytest.skip("SQLite's writer thread runs every write in its batch's transaction")
    from server.store import base

    sent: list[str] = []

    def logging_database(database_url: str, **options: Any) -> Database:
        async def init(connection: asyncpg.Connection) -> None:
            connection.add_query_logger(lambda logged: sent.append(logged.query.split()[0].rstrip(";").upper()))

        return Database(database_url, init=init, **options)

    monkeypatch.setattr(base, "Database", logging_database)
    store = Store(url, synchronous_answers=False)

    async def statements(write: Any) -> list[str]:
        """What `write` sends (asyncpg calls its query loggers soon after each query, not at once)."""
        await asyncio.sleep(0.01)
        sent.clear()
        await write
        await asyncio.sleep(0.01)
        return list(sent)

    await store.connect()
    try:
        started = await turn(store, "one round trip?")
        other = await turn(store, "and a second answer?")
        assert await statements(turn(store, "one round trip?")) == ["WITH"]
        progress = [(started.assistant_message_id, reply("y", Status.STREAMING, None)),
                    (other.assistant_message_id, reply("m", Status.STREAMING, None))]
        # Warm: asyncpg looks up the array types on a connection's first use of them, once.
        for _ in range(12):
            await store.save_progress(progress)
        assert await statements(store.save_progress(progress)) == ["UPDATE"]
        assert await statements(store.save_reply(started.assistant_message_id, reply("yes"))) == ["WITH"]
        assert await statements(turn(store, "and again?", started.conversation_id)) == [
            "BEGIN", "SELECT", "SELECT", "WITH", "COMMIT"]
        user = await statements(store.add_user("ada", "0" * 64))
        assert user[:2] == ["BEGIN", "SET"] and user[-1] == "COMMIT"
    finally:
        await store.disconnect()


async def test_migration_0006_keeps_cli_users_adds_the_apps_users_and_its_downgrade_restores_0005(url):
    """0006 keeps every CLI user, token and session; (issuer, subject) is unique, a CLI name is unique among CLI
    users only, and an app user needs no token. Its downgrade refuses while app users exist (nothing changed),
    and without them gives back exactly 0005's schema."""
    database = await database_at(url, "0005")
    try:
        await database.execute("INSERT INTO users (id, name, is_admin, token_hash, created_at)"
                               " VALUES ('u1', 'alice', 0, 'h1', 't')")
        await database.execute("INSERT INTO sessions (secret_hash, user_id, created_at, expires_at)"
                               " VALUES ('s1', 'u1', 't', 'z')")
    finally:
        await database.disconnect()
    at_0005 = await schema_of(url)
    await schema.run_on(url, lambda connection: schema.upgrade(connection, "0006"))
    store = Store(url)
    await store.connect()
    try:
        assert (await store.user_by_token_hash("h1") or {}).get("name") == "alice"
        first = await store.identity_user("https://app.example", "42", "alice", False)  # a CLI name: allowed
        again = await store.identity_user("https://app.example", "42", "Alice B", True)
        other = await store.identity_user("https://other.example", "42", "alice", False)
        assert first["id"] == again["id"] != other["id"]
        assert (again["name"], bool(again["is_admin"])) == ("Alice B", True)
        with pytest.raises(ValueError):
            await store.add_user("alice", "h2")  # still unique among CLI users
        assert await store.user_id_by_name("alice") == "u1"  # the CLI user first
        with pytest.raises(Exception):  # noqa: B017 - the driver's integrity error, whichever driver
            await store.db.execute("INSERT INTO users (id, name, is_admin, token_hash, created_at, issuer, subject)"
                                   " VALUES ('dup', 'x', 0, NULL, 't', 'https://app.example', '42')")
    finally:
        await store.disconnect()
    with pytest.raises(RuntimeError, match="nothing changed"):
        await schema.run_on(url, lambda connection: schema.downgrade(connection, "0005"))
    database = Database(databases_url(url))
    await database.connect()
    try:
        assert await database.fetch_val("SELECT COUNT(*) FROM users WHERE issuer IS NOT NULL") == 2
        await database.execute("DELETE FROM users WHERE issuer IS NOT NULL")
    finally:
        await database.disconnect()
    await schema.run_on(url, lambda connection: schema.downgrade(connection, "0005"))
    assert await schema_of(url) == at_0005
    database = Database(databases_url(url))
    await database.connect()
    try:
        assert [(r[0], r[1], r[2]) for r in await database.fetch_all("SELECT id, name, token_hash FROM users")] == [
            ("u1", "alice", "h1")]
        assert await database.fetch_val("SELECT user_id FROM sessions WHERE secret_hash = 's1'") == "u1"
    finally:
        await database.disconnect()


# --- conversations as trees (issue 17) -----------------------------------------------------------------------


async def usage_totals(store: Store) -> tuple[int, int, int, Decimal, int]:
    """(answers, input tokens, output tokens, cost, unpriced answers) of every user, over all time."""
    rows = await store.usage("0000", "9999", "user", every_owner=True)
    total = UsageRow("total")
    for row in rows:
        total.merge(row)
    return total.messages, total.input_tokens, total.output_tokens, total.cost, total.unpriced


async def test_migration_0007_makes_each_linear_conversation_one_chain_and_keeps_every_cost_in_the_ledger(url):
    """A database made at 0006 (two conversations, an unpriced answer, one left streaming): after 0007 no message
    is lost, each message's parent is the one before it by seq, the active leaf is the last message, and the
    usage report and budget sums read exactly what the old queries over messages read. Its downgrade gives back
    0006's messages. Fails if the chain is built by created_at or id, or a cost goes through a float."""
    database = await database_at(url, "0006")
    sqlite = url.startswith("sqlite")
    costs = ["0.000003750", "12345678.901234567", None, "0.30", "0.00000003"]

    def stored(cost: str | None) -> Any:
        return None if cost is None else (int(Decimal(cost).scaleb(9)) if sqlite else Decimal(cost))

    try:
        await database.execute("INSERT INTO users (id, name, is_admin, token_hash, created_at)"
                               " VALUES ('u1', 'alice', 0, 'h1', 't')")
        for conv, owner in (("c1", "u1"), ("c2", None)):
            await database.execute("INSERT INTO conversations (id, agent_id, title, created_at, updated_at, owner_id)"
                                   " VALUES (:id, 'default', 't', 't', 't', :owner)", {"id": conv, "owner": owner})
        # Ids in no order of their own: the chain follows seq.
        rows = [("c1", n, f"m{9 - n}") for n in range(6)] + [("c2", n, f"x{n}") for n in range(4)]
        for index, (conv, seq, message_id) in enumerate(rows):
            assistant = seq % 2 == 1
            streaming = (conv, seq) == ("c2", 3)
            await database.execute(
                "INSERT INTO messages (id, conversation_id, seq, role, content, model, status, input_tokens,"
                " output_tokens, cost, created_at, completed_at) VALUES (:id, :c, :seq, :role, :content, 'm',"
                " :status, :inp, :out, :cost, :t, :done)",
                {"id": message_id, "c": conv, "seq": seq, "role": "assistant" if assistant else "user",
                 "content": f"text {index}", "status": "streaming" if streaming else "complete",
                 "inp": 10 * index if assistant else 0, "out": index if assistant else 0,
                 "cost": stored(costs[index % len(costs)]) if assistant and not streaming else None,
                 "t": f"2026-11-{10 + index}T00:00:00.000000Z",
                 "done": None if streaming else f"2026-11-{10 + index}T00:00:01.000000Z"})
        before = [tuple(row._mapping.values()) for row in await database.fetch_all(
            "SELECT id, conversation_id, seq, role, content FROM messages ORDER BY conversation_id, seq")]
        old_cost = await database.fetch_val("SELECT SUM(cost) FROM messages WHERE role = 'assistant'"
                                            " AND completed_at IS NOT NULL")
        old_alice = await database.fetch_val(
            "SELECT SUM(m.cost) FROM messages m JOIN conversations c ON c.id = m.conversation_id"
            " WHERE c.owner_id = 'u1' AND m.completed_at >= '2026-11-12'")
        old_tokens = await database.fetch_val("SELECT SUM(input_tokens) FROM messages WHERE completed_at IS NOT NULL"
                                              " AND role = 'assistant'")
        old_answers = await database.fetch_val("SELECT COUNT(*) FROM messages WHERE role = 'assistant'"
                                               " AND completed_at IS NOT NULL")
    finally:
        await database.disconnect()
    await schema.run_on(url, schema.upgrade)
    store = Store(url)
    await store.connect()
    try:
        after = [(m["id"], m["conversation_id"], m["seq"], m["role"], m["content"])
                 for conv in ("c1", "c2") for m in await store.list_messages(conv)]
        assert after == before
        for conv in ("c1", "c2"):
            messages = await store.list_messages(conv)
            assert [m["parent_id"] for m in messages] == [None, *(m["id"] for m in messages[:-1])]
            assert all((m["sibling_index"], m["sibling_count"]) == (0, 1) for m in messages)
            assert (await store.get_conversation(conv))["active_leaf_id"] == messages[-1]["id"]
            assert await store.list_messages(conv, path=True) == messages
        answers, tokens, _, cost, unpriced = await usage_totals(store)
        assert (answers, tokens) == (old_answers, old_tokens)
        assert cost == store._cost_value(old_cost)
        assert unpriced == 1
        assert await store.spent_since("u1", "2026-11-12") == store._cost_value(old_alice)
        # The answer left streaming gets its ledger row when it is finished.
        await store.save_reply("x3", reply("late", cost=Decimal("0.000001")))
        assert (await usage_totals(store))[3] == cost + Decimal("0.000001")
    finally:
        await store.disconnect()
    await schema.run_on(url, lambda connection: schema.downgrade(connection, "0006"))
    database = Database(databases_url(url))
    await database.connect()
    try:
        assert [tuple(row._mapping.values()) for row in await database.fetch_all(
            "SELECT id, conversation_id, seq, role, content FROM messages ORDER BY conversation_id, seq"
        )][:6] == before[:6]
        assert await database.fetch_val("SELECT COUNT(*) FROM messages") == len(before)
    finally:
        await database.disconnect()


async def test_migration_0007_downgrade_refuses_a_conversation_with_branches(store, url):
    first = await answer(store, "q", "a")
    await store.save_reply((await store.begin_regenerate(
        answer_id=first.assistant_message_id, model="m", stream_id=new_id(), task_trace_id="t")).assistant_message_id,
        reply("b"))
    await store.disconnect()
    with pytest.raises(RuntimeError, match="nothing changed"):
        await schema.run_on(url, lambda connection: schema.downgrade(connection, "0006"))
    await store.connect()


def check_tree(messages: list[dict[str, Any]], conversation_id: str) -> None:
    """Every parent is an earlier message of the same conversation; sibling numbers count each parent's children."""
    seen: dict[str, dict[str, Any]] = {}
    children: dict[str | None, int] = {}
    for message in messages:
        assert message["conversation_id"] == conversation_id
        assert message["parent_id"] is None or message["parent_id"] in seen
        assert message["sibling_index"] == children.get(message["parent_id"], 0)
        children[message["parent_id"]] = children.get(message["parent_id"], 0) + 1
        seen[message["id"]] = message
    for message in messages:
        assert message["sibling_count"] == children[message["parent_id"]]


async def test_edit_regenerate_and_switch_keep_one_tree_and_send_only_the_active_path(store):
    """Fails if the history of a turn is the whole conversation (by seq) rather than the path to its parent, if
    a regenerated answer is not a sibling, or if choosing a message does not select the newest leaf under it."""
    one = await answer(store, "one", "A1")
    conv = one.conversation_id
    two = await answer(store, "two", "A2", conv)
    assert two.history == [{"role": "user", "content": "one"}, {"role": "assistant", "content": "A1"},
                           {"role": "user", "content": "two"}]
    edited_stream = new_id()
    edited = await store.begin_turn(conversation_id=conv, agent_id="default", user_text="two bis", model="m",
                                    stream_id=edited_stream, task_trace_id="t",
                                    parent_message_id=one.assistant_message_id, parent_given=True)
    assert edited.history == [{"role": "user", "content": "one"}, {"role": "assistant", "content": "A1"},
                              {"role": "user", "content": "two bis"}]
    with pytest.raises(ConflictError) as busy:
        await store.begin_regenerate(answer_id=two.assistant_message_id, model="m", stream_id=new_id(),
                                     task_trace_id="t")
    assert (busy.value.code, busy.value.details) == ("busy", {"streamId": edited_stream})
    await store.save_reply(edited.assistant_message_id, reply("A3"))
    again = await store.begin_regenerate(answer_id=edited.assistant_message_id, model="m", stream_id=new_id(),
                                         task_trace_id="t")
    assert again.history == edited.history and again.parent_id == edited.user_message_id
    await store.save_reply(again.assistant_message_id, reply("A4"))
    messages = await store.list_messages(conv)
    check_tree(messages, conv)
    by_id = {m["id"]: m for m in messages}
    assert (by_id[again.assistant_message_id]["sibling_index"], by_id[again.assistant_message_id]["sibling_count"]) \
        == (1, 2)
    assert (by_id[edited.user_message_id]["sibling_index"], by_id[two.user_message_id]["sibling_count"]) == (1, 2)
    assert (await store.get_conversation(conv))["active_leaf_id"] == again.assistant_message_id
    assert [m["content"] for m in await store.list_messages(conv, path=True)] == ["one", "A1", "two bis", "A4"]
    # Choosing the first "two" selects the newest leaf under it: its answer.
    assert await store.set_active_leaf(conv, two.user_message_id) == two.assistant_message_id
    three = await store.begin_turn(conversation_id=conv, agent_id="default", user_text="three", model="m",
                                   stream_id=new_id(), task_trace_id="t")
    assert [m["content"] for m in three.history] == ["one", "A1", "two", "A2", "three"]
    await store.save_reply(three.assistant_message_id, reply("A5"))
    # Choosing the edited message selects its newest answer; a root message, the newest leaf of all below it.
    assert await store.set_active_leaf(conv, edited.user_message_id) == again.assistant_message_id
    assert await store.set_active_leaf(conv, one.user_message_id) == again.assistant_message_id
    with pytest.raises(NotFoundError):
        await store.set_active_leaf(conv, (await answer(store, "elsewhere", "x")).assistant_message_id)
    # A new first message is a root sibling.
    root = await store.begin_turn(conversation_id=conv, agent_id="default", user_text="restart", model="m",
                                  stream_id=new_id(), task_trace_id="t", parent_given=True)
    assert root.history == [{"role": "user", "content": "restart"}]
    await store.save_reply(root.assistant_message_id, reply("R"))
    check_tree(await store.list_messages(conv), conv)
    with pytest.raises(BadRequestError):  # a user message is no parent
        await store.begin_turn(conversation_id=conv, agent_id="default", user_text="x", model="m",
                               stream_id=new_id(), task_trace_id="t", parent_message_id=one.user_message_id,
                               parent_given=True)
    with pytest.raises(NotFoundError):  # another user's answer
        await store.begin_regenerate(answer_id=one.assistant_message_id, model="m", stream_id=new_id(),
                                     task_trace_id="t", owner_id="someone")


async def test_continue_adds_tokens_and_cost_exactly_and_the_ledger_keeps_each_generation(store):
    """The continued answer's history ends with the partial answer; its saved text, tokens and cost are the sums,
    the ledger has one row per generation whose sum is the message's own, and the report counts one answer.
    Fails if a continue's row holds the message's totals (the first generation counted twice)."""
    first = await turn(store, "write")
    cut = replace(reply("Once upon ", cost=Decimal("0.000000125")), stop_reason="max_tokens")
    await store.save_reply(first.assistant_message_id, cut)
    with pytest.raises(ConflictError) as refused:
        await store.begin_continue(answer_id=(await answer(store, "q", "done")).assistant_message_id,
                                   stream_id=new_id(), task_trace_id="t")
    assert refused.value.code == "not_continuable"
    more = await store.begin_continue(answer_id=first.assistant_message_id, stream_id=new_id(), task_trace_id="t")
    assert more.history == [{"role": "user", "content": "write"}, {"role": "assistant", "content": "Once upon"}]
    assert more.base is not None and (more.base.content, more.base.cost) == ("Once upon ", Decimal("0.000000125"))
    with pytest.raises(ConflictError):
        await store.begin_continue(answer_id=first.assistant_message_id, stream_id=new_id(), task_trace_id="t")
    total = replace(reply("Once upon a time", cost=Decimal("0.000000125") + Decimal("12345678.000000001")),
                    input_tokens=20, output_tokens=6)
    await store.save_reply(first.assistant_message_id, total)
    saved = await store.get_message(first.assistant_message_id)
    assert saved is not None and (saved["content"], saved["cost"], saved["input_tokens"]) == (
        "Once upon a time", "12345678.000000126", 20)
    rows = await store._fetch_all("SELECT input_tokens, output_tokens, cost FROM usage WHERE message_id = :m"
                                  " ORDER BY completed_at", {"m": first.assistant_message_id})
    assert [(int(r[0]), int(r[1]), store._cost_value(r[2])) for r in rows] == [
        (10, 3, Decimal("0.000000125")), (10, 3, Decimal("12345678.000000001"))]
    answers, _, _, cost, _ = await usage_totals(store)
    assert answers == 2 and cost == Decimal("12345678.000000126") + Decimal("0.000025")


async def test_deleting_a_conversation_leaves_nothing_of_it_but_its_usage(store):
    """Fails if usage is summed over messages (the delete would lower it) or if a message is left behind; an
    answer still streaming at the delete is counted as last saved."""
    kept = await answer(store, "keep", "k")
    gone = await answer(store, "go", "g1")
    await answer(store, "again", "g2", gone.conversation_id)
    running = await turn(store, "more", gone.conversation_id)
    partial = replace(reply("half", status=Status.STREAMING, cost=Decimal("0.000000007")), stop_reason=None)
    await store.save_progress([(running.assistant_message_id, partial)])
    assert await store.running_streams(gone.conversation_id) != []
    before = await usage_totals(store)
    assert await store.delete_conversation(gone.conversation_id) == 6
    assert await usage_totals(store) == (before[0] + 1, before[1] + 10, before[2] + 3,
                                         before[3] + Decimal("0.000000007"), before[4])
    with pytest.raises(NotFoundError):
        await store.get_conversation(gone.conversation_id)
    assert await store._fetch_val("SELECT COUNT(*) FROM messages WHERE conversation_id = :c",
                                  {"c": gone.conversation_id}) == 0
    with pytest.raises(FinishedElsewhereError):  # the cancelled answer's late save finds nothing to finish
        await store.save_reply(running.assistant_message_id, reply("late"))
    assert await usage_totals(store) == (before[0] + 1, before[1] + 10, before[2] + 3,
                                         before[3] + Decimal("0.000000007"), before[4])
    assert [c["id"] for c in await store.list_conversations(None)] == [kept.conversation_id]
    with pytest.raises(NotFoundError):
        await store.delete_conversation(gone.conversation_id)


async def test_conversations_page_by_cursor_and_search_titles_in_any_case(store):
    made = [await answer(store, f"Topic {n} {'PYTHON' if n % 3 == 0 else 'rust'} 100%_", "a") for n in range(7)]
    newest_first = [t.conversation_id for t in reversed(made)]
    pages, before = [], None
    while True:
        page = await store.list_conversations(None, 3, before=before)
        pages += [c["id"] for c in page]
        if len(page) < 3:
            break
        before = encode_cursor(page[-1])
    assert pages == newest_first
    found = await store.list_conversations(None, 50, query="python")
    assert [c["id"] for c in found] == [made[n].conversation_id for n in (6, 3, 0)]
    assert await store.list_conversations(None, 50, query="1%0") == []  # % and _ are literal
    assert len(await store.list_conversations(None, 50, query="100%_")) == 7
    long = await answer(store, "word " * 40, "a")
    title = (await store.get_conversation(long.conversation_id))["title"]
    assert title.endswith("word…") and len(title) <= 80
    await store.rename_conversation(long.conversation_id, "Renamed")
    assert (await store.get_conversation(long.conversation_id))["title"] == "Renamed"


async def test_a_continue_saved_from_a_dead_instances_log_keeps_the_part_it_continued(store):
    """The burying instance has only the continuation's events: the saved answer is the earlier text plus all
    of the continuation (not the partial save's prefix twice), its usage the earlier part's plus the
    continuation's estimate, and the ledger's new row only the continuation's. Fails without continued_part
    (the first part would be lost and the ledger's row negative)."""
    from server.core import save_orphan
    from server.hub import Orphan

    first = await turn(store, "write")
    await store.save_reply(first.assistant_message_id,
                           replace(reply("Once upon", cost=Decimal("0.000001")), stop_reason="max_tokens"))
    stream_id = new_id()
    await store.begin_continue(answer_id=first.assistant_message_id, stream_id=stream_id, task_trace_id="t")
    partial = replace(reply("Once upon a ti", status=Status.STREAMING), stop_reason=None)
    await store.save_progress([(first.assistant_message_id, partial)])
    entries = [(1, "start", b'{"model": "claude-haiku-4-5"}'), (2, "chunk", b'{"text": " a ti"}'),
               (3, "chunk", b'{"text": "me"}')]
    orphan = Orphan(stream_id, first.assistant_message_id, "claude-haiku-4-5", entries, {"input_tokens": 7})
    assert await save_orphan(store, orphan)
    saved = await store.get_message(first.assistant_message_id)
    assert saved is not None
    assert (saved["content"], saved["status"], saved["input_tokens"]) == ("Once upon a time", "interrupted", 17)
    rows = await store._fetch_all("SELECT input_tokens, cost FROM usage WHERE message_id = :m ORDER BY completed_at",
                                  {"m": first.assistant_message_id})
    assert [int(row[0]) for row in rows] == [10, 7]
    assert store._cost_value(rows[1][1]) is not None and store._cost_value(rows[1][1]) > 0
