"""The benchmark of issue 5 in one command: the relay against the upstream read directly and the seed's algorithm.

    .venv/bin/python -m bench.run [--quick] [--only latency,capacity,...] [--transports sse,ws] [--dry-run]
    .venv/bin/python -m bench.run --instances 2 --database-url postgresql://… --redis-url redis://…

Every case starts fresh processes: the stamping upstream (bench.upstream) pinned to core 1, the target pinned
to core 0 (the relay with a new SQLite file, the seed port, the bare WebSocket app, or nothing for the direct
read), then the load generator (bench.loadgen) pinned to core 1. Results go to bench/results/: latest.json,
latest.md and two PNG plots (bench/report.py). Workloads and targets are described in bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import report
from .loadgen import Spec

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
TARGET_CORE, LOAD_CORE = 0, 1
WARMUP_STREAMS = 5
WORKLOADS = ("latency", "capacity", "throughput", "memory")


@dataclass(frozen=True)
class Deployment:
    """How the relay runs: one instance on SQLite (the default), or instances sharing PostgreSQL and Redis.

    Every instance is pinned to the target core. On a 2-core machine, an instance on each core would leave
    no core for the upstream and the load generator, and their CPU would be measured against the relay's:
    so two instances here show what the Redis path costs on the same CPU, not what a second machine adds.
    """

    instances: int = 1
    database_url: str | None = None  # a PostgreSQL server: each case gets a new database on it
    redis_url: str | None = None


@dataclass(frozen=True)
class Case:
    """One run: one workload against one target over one transport."""

    workload: str  # latency | capacity | capacity_long | throughput | memory_idle | memory_flat
    target: str  # direct | seed | relay | bare | bare-relay-protocol
    transport: str  # sse | ws
    kind: str = "streams"  # streams | flat | idle_ws
    streams: int = 0
    deltas: int = 0
    delay_ms: float = 0.0
    ramp_s: float = 0.0
    concurrency: int = 50
    checkpoint_every: int = 2000
    idle_sockets: int = 0

    @property
    def name(self) -> str:
        if self.kind == "idle_ws":
            return f"{self.workload} {self.target}/{self.transport} {self.idle_sockets} idle"
        size = f"{self.streams}x{self.deltas}@{self.delay_ms:g}ms"
        return f"{self.workload} {self.target}/{self.transport} {size}"

    def timeout_s(self) -> float:
        """The load generator's deadline: generous, but every run ends."""
        if self.kind == "idle_ws":
            return 60 + self.idle_sockets * 0.02
        if self.kind == "flat":
            return 60 + self.streams * (0.01 + self.deltas * 0.0005)
        paced = self.deltas * self.delay_ms / 1000
        return 30 + self.ramp_s + 3 * paced + self.streams * self.deltas * 0.0002

    def expected_s(self) -> float:
        """A rough duration for the estimate printed first: paced time, or total deltas over what the target
        relayed on one core when this was written (paced: seed port ~1,400 chunks/s, relay ~4,500, direct
        ~15,000; unpaced, reading bigger batches: ~9,000, ~40,000, ~50,000), plus ~1.5 s to start and stop."""
        if self.kind == "idle_ws":
            return 1.5 + 6 + self.idle_sockets * 0.004
        if self.kind == "flat":
            return 1.5 + self.streams * 0.003
        if self.delay_ms > 0:
            rate = {"seed": 1400.0, "relay": 4500.0}.get(self.target, 15000.0)
        else:
            rate = {"seed": 9000.0, "relay": 40000.0}.get(self.target, 50000.0)
        paced = self.ramp_s + self.deltas * self.delay_ms / 1000 * 1.05
        return 1.5 + min(self.timeout_s(), max(paced, self.streams * self.deltas / rate))


def streaming_targets(transports: list[str]) -> list[tuple[str, str]]:
    """The floor and the seed port (SSE only: it has no WebSocket), then the relay on each transport."""
    return [("direct", "sse"), ("seed", "sse")] + [("relay", t) for t in transports]


