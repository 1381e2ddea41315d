"""The hub across instances (REDIS_URL): stream logs, fan-out and cancels through Redis.

It is a StreamHub: streams this process generates keep the in-process path (their
readers here never wait for Redis). On top of it:

- every numbered event is copied to the stream's Redis Stream `{prefix}:log:{id}` with
  the relay's own id as the entry id (`<n>-0`), by one writer task that sends what every
  stream logged since its last write in one script call, read from the stream's own log
  (sent at once: what a client was sent, Redis has within a round trip); so
  a resume on any instance is exact. Each copy has an epoch (`{prefix}:epoch:{id}`, a
  random token made with it): the owner appends only to the copy it made (a script checks
  the epoch and skips events the copy holds, so a write may be sent twice), and when Redis
  lost it (restart, FLUSHDB, eviction) it makes a new one from its own log. A write Redis
  does not take is sent again, with backoff, until it does: nothing is dropped;
- a stream generated elsewhere is read into a local mirror (a LiveStream fed with the
  owner's ids) by one reader task per process, one XREAD BLOCK for all mirrored streams.
  Ids follow on, or the mirror ends: events that a jump in ids skipped are asked for
  (XRANGE), and a log that lost them (or that vanished and was not copied again within
  LOST_LOG_WAIT_SECONDS) ends the mirror's readers with `not_resumable`, never with a gap;
- a cancel for a stream generated elsewhere is published on `{prefix}:cancel`;
- each instance keeps a lease `{prefix}:alive:{instance}`, renewed every lease/3 by a timer
  of its own, and lists its running streams in `{prefix}:running:{instance}`. Every
  instance sweeps the instances once per renewal interval: the first to claim a dead one
  (SET NX) buries it in the background, a batch of streams at a time and for at most
  BURY_SECONDS per claim: it saves each running answer as `interrupted` from the log
  (save_reply only finishes a `streaming` row), then appends the `error` event
  `interrupted` with the next id, so every watcher on every instance gets it, once.

No I/O happens in the event path: LiveStream.append only marks the stream as written to.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any, cast

import orjson
from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError

from .errors import NotFoundError, RelayError
from .events import TERMINAL_EVENTS, Error, encode_data
from .hub import Entry, LiveStream, Orphan, StreamHub, Subscriber
from .pricing import Usage
from .tasks import stop_tasks

log = logging.getLogger("deltarelay.hub")

LOG_TTL_SECONDS = 24 * 3600  # a running stream's log outlives any answer; a finished one keeps the retention time
CURSOR_WAIT_SECONDS = 2.0  # a resume may be a few events ahead of this instance's copy of the log
FIRST_EVENT_WAIT_SECONDS = 1.0  # how long an unknown stream id is given to appear (its owner just started it)
CLAIM_SECONDS = 60  # a survivor that dies while burying a dead instance is replaced after this
BURY_SECONDS = 40.0  # one claim's burial, then the claim is let go and the next sweep goes on with the rest
BURY_BATCH = 50  # a dead instance's streams are ended this many at a time
ORPHAN_SECONDS = 20.0  # one orphan's save; past it the log is ended all the same
READ_BLOCK_MS = 5000
WRITE_RETRY_SECONDS = (0.05, 1.0)  # the first and the longest wait before sending again what Redis did not take
LOST_LOG_WAIT_SECONDS = 5.0  # a followed log gone from Redis this long (or two leases) is not coming back
LOG_CHECK_SECONDS = 30.0  # followed logs are checked at least this often, and when Redis may have lost them

# Replies are bytes (no decode_responses): an entry of a Redis Stream is (b"n-0", {b"e": name, b"d": JSON data}),
# and an event's data goes from Redis to the log, and on to the socket, as the bytes it was written as.
RawEntry = tuple[bytes, dict[bytes, bytes]]


def entry_number(entry_id: bytes) -> int:
    """The relay's event id of a Redis Stream entry id (b"n-0")."""
    return int(entry_id.partition(b"-")[0])


def text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value

