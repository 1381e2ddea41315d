"""Logging: plain text for people, or one JSON object a line (RELAY_LOG_FORMAT=json) for machines.

Structured fields ride on a record as `extra={"fields": {...}}`; both formats show them.
Nothing here adds message text or secrets: callers pass ids, counts and codes only.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson


def fields(**values: Any) -> dict[str, Any]:
    """The `extra` argument that attaches structured fields to one log call."""
    return {"fields": values}


class PeerLog:
    """Warnings about one peer (an IP address) at most once per `period` seconds each.

    What a peer does in between is counted and told in its next line. At most `peers` peers are remembered:
    past that, the peers whose minute has passed are forgotten, and any other new peer shares one line a
    period under "other peers", so neither memory nor the log grows with the number of peers.
    """

    OTHERS = "other peers"

    def __init__(self, logger: logging.Logger, period: float = 60.0, peers: int = 1024,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.period = period
        self.peers = peers
        self.clock = clock
        self._seen: OrderedDict[str, list[float]] = OrderedDict()  # peer -> [time of its last line, refusals since]

    def warning(self, peer: str, message: str, **values: Any) -> bool:
        """Log `message` about `peer` unless a line about it went out less than a period ago; True if logged."""
        now = self.clock()
        entry = self._seen.get(peer)
        if entry is None and len(self._seen) >= self.peers:
            while self._seen and now - next(iter(self._seen.values()))[0] >= self.period:
                self._seen.popitem(last=False)  # in order of last line: the ones whose period passed come first
            if len(self._seen) >= self.peers:
                peer = self.OTHERS
                entry = self._seen.get(peer)
        if entry is not None and now - entry[0] < self.period:
            entry[1] += 1
            return False
        before = int(entry[1]) if entry is not None else 0
        self._seen[peer] = [now, 0]
        self._seen.move_to_end(peer)  # the dict stays in order of last line
        tail = f" ({before} more since the last line about this peer)" if before else ""
        self.logger.warning("%s: %s%s", peer, message, tail, extra=fields(**values))
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if extra:
            line.update(extra)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extra = getattr(record, "fields", None)
        if extra:
            text += " " + " ".join(f"{key}={value}" for key, value in extra.items() if value is not None)
        return text


class OneLineCause(logging.Filter):
    """A library's expected failure (asyncpg's pool failing to reconnect while its database restarts) as one
    line naming the cause, not a traceback every few seconds: the relay logs the outage itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None and record.levelno < logging.ERROR:
            cause = record.exc_info[1]
            record.msg = f"{record.getMessage()} ({' '.join(f'{type(cause).__name__}: {cause}'.split())[:200]})"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


def configure(level: str, log_format: str) -> None:
    """One handler on the root logger for ours, uvicorn's and the libraries' records alike."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per upstream request is noise at scale
    logging.getLogger("databases").setLevel(logging.WARNING)
    logging.getLogger("asyncpg.pool").addFilter(OneLineCause())
