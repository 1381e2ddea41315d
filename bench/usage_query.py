"""The usage report on 10,000 answers: rows summed in Python over TEXT costs (revision 0004) against one SQL
aggregate over exact costs (0005 and later).

    .venv/bin/python -m bench.usage_query [--messages 10000] [--runs 20] [--database-url URL]

Without --database-url it makes a SQLite file in a temporary directory; a PostgreSQL URL names an empty database
(its tables are dropped at the end). It prints the median and best time of each, per grouping.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from decimal import Decimal
from typing import Any

from databases import Database

from server.store import Store, databases_url, schema

GROUPS = ("day", "model", "agent", "user")
TABLES = ("usage", "messages", "sessions", "conversations", "users", "write_probe", "alembic_version")


async def fill(url: str, messages: int) -> None:
    """`messages` answers over 100 conversations, 5 models, 4 agents and 30 days, costs as 0004 wrote them."""
    database = Database(databases_url(url))
    await database.connect()
    try:
        async with database.transaction():
            await database.execute_many(
                "INSERT INTO conversations (id, agent_id, title, created_at, updated_at)"
                " VALUES (:id, :agent, 'bench', 't', 't')",
                [{"id": f"c{i}", "agent": f"agent{i % 4}"} for i in range(100)])
            await database.execute_many(
                "INSERT INTO messages (id, conversation_id, seq, role, content, model, status, input_tokens,"
                " output_tokens, cost, created_at, completed_at) VALUES (:id, :conv, :seq, 'assistant', 'a',"
                " :model, 'complete', 1200, 300, :cost, 't', :done)",
                [{"id": f"m{i}", "conv": f"c{i % 100}", "seq": i, "model": f"model{i % 5}",
                  "cost": format(Decimal(1200 * 3 + 300 * 15 + i) / 1_000_000, "f"),
                  "done": f"2026-11-{1 + i % 30:02d}T12:00:00.000000Z"} for i in range(messages)])
    finally:
        await database.disconnect()


async def python_sums(store: Store, group_by: str) -> dict[str, Decimal]:
    """What Store.usage did at revision 0004: every row read, costs summed as Decimal in Python."""
    rows = await store.reads.fetch_all(
        "SELECT m.completed_at, m.model, c.agent_id, COALESCE(u.name, 'anonymous'), m.input_tokens,"
        " m.output_tokens, m.cache_creation_input_tokens, m.cache_read_input_tokens, m.cost"
        " FROM messages m JOIN conversations c ON c.id = m.conversation_id LEFT JOIN users u ON u.id = c.owner_id"
        " WHERE m.role = 'assistant' AND m.completed_at >= :start AND m.completed_at < :end",
        {"start": "2026-11-01", "end": "2026-12-01"})
    column = {"day": 0, "model": 1, "agent": 2, "user": 3}[group_by]
    sums: dict[str, Decimal] = {}
    for row in rows:
        key = str(row[0])[:10] if column == 0 else str(row[column] or "unknown")
        sums[key] = sums.get(key, Decimal(0)) + (Decimal(row[8]) if row[8] is not None else Decimal(0))
    return sums


async def timed(runs: int, work: Any) -> tuple[float, float, Any]:
    times, result = [], None
    for _ in range(runs):
        start = time.perf_counter()
        result = await work()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000, min(times) * 1000, result


async def measure(url: str, messages: int, runs: int) -> None:
    await schema.run_on(url, lambda connection: schema.upgrade(connection, "0004"))
    await fill(url, messages)
    before: dict[str, tuple[float, float, Any]] = {}
    store = Store(url)
    await store.connect(migrate=False)
    try:
        for group in GROUPS:
            before[group] = await timed(runs, lambda group=group: python_sums(store, group))
    finally:
        await store.disconnect()
    store = Store(url)
    await store.connect()  # migrates to the head: exact costs in SQL
    try:
        print(f"usage report over {messages} answers, {runs} runs each ({url.split(':')[0]}):")
        for group in GROUPS:
            after = await timed(runs, lambda group=group: store.usage("2026-11-01", "2026-12-01", group,
                                                                      every_owner=True))
            sums = {row.key: row.cost for row in after[2]}
            assert sums == before[group][2], f"the two sums differ for {group}"
            print(f"  by {group:5}  Python over rows: median {before[group][0]:7.1f} ms (best {before[group][1]:6.1f})"
                  f"   SQL aggregate: median {after[0]:6.1f} ms (best {after[1]:6.1f})")
    finally:
        await store.disconnect()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--database-url", help="an empty PostgreSQL database (default: a temporary SQLite file)")
    args = parser.parse_args()
    if args.database_url is None:
        with tempfile.TemporaryDirectory() as directory:
            await measure(f"sqlite:///{directory}/usage.db", args.messages, args.runs)
        return
    try:
        await measure(args.database_url, args.messages, args.runs)
    finally:
        database = Database(databases_url(args.database_url))
        await database.connect()
        for table in TABLES:
            await database.execute(f"DROP TABLE IF EXISTS {table}")
        await database.disconnect()


if __name__ == "__main__":
    asyncio.run(main())