# One call for a whole write: every stream's new events and the running list's changes, atomically. KEYS: the
# running list of this instance (a hash). ARGV: maxlen; the key prefix ("deltarelay:"); every stream's part, as
# one blob of lines: its id, its mode, its epoch, ttl (0: leave it), the id of its first event, the number of its
# events, then the name and the JSON data of each event, in order (neither holds a newline of its own); the ids
# of the streams to take off the running list, one per line (they ended, and their last events are in this
# write); then field and value pairs for the running list (usage copies). The logs' and epochs' keys are made
# here from the prefix and the ids: one argument for all streams, since redis-py packs each argument in Python,
# and three per stream were most of a write's cost (a single Redis: keys are not declared for a Cluster).
# Mode "a" appends to the copy of that epoch the events it does not hold yet (XADD refuses an id at or below the
# top); mode "c" makes a new copy of the log, of this epoch, holding exactly these events.
# Returns one number per stream, comma-separated, in the blob's order: the number of events added; -1: the copy
# is not this epoch's (Redis lost it); -2: another instance ended it.
WRITE_SCRIPT = """
local blob, at = ARGV[3], 1
local function line()
  local stop = string.find(blob, '\\n', at, true)
  local value
  if stop == nil then value, at = string.sub(blob, at), #blob + 2
  else value, at = string.sub(blob, at, stop - 1), stop + 1 end
  return value
end
local prefix, maxlen = ARGV[2], ARGV[1]
local results = {}
while at <= #blob do
  local id = line()
  local log, epoch = prefix .. 'log:' .. id, prefix .. 'epoch:' .. id
  local mode, token, ttl = line(), line(), line()
  local first, count = tonumber(line()), tonumber(line())
  local names, datas = {}, {}
  for i = 1, count do
    names[i] = line()
    datas[i] = line()
  end
  local result = nil
  if mode == 'c' then
    redis.call('DEL', log)
    for i = 1, count do
      redis.call('XADD', log, 'MAXLEN', '~', maxlen, (first + i - 1) .. '-0', 'e', names[i], 'd', datas[i])
    end
    redis.call('SET', epoch, token, 'EX', ttl)
    redis.call('EXPIRE', log, ttl)
    result = count
  elseif redis.call('GET', epoch) ~= token or redis.call('EXISTS', log) == 0 then
    result = -1
  else
    local top = redis.call('XREVRANGE', log, '+', '-', 'COUNT', 1)[1]
    if top and first + count - 1 > tonumber(string.match(top[1], '^%d+')) then
      for i = 1, #top[2], 2 do
        if top[2][i] == 'e' and (top[2][i + 1] == 'done' or top[2][i + 1] == 'error') then result = -2 end
      end
    end
    if result == nil then
      local added = 0
      for i = 1, count do
        local entry = redis.pcall('XADD', log, 'MAXLEN', '~', maxlen, (first + i - 1) .. '-0', 'e', names[i], 'd',
                                  datas[i])
        if type(entry) == 'string' then added = added + 1 end
      end
      if ttl ~= '0' then
        redis.call('EXPIRE', log, ttl)
        redis.call('EXPIRE', epoch, ttl)
      end
      result = added
    end
  end
  results[#results + 1] = result
end
for id in string.gmatch(ARGV[4], '[^\\n]+') do
  redis.call('HDEL', KEYS[1], id)
end
if #ARGV > 4 then
  redis.call('HSET', KEYS[1], unpack(ARGV, 5))
end
return table.concat(results, ',')
"""

# KEYS: log, epoch. ARGV: the last id read, the `error` event's data, ttl. Ends a dead instance's log with
# its next id, unless it moved on meanwhile (-2: its instance was alive after all), ended (0) or is gone (-1).
END_SCRIPT = """
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
if not last then return -1 end
for i = 1, #last[2], 2 do
  if last[2][i] == 'e' and (last[2][i + 1] == 'done' or last[2][i + 1] == 'error') then return 0 end
end
local top = tonumber(string.match(last[1], '^%d+'))
if top ~= tonumber(ARGV[1]) then return -2 end
redis.call('XADD', KEYS[1], (top + 1) .. '-0', 'e', 'error', 'd', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return top + 1
"""


def new_epoch() -> str:
    return secrets.token_hex(8)


@dataclass(slots=True)
class LogCopy:
    """What Redis holds of one of this instance's streams, until its last event is written."""

    stream: LiveStream
    epoch: str
    id: bytes  # the stream's id, as the write script takes it
    written: int = 0  # the last id Redis took
    made: bool = False  # the copy of this epoch exists in Redis (as far as this instance knows)


