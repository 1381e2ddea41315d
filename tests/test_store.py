"""Store on a real database: a SQLite file, and PostgreSQL for each URL in TEST_DATABASE_URLS."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import AsyncIterator
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from databases import Database

from server.errors import NotFoundError
from server.store import (
    MIGRATIONS,
    FinishedElsewhereError,
    Query,
    Reply,
    Status,
    Store,
    Turn,
    _statements,
    databases_url,
    new_id,
)

from .conftest import SCHEMA_TABLES

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
    database = Database(databases_url(url))
    await database.connect()
    try:
        for table in TABLES:
            await database.execute(f"DROP TABLE IF EXISTS {table}")
    finally:
        await database.disconnect()


@pytest.fixture(params=DATABASE_PARAMS, ids=lambda url: url.split(":")[0])
async def url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A database URL with no tables in it yet."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/store.db"
        return
    await drop_tables(request.param)  # what an interrupted earlier run may have left
    yield request.param
    await drop_tables(request.param)


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


async def test_migrations_apply_once_and_are_recorded_one_row_per_file(url, caplog):
    caplog.set_level(logging.INFO, logger="deltarelay.store")
    files = sorted(MIGRATIONS.glob("*.sql"))
    first = Store(url)
    await first.connect()
    applied = await first.db.fetch_all("SELECT version, applied_at FROM schema_migrations ORDER BY version")
    await first.disconnect()
    assert [row[0] for row in applied] == [int(path.name.split("_", 1)[0]) for path in files]
    assert [r.getMessage() for r in caplog.records] == [f"applied migration {path.name}" for path in files]

    caplog.clear()
    second = Store(url)
    await second.connect()
    again = await second.db.fetch_all("SELECT version, applied_at FROM schema_migrations ORDER BY version")
    await second.disconnect()
    assert [tuple(row) for row in again] == [tuple(row) for row in applied]
    assert caplog.records == []


async def test_an_old_database_with_only_the_first_migration_is_upgraded_at_start_without_losing_rows(url):
    database = Database(databases_url(url))
    await database.connect()
    try:
        await database.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)")
        first = MIGRATIONS / "0001_initial.sql"
        for statement in _statements(first.read_text(encoding="utf-8")):
            await database.execute(statement)
        await database.execute("INSERT INTO schema_migrations (version, applied_at) VALUES (1, 'then')")
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
        versions = [row[0] for row in await store.db.fetch_all("SELECT version FROM schema_migrations ORDER BY 1")]
        messages = await store.list_messages("c1")
        # An answer an old (single) instance left streaming names no instance: it counts as gone.
        assert await store.interrupt_unfinished({"some-live-instance"}) == 1
        left = await store.get_message("m3")
    finally:
        await store.disconnect()
    assert versions == [int(path.name.split("_", 1)[0]) for path in sorted(MIGRATIONS.glob("*.sql"))]
    assert [(m["seq"], m["role"], m["content"], m["status"], m["cost"]) for m in messages] == [
        (0, "user", "Hi 🙂", "complete", None), (1, "assistant", "Hello there.", "complete", "0.00001234"),
        (2, "user", "More?", "complete", None), (3, "assistant", "Half", "streaming", None),
    ]
    assert left is not None and (left["status"], left["content"]) == ("interrupted", "Half")


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
    streaming = await turn(store, "second question", first.conversation_id)  # its answer never saved
    third = await turn(store, "third question", first.conversation_id)

    assert streaming.history == [{"role": "user", "content": "first question\n\nsecond question"}]
    assert third.history == [{"role": "user", "content": "first question\n\nsecond question\n\nthird question"}]


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
    await store.connect()  # the migrations were a batch just now: the next write counts as "under load"
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
    tiny = await answer(store, "tiny", "a", cost=Decimal("0.00000001"))
    long = await answer(store, "long", "b", cost=Decimal("12345.678901234567890123"))
    unpriced = await answer(store, "unpriced", "c", cost=None)

    assert (await store.list_messages(tiny.conversation_id))[1]["cost"] == "0.00000001"
    assert (await store.list_messages(long.conversation_id))[1]["cost"] == "12345.678901234567890123"
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
                {"id": new_id(), "conv": started.conversation_id, "seq": 2 + i, "cost": format(cost, "f")},
            )

    await store.write(insert())

    total = (await store.get_conversation(started.conversation_id))["total_cost"]
    # 2000 * 0.1 + (1 + ... + 2000) * 0.00000001 = 200 + 0.02001
    assert isinstance(total, Decimal) and total == Decimal("200.02001")