def plan(quick: bool, only: list[str], transports: list[str]) -> list[Case]:
    targets = streaming_targets(transports)
    cases: list[Case] = []
    if "latency" in only:
        n, d = (20, 20) if quick else (100, 200)
        cases += [Case("latency", t, tr, streams=n, deltas=d, delay_ms=20, ramp_s=1) for t, tr in targets]
    if "capacity" in only:
        ramp = [50, 100] if quick else [100, 250, 500, 750, 1000, 1500]
        for n in ramp:
            cases += [Case("capacity", t, tr, streams=n, deltas=20 if quick else 60, delay_ms=50, ramp_s=1)
                      for t, tr in targets]
        n, d, r = (100, 40, 2) if quick else (1000, 200, 5)
        cases += [Case("capacity_long", t, tr, streams=n, deltas=d, delay_ms=50, ramp_s=r) for t, tr in targets]
    if "throughput" in only:
        n, d = (20, 500) if quick else (50, 2000)
        cases += [Case("throughput", t, tr, streams=n, deltas=d, delay_ms=0, ramp_s=0) for t, tr in targets]
    if "memory" in only:
        k = 200 if quick else 1000
        cases += [Case("memory_idle", t, "ws", kind="idle_ws", idle_sockets=k)
                  for t in ("bare", "bare-relay-protocol", "relay") if "ws" in transports or t == "bare"]
        n, every = (500, 100) if quick else (10_000, 2000)
        cases += [Case("memory_flat", "relay", tr, kind="flat", streams=n, deltas=10, delay_ms=0, concurrency=50,
                       checkpoint_every=every) for tr in transports]
    return cases


# --- processes ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_env() -> dict[str, str]:
    """The caller's environment without relay settings, so the relay runs with its defaults."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RELAY_", "ANTHROPIC_", "DATABASE_URL", "HOST", "PORT"))}
    env["PYTHONPATH"] = str(ROOT)
    return env


class Process:
    """A child pinned to one core; stopped (TERM, then KILL) by its own pid only."""

    def __init__(self, name: str, argv: list[str], core: int, log: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log = log
        self.handle = log.open("wb")
        # taskset execs the program, so the pid is the Python process's.
        self.popen = subprocess.Popen(["taskset", "-c", str(core), *argv], cwd=ROOT, env=env, stdout=self.handle,
                                      stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.alive():
            self.popen.terminate()
            try:
                self.popen.wait(timeout=25)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)
        self.handle.close()


def wait_ready(process: Process, port: int, path: str | None, timeout: float = 30.0) -> None:
    """Until the port accepts (and `path` answers 200), or raise with the process's log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.alive():
            raise RuntimeError(f"{process.name} exited with {process.popen.returncode}:\n{process.tail()}")
        try:
            if path is None:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{process.name} not ready on port {port} after {timeout} s:\n{process.tail()}")


def on_postgresql(url: str, statement: str) -> list[Any]:
    """Run one statement on a PostgreSQL database (CREATE/DROP DATABASE on the server's own); its rows."""
    import asyncio

    import asyncpg

    from server.store import asyncpg_dsn

    async def run() -> list[Any]:
        connection = await asyncpg.connect(asyncpg_dsn(url))
        try:
            return list(await connection.fetch(statement))
        finally:
            await connection.close()

    return asyncio.run(run())


def new_database(server_url: str) -> str:
    """A new empty PostgreSQL database on `server_url`'s server, for one case; its URL."""
    import uuid

    name = f"bench_{uuid.uuid4().hex[:12]}"
    on_postgresql(server_url, f'CREATE DATABASE "{name}"')
    return urllib.parse.urlunsplit(urllib.parse.urlsplit(server_url)._replace(path="/" + name))  # query kept


