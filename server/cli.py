"""Command line: `deltarelay` (or `python -m server`) runs the server; `users` manages users, `usage` reports
spending, `db` migrates the schema and `check` says whether a deployment is ready."""

from __future__ import annotations

import argparse
import asyncio
import csv
import ctypes
import logging
import math
import os
import resource
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from types import FrameType
from typing import TypeVar

from . import logs
from .attachments import inline_room
from .auth import new_secret, secret_hash, valid_user_name
from .config import ConfigError, Settings, load_settings, masked_url
from .errors import RelayError, one_line
from .store import Store, UsageRow, schema
from .transports.http_protocol import ConnectionGuard, relay_http_protocol
from .transports.ws_protocol import relay_websocket_protocol
from .usage import GROUPS, parse_query, total_of, usage_rows

T = TypeVar("T")
DATABASE_URL_HELP = "sqlite:///file.db or postgresql://user@host:5432/db (DATABASE_URL)"


def _serve_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="address to bind (HOST, default 127.0.0.1)")
    parser.add_argument("--port", help="port to bind (PORT, default 8000)")
    parser.add_argument("--database-url", help=DATABASE_URL_HELP)
    parser.add_argument("--model", help="default model (RELAY_MODEL)")
    parser.add_argument("--log-level", help="critical, error, warning, info or debug (RELAY_LOG_LEVEL)")


async def _with_store(settings: Settings, work: Callable[[Store], Awaitable[T]]) -> T:
    store = Store(settings.database_url, pool_size=1)  # one command, one read at a time
    await store.connect()
    try:
        return await work(store)
    finally:
        await store.disconnect()


def preflight(settings: Settings) -> str | None:
    """Why the server must not start, in one line: the database or Redis cannot be reached, or there are
    no users and the address is reachable from other machines. None: start."""

    async def check() -> str | None:
        where = masked_url(settings.database_url)
        try:
            users = await _with_store(settings, lambda store: store.active_user_count())
        except Exception as exc:
            return f"cannot open the database {where}: {one_line(exc)}"
        if settings.redis_url is not None:
            import redis.asyncio

            client = redis.asyncio.from_url(settings.redis_url, socket_connect_timeout=5)
            try:
                await client.ping()
            except Exception as exc:
                return f"cannot reach Redis at {masked_url(settings.redis_url)}: {one_line(exc)}"
            finally:
                await client.aclose()
        if users or settings.host_identity or settings.loopback or settings.allow_anonymous:
            return None
        return (f"no users exist and {settings.host} is reachable from other machines: add one with"
                " `deltarelay users add NAME`, bind to 127.0.0.1, or set RELAY_ALLOW_ANONYMOUS=1 to serve"
                " without sign-in")

    return asyncio.run(check())


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas, as MALLOC_ARENA_MAX would, unless the environment sets it.

    Each thread that allocates (the SQLite writer, aiosqlite's connection threads) gets an arena of its
    own by default, and freed memory stays spread over them: RSS grew 13% from 2,000 to 20,000 finished
    streams; with two arenas it grew 5% and then stayed flat (measured in one process, same workload).
    """
    if "MALLOC_ARENA_MAX" in os.environ or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, arenas)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass  # not glibc (musl, for one): nothing to cap


def raise_open_file_limit() -> tuple[int, int, int]:
    """Raise the soft limit on open files to the hard limit: (soft before, soft now, hard).

    Each connection is a file descriptor, and the usual soft limit (1024) is below what a few
    hundred streams with their upstream connections take; the hard limit is what the
    administrator allows.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return soft, soft, hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ValueError, OSError):  # macOS caps it below an infinite hard limit
        return soft, soft, hard
    return soft, wanted, hard


# Files a process holds besides its connections: listening sockets, the event loop's, Redis clients, logs.
OWN_FILES = 64


def open_files_needed(settings: Settings) -> tuple[int, int]:
    """(files the settings may need open at once, the part of them that is not upstream connections).

    Each upstream connection serves one answer, and its reader usually has a connection of its own (an SSE
    response, or a WebSocket): two each. Each database connection is one or two (SQLite: the file and its WAL).
    The offline model opens no upstream connection.
    """
    database = 2 * (settings.database_pool_size + 1)
    per_upstream = 0 if settings.offline else 2
    return per_upstream * settings.upstream_max_connections + database + OWN_FILES, database + OWN_FILES


