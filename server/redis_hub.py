"""The hub across instances (REDIS_URL): stream logs, fan-out and cancels through Redis.

It is a StreamHub: streams this process generates keep the in-process path (their
readers here never wait for Redis). On top of it:

- every numbered event is copied to the stream's Redis Stream `{prefix}:log:{id}` with
  the relay's own id as the entry id (`<n>-0`), by one writer task that sends all the
  events ready at once in one pipeline; so a resume on any instance is exact;
- a stream generated elsewhere is read into a local mirror (a LiveStream fed with the
  owner's ids) by one reader task per process, one XREAD BLOCK for all mirrored streams;
- a cancel for a stream generated elsewhere is published on `{prefix}:cancel`;
- each instance keeps a lease `{prefix}:alive:{instance}` (refreshed every lease/3) and
  lists its running streams in `{prefix}:running:{instance}`. Every instance sweeps the
  instances once per heartbeat: the first to claim a dead one (SET NX) saves each of its
  running answers as `interrupted` from the log (save_reply only finishes a `streaming`
  row), then appends the `error` event `interrupted` with the next id, so every watcher
  on every instance gets it, once.

No I/O happens in the event path: LiveStream.append only queues the entry.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any, cast

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from .errors import NotFoundError
from .events import TERMINAL_EVENTS, Error, encode_data
from .hub import Entry, LiveStream, Orphan, StreamHub, Subscriber
from .pricing import Usage

log = logging.getLogger("deltarelay.hub")

LOG_TTL_SECONDS = 24 * 3600  # a running stream's log outlives any answer; a finished one keeps the retention time
CURSOR_WAIT_SECONDS = 2.0  # a resume may be a few events ahead of this instance's copy of the log
FIRST_EVENT_WAIT_SECONDS = 1.0  # how long an unknown stream id is given to appear (its owner just started it)
CLAIM_SECONDS = 60  # a survivor that dies while saving a dead instance's answers is replaced after this
READ_BLOCK_MS = 5000
WRITE_ATTEMPTS = (0.1, 0.5, 1.0)  # waits between tries of a pipeline Redis did not take

# With decode_responses, an entry of a Redis Stream is (entry id "n-0", {"e": name, "d": data}).
RawEntry = tuple[str, dict[str, str]]


class RedisStreamHub(StreamHub):
    """A StreamHub whose streams can be read, resumed and cancelled from any instance sharing one Redis.

    Args:
        redis_url: redis://host:port/db (or rediss://, unix://).
        prefix: the start of every key, so several deployments (or test runs) share a Redis.
        lease_seconds: how long an instance counts as alive after its last heartbeat; a dead one is
            noticed lease_seconds to lease_seconds * 4/3 after it stopped.
        on_orphan: saves the partial answer of a dead instance's stream; True when it finished the message.
        on_instance_gone: finishes whatever else a dead instance left `streaming` in the database.
    """

    def __init__(self, redis_url: str, log_limit: int, retention_seconds: float, queue_limit: int = 2000,
                 keepalive_seconds: float = 15.0, retention_max: int = 1000, *, prefix: str = "deltarelay",
                 lease_seconds: float = 3.0,
                 on_orphan: Callable[[Orphan], Awaitable[bool]] | None = None,
                 on_instance_gone: Callable[[str], Awaitable[int]] | None = None) -> None:
        super().__init__(log_limit, retention_seconds, queue_limit, keepalive_seconds, retention_max)
        self.redis_url = redis_url
        self.prefix = prefix
        self.lease_seconds = lease_seconds
        self.heartbeat_seconds = lease_seconds / 3
        self.on_orphan = on_orphan
        self.on_instance_gone = on_instance_gone
        self.redis: Redis = Redis.from_url(redis_url, decode_responses=True)
        # The blocking XREAD holds its connection for up to READ_BLOCK_MS: a client of its own.
        self.reader: Redis = Redis.from_url(redis_url, decode_responses=True)
        self._outbox: list[tuple[LiveStream, int, str, str]] = []
        self._outbox_ready = asyncio.Event()
        self._copied_usage: dict[str, Usage] = {}
        self._mirrors: dict[str, LiveStream] = {}  # log key -> mirror still being read
        self._read_from: dict[str, str] = {}  # log key -> last entry id read
        self._reading_changed = asyncio.Event()
        self._wake_id = "0-0"
        self._listening = asyncio.Event()
        self._closing = False
        self._tasks: list[asyncio.Task[None]] = []
        self._writer: asyncio.Task[None] | None = None

    # --- keys -----------------------------------------------------------------------------------

    def log_key(self, stream_id: str) -> str:
        return f"{self.prefix}:log:{stream_id}"

    def _alive_key(self, instance_id: str) -> str:
        return f"{self.prefix}:alive:{instance_id}"

    def _running_key(self, instance_id: str) -> str:
        return f"{self.prefix}:running:{instance_id}"

    @property
    def _instances_key(self) -> str:
        return f"{self.prefix}:instances"

    @property
    def _cancel_channel(self) -> str:
        return f"{self.prefix}:cancel"

    @property
    def _wake_key(self) -> str:
        return f"{self.prefix}:wake:{self.instance_id}"

    # --- life -----------------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, take the lease, listen for cancels, and bury instances that died while none was looking."""
        await self.redis.set(self._alive_key(self.instance_id), "1", px=int(self.lease_seconds * 1000))
        await self.redis.sadd(self._instances_key, self.instance_id)
        self.start()
        self._writer = asyncio.create_task(self._write_loop(), name="redis-writer")
        self._tasks = [
            asyncio.create_task(self._listen_for_cancels(), name="redis-cancels"),
            asyncio.create_task(self._read_loop(), name="redis-reader"),
            asyncio.create_task(self._heartbeat_loop(), name="redis-heartbeat"),
        ]
        async with asyncio.timeout(10):
            await self._listening.wait()  # a cancel sent right after this start must not be missed
        await self.sweep()

    async def close(self) -> None:
        """Write out every queued event, give up the lease, disconnect; after shutdown()."""
        self._closing = True
        self._outbox_ready.set()
        if self._writer is not None:
            try:
                async with asyncio.timeout(10):
                    await self._writer
            except TimeoutError:
                log.error("gave up writing %d events to Redis at shutdown", len(self._outbox))
                self._writer.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.srem(self._instances_key, self.instance_id)
            pipe.delete(self._alive_key(self.instance_id), self._running_key(self.instance_id), self._wake_key)
            await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("could not give up this instance's lease in Redis: %s", exc)
        await self.redis.aclose()
        await self.reader.aclose()

    async def live_instances(self) -> set[str]:
        """The instances whose lease is current, this one included."""
        members = sorted(await self._instances())
        pipe = self.redis.pipeline(transaction=False)
        for member in members:
            pipe.exists(self._alive_key(member))
        alive = await pipe.execute()
        return {member for member, exists in zip(members, alive, strict=True) if exists} | {self.instance_id}

    async def _instances(self) -> set[str]:
        return cast(set[str], await self.redis.smembers(self._instances_key))

    async def _log(self, stream_id: str) -> list[RawEntry]:
        if len(stream_id) > 200:  # not an id of ours: no key of that size
            return []
        return cast(list[RawEntry], await self.redis.xrange(self.log_key(stream_id)))

    # --- this instance's streams: copy every event to Redis ------------------------------------

    def create(self, stream_id: str, conversation_id: str, message_id: str, model: str) -> LiveStream:
        stream = super().create(stream_id, conversation_id, message_id, model)
        stream.sink = self._queue
        return stream

    def _queue(self, stream: LiveStream, event_id: int, name: str, data: str) -> None:
        self._outbox.append((stream, event_id, name, data))
        if not self._outbox_ready.is_set():
            self._outbox_ready.set()

    async def _write_loop(self) -> None:
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            batch, self._outbox = self._outbox, []
            if batch:
                await self._write(batch)
            if self._closing and not self._outbox:
                return

    async def _write(self, batch: list[tuple[LiveStream, int, str, str]]) -> None:
        """One pipeline for every event ready: XADD each, and keep the running list and usage copies."""
        pipe = self.redis.pipeline(transaction=False)
        running = self._running_key(self.instance_id)
        xadds: list[tuple[int, LiveStream]] = []
        touched: dict[str, LiveStream] = {}
        for stream, event_id, name, data in batch:
            key = self.log_key(stream.id)
            xadds.append((len(pipe.command_stack), stream))
            pipe.xadd(key, {"e": name, "d": data}, id=f"{event_id}-0", maxlen=self.log_limit, approximate=True)
            if event_id == 1:
                pipe.expire(key, LOG_TTL_SECONDS)
            if name in TERMINAL_EVENTS:
                pipe.expire(key, max(1, math.ceil(self.retention_seconds)))
                pipe.hdel(running, stream.id)
                self._copied_usage.pop(stream.id, None)
                touched.pop(stream.id, None)
            else:
                touched[stream.id] = stream
        for stream in touched.values():
            # What a survivor needs to save this answer if this instance dies: its message and last usage.
            usage = stream.reply.usage if stream.reply is not None else Usage()
            if self._copied_usage.get(stream.id) != usage:
                self._copied_usage[stream.id] = usage
                pipe.hset(running, stream.id, orjson.dumps(
                    {"messageId": stream.message_id, "model": stream.model, "usage": asdict(usage)}).decode())
        retried = False
        for pause in (*WRITE_ATTEMPTS, None):
            try:
                results = await pipe.execute(raise_on_error=False)
                break
            except (RedisError, OSError) as exc:
                if pause is None:
                    log.error("dropped %d events that Redis did not take: %s", len(batch), exc)
                    return
                log.warning("Redis did not take %d events (%s); trying again", len(batch), exc)
                await asyncio.sleep(pause)
                retried = True
        if retried:
            return  # a retried pipeline may have been applied in part: its XADD errors mean nothing
        for index, stream in xadds:
            if isinstance(results[index], ResponseError) and stream.sink is not None:
                # Another instance took this stream for dead and ended its log: stop, as a shutdown would.
                log.warning("stream %s was ended as interrupted by another instance; stopping it", stream.id)
                stream.sink = None
                self.cancel(stream.id, status="interrupted")

    # --- other instances' streams: mirrors -----------------------------------------------------

    async def resume(self, stream_id: str, after: int = 0, keepalive: bool = False) -> Subscriber:
        if stream_id not in self.streams:
            await self._mirror(stream_id)
        stream = self.get(stream_id)
        if stream.task is None and after > stream.last_id:
            # The client may have read these events from the owner a moment before they reached Redis.
            await stream.reach(after, CURSOR_WAIT_SECONDS)
        return self.subscribe(stream_id, after, keepalive)

    async def _mirror(self, stream_id: str) -> None:
        """Load a stream's log from Redis into a local mirror, and read the rest as it comes."""
        entries = await self._log(stream_id)
        if not entries and len(stream_id) <= 200:
            # Its id may have come from the owner a moment before its first event reached Redis.
            await self.redis.xread({self.log_key(stream_id): "0-0"}, count=1,
                                   block=int(FIRST_EVENT_WAIT_SECONDS * 1000))
            entries = await self._log(stream_id)
        if stream_id in self.streams:
            return  # another reader mirrored it meanwhile
        if not entries:
            raise NotFoundError(f"stream {stream_id} not found or expired", code="not_resumable")
        start: dict[str, Any] = next((orjson.loads(fields["d"]) for _, fields in entries if fields["e"] == "start"), {})
        mirror = LiveStream(stream_id, start.get("conversationId", ""), None, start.get("model", ""), self.log_limit)
        for entry_id, fields in entries:
            self._append_to_mirror(mirror, entry_id, fields)
        self.streams[stream_id] = mirror
        if mirror.finished:
            self._retain(stream_id)
            return
        key = self.log_key(stream_id)
        self._mirrors[key] = mirror
        self._read_from[key] = entries[-1][0]
        self._reading_changed.set()
        # The reader may be blocked in an XREAD without this key: an entry in its wake stream ends the block.
        await self.redis.xadd(self._wake_key, {"w": "1"}, maxlen=10, approximate=False)

    @staticmethod
    def _append_to_mirror(mirror: LiveStream, entry_id: str, fields: dict[str, str]) -> None:
        mirror.append_entry(int(entry_id.partition("-")[0]), fields["e"], fields["d"])
        if mirror.finished and mirror.message_id is None:
            mirror.message_id = orjson.loads(fields["d"]).get("messageId")

    async def _read_loop(self) -> None:
        while True:
            if not self._read_from:
                self._reading_changed.clear()
                await self._reading_changed.wait()
                continue
            streams: dict[Any, Any] = {self._wake_key: self._wake_id, **self._read_from}
            try:
                # RESP2: [[key, [(id, fields), ...]], ...], or None when the block timed out.
                replies = cast(list[tuple[str, list[RawEntry]]] | None,
                               await self.reader.xread(streams, count=1000, block=READ_BLOCK_MS))
            except (RedisError, OSError) as exc:
                log.warning("reading streams from Redis failed (%s); trying again", exc)
                await asyncio.sleep(0.5)
                continue
            for key, entries in replies or []:
                if not entries:
                    continue
                if key == self._wake_key:
                    self._wake_id = entries[-1][0]
                    continue
                mirror = self._mirrors.get(key)
                if mirror is None:
                    continue
                for entry_id, fields in entries:
                    self._append_to_mirror(mirror, entry_id, fields)
                if mirror.finished:
                    del self._mirrors[key], self._read_from[key]
                    self._retain(mirror.id)
                else:
                    self._read_from[key] = entries[-1][0]

    def _expire(self, stream_id: str) -> None:
        super()._expire(stream_id)
        key = self.log_key(stream_id)
        self._mirrors.pop(key, None)
        self._read_from.pop(key, None)

    # --- cancels --------------------------------------------------------------------------------

    async def request_cancel(self, stream_id: str) -> bool:
        stream = self.streams.get(stream_id)
        if stream is not None and stream.task is not None:
            return self.cancel(stream_id)
        if stream is not None and stream.finished:
            return False
        last = cast(list[RawEntry], await self.redis.xrevrange(self.log_key(stream_id), count=1)) \
            if len(stream_id) <= 200 else []
        if not last:
            raise NotFoundError(f"stream {stream_id} not found or expired", code="not_resumable")
        if last[0][1]["e"] in TERMINAL_EVENTS:
            return False
        await self.redis.publish(self._cancel_channel, stream_id)
        return True

    async def _listen_for_cancels(self) -> None:
        while True:
            try:
                async with self.redis.pubsub() as pubsub:
                    await pubsub.subscribe(self._cancel_channel)
                    self._listening.set()
                    async for message in pubsub.listen():
                        if message["type"] != "message":
                            continue
                        stream = self.streams.get(message["data"])
                        if stream is not None and stream.task is not None:
                            self.cancel(stream.id)
            except (RedisError, OSError) as exc:
                log.warning("listening for cancels in Redis failed (%s); trying again", exc)
                await asyncio.sleep(1)

    # --- leases and dead instances --------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_seconds)
            try:
                await self.redis.set(self._alive_key(self.instance_id), "1", px=int(self.lease_seconds * 1000))
                await self.sweep()
            except (RedisError, OSError) as exc:
                log.warning("heartbeat to Redis failed: %s", exc)
            except Exception:
                log.exception("sweeping for dead instances failed")

    async def sweep(self) -> int:
        """Finish the running answers of instances whose lease ran out; how many such instances this one buried."""
        members = await self._instances()
        others = sorted(member for member in members if member != self.instance_id)
        if not others:
            return 0
        pipe = self.redis.pipeline(transaction=False)
        for member in others:
            pipe.exists(self._alive_key(member))
        alive = await pipe.execute()
        buried = 0
        for member, exists in zip(others, alive, strict=True):
            if exists:
                continue
            # One survivor per dead instance: the others leave it alone.
            if not await self.redis.set(f"{self.prefix}:claim:{member}", self.instance_id, nx=True,
                                        ex=CLAIM_SECONDS):
                continue
            await self._bury(member)
            buried += 1
        return buried

    async def _bury(self, instance_id: str) -> None:
        running = cast(dict[str, str], await self.redis.hgetall(self._running_key(instance_id)))
        log.warning("instance %s is gone; ending its %d running streams as interrupted", instance_id, len(running))
        for stream_id, info in running.items():
            await self._end_orphan(stream_id, orjson.loads(info))
        if self.on_instance_gone is not None:
            await self.on_instance_gone(instance_id)  # answers it began but never copied to Redis
        pipe = self.redis.pipeline(transaction=False)
        pipe.srem(self._instances_key, instance_id)
        pipe.delete(self._running_key(instance_id), f"{self.prefix}:wake:{instance_id}")
        await pipe.execute()

    async def _end_orphan(self, stream_id: str, info: dict[str, Any]) -> None:
        """Save a dead instance's answer from its log, then end the log with `interrupted`: save first, as the
        core does, so a client that gets the event finds the answer saved."""
        key = self.log_key(stream_id)
        entries: list[Entry] = [(int(entry_id.partition("-")[0]), fields["e"], fields["d"])
                                for entry_id, fields in await self._log(stream_id)]
        if entries and entries[-1][1] in TERMINAL_EVENTS:
            return  # it ended; only its lease outlived it
        message_id = info.get("messageId")
        saved = False
        if self.on_orphan is not None and message_id:
            try:
                saved = await self.on_orphan(Orphan(stream_id, message_id, info.get("model", ""), entries,
                                                    info.get("usage", {})))
            except Exception:
                log.exception("could not save the answer of orphaned stream %s", stream_id)
        error = Error("interrupted", "the server generating this answer stopped before it was finished", True,
                      message_id=message_id)
        next_id = entries[-1][0] + 1 if entries else 1
        try:
            await self.redis.xadd(key, {"e": error.name, "d": encode_data(error).decode()}, id=f"{next_id}-0")
            await self.redis.expire(key, max(1, math.ceil(self.retention_seconds)))
        except ResponseError:
            pass  # the owner was alive after all and wrote on: it will see its stream taken and stop
        log.info("stream %s ended as interrupted (answer %s)", stream_id, "saved" if saved else "already finished")
