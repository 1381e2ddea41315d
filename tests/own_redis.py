"""A redis-server of the test's own, to kill and start again at will: never the machine's shared one.

    with own_redis(tmp_path) as redis:    # redis-server on a free port of 127.0.0.1, running
        redis.url                         # redis://127.0.0.1:PORT/0
        redis.kill()                      # SIGKILL by its pid: everything it held is gone (no persistence)
        redis.start()                     # empty again, on the same port

A machine without redis-server skips the test that asks, saying why.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from .conftest import free_port


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