class RedisStreamHub(StreamHub):
    """A StreamHub whose streams can be read, resumed and cancelled from any instance sharing one Redis.

    Args:
        redis_url: redis://host:port/db (or rediss://, unix://).
        prefix: the start of every key, so several deployments (or test runs) share a Redis.
        lease_seconds: how long an instance counts as alive after its last renewal; a dead one is
            noticed lease_seconds to lease_seconds * 4/3 after it stopped.
        on_orphan: saves the partial answer of a dead instance's stream; True when it finished the message.
        on_instance_gone: finishes whatever else a dead instance left `streaming` in the database.
        write_interval: seconds between the starts of two writes of events to Redis, at least: the events
            of every stream that arrive meanwhile go in the next write (0: write as soon as the last ended).
            Readers on this instance never wait for it; a reader on another instance gets each event up to
            this much later.
    """

    def __init__(self, redis_url: str, log_limit: int, retention_seconds: float, queue_limit: int = 2000,
                 keepalive_seconds: float = 15.0, retention_max: int = 1000, *, prefix: str = "deltarelay",
                 lease_seconds: float = 3.0, write_interval: float = 0.0,
                 on_orphan: Callable[[Orphan], Awaitable[bool]] | None = None,
                 on_instance_gone: Callable[[str], Awaitable[int]] | None = None) -> None:
        super().__init__(log_limit, retention_seconds, queue_limit, keepalive_seconds, retention_max)
        self.redis_url = redis_url
        self.prefix = prefix
        self.lease_seconds = lease_seconds
        self.heartbeat_seconds = lease_seconds / 3
        self.write_interval = write_interval
        self.on_orphan = on_orphan
        self.on_instance_gone = on_instance_gone
        self.redis: Redis = Redis.from_url(redis_url)
        # The blocking XREAD holds its connection for up to READ_BLOCK_MS: a client of its own.
        self.reader: Redis = Redis.from_url(redis_url)
        self._scripts = {source: "" for source in (WRITE_SCRIPT, END_SCRIPT)}  # source -> sha
        self._copies: dict[str, LogCopy] = {}  # this instance's streams whose last event Redis has not taken yet
        self._dirty: dict[str, LogCopy] = {}  # those with events to write
        self._dirty_ready = asyncio.Event()
        self._copied_usage: dict[str, tuple[int, int]] = {}  # stream id -> usage_mark of its last usage copy
        self._mirrors: dict[str, LiveStream] = {}  # log key -> mirror still being read
        self._read_from: dict[str, str] = {}  # log key -> last entry id read
        self._epoch_of: dict[str, str | None] = {}  # log key -> the epoch of the copy a mirror reads
        self._missing: dict[str, float] = {}  # log key -> since when (loop time) its log is gone from Redis
        self._check_at: float | None = None  # when the reader checks its mirrors' logs next (loop time)
        self._reading_changed = asyncio.Event()
        self._wake_id = "0-0"
        self._listening = asyncio.Event()
        self._closing = False
        self._tasks: list[asyncio.Task[None]] = []
        self._writer: asyncio.Task[None] | None = None
        self._burials: dict[str, asyncio.Task[None]] = {}  # instance id -> its burial by this instance

    # --- keys -----------------------------------------------------------------------------------

    @property
    def _key_prefix(self) -> str:
        return f"{self.prefix}:"

    def log_key(self, stream_id: str) -> str:
        return f"{self.prefix}:log:{stream_id}"

    def epoch_key(self, stream_id: str) -> str:
        return f"{self.prefix}:epoch:{stream_id}"

    def _epoch_key_of(self, log_key: str) -> str:
        return self.epoch_key(log_key.removeprefix(f"{self.prefix}:log:"))

    def _alive_key(self, instance_id: str) -> str:
        return f"{self.prefix}:alive:{instance_id}"

    def _running_key(self, instance_id: str) -> str:
        return f"{self.prefix}:running:{instance_id}"

    def _claim_key(self, instance_id: str) -> str:
        return f"{self.prefix}:claim:{instance_id}"

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
        """Connect, take the lease, listen for cancels, and bury instances that died while none was looking.

        Those burials are waited for (each bounded by BURY_SECONDS): the caller then marks `interrupted` what
        dead instances left in the database, which must come after their answers are saved from their logs.
        """
        await self._renew_lease()
        await self._load_scripts()
        self.start()
        self._writer = asyncio.create_task(self._write_loop(), name="redis-writer")
        self._tasks = [
            asyncio.create_task(self._listen_for_cancels(), name="redis-cancels"),
            asyncio.create_task(self._read_loop(), name="redis-reader"),
            asyncio.create_task(self._lease_loop(), name="redis-lease"),
            asyncio.create_task(self._sweep_loop(), name="redis-sweep"),
        ]
        async with asyncio.timeout(10):
            await self._listening.wait()  # a cancel sent right after this start must not be missed
        await self.sweep()
        await asyncio.gather(*self._burials.values())

    async def close(self) -> None:
        """Write out every queued event, give up the lease, disconnect; after shutdown()."""
        self._closing = True
        self._dirty_ready.set()
        if self._writer is not None:
            try:
                async with asyncio.timeout(10):
                    await self._writer
            except TimeoutError:
                log.error("gave up writing the events of %d streams to Redis at shutdown", len(self._dirty))
                await stop_tasks([self._writer])
        await stop_tasks([*self._tasks, *self._burials.values()])
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
        return {member.decode() for member in cast(set[bytes], await self.redis.smembers(self._instances_key))}

    async def _load_scripts(self) -> None:
        for source in self._scripts:
            self._scripts[source] = str(text(await self.redis.script_load(source)))

    async def _log(self, stream_id: str) -> tuple[str | None, list[RawEntry]]:
        """The epoch and entries of a stream's log, read in one step."""
        if len(stream_id) > 200:  # not an id of ours: no key of that size
            return None, []
        pipe = self.redis.pipeline(transaction=True)
        pipe.get(self.epoch_key(stream_id))
        pipe.xrange(self.log_key(stream_id))
        epoch, entries = await pipe.execute()
        return text(epoch), cast(list[RawEntry], entries)

    # --- this instance's streams: copy every event to Redis ------------------------------------

    def create(self, stream_id: str, conversation_id: str, message_id: str, model: str) -> LiveStream:
        stream = super().create(stream_id, conversation_id, message_id, model)
        stream.sink = self._queue
        self._copies[stream_id] = LogCopy(stream, new_epoch(), stream_id.encode())
        return stream

    def _queue(self, stream: LiveStream, event_id: int, name: str, data: bytes) -> None:
        copy = self._copies.get(stream.id)
        if copy is not None:
            self._dirty[stream.id] = copy
            if not self._dirty_ready.is_set():
                self._dirty_ready.set()

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        delay = WRITE_RETRY_SECONDS[0]
        failing_since: float | None = None
        last_write = -math.inf
        while True:
            await self._dirty_ready.wait()
            wait = last_write + self.write_interval - loop.time()
            if wait > 0 and not self._closing:
                await asyncio.sleep(wait)  # what arrives meanwhile shares this write's round trip
            last_write = loop.time()
            self._dirty_ready.clear()
            if self._dirty:
                dirty, self._dirty = self._dirty, {}
                try:
                    await self._write(list(dirty.values()))
                except (RedisError, OSError) as exc:
                    # Nothing is lost: each event is still in its stream's log, and is sent from there again.
                    for stream_id, copy in dirty.items():
                        self._dirty.setdefault(stream_id, copy)
                        self._copied_usage.pop(stream_id, None)
                    if failing_since is None:
                        failing_since = loop.time()
                        log.warning("Redis did not take events (%s); sending them again from the streams' logs"
                                    " until it does", exc)
                    self._dirty_ready.set()
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, WRITE_RETRY_SECONDS[1])
                    continue
                if failing_since is not None:
                    log.warning("Redis takes events again: what it did not take for %.1f s is written",
                                loop.time() - failing_since)
                    failing_since, delay = None, WRITE_RETRY_SECONDS[0]
            if self._closing and not self._dirty:
                return

    async def _write(self, copies: list[LogCopy]) -> None:
        """One script call: for each stream, the events Redis does not have yet from its log, and the running
        list's changes (usage copies; finished streams off it, with their last events), so that its commands and
        replies cost once per write, not once per stream.

        Raises:
            RedisError, OSError: Redis did not take them all (the write loop marks them to be sent again).
        """
        retention = max(1, math.ceil(self.retention_seconds))
        sent: list[tuple[LogCopy, int]] = []  # (copy, last id sent), in the script's order
        ended: list[bytes] = []  # streams to take off the running list, their last events in this write
        usages: list[str | bytes] = []  # field and value pairs: running streams whose usage copy changed
        parts: list[bytes | bytearray] = []
        for copy in copies:
            stream = copy.stream
            if stream.last_id <= copy.written:
                continue
            first_held = stream.last_id - len(stream.log) + 1
            # A copy that Redis lost, or that would have a hole (its log dropped events Redis never took): anew.
            anew = not copy.made or copy.written + 1 < first_held
            start = first_held if anew else copy.written + 1
            ttl = retention if stream.finished else LOG_TTL_SECONDS if anew else 0
            parts.append(b"%s\n%s\n%s\n%d\n%d\n%d" % (copy.id, b"c" if anew else b"a", copy.epoch.encode(), ttl,
                                                        start, stream.last_id - start + 1))
            parts += stream.log.lines(start - first_held)
            sent.append((copy, stream.last_id))
            if stream.finished:
                ended.append(copy.id)
                self._copied_usage.pop(stream.id, None)
                continue
            # What a survivor needs to save this answer if this instance dies: its message and last usage.
            reply = stream.reply
            mark = reply.usage_mark if reply is not None else (-1, -1)
            if anew or self._copied_usage.get(stream.id) != mark:
                self._copied_usage[stream.id] = mark
                usage = reply.usage if reply is not None else Usage()
                usages += (copy.id, orjson.dumps(
                    {"messageId": stream.message_id, "model": stream.model, "usage": asdict(usage)}))
        if not sent:
            return
        try:
            reply_text = await self.redis.evalsha(
                self._scripts[WRITE_SCRIPT], 1, self._running_key(self.instance_id), self.log_limit,
                self._key_prefix, b"\n".join(parts), b"\n".join(ended), *usages)
        except NoScriptError:
            # A Redis that restarted has no scripts: load them, send again at once.
            for copy, _ in sent:
                self._dirty.setdefault(copy.stream.id, copy)
            await self._load_scripts()
            self._dirty_ready.set()
            return
        written = [int(result) for result in cast(bytes, reply_text).split(b",")]
        lost: list[LogCopy] = []
        for (copy, last_id), result in zip(sent, written, strict=True):
            stream = copy.stream
            if result == -1:
                lost.append(copy)
            elif result == -2:
                # Another instance took this stream for dead and ended its log: stop, as a shutdown would.
                if self._copies.pop(stream.id, None) is None:
                    continue  # already stopped: a write retried after a failure sent it again
                log.warning("stream %s was ended as interrupted by another instance; stopping it", stream.id)
                stream.sink = None
                self.cancel(stream.id, status="interrupted")
            else:
                copy.made, copy.written = True, last_id
                if stream.finished and last_id == stream.last_id:
                    self._copies.pop(stream.id, None)
        if lost:
            self._copy_again(lost)

    def _copy_again(self, lost: list[LogCopy]) -> None:
        """Make new copies, from this instance's logs, of the logs that Redis lost."""
        log.warning("the Redis logs of %d streams were lost (a restart, FLUSHDB, eviction), %s among them; copying"
                    " them again from this instance's logs", len(lost), lost[0].stream.id)
        for copy in lost:
            copy.made, copy.epoch, copy.written = False, new_epoch(), 0
            self._dirty.setdefault(copy.stream.id, copy)
        self._dirty_ready.set()

    # --- other instances' streams: mirrors -----------------------------------------------------

    async def resume(self, stream_id: str, after: int = 0, keepalive: bool = False) -> Subscriber:
        if stream_id not in self.streams:
            try:
                await self._mirror(stream_id)
            except (RedisError, OSError) as exc:
                raise RelayError("the streams of other instances cannot be read now (Redis does not answer);"
                                 " try again", code="stream_unavailable", status=503, retryable=True) from exc
        stream = self.get(stream_id)
        if stream.task is None and after > stream.last_id:
            # The client may have read these events from the owner a moment before they reached Redis.
            await stream.reach(after, CURSOR_WAIT_SECONDS)
        return self.subscribe(stream_id, after, keepalive)

    async def _mirror(self, stream_id: str) -> None:
        """Load a stream's log from Redis into a local mirror, and read the rest as it comes."""
        epoch, entries = await self._log(stream_id)
        if not entries and len(stream_id) <= 200:
            # Its id may have come from the owner a moment before its first event reached Redis.
            await self.redis.xread({self.log_key(stream_id): "0-0"}, count=1,
                                   block=int(FIRST_EVENT_WAIT_SECONDS * 1000))
            epoch, entries = await self._log(stream_id)
        if stream_id in self.streams:
            return  # another reader mirrored it meanwhile
        if not entries:
            raise NotFoundError(f"stream {stream_id} not found or expired", code="not_resumable")
        start: dict[str, Any] = next((orjson.loads(fields[b"d"]) for _, fields in entries if fields[b"e"] == b"start"),
                                     {})
        mirror = LiveStream(stream_id, start.get("conversationId", ""), None, start.get("model", ""), self.log_limit)
        for entry_id, fields in entries:
            # A hole (entries deleted) starts the log afresh after it: a cursor before it is not resumable.
            self._append_to_mirror(mirror, entry_id, fields)
        self.streams[stream_id] = mirror
        if mirror.finished:
            self._retain(stream_id)
            return
        key = self.log_key(stream_id)
        self._mirrors[key] = mirror
        self._read_from[key] = entries[-1][0].decode()
        self._epoch_of[key] = epoch
        if self._check_at is None:
            self._check_at = asyncio.get_running_loop().time() + LOG_CHECK_SECONDS
        self._reading_changed.set()
        # The reader may be blocked in an XREAD without this key: an entry in its wake stream ends the block.
        await self.redis.xadd(self._wake_key, {"w": "1"}, maxlen=10, approximate=False)

    @staticmethod
    def _append_to_mirror(mirror: LiveStream, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        mirror.append_entry(entry_number(entry_id), fields[b"e"].decode(), fields[b"d"])
        if mirror.finished and mirror.message_id is None:
            mirror.message_id = orjson.loads(fields[b"d"]).get("messageId")

    async def _read_loop(self) -> None:
        loop = asyncio.get_running_loop()
        failing = False
        while True:
            if not self._read_from:
                self._reading_changed.clear()
                await self._reading_changed.wait()
                continue
            try:
                if self._check_at is not None and loop.time() >= self._check_at:
                    await self._check_mirrors()
                streams: dict[Any, Any] = {self._wake_key: self._wake_id, **self._read_from}
                # While a log is missing, look again each renewal interval: its owner copies it again by then.
                block = int(self.heartbeat_seconds * 1000) if self._missing else READ_BLOCK_MS
                # RESP2: [[key, [(id, fields), ...]], ...], or None when the block timed out.
                replies = cast(list[tuple[bytes, list[RawEntry]]] | None,
                               await self.reader.xread(streams, count=1000, block=block))
                if failing:
                    log.warning("reading streams from Redis again")
                    failing = False
                if not replies:
                    self._check_at = loop.time()  # a quiet log may be a lost one: look
                    continue
                await self._take(replies)
            except (RedisError, OSError) as exc:
                if not failing:
                    log.warning("reading streams from Redis failed (%s); trying again", exc)
                    failing = True
                self._check_at = loop.time()  # once it answers: did the logs outlive the failure?
                await asyncio.sleep(0.5)

    async def _take(self, replies: list[tuple[bytes, list[RawEntry]]]) -> None:
        """Append what one XREAD returned to the mirrors, each from the id after its last: a jump is a gap."""
        for raw_key, entries in replies:
            if not entries:
                continue
            key = raw_key.decode()
            if key == self._wake_key:
                self._wake_id = entries[-1][0].decode()
                continue
            mirror = self._mirrors.get(key)
            if mirror is None:
                continue
            for entry_id, fields in entries:
                event_id = entry_number(entry_id)
                if event_id > mirror.last_id + 1 and not await self._fill_gap(key, mirror, event_id):
                    break
                self._append_to_mirror(mirror, entry_id, fields)
            if mirror.finished:
                self._stop_reading(key)
                if mirror.lost is None:
                    self._retain(mirror.id)
            else:
                self._read_from[key] = f"{mirror.last_id}-0"

    async def _fill_gap(self, key: str, mirror: LiveStream, upto: int) -> bool:
        """Ask the log for the events between the mirror's last and `upto`; False (the mirror ended) when gone."""
        missing = cast(list[RawEntry], await self.redis.xrange(key, f"{mirror.last_id + 1}-0", f"{upto - 1}-0"))
        for entry_id, fields in missing:
            if entry_number(entry_id) == mirror.last_id + 1:
                self._append_to_mirror(mirror, entry_id, fields)
        if mirror.last_id + 1 == upto:
            return True
        self._lose(key, mirror, f"events {mirror.last_id + 1} to {upto - 1} of stream {mirror.id} are gone from"
                                f" Redis")
        return False

    async def _check_mirrors(self) -> None:
        """Make sure each followed log still holds the event after its mirror's last one.

        A log that Redis lost is given LOST_LOG_WAIT_SECONDS (or two leases) for its owner to copy it again
        (a live owner does within a renewal interval of Redis answering); past that, or when the log holds
        only later events, the mirror ends.
        """
        loop = asyncio.get_running_loop()
        self._check_at = None
        keys = list(self._mirrors)
        if not keys:
            return
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            pipe.get(self._epoch_key_of(key))
            pipe.xrange(key, count=1)
        results = await pipe.execute()
        now = loop.time()
        for n, key in enumerate(keys):
            mirror = self._mirrors.get(key)
            if mirror is None:
                continue
            epoch, first = text(results[2 * n]), cast(list[RawEntry], results[2 * n + 1])
            if not first:
                since = self._missing.setdefault(key, now)
                if now - since >= max(2 * self.lease_seconds, LOST_LOG_WAIT_SECONDS):
                    self._lose(key, mirror, f"the Redis log of stream {mirror.id} was lost, and its instance did"
                                            " not copy it again")
                else:
                    self._check_at = now + self.heartbeat_seconds
                continue
            self._missing.pop(key, None)
            if entry_number(first[0][0]) > mirror.last_id + 1:
                self._lose(key, mirror, f"the Redis log of stream {mirror.id} no longer holds event"
                                        f" {mirror.last_id + 1}")
            elif epoch != self._epoch_of.get(key):
                log.info("stream %s: its Redis log was copied again; reading on from event %d", mirror.id,
                         mirror.last_id + 1)
                self._epoch_of[key] = epoch
        if self._check_at is None and self._mirrors:
            self._check_at = now + LOG_CHECK_SECONDS

    def _lose(self, key: str, mirror: LiveStream, reason: str) -> None:
        """End a mirror whose log lost events: its readers get an error, a later resume reads the log afresh."""
        log.warning("%s: its readers on this instance end with not_resumable", reason)
        self._stop_reading(key)
        mirror.end_lost(reason)
        if self.streams.get(mirror.id) is mirror:
            del self.streams[mirror.id]

    def _stop_reading(self, key: str) -> None:
        self._mirrors.pop(key, None)
        self._read_from.pop(key, None)
        self._epoch_of.pop(key, None)
        self._missing.pop(key, None)

    def _expire(self, stream_id: str) -> None:
        super()._expire(stream_id)
        self._stop_reading(self.log_key(stream_id))

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
        if last[0][1][b"e"].decode() in TERMINAL_EVENTS:
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
                        stream = self.streams.get(str(text(message["data"])))
                        if stream is not None and stream.task is not None:
                            self.cancel(stream.id)
            except (RedisError, OSError) as exc:
                if self._listening.is_set():  # once per outage
                    log.warning("listening for cancels in Redis failed (%s); trying again", exc)
                self._listening.clear()
                await asyncio.sleep(1)

    # --- leases and dead instances --------------------------------------------------------------

    async def _lease_loop(self) -> None:
        """Renew the lease every third of it, whatever else is going on (sweeps and burials have their own task)."""
        failing = False
        while True:
            await asyncio.sleep(self.heartbeat_seconds)
            try:
                async with asyncio.timeout(self.lease_seconds):
                    await self._renew_lease()
                if failing:
                    log.warning("the lease in Redis is renewed again")
                    failing = False
            except (RedisError, OSError, TimeoutError) as exc:
                if not failing:
                    log.warning("renewing the lease in Redis failed: %s", exc or type(exc).__name__)
                    failing = True

    async def _renew_lease(self) -> None:
        """The lease, the membership (both lost if Redis restarted), and a look at this instance's copies."""
        pipe = self.redis.pipeline(transaction=False)
        alive = self._alive_key(self.instance_id)
        pipe.exists(alive)
        pipe.set(alive, "1", px=int(self.lease_seconds * 1000))
        pipe.sadd(self._instances_key, self.instance_id)  # after the lease: never a member without one
        made = [(copy, copy.epoch) for copy in self._copies.values() if copy.made]
        if made:
            pipe.mget([self.epoch_key(copy.stream.id) for copy, _ in made])
        results = await pipe.execute()
        if not results[0] and self._mirrors:
            # The lease was gone before its time: Redis lost its keys (a restart, FLUSHDB). The followed logs too?
            self._check_at = asyncio.get_running_loop().time()
        if not made:
            return
        # A stream idle for a while writes nothing: its lost copy is noticed here, not at its next event.
        lost = [copy for (copy, epoch), found in zip(made, results[3], strict=True)
                if text(found) != epoch and copy.epoch == epoch and copy.made and copy.stream.id in self._copies]
        if lost:
            self._copy_again(lost)

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_seconds)
            try:
                await self.sweep()
            except (RedisError, OSError):
                pass  # Redis is away: the lease's renewal says so, once
            except Exception:
                log.exception("sweeping for dead instances failed")

    async def sweep(self) -> int:
        """Claim the instances whose lease ran out and bury each in the background; how many were claimed."""
        members = await self._instances()
        others = sorted(member for member in members if member != self.instance_id and member not in self._burials)
        if not others:
            return 0
        pipe = self.redis.pipeline(transaction=False)
        for member in others:
            pipe.exists(self._alive_key(member))
        alive = await pipe.execute()
        claimed = 0
        for member, exists in zip(others, alive, strict=True):
            if exists:
                continue
            # One survivor per dead instance: the others leave it alone.
            if not await self.redis.set(self._claim_key(member), self.instance_id, nx=True, ex=CLAIM_SECONDS):
                continue
            task = asyncio.create_task(self._bury(member), name=f"redis-bury-{member}")
            self._burials[member] = task
            task.add_done_callback(lambda _, member=member: self._burials.pop(member, None))  # type: ignore[misc]
            claimed += 1
        return claimed

    async def _bury(self, instance_id: str) -> None:
        """End a dead instance's running streams, BURY_BATCH at a time, for at most BURY_SECONDS; the streams
        not reached by then stay listed, for the next sweep (this claim is let go)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BURY_SECONDS
        running = self._running_key(instance_id)
        claim = self._claim_key(instance_id)
        try:
            log.warning("instance %s is gone; ending its %d running streams as interrupted", instance_id,
                        await self.redis.hlen(running))
            cursor = 0
            while True:
                cursor, batch = cast(tuple[int, dict[bytes, bytes]],
                                     await self.redis.hscan(running, cursor, count=BURY_BATCH))
                if batch:
                    await asyncio.gather(*(self._end_orphan(stream_id.decode(), orjson.loads(info))
                                           for stream_id, info in batch.items()))
                    await self.redis.hdel(running, *batch)
                await self.redis.expire(claim, CLAIM_SECONDS)  # still at it
                if cursor == 0:
                    break
                if loop.time() > deadline:
                    log.warning("burying instance %s took over %.0f s; the next sweep ends its other %d streams",
                                instance_id, BURY_SECONDS, await self.redis.hlen(running))
                    await self.redis.delete(claim)
                    return
            if self.on_instance_gone is not None:
                await self.on_instance_gone(instance_id)  # answers it began but never copied to Redis
            pipe = self.redis.pipeline(transaction=False)
            pipe.srem(self._instances_key, instance_id)
            pipe.delete(running, f"{self.prefix}:wake:{instance_id}")
            await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("burying instance %s stopped (%s); a later sweep goes on once the claim expires",
                        instance_id, exc)
        except Exception:
            log.exception("burying instance %s failed; a later sweep goes on once the claim expires", instance_id)

    async def _end_orphan(self, stream_id: str, info: dict[str, Any]) -> None:
        """Save a dead instance's answer from its log, then end the log with `interrupted`: save first, as the
        core does, so a client that gets the event finds the answer saved."""
        epoch, raw = await self._log(stream_id)
        entries: list[Entry] = [(entry_number(entry_id), fields[b"e"].decode(), fields[b"d"])
                                for entry_id, fields in raw]
        if not entries:
            # Its log is gone (Redis lost it): nothing to save from, nor to end. The database's row is
            # finished by on_instance_gone, with whatever it holds.
            log.warning("the Redis log of orphaned stream %s is gone; its answer is left to the database", stream_id)
            return
        if entries[-1][1] in TERMINAL_EVENTS:
            return  # it ended; only its lease outlived it
        message_id = info.get("messageId")
        saved = False
        if self.on_orphan is not None and message_id:
            try:
                async with asyncio.timeout(ORPHAN_SECONDS):
                    saved = await self.on_orphan(Orphan(stream_id, message_id, info.get("model", ""), entries,
                                                        info.get("usage", {})))
            except Exception:
                log.exception("could not save the answer of orphaned stream %s", stream_id)
        error = Error("interrupted", "the server generating this answer stopped before it was finished", True,
                      message_id=message_id)
        ended = await self.redis.evalsha(self._scripts[END_SCRIPT], 2, self.log_key(stream_id),
                                         self.epoch_key(stream_id), entries[-1][0], encode_data(error),
                                         max(1, math.ceil(self.retention_seconds)))
        if ended == -2:
            log.warning("stream %s was still being written by its instance; not ended", stream_id)
            return
        log.info("stream %s ended as interrupted (answer %s)", stream_id, "saved" if saved else "already finished")
