"""Live streams by id: each stream's bounded, numbered event log and its subscribers.

The hub owns the task that runs each answer, so generation goes on when the
connection that started it drops. A subscriber gets the log after its cursor and
then the live events, with no gap and no duplicate. The backlog is read from the
log a page at a time as the reader's writes drain, so a reader resuming from event
0 of a long stream holds one page, not the whole log. Every queue is bounded; a
subscriber that falls too far behind is dropped and may resume from the log.

StreamHub is the one interface the core and the transports use, and its in-process
implementation for a single instance. server/redis_hub.py extends it across
instances (REDIS_URL): the same local streams, plus every event copied to Redis
through `LiveStream.sink`, and other instances' streams read into local mirrors.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
import weakref
from array import array
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from .errors import GoneError, NotFoundError
from .events import TERMINAL_EVENTS, RelayEvent, encode_data
from .protocol.answer import AnswerState

log = logging.getLogger("deltarelay.hub")

# One logged event: (id, name, data as JSON bytes). Tuples keep thousands of streams small.
Entry = tuple[int, str, bytes]
# Called with every event a stream logs, after numbering: (stream, id, name, data).
Sink = Callable[["LiveStream", int, str, bytes], None]


@dataclass(frozen=True, slots=True)
class Orphan:
    """A stream whose instance died before it ended: what the log and the last usage copy hold."""

    stream_id: str
    message_id: str
    model: str
    entries: list[Entry]
    usage: dict[str, int]


class KeepaliveTarget(Protocol):
    def keepalive_tick(self) -> None: ...


# A backlog is read from the log this many events at a time (at most half the reader's queue bound), or fewer
# when they hold more than BACKLOG_PAGE_BYTES: what a reader holds does not grow with its backlog.
BACKLOG_PAGE = 500
BACKLOG_PAGE_BYTES = 64 * 1024


class SubscriberDropped(Exception):
    """The subscriber fell more than its queue bound behind; it may resume from the log."""


class LogLostError(SubscriberDropped):
    """The log lost events this subscriber had not read yet (Redis lost them): it cannot go on, nor resume."""


class Writer(Protocol):
    """One client's socket as a subscriber writes to it; both transports implement it (transports/)."""

    def can_write(self) -> bool:
        """Open, and the peer keeps up: write_many() goes out now."""
        ...

    def write_many(self, frames: list[bytes]) -> None:
        """Write these frames, in order, in one write."""
        ...

    async def drain(self) -> None:
        """Return once can_write() holds again (or once what write_many() took is sent).

        Raises:
            OSError: the socket is gone.
        """
        ...


# A transport's framing of one event: (id, name, data as JSON bytes) -> the bytes written for it.
Framer = Callable[[int, str, bytes], bytes]


def _unframed(event_id: int, name: str, data: bytes) -> bytes:
    raise AssertionError("a subscriber frames events only while it serves")


class TurnFlush:
    """The end of a loop's turn for every subscriber at once: each one whose outbox got its first event in
    this turn is flushed once, in the order they got it, by one callback per turn (not one per subscriber)."""

    __slots__ = ("loop", "pending", "__weakref__")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pending: list[Subscriber] = []

    def add(self, subscriber: Subscriber) -> None:
        pending = self.pending
        pending.append(subscriber)
        if len(pending) == 1:
            self.loop.call_soon(self.run)

    def run(self) -> None:
        pending, self.pending = self.pending, []
        for subscriber in pending:
            subscriber.flush()


_turn_flushes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, TurnFlush] = weakref.WeakKeyDictionary()


def turn_flush(loop: asyncio.AbstractEventLoop) -> TurnFlush:
    """The loop's one TurnFlush."""
    flush = _turn_flushes.get(loop)
    if flush is None:
        flush = _turn_flushes[loop] = TurnFlush(loop)
    return flush