@contextmanager
def processes(case: Case, workdir: Path,
              deployment: Deployment = Deployment()) -> Iterator[tuple[int, int, int, dict[str, Any]]]:
    """Start the upstream and the target; yield (port to load, target pid, upstream pid, facts)."""
    python = sys.executable
    env = base_env()
    facts: dict[str, Any] = {}
    with ExitStack() as stack:
        upstream_pid = 0
        if not case.target.startswith("bare"):
            up_port = free_port()
            upstream = Process("upstream", [python, "-m", "bench.upstream", "--port", str(up_port), "--delay-ms",
                                            str(case.delay_ms), "--words", str(case.deltas)],
                               LOAD_CORE, workdir / "upstream.log", env)
            stack.callback(upstream.stop)
            wait_ready(upstream, up_port, None)
            upstream_pid = upstream.pid
        if case.target == "direct":
            yield up_port, 0, upstream_pid, facts
            return
        port = free_port()
        if case.target == "relay":
            database = workdir / "relay.db"
            # One anonymous user (open mode) opens every stream: per-user limits would cap the load itself.
            env = {**env, "DATABASE_URL": f"sqlite:///{database}", "ANTHROPIC_API_KEY": "bench",
                   "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{up_port}", "RELAY_LIMIT_REQUESTS_PER_MINUTE": "0",
                   "RELAY_LIMIT_CONCURRENT_STREAMS": "0", "RELAY_LIMIT_CONNECTIONS": "0"}
            argv = [python, "-m", "server", "--port", str(port)]
            facts["database"] = database
            if deployment.database_url:
                env["DATABASE_URL"] = facts["database_url"] = new_database(deployment.database_url)
            if deployment.redis_url:
                env.update({"REDIS_URL": deployment.redis_url, "RELAY_REDIS_PREFIX": f"bench-{workdir.name}"})
            others = []
            for n in range(1, deployment.instances):
                other_port = free_port()
                other = Process(f"relay-{n + 1}", [python, "-m", "server", "--port", str(other_port)], TARGET_CORE,
                                workdir / f"relay-{n + 1}.log", env)
                stack.callback(other.stop)
                wait_ready(other, other_port, "/healthz")
                others.append((other_port, other.pid))
            facts["ports"] = [port] + [other_port for other_port, _ in others]
            facts["other_pids"] = [pid for _, pid in others]
        elif case.target == "seed":
            database = workdir / "seed.db"
            env = {**env, "ANTHROPIC_API_KEY": "bench", "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{up_port}"}
            argv = [python, "-m", "bench.baselines.seed_relay", "--port", str(port), "--database", str(database)]
            facts["database"] = database
        else:
            protocol = "relay" if case.target == "bare-relay-protocol" else "uvicorn"
            argv = [python, "-m", "bench.baselines.bare_ws", "--port", str(port), "--protocol", protocol]
        target = Process(case.target, argv, TARGET_CORE, workdir / f"{case.target}.log", env)
        stack.callback(target.stop)
        wait_ready(target, port, "/healthz")
        facts["target_start_rss_kb"] = rss_of(target.pid)
        yield port, target.pid, upstream_pid, facts
        target.stop()
        facts["target_exit_code"] = target.popen.returncode
        facts["target_log_tail"] = target.tail(5)


def rss_of(pid: int) -> int:
    from .procstat import rss_kb

    return rss_kb(pid)


def saved_replies_postgres(database_url: str, server_url: str) -> dict[str, int] | str:
    """Like saved_replies, from the case's PostgreSQL database, which is then dropped."""
    import asyncpg

    try:
        rows = on_postgresql(database_url, "SELECT status, count(*) FROM messages WHERE role = 'assistant' "
                                           "GROUP BY status")
        return {str(row[0]): int(row[1]) for row in rows}
    except (OSError, asyncpg.PostgresError) as exc:
        return f"unreadable: {exc}"
    finally:
        on_postgresql(server_url, f'DROP DATABASE IF EXISTS "{urllib.parse.urlsplit(database_url).path[1:]}"')


def saved_replies(case: Case, database: Path | None) -> dict[str, int] | str:
    """Assistant messages in the target's database by status, read after the target stopped."""
    if database is None or not database.exists():
        return "no database"
    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
            if case.target == "relay":
                rows = db.execute("SELECT status, count(*) FROM messages WHERE role = 'assistant' GROUP BY status")
            else:
                rows = db.execute("SELECT 'saved', count(*) FROM messages WHERE role = 'assistant'")
            return {str(status): int(count) for status, count in rows}
    except sqlite3.Error as exc:
        return f"unreadable: {exc}"