def check_open_file_limit(log: logging.Logger, limits: tuple[int, int, int], settings: Settings) -> None:
    """Log the open-file limit once at start, and a warning when the hard limit cannot hold the settings."""
    before, soft, hard = limits
    if soft > before:
        log.info("open files: soft limit raised from %d to %d (the hard limit)", before, soft)
    else:
        log.info("open files: limit %d (hard limit %d)", soft, hard)
    needed, fixed = open_files_needed(settings)
    if needed > soft:
        room = max(0, (soft - fixed) // 2)
        log.warning("open files: the limit of %d cannot hold RELAY_UPSTREAM_MAX_CONNECTIONS=%d answers, each with a"
                    " client connection, and %d database connections (about %d files): lower"
                    " RELAY_UPSTREAM_MAX_CONNECTIONS to %d, or raise the hard limit (ulimit -Hn, systemd LimitNOFILE=)",
                    soft, settings.upstream_max_connections, settings.database_pool_size + 1, needed, room)


def serve(settings: Settings) -> int:
    import uvicorn

    from .app import create_app

    limit_malloc_arenas()  # before any thread starts
    open_files = raise_open_file_limit()
    refusal = preflight(settings)  # before logging is set up: the refusal is the one line printed
    if refusal:
        print(f"deltarelay: {refusal}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    log = logging.getLogger("deltarelay")
    check_open_file_limit(log, open_files, settings)
    if settings.offline:
        log.warning("no ANTHROPIC_API_KEY: answers come from the built-in offline demo model")
    log.info("deltarelay on http://%s:%d (database %s)", settings.host, settings.port,
             masked_url(settings.database_url))
    app = create_app(settings)
    guard = ConnectionGuard(
        max_header_bytes=settings.max_header_bytes, max_headers=settings.max_headers,
        head_timeout=settings.header_timeout_seconds, max_pending=settings.max_unauthenticated_connections,
        write_timeout=settings.write_timeout_seconds,
    )

    grace = settings.shutdown_grace_seconds
    # The end of the grace period is kept for the readers' last events and the sockets' closing handshakes.
    tail = min(1.0, grace / 4)

    class Server(uvicorn.Server):
        draining: asyncio.Task[None] | None = None

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # SIGTERM: refuse new answers at once, but keep listening while running ones finish (within the
            # grace period): /readyz says 503 so the load balancer moves on, and readers can still resume.
            # A second signal stops at once.
            hub = getattr(app.state, "hub", None)
            if hub is None or self.draining is not None:
                super().handle_exit(sig, frame)
                return
            hub.begin_shutdown()
            log.info("shutting down: new answers are refused; %d running get up to %.0f s",
                     len(hub.active()), grace)
            self.draining = asyncio.get_running_loop().create_task(self.drain(sig, frame))

        async def drain(self, sig: int, frame: FrameType | None) -> None:
            """The whole shutdown within the grace period: answers until its tail, then the readers and sockets.

            What is still running at the tail is saved as interrupted, which ends its stream with an
            `interrupted` error event; its readers get that event before uvicorn closes their connections.
            """
            hub = app.state.hub
            try:
                await hub.shutdown(grace - tail)
                await hub.wait_for_readers(grace - (time.monotonic() - hub.shutdown_started))
            finally:
                # uvicorn's own wait for connections to close (and then tasks to end) gets what is left of the
                # grace period.
                self.config.timeout_graceful_shutdown = max(0.1, grace - (time.monotonic() - hub.shutdown_started))
                super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # our handler (text or JSON) formats uvicorn's lines too
        access_log=settings.access_log,
        loop="auto",  # uvloop when installed
        http=relay_http_protocol(guard),  # httptools, with a body writer for event streams and head limits
        ws=relay_websocket_protocol(quiet=not settings.access_log and settings.log_level.lower() != "debug",
                                    guard=guard),
        ws_ping_interval=settings.keepalive_seconds,
        # Answers are small text frames: compression costs more CPU than it saves, and a zlib context per socket.
        ws_per_message_deflate=False,
        # A bigger frame closes the socket (1009); the room for inline attachments is only for a frame that
        # has them (see RelaySocket.handle).
        ws_max_size=settings.ws_max_frame_bytes + inline_room(settings.max_attachment_bytes),
        lifespan="on",
        # What a second signal leaves connections to close; a drain sets it to the rest of the grace period.
        timeout_graceful_shutdown=math.ceil(tail),
    )
    Server(config).run()
    return 0


def users_command(args: argparse.Namespace, settings: Settings) -> int:
    """`deltarelay users add|list|revoke`: the token is printed once; only its hash is kept."""
    if args.action == "add":
        if not valid_user_name(args.name):
            print("deltarelay: a user name is 1-64 letters, digits, '.', '_', '@' or '-'", file=sys.stderr)
            return 2
        token = new_secret()
        try:
            asyncio.run(_with_store(settings, lambda store: store.add_user(args.name, secret_hash(token),
                                                                            args.admin)))
        except ValueError as exc:
            print(f"deltarelay: {exc}", file=sys.stderr)
            return 1
        print(f"user {args.name} added{' (admin)' if args.admin else ''}. Their API token, shown only now:",
              file=sys.stderr)
        print(token)
        return 0
    if args.action == "revoke":
        revoked = asyncio.run(_with_store(settings, lambda store: store.revoke_user(args.name)))
        if not revoked:
            print(f"deltarelay: no active user named {args.name!r}", file=sys.stderr)
            return 1
        print(f"user {args.name} revoked: their token and sessions no longer work", file=sys.stderr)
        return 0
    rows = asyncio.run(_with_store(settings, lambda store: store.list_users()))
    print(f"{'name':<24} {'role':<6} {'status':<8} created")
    for row in rows:
        status = "revoked" if row["revoked_at"] else "active"
        print(f"{row['name']:<24} {'admin' if row['is_admin'] else 'user':<6} {status:<8} {row['created_at']}")
    return 0


def usage_command(args: argparse.Namespace, settings: Settings) -> int:
    """`deltarelay usage`: the usage report of /api/usage, for every user or one, as a table or CSV."""
    try:
        query = parse_query(args.date_from, args.date_to, args.group_by)
    except RelayError as exc:
        print(f"deltarelay: {exc.message}", file=sys.stderr)
        return 2

    async def read(store: Store) -> list[UsageRow] | None:
        if args.user is None:
            return await usage_rows(store, query, None, every_owner=True)
        owner = None if args.user == "anonymous" else await store.user_id_by_name(args.user)
        if owner is None and args.user != "anonymous":
            return None
        return await usage_rows(store, query, owner, every_owner=False)

    rows = asyncio.run(_with_store(settings, read))
    if rows is None:
        print(f"deltarelay: no user named {args.user!r}", file=sys.stderr)
        return 1
    header = [query.group_by, "answers", "input tokens", "output tokens", "cache write tokens", "cache read tokens",
              "cost (USD)", "cache savings (USD)"]
    table = [[row.key, row.messages, row.input_tokens, row.output_tokens, row.cache_creation_input_tokens,
              row.cache_read_input_tokens, format(row.cost, "f"), format(row.cache_savings, "f")] for row in rows]
    total = total_of(rows)
    footer = ["total", total.messages, total.input_tokens, total.output_tokens, total.cache_creation_input_tokens,
              total.cache_read_input_tokens, format(total.cost, "f"), format(total.cache_savings, "f")]
    if args.csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(table)
        writer.writerow(footer)
        return 0
    print(f"usage {query.first_day} to {query.last_day} (UTC), by {query.group_by}"
          f"{'' if args.user is None else ', user ' + args.user}")
    cells = [header, *[[str(c) for c in line] for line in table], [str(c) for c in footer]]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    for n, line in enumerate(cells):
        if n == len(cells) - 1:
            print("  ".join("-" * w for w in widths))
        padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))]
        print("  ".join(padded))
    if total.unpriced:
        print(f"{total.unpriced} answers of models without a price are counted but not costed")
    return 0