class Subscriber:
    """One reader of one stream: one bounded outbox of framed events, flushed to its writer once per loop turn.

    Every event reaches the writer by the same path: framed into the outbox when it is logged (or read from
    the log in pages, for a backlog), then written, everything the outbox holds in one write, at the end of
    the loop's turn, or by serve() once a paused socket drains. Until serve() starts, and until it has caught
    up, the subscriber pages from the stream's log (`paging`): live events are in that log too, so none is
    framed twice or missed. The outbox holds at most `limit` events: one more, and the subscriber is dropped
    (serve() raises SubscriberDropped) and may resume from the log.
    """

    __slots__ = ("stream", "limit", "outbox", "cursor", "paging", "closed", "dropped", "active", "on_detach",
                 "writer", "frame", "keepalive", "_loop", "_turn", "_waiter", "__weakref__")

    def __init__(self, stream: LiveStream, after: int, limit: int) -> None:
        self.stream = stream
        self.limit = limit
        self.outbox: list[bytes] = []
        self.cursor = after  # the id of the last event framed into the outbox
        self.paging = True
        self.closed = False
        self.dropped = False
        self.active = True  # got an event since the last keepalive tick
        self.on_detach: Callable[[Subscriber], None] | None = None
        self.writer: Writer | None = None  # set while serve() runs
        self.frame: Framer = _unframed
        self.keepalive: bytes | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._turn: TurnFlush | None = None  # set while serve() runs
        # A bare future, not an asyncio.Event: serve() waits on it between the stream's turns of events.
        self._waiter: asyncio.Future[None] | None = None

    @property
    def has_had_everything(self) -> bool:
        """The stream has ended and nothing after this subscriber's cursor is left to write."""
        return self.closed and self.cursor >= self.stream.last_id and not self.outbox

    def push(self, entry: Entry) -> None:
        self.active = True
        if self.dropped or self.paging:
            return  # paging: the event is in the log, and its page comes in turn
        self.cursor = entry[0]
        outbox = self.outbox
        if len(outbox) >= self.limit:
            self.dropped = True
            self.outbox = []
            self._wake()
            if self._loop is not None:  # stop receiving now, even while serve() waits for a paused socket
                self._loop.call_soon(self.detach)
            return
        outbox.append(self.frame(*entry))
        if len(outbox) == 1 and self._turn is not None:
            self._turn.add(self)

    def flush(self) -> None:
        """The end of the turn: write what the outbox holds, unless the socket is paused or the stream ended."""
        writer = self.writer
        if writer is None or not self.outbox or self.closed:
            return  # closed: serve() writes the last events, so that the end can go in the same write
        if writer.can_write():
            frames, self.outbox = self.outbox, []
            writer.write_many(frames)
            if writer.can_write():
                return
        self._wake()  # serve() waits for the socket to drain, then writes what queued meanwhile

    def page(self) -> None:
        """Frame the next page of the backlog from the log; caught up, stop paging and take live events.

        A cursor the log no longer holds (it dropped older events meanwhile) drops the subscriber.
        """
        stream = self.stream
        first_id = stream.last_id - len(stream.log) + 1
        if self.cursor < first_id - 1:
            self.paging = False
            self.dropped = True
            return
        count = max(1, min(BACKLOG_PAGE, self.limit // 2))
        frame = self.frame
        page = self.outbox
        next_id = self.cursor + 1
        size = 0
        for name, data in stream.log.encoded(self.cursor - first_id + 1):
            page.append(frame(next_id, name, data))
            next_id += 1
            size += len(data)
            if len(page) >= count or size >= BACKLOG_PAGE_BYTES:
                break
        self.cursor = next_id - 1
        self.paging = self.cursor < stream.last_id

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def close(self) -> None:
        self.closed = True
        self._wake()

    def abandon(self) -> None:
        """The reader went away: stop writing now, whatever is still queued."""
        self.outbox = []
        self.paging = False
        self.close()
        self.detach()

    def keepalive_tick(self) -> None:
        """Called every keepalive interval: a subscriber idle for a whole interval gets its keepalive frame."""
        if self.active:
            self.active = False
        elif self.keepalive is not None and not self.closed and not self.dropped:
            self.outbox.append(self.keepalive)
            if len(self.outbox) == 1 and self._turn is not None:
                self._turn.add(self)

    def detach(self) -> None:
        """Stop receiving; called when the reader goes away."""
        self.stream.unsubscribe(self)
        if self.on_detach is not None:
            self.on_detach(self)
            self.on_detach = None

    async def serve(self, writer: Writer, frame: Framer, keepalive: bytes | None = None) -> list[bytes]:
        """Write every event after the cursor to `writer`, in id order, each once, until the stream ends.

        `frame` makes each event's bytes; `keepalive` (when given) is written after an idle keepalive
        interval. Returns the frames of the stream's last events not yet written, for the caller to write
        with its own end of the response (one write). Detaches when it returns or raises.

        Raises:
            SubscriberDropped: more than `limit` events behind, or behind what the log still holds.
            LogLostError: the stream's log lost the events after the last one this subscriber got.
            OSError: the writer's socket is gone.
        """
        self.writer, self.frame, self.keepalive = writer, frame, keepalive
        self._loop = loop = asyncio.get_running_loop()
        self._turn = turn_flush(loop)
        try:
            while True:
                if self.dropped:
                    raise SubscriberDropped(f"more than {self.limit} events behind")
                ending = self.closed and not self.paging
                if ending and self.stream.lost is None:
                    frames, self.outbox = self.outbox, []
                    return frames
                if not writer.can_write():
                    await writer.drain()
                    continue
                if self.outbox:
                    frames, self.outbox = self.outbox, []
                    writer.write_many(frames)
                    continue
                if ending:  # a lost log: every event it had is written, and there is no end to write
                    raise LogLostError(str(self.stream.lost))
                if self.paging:
                    self.page()
                    continue
                self._waiter = loop.create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
        finally:
            self.writer = None
            self._loop = None
            self._turn = None
            self.detach()


# Event names as one byte each in the log; names come from the code (events.py), never from input.
_NAME_CODES: dict[str, int] = {}
_NAMES: list[str] = []
_NAME_BYTES: list[bytes] = []


def _name_code(name: str) -> int:
    code = _NAME_CODES.get(name)
    if code is None:
        if len(_NAMES) == 256:
            raise ValueError("more than 256 event names")
        code = _NAME_CODES[name] = len(_NAMES)
        _NAMES.append(name)
        _NAME_BYTES.append(name.encode())
    return code


class EventLog:
    """A stream's events, oldest first, at most `limit` of them: (name, JSON data) each, numbered by the stream.

    Held as blocks of FOLD events: the names as one byte each, the data as one UTF-8 bytes object with an
    offsets array. The open block grows in place (bytearrays and an array), so an event costs its own bytes
    plus five: a string object per event cost about 50 bytes more than its text, and the log is most of
    what an active stream holds.
    """

    __slots__ = ("limit", "_blocks", "_names", "_data", "_offsets", "_skip", "_count")
    FOLD = 64

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._blocks: list[tuple[bytes, bytes, array[int]]] = []  # a list, not a deque: 600 bytes less
        self._names = bytearray()  # the open block
        self._data = bytearray()
        self._offsets = array("I", [0])
        self._skip = 0  # events of the first block already dropped by the limit
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def append(self, name: str, data: bytes) -> None:
        self._names.append(_name_code(name))
        self._data += data
        self._offsets.append(len(self._data))
        self._count += 1
        if len(self._names) == self.FOLD:
            self._blocks.append((bytes(self._names), bytes(self._data), self._offsets))
            self._names, self._data, self._offsets = bytearray(), bytearray(), array("I", [0])
        if self._count > self.limit:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        self._count -= 1
        if self._blocks:
            self._skip += 1
            if self._skip == len(self._blocks[0][0]):
                del self._blocks[0]
                self._skip = 0
        else:  # a log shorter than one block: drop from the open block itself
            cut = self._offsets[1]
            del self._names[0], self._data[:cut]
            self._offsets = array("I", [offset - cut for offset in self._offsets[1:]])

    def clear(self) -> None:
        self._blocks.clear()
        self._names, self._data, self._offsets = bytearray(), bytearray(), array("I", [0])
        self._skip = self._count = 0

    def last_name(self) -> str | None:
        if self._names:
            return _NAMES[self._names[-1]]
        return _NAMES[self._blocks[-1][0][-1]] if self._blocks else None

    def _blocks_from(self, start: int) -> Iterator[tuple[bytes | bytearray, bytes | bytearray, array[int], int]]:
        """(names, data, offsets, first index) of each block from the one with the `start`-th held event."""
        index = start + self._skip
        blocks: list[tuple[bytes | bytearray, bytes | bytearray, array[int]]] = [*self._blocks]
        blocks.append((self._names, self._data, self._offsets))
        for names, joined, offsets in blocks:
            if index >= len(names):
                index -= len(names)
                continue
            yield names, joined, offsets, index
            index = 0

    def entries(self, start: int = 0) -> Iterator[tuple[str, str]]:
        """(name, data as text) of every event from the `start`-th held one (0: the oldest held)."""
        for name, data in self.encoded(start):
            yield name, data.decode()

    def encoded(self, start: int = 0) -> Iterator[tuple[str, bytes]]:
        """(name, data as UTF-8 JSON bytes) of every event from the `start`-th held one."""
        for names, joined, offsets, first in self._blocks_from(start):
            for k in range(first, len(names)):
                yield _NAMES[names[k]], bytes(joined[offsets[k]:offsets[k + 1]])

    def lines(self, start: int = 0) -> list[bytes | bytearray]:
        """The name and the data of every event from the `start`-th held one, in order: two items per event,
        for joining with newlines (no name and no JSON data holds a newline of its own)."""
        parts: list[bytes | bytearray] = []
        open_names, open_data, open_offsets = self._names, self._data, self._offsets
        first = len(open_names) - (self._count - start)
        if first >= 0:  # all in the open block: what came since a write, as a rule
            for k in range(first, len(open_names)):
                parts.append(_NAME_BYTES[open_names[k]])
                parts.append(open_data[open_offsets[k]:open_offsets[k + 1]])
            return parts
        for names, joined, offsets, first in self._blocks_from(start):
            for k in range(first, len(names)):
                parts.append(_NAME_BYTES[names[k]])
                parts.append(joined[offsets[k]:offsets[k + 1]])
        return parts


class LiveStream:
    """One answer being generated (or just finished): its numbered event log."""

    __slots__ = (
        "id", "conversation_id", "message_id", "model", "log", "last_id", "finished",
        "subscribers", "task", "stop_status", "reply", "running", "finalizing", "sink", "cursor_waiters", "lost",
    )

    def __init__(self, stream_id: str, conversation_id: str, message_id: str | None, model: str,
                 log_limit: int) -> None:
        self.id = stream_id
        self.conversation_id = conversation_id
        self.message_id = message_id
        self.model = model
        self.log = EventLog(log_limit)  # ids implicit: the last one is last_id
        self.last_id = 0
        self.finished = False
        self.subscribers: list[Subscriber] = []
        self.task: asyncio.Task[None] | None = None
        # Why the task was cancelled: "cancelled" by a user, "interrupted" by shutdown.
        self.stop_status: str | None = None
        self.running = False  # the core has begun: a cancel can be delivered into it
        self.finalizing = False  # the core is saving and ending the stream: too late to cancel
        self.reply: AnswerState | None = None  # the core's state of the answer, its upstream requests so far
        self.sink: Sink | None = None  # where else every event goes (Redis), None for one instance
        # A mirror's readers whose cursor is a few events ahead of what has arrived yet: (cursor, future).
        self.cursor_waiters: list[tuple[int, asyncio.Future[None]]] = []
        # Why a mirror ended without its last event: the log it copies lost events it had not read yet.
        self.lost: str | None = None

    def append(self, event: RelayEvent) -> None:
        """Number, encode (once) and log an event, and hand it to every subscriber."""
        if self.finished:
            return
        self.last_id += 1
        data = encode_data(event)
        sink = self.sink
        if sink is not None:
            sink(self, self.last_id, event.name, data)
        self._log(event.name, data)

    def append_entry(self, event_id: int, name: str, data: bytes) -> None:
        """Log an event numbered elsewhere (a mirror of another instance's stream): ids are kept as they are.

        The caller sees to it that ids follow on (see RedisStreamHub): a jump starts the log afresh.
        """
        if self.finished or event_id <= self.last_id:
            return  # already have it: a mirror's reads may overlap
        if event_id != self.last_id + 1:
            # The log starts here (the first events were trimmed away): ids stay those of the owner.
            self.log.clear()
        self.last_id = event_id
        self._log(name, data)
        if self.cursor_waiters:
            self.wake_cursor_waiters()

    def _log(self, name: str, data: bytes) -> None:
        self.log.append(name, data)
        if self.subscribers:
            entry: Entry = (self.last_id, name, data)
            for subscriber in self.subscribers:
                subscriber.push(entry)
        if name in TERMINAL_EVENTS:
            self.finished = True
            for subscriber in self.subscribers:
                subscriber.close()
            self.subscribers = []
            if self.cursor_waiters:
                self.wake_cursor_waiters()

    def end_lost(self, reason: str) -> None:
        """End a mirror whose log lost events: each subscriber gets what is here, then LogLostError."""
        if self.finished:
            return
        self.lost = reason
        self.finished = True
        for subscriber in self.subscribers:
            subscriber.close()
        self.subscribers = []
        self.wake_cursor_waiters()

    def wake_cursor_waiters(self) -> None:
        waiting = []
        for cursor, future in self.cursor_waiters:
            if cursor <= self.last_id or self.finished:
                if not future.done():
                    future.set_result(None)
            else:
                waiting.append((cursor, future))
        self.cursor_waiters = waiting

    async def reach(self, cursor: int, seconds: float) -> None:
        """Wait (up to `seconds`) until the log holds event `cursor` or the stream ends."""
        if cursor <= self.last_id or self.finished:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.cursor_waiters.append((cursor, future))
        try:
            async with asyncio.timeout(seconds):
                await future
        except TimeoutError:
            pass

    def subscribe(self, after: int, queue_limit: int) -> Subscriber:
        """A subscriber that gets every event with an id above `after`.

        Raises:
            GoneError: the cursor is ahead of the log, or older than what it still holds.
        """
        if after > self.last_id:
            raise GoneError(
                f"event {after} is ahead of stream {self.id}, which is at event {self.last_id}",
                message_id=self.message_id,
            )
        first_id = self.last_id - len(self.log) + 1
        if after < first_id - 1:
            raise GoneError(
                f"the log of stream {self.id} no longer holds event {after + 1}", message_id=self.message_id
            )
        subscriber = Subscriber(self, after, queue_limit)
        if self.finished:
            subscriber.closed = True
        else:
            self.subscribers.append(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        try:
            self.subscribers.remove(subscriber)
        except ValueError:
            pass


class StreamHub:
    """All live and recently finished streams of this process; the interface of every hub.

    The core uses create() and run(); transports use subscribe() for a stream this
    process just started, resume() for any stream by id, and request_cancel(). The
    in-process hub serves one instance: resume() and request_cancel() only see its own
    streams, and every answer a process left unfinished is its own.
    """

    def __init__(self, log_limit: int, retention_seconds: float, queue_limit: int = 2000,
                 keepalive_seconds: float = 15.0, retention_max: int = 1000) -> None:
        # Saved with each answer (messages.instance_id): whose answers are still running somewhere.
        self.instance_id = uuid.uuid4().hex
        self.log_limit = log_limit
        self.retention_seconds = retention_seconds
        self.retention_max = retention_max
        # Finished streams, oldest first, with when each expires (loop time): kept for resumes, within both a
        # time and a count. One timer, for the oldest: a timer per stream held 10,000 timers (and their
        # contexts) after 10,000 streams in five minutes, the largest growth that benchmark showed.
        self.finished: OrderedDict[str, float] = OrderedDict()
        self._expiry: asyncio.TimerHandle | None = None
        self.queue_limit = queue_limit
        self.keepalive_seconds = keepalive_seconds
        self.streams: dict[str, LiveStream] = {}
        self.accepting = True
        self.shutdown_started: float | None = None
        # Readers that want keepalives: one sweep per interval for all of them, no timer per reader.
        self.keepalive_targets: set[KeepaliveTarget] = set()
        self._keepalive_task: asyncio.Task[None] | None = None
        # Every reader not yet detached (weak: one whose task never ran is not kept), so that a shutdown can
        # wait for the readers of the streams it ended to get their last event.
        self.readers: weakref.WeakSet[Subscriber] = weakref.WeakSet()
        self._awaited: tuple[set[Subscriber], asyncio.Future[None]] | None = None

    def start(self) -> None:
        self._keepalive_task = asyncio.create_task(self._keepalive_loop(), name="keepalive")

    async def open(self) -> None:
        """Start the hub's own tasks (and, for hubs across instances, connect)."""
        self.start()

    async def close(self) -> None:
        """Release what open() took; after shutdown()."""

    async def live_instances(self) -> set[str]:
        """Instances whose unfinished answers are still being generated: none but this new one here."""
        return {self.instance_id}

    async def _keepalive_loop(self) -> None:
        while True:
            await asyncio.sleep(self.keepalive_seconds)
            for target in list(self.keepalive_targets):
                target.keepalive_tick()

    def create(self, stream_id: str, conversation_id: str, message_id: str, model: str) -> LiveStream:
        stream = LiveStream(stream_id, conversation_id, message_id, model, self.log_limit)
        self.streams[stream_id] = stream
        return stream

    def run(self, stream: LiveStream, work: Coroutine[Any, Any, None]) -> None:
        """Run the stream's generation as a task the hub owns."""
        task = asyncio.create_task(work, name=f"stream-{stream.id}")
        stream.task = task
        task.add_done_callback(lambda _: self._finished(stream))

    def _finished(self, stream: LiveStream) -> None:
        if stream.task is not None and not stream.task.cancelled() and stream.task.exception() is not None:
            log.error("stream %s failed", stream.id, exc_info=stream.task.exception())
        self._retain(stream.id)

    def _retain(self, stream_id: str) -> None:
        """Keep a finished stream for resumes, within both the retention time and count."""
        loop = asyncio.get_running_loop()
        if stream_id not in self.finished:
            self.finished[stream_id] = loop.time() + self.retention_seconds
        while len(self.finished) > self.retention_max:
            self._expire(next(iter(self.finished)))
        if self._expiry is None:
            self._next_expiry(loop)

    def _next_expiry(self, loop: asyncio.AbstractEventLoop) -> None:
        self._expiry = loop.call_at(next(iter(self.finished.values())), self._expire_due) if self.finished else None

    def _expire_due(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self.finished:
            stream_id, due = next(iter(self.finished.items()))
            if due > now:
                break
            self._expire(stream_id)
        self._next_expiry(loop)

    def _expire(self, stream_id: str) -> None:
        self.streams.pop(stream_id, None)
        self.finished.pop(stream_id, None)

    def get(self, stream_id: str) -> LiveStream:
        stream = self.streams.get(stream_id)
        if stream is None:
            raise NotFoundError(f"stream {stream_id} not found or expired", code="not_resumable")
        return stream

    def subscribe(self, stream_id: str, after: int = 0, keepalive: bool = False) -> Subscriber:
        """Read a stream from after event `after`; `keepalive`: the keepalive sweep reaches it (see serve())."""
        subscriber = self.get(stream_id).subscribe(after, self.queue_limit)
        if keepalive and not subscriber.closed:
            self.keepalive_targets.add(subscriber)
        self.readers.add(subscriber)
        subscriber.on_detach = self._detached
        return subscriber

    def _detached(self, subscriber: Subscriber) -> None:
        self.keepalive_targets.discard(subscriber)
        self.readers.discard(subscriber)
        awaited = self._awaited
        if awaited is not None and subscriber in awaited[0]:
            awaited[0].discard(subscriber)
            if not awaited[0] and not awaited[1].done():
                awaited[1].set_result(None)

    async def wait_for_readers(self, seconds: float) -> bool:
        """Wait, at most `seconds`, until every reader of a finished stream has had its last event and let go.

        Readers of streams still running (another instance's, with Redis) are not waited for. True: none left.
        """
        waiting = {reader for reader in self.readers if reader.stream.finished}
        if not waiting:
            return True
        self._awaited = (waiting, asyncio.get_running_loop().create_future())
        try:
            async with asyncio.timeout(max(seconds, 0.0)):
                await self._awaited[1]
            return True
        except TimeoutError:
            return False
        finally:
            self._awaited = None

    async def resume(self, stream_id: str, after: int = 0, keepalive: bool = False) -> Subscriber:
        """Read any stream from after event `after` (here: only this process's streams).

        Raises:
            NotFoundError/GoneError (code not_resumable): the stream cannot be served.
        """
        return self.subscribe(stream_id, after, keepalive)

    async def request_cancel(self, stream_id: str) -> bool:
        """Stop a stream wherever it is generated; True when it was still running.

        Raises:
            NotFoundError: no such stream (or it expired).
        """
        return self.cancel(stream_id)

    def cancel(self, stream_id: str, status: str = "cancelled") -> bool:
        """Stop generating a stream of this process; True when the stream was still running."""
        stream = self.get(stream_id)
        if stream.task is None or stream.task.done() or stream.finalizing or stream.stop_status is not None:
            return False
        stream.stop_status = status
        # A task that has not started yet cannot catch a cancel: the core checks stop_status first instead.
        if stream.running:
            stream.task.cancel()
        return True

    def active(self) -> list[LiveStream]:
        return [s for s in self.streams.values() if s.task is not None and not s.task.done()]

    def begin_shutdown(self) -> None:
        """Refuse new streams from now on (SIGTERM); running ones go on."""
        if self.shutdown_started is None:
            self.accepting = False
            self.shutdown_started = time.monotonic()

    async def shutdown(self, grace_seconds: float, on_interrupt: Callable[[LiveStream], None] | None = None) -> None:
        """Stop accepting streams, let running ones finish within the grace period, then interrupt the rest.

        The grace period counts from begin_shutdown() (the signal), not from this call.
        """
        self.begin_shutdown()
        assert self.shutdown_started is not None
        if self._keepalive_task is not None:
            self._keepalive_task.cancel()
        running = [s.task for s in self.active() if s.task is not None]
        left = grace_seconds - (time.monotonic() - self.shutdown_started)
        if running and left > 0:
            await asyncio.wait(running, timeout=left)
        leftover = self.active()
        for stream in leftover:
            self.cancel(stream.id, status="interrupted")
            if on_interrupt is not None:
                on_interrupt(stream)
        tasks = [s.task for s in leftover if s.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=10)
