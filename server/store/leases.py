"""Instance leases: a locked file per live process beside a SQLite file (PostgreSQL uses advisory locks)."""

from __future__ import annotations

import fcntl
import os
import re

# The PostgreSQL advisory lock that is an instance's lease: a 64-bit hash of its id, in a namespace of ours.
LEASE_KEY = "hashtextextended('deltarelay-instance:' || :instance, 0)"
_LOCK_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class LockFiles:
    """Instance leases beside a SQLite file: each live process holds an flock on `<dir>/<instance>.lock`.

    The kernel drops an flock when its process dies, however it dies (kill -9 included), so a file that
    can be locked belongs to a process that is gone; it is removed by whoever finds it so.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._held: tuple[int, str] | None = None  # (fd, path) of this process's own lease

    def _path(self, instance_id: str) -> str | None:
        return os.path.join(self.directory, instance_id + ".lock") if _LOCK_NAME.fullmatch(instance_id) else None

    def hold(self, instance_id: str) -> None:
        path = self._path(instance_id)
        if path is None:
            raise ValueError(f"an instance id is letters, digits, '_' or '-', got {instance_id!r}")
        os.makedirs(self.directory, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.release()
        self._held = (fd, path)
        for name in os.listdir(self.directory):  # what processes that died left behind
            if name.endswith(".lock") and name != instance_id + ".lock":
                self.held(name[:-5])

    def held(self, instance_id: str) -> bool:
        """Whether a live process holds this instance's lease; a lease nobody holds is removed."""
        path = self._path(instance_id)
        if path is None:
            return False
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        else:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            return False
        finally:
            os.close(fd)

    def release(self) -> None:
        if self._held is not None:
            fd, path = self._held
            self._held = None
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            os.close(fd)


