"""Database servers of a test's own, to stop and start at will: never the machine's shared ones.

    with own_postgres() as postgres:      # initdb in a temp dir, on a free port, running
        postgres.url                      # postgresql://postgres@127.0.0.1:PORT/postgres (trust)
        postgres.stop()                   # a fast shutdown, as `pg_ctl stop -m fast`
        postgres.start()                  # the same data, the same port
    # gone: its postmaster stopped by pid, its directory removed

    with own_redis(tmp_path) as redis:    # redis-server on a free port of 127.0.0.1, running
        redis.url                         # redis://127.0.0.1:PORT/0
        redis.kill()                      # SIGKILL by its pid: everything it held is gone (no persistence)
        redis.start()                     # empty again, on the same port

PostgreSQL refuses to run as root, so as root it runs as the `postgres` OS user (or `nobody`). A machine
without PostgreSQL's binaries (or redis-server) skips the test that asks, saying why.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from .conftest import free_port


def _postgres_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)),
                                       None)
    if found is None:
        pytest.skip(f"PostgreSQL's {name} is not installed (apt-get install postgresql)")
    return found


def _run_as() -> list[str]:
    """The command prefix that runs a program as a user PostgreSQL accepts (not root)."""
    if os.geteuid() != 0:
        return []
    for user in ("postgres", "nobody"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            continue
        return ["runuser", "-u", user, "--"]
    pytest.skip("running as root with neither a postgres nor a nobody user to run PostgreSQL as")


class OwnPostgres:
    """A PostgreSQL server in a temporary directory, on a free port of 127.0.0.1, with trust auth."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._as = _run_as()
        self._pg_ctl = _postgres_bin("pg_ctl")
        self.directory = Path(tempfile.mkdtemp(prefix="own-postgres-"))
        self.data = self.directory / "data"
        if self._as:
            user = self._as[2]
            shutil.chown(self.directory, user, user)
        subprocess.run([*self._as, _postgres_bin("initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
                        "-E", "UTF8", "--no-sync"], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run([*self._as, self._pg_ctl, "-D", str(self.data), "-l", str(self.directory / "postgres.log"),
                        "-o", options, "-w", "-t", "60", "start"], check=True, capture_output=True, timeout=90)

    def stop(self) -> None:
        """A fast shutdown: clients are disconnected, running transactions rolled back."""
        subprocess.run([*self._as, self._pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop"],
                       check=True, capture_output=True, timeout=90)

    def pid(self) -> int | None:
        """The postmaster's process id while it runs."""
        try:
            return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (FileNotFoundError, ValueError):
            return None

    def close(self) -> None:
        """Stop the postmaster by its pid (whatever state the test left it in) and remove the directory."""
        pid = self.pid()
        if pid is not None:
            try:
                os.kill(pid, signal.SIGINT)  # PostgreSQL's fast shutdown
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    os.kill(pid, 0)
                    time.sleep(0.05)  # waiting for a process to exit, not for test logic
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.directory, ignore_errors=True)


@contextmanager
def own_postgres() -> Iterator[OwnPostgres]:
    """A running OwnPostgres, closed on exit."""
    postgres = OwnPostgres()
    try:
        postgres.start()
        yield postgres
    finally:
        postgres.close()


class OwnRedis:
    """redis-server on a free port of 127.0.0.1, without persistence (`--save ''`, no AOF)."""

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (self.directory / f"redis-{self.port}.log").open("ab")
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.directory)], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited at start ({self.proc.returncode})")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.02)  # waiting for a process to bind, not for test logic
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        """SIGKILL by pid, as a crash: what it held is lost."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None


@contextmanager
def own_redis(directory: Path) -> Iterator[OwnRedis]:
    """A running OwnRedis, killed on exit."""
    redis = OwnRedis(directory)
    try:
        redis.start()
        yield redis
    finally:
        redis.kill()