def _positive_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, got {text!r}")
    return seconds


def _check(args: argparse.Namespace) -> int:
    """`deltarelay check`: the settings the server would read, then each dependency; exit 0 when ready, else 1."""
    from . import check

    try:
        settings = load_settings(host=args.host, port=args.port, database_url=args.database_url, model=args.model,
                                 log_level=args.log_level)
    except ConfigError as exc:
        return check.settings_failed(str(exc), args.json)
    return check.check_command(settings, args.timeout, args.json)


def db_command(args: argparse.Namespace, settings: Settings) -> int:
    """`deltarelay db upgrade [REV] | downgrade REV | current | history`: Alembic's commands on DATABASE_URL."""
    if args.action == "history":
        print("\n".join(schema.history()))
        return 0
    url = settings.database_url
    try:
        if args.action == "upgrade":
            target = args.revision
            applied = asyncio.run(schema.run_on(url, lambda connection: schema.upgrade(connection, target)))
            print(f"applied {', '.join(applied)}" if applied else "nothing to apply")
        elif args.action == "downgrade":
            target = args.revision
            asyncio.run(schema.run_on(url, lambda connection: schema.downgrade(connection, target)))
        print(asyncio.run(schema.run_on(url, schema.describe_current)))
    except Exception as exc:
        print(f"deltarelay db {args.action}: {masked_url(url)}: {one_line(exc)}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deltarelay", description="Stream model answers to browsers.")
    sub = parser.add_subparsers(dest="command")
    _serve_parser(parser)
    _serve_parser(sub.add_parser("serve", help="run the server (the default)"))
    users = sub.add_parser("users", help="add, list or revoke users and their API tokens")
    users.add_argument("--database-url", help=DATABASE_URL_HELP)
    actions = users.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="add a user and print their API token once")
    add.add_argument("name")
    add.add_argument("--admin", action="store_true", help="may see every user's conversations and usage")
    actions.add_parser("list", help="list users")
    revoke = actions.add_parser("revoke", help="revoke a user's token and end their sessions")
    revoke.add_argument("name")
    report = sub.add_parser("usage", help="tokens and exact costs per day, model, agent or user")
    report.add_argument("--database-url", help=DATABASE_URL_HELP)
    report.add_argument("--from", dest="date_from", help="first UTC day, YYYY-MM-DD (default: 29 days before --to)")
    report.add_argument("--to", dest="date_to", help="last UTC day, YYYY-MM-DD (default: today)")
    report.add_argument("--group-by", choices=GROUPS, default="day")
    report.add_argument("--user", help="one user's usage (default: everyone's)")
    report.add_argument("--csv", action="store_true", help="CSV on standard output")
    db = sub.add_parser("db", help="migrate the database's schema (a server start upgrades it by itself)")
    db.add_argument("--database-url", help=DATABASE_URL_HELP)
    steps = db.add_subparsers(dest="action", required=True)
    upgrade = steps.add_parser("upgrade", help="apply the revisions up to REV (default: head, the newest)")
    upgrade.add_argument("revision", nargs="?", default="head", metavar="REV")
    downgrade = steps.add_parser("downgrade", help="undo the revisions after REV (base: all of them)")
    downgrade.add_argument("revision", metavar="REV")
    steps.add_parser("current", help="the database's revision")
    steps.add_parser("history", help="the revisions this version has, oldest first")
    check = sub.add_parser("check", help="check the settings, database, Redis and upstream before traffic")
    _serve_parser(check)
    check.add_argument("--timeout", type=_positive_seconds, default=5.0,
                       help="seconds each check may take (default 5)")
    check.add_argument("--json", action="store_true", help="the report as JSON")
    args = parser.parse_args(argv)
    if args.command == "check":
        return _check(args)
    try:
        if args.command == "users":
            return users_command(args, load_settings(database_url=args.database_url))
        if args.command == "usage":
            return usage_command(args, load_settings(database_url=args.database_url))
        if args.command == "db":
            return db_command(args, load_settings(database_url=args.database_url))
        settings = load_settings(
            host=args.host, port=args.port, database_url=args.database_url, model=args.model,
            log_level=args.log_level,
        )
    except ConfigError as exc:
        print(f"deltarelay: {exc}", file=sys.stderr)
        return 2
    return serve(settings)