@contextmanager
def profiled(pid: int, output: Path | None) -> Iterator[None]:
    """py-spy samples the target while the load runs: collapsed stacks (flamegraph.pl, speedscope) in `output`.

    py-spy runs on the load core; its sampling costs that core a little, so profiled figures are not compared
    with unprofiled ones.
    """
    if output is None or not pid:
        yield
        return
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    rate = os.environ.get("BENCH_SPY_RATE", "250")  # samples per second
    sampler = subprocess.Popen(["taskset", "-c", str(LOAD_CORE), spy, "record", "--pid", str(pid), "--rate", rate,
                                "--format", "raw", "--nonblocking", "--output", str(output)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        sampler.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        try:
            sampler.wait(timeout=30)
        except subprocess.TimeoutExpired:
            sampler.kill()


def run_case(case: Case, workdir: Path, deployment: Deployment = Deployment(),
             profile: Path | None = None) -> dict[str, Any]:
    workdir.mkdir(parents=True)
    started = time.monotonic()
    result: dict[str, Any] = {"case": asdict(case)}
    if case.target == "relay" and deployment != Deployment():
        result["deployment"] = {"instances": deployment.instances, "database": "postgresql" if
                                deployment.database_url else "sqlite", "redis": bool(deployment.redis_url)}
    try:
        with processes(case, workdir, deployment) as (port, target_pid, upstream_pid, facts):
            spec = Spec(kind=case.kind, target=case.target, transport=case.transport, port=port,
                        streams=case.streams, deltas=case.deltas, delay_ms=case.delay_ms, ramp_s=case.ramp_s,
                        timeout_s=case.timeout_s(), concurrency=case.concurrency,
                        checkpoint_every=case.checkpoint_every, idle_sockets=case.idle_sockets,
                        warmup_streams=WARMUP_STREAMS if case.kind != "idle_ws" else 0,
                        target_pid=target_pid, upstream_pid=upstream_pid,
                        ports=tuple(facts.get("ports", ())), other_target_pids=tuple(facts.get("other_pids", ())))
            spec_path, result_path = workdir / "spec.json", workdir / "result.json"
            spec_path.write_text(json.dumps(asdict(spec)))
            flames = profile / f"{workdir.name}.txt" if profile is not None else None
            with (workdir / "loadgen.log").open("wb") as log, profiled(target_pid, flames):
                loadgen = subprocess.run(
                    ["taskset", "-c", str(LOAD_CORE), sys.executable, "-m", "bench.loadgen", str(spec_path),
                     str(result_path)], cwd=ROOT, env=base_env(), stdout=log, stderr=subprocess.STDOUT,
                    timeout=spec.timeout_s + 60, check=False)
            if loadgen.returncode != 0 or not result_path.exists():
                log_tail = (workdir / "loadgen.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"loadgen exited with {loadgen.returncode}: {log_tail}")
            result.update(json.loads(result_path.read_text()))
        result["target_exit_code"] = facts.get("target_exit_code")
        result["target_start_rss_kb"] = facts.get("target_start_rss_kb")
        if case.target in ("relay", "seed") and case.kind != "idle_ws":
            result["saved"] = saved_replies_postgres(facts["database_url"], deployment.database_url or "") \
                if "database_url" in facts else saved_replies(case, facts.get("database"))
            result["saved_expected"] = case.streams + WARMUP_STREAMS
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        result["failed"] = str(exc)[-2000:]
    result["case_wall_s"] = round(time.monotonic() - started, 2)
    return result


# --- facts and output ---------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:  # read-only git: which relay was measured, and whether server/ had uncommitted changes
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "server"], cwd=ROOT, capture_output=True,
                                    text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        commit, dirty = "", False
    versions = {}
    for package in ("uvloop", "uvicorn", "starlette", "httpx", "websockets", "httptools", "orjson"):
        try:
            from importlib.metadata import version

            versions[package] = version(package)
        except Exception:  # noqa: BLE001 - a missing package is just not listed
            pass
    return {
        "cpu_model": model, "cores": os.cpu_count(), "python": platform.python_version(),
        "platform": platform.platform(), "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "load_average_at_start": os.getloadavg(), "commit": commit, "server_uncommitted_changes": dirty,
        "packages": versions,
        "pinning": {"target": TARGET_CORE, "upstream": LOAD_CORE, "loadgen": LOAD_CORE},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny version, for smoke tests (under 2 minutes)")
    parser.add_argument("--only", default=",".join(WORKLOADS), help=f"comma-separated: {', '.join(WORKLOADS)}")
    parser.add_argument("--transports", default="sse,ws", help="the relay's transports: sse, ws or both")
    parser.add_argument("--dry-run", action="store_true", help="print the cases and an estimated duration")
    parser.add_argument("--output", default=str(RESULTS), help="results folder (default bench/results)")
    parser.add_argument("--instances", type=int, default=1,
                        help="relay instances, all on the target core (more than 1 needs the two options below)")
    parser.add_argument("--database-url", help="a PostgreSQL server (postgresql://user@host:5432/db): each relay "
                        "case gets a new database on it, instead of a SQLite file")
    parser.add_argument("--redis-url", help="Redis for the relay's instances (REDIS_URL), e.g. redis://127.0.0.1:6379/7")
    parser.add_argument("--profile", metavar="DIR", help="record each target under py-spy (pip install py-spy) "
                        "into DIR as collapsed stacks, one file per case")
    args = parser.parse_args(argv)
    only = [w.strip() for w in args.only.split(",") if w.strip()]
    transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    if unknown := [w for w in only if w not in WORKLOADS] + [t for t in transports if t not in ("sse", "ws")]:
        parser.error(f"unknown workload or transport: {', '.join(unknown)}")
    if shutil.which("taskset") is None:
        parser.error("taskset (util-linux) is needed to pin the processes to cores")
    if (os.cpu_count() or 1) < 2:
        parser.error("two cores are needed: one for the target, one for the upstream and load generator")
    if args.instances < 1 or (args.instances > 1 and not (args.database_url and args.redis_url)):
        parser.error("--instances 2 or more needs --database-url (PostgreSQL) and --redis-url")
    if args.database_url:
        from server.config import ConfigError, database_url

        try:
            args.database_url = database_url(args.database_url)  # postgres:// and the like: one form
        except ConfigError as exc:
            parser.error(str(exc))
        if not args.database_url.startswith("postgresql:"):
            parser.error("--database-url is a PostgreSQL server (postgresql://user@host:5432/db)")
    deployment = Deployment(args.instances, args.database_url, args.redis_url)
    cases = plan(args.quick, only, transports)
    estimate = sum(case.expected_s() for case in cases)
    print(f"{len(cases)} cases, about {estimate / 60:.1f} minutes", flush=True)
    if args.dry_run:
        for case in cases:
            print(f"  {case.name}  (timeout {case.timeout_s():.0f} s)")
        return 0
    # Children inherit the raised open-files limit: 1,500 streams need 3,000+ sockets in the relay.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    profile = Path(args.profile).resolve() if args.profile else None
    if profile is not None:
        profile.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    facts = machine()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="deltarelay-bench-") as tmp:
        for index, case in enumerate(cases):
            result = run_case(case, Path(tmp) / f"{index:03d}-{case.workload}-{case.target}-{case.transport}",
                              deployment, profile)
            runs.append(result)
            print(report.one_line(result), flush=True)
    document = {
        "quick": args.quick,
        "machine": facts,
        "settings": {"only": only, "transports": transports, "warmup_streams": WARMUP_STREAMS,
                     "upstream": "bench.upstream", "instances": deployment.instances,
                     "database": "postgresql" if deployment.database_url else "sqlite",
                     "redis": bool(deployment.redis_url)},
        "duration_s": round(time.monotonic() - began, 1),
        "runs": runs,
    }
    document["summary"] = report.summarize(document)
    (output / "latest.json").write_text(json.dumps(document, indent=1, default=str))
    text = report.markdown(document)
    (output / "latest.md").write_text(text)
    if not args.quick and set(only) == set(WORKLOADS) and set(transports) == {"sse", "ws"}:
        # Every full run's tables are kept: figures on this shared machine move from run to run.
        history = output / "history"
        history.mkdir(exist_ok=True)
        (history / f"{facts['date'][:16].replace(':', '')}.md").write_text(text)
    plots = report.plots(document, output)
    print(f"done in {document['duration_s']:.0f} s: {output / 'latest.md'}", *plots, sep=", ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
