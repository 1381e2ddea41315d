"""The hub's log and subscribers: numbering, replay, bounds, keepalive, cancels.

Run on both hubs: in-process (the reader is the hub that generates the stream) and Redis
(the reader is a second instance sharing the Redis, reading through its mirror).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.errors import GoneError, NotFoundError
from server.events import Chunk, Done, Start
from server.hub import EventLog, LiveStream, StreamHub, Subscriber, SubscriberDropped

from .fakes import RecordingWriter, entry_frame, serve_all

REDIS_URL = os.environ.get("TEST_REDIS_URL", "")
# Without a Redis named, the Redis runs show up as skipped, never silently absent.
HUB_KINDS = ["in-process", "redis" if REDIS_URL else pytest.param("redis", marks=pytest.mark.skip(
    reason="set TEST_REDIS_URL=redis://127.0.0.1:6379/7 to run the hub tests on Redis"))]


@dataclass
class Hubs:
    """`owner` generates streams; `reader` reads them: the same hub in-process, another instance with Redis."""

    owner: StreamHub
    reader: StreamHub

    async def settled(self, stream_id: str, last_id: int) -> LiveStream:
        """The reader's copy of a stream once it holds event `last_id` (a mirror lags the owner a little)."""
        if stream_id not in self.reader.streams:
            with contextlib.suppress(GoneError):  # only to load the copy; the log may no longer start at 1
                await self.reader.resume(stream_id, 0)
        stream = self.reader.streams[stream_id]
        await stream.reach(last_id, 5)
        assert stream.last_id >= last_id
        return stream


async def open_redis_hub(prefix: str, **options: object) -> StreamHub:
    from server.redis_hub import RedisStreamHub

    hub = RedisStreamHub(REDIS_URL, 100, retention_seconds=60, queue_limit=10, prefix=prefix, **options)  # type: ignore[arg-type]
    await hub.open()
    return hub


@pytest.fixture(params=HUB_KINDS)
async def hubs(request: pytest.FixtureRequest) -> AsyncIterator[Hubs]:
    if request.param == "in-process":
        hub = StreamHub(100, retention_seconds=60, queue_limit=10)
        yield Hubs(hub, hub)
        await hub.shutdown(0)
        return
    prefix = f"test-{uuid.uuid4().hex[:12]}"  # every test its own keys: others share this Redis
    owner, reader = await open_redis_hub(prefix), await open_redis_hub(prefix)
    yield Hubs(owner, reader)
    for hub in (owner, reader):
        await hub.shutdown(0)
        await hub.close()


def make_stream(hub: StreamHub, log_limit: int = 100, stream_id: str = "s1") -> LiveStream:
    hub.log_limit = log_limit
    stream = hub.create(stream_id, "c1", "m1", "model")
    stream.append(Start(stream_id, "c1", "model"))
    return stream


async def read_all(subscriber: Subscriber, writer: RecordingWriter | None = None) -> list:
    async with asyncio.timeout(5):
        return await serve_all(subscriber, writer)


async def test_a_subscriber_gets_the_backlog_then_live_events_with_no_gap_or_duplicate(hubs):
    stream = make_stream(hubs.owner)
    for n in range(3):
        stream.append(Chunk(f"w{n}"))
    await hubs.settled("s1", 4)
    subscriber = await hubs.reader.resume("s1", after=2)
    stream.append(Chunk("w3"))
    stream.append(Done("c1", "m1", "end_turn"))

    entries = await read_all(subscriber)

    assert [entry[0] for entry in entries] == [3, 4, 5, 6]
    assert [entry[2] for entry in entries[:-1]] == ['{"text":"w1"}', '{"text":"w2"}', '{"text":"w3"}']
    assert entries[-1][1] == "done"


async def test_a_cursor_a_little_ahead_of_the_readers_copy_gets_exactly_the_rest(hubs):
    stream = make_stream(hubs.owner)
    await hubs.settled("s1", 1)
    for n in range(5):
        stream.append(Chunk(f"w{n}"))
    # Asked for before the reader's copy can hold event 6 (Redis: the owner has not even written it yet).
    resuming = asyncio.ensure_future(hubs.reader.resume("s1", after=6))
    stream.append(Chunk("w5"))
    stream.append(Done("c1", "m1", "end_turn"))

    entries = await read_all(await resuming)

    assert [entry[0] for entry in entries] == [7, 8]


async def test_a_reader_whose_socket_stalls_is_dropped_at_its_bound_and_holds_no_more(hubs):
    """Fails when the outbox is not bounded (Subscriber.push without its `limit` check): the stalled reader
    then holds all 1,000 frames and is never dropped."""
    stream = make_stream(hubs.owner, log_limit=10_000)
    await hubs.settled("s1", 1)
    stuck = await hubs.reader.resume("s1", after=1)
    writer = RecordingWriter()
    serving = asyncio.ensure_future(stuck.serve(writer, entry_frame))
    await asyncio.sleep(0)  # it starts: caught up, it takes live events
    writer.paused = True  # from now on its socket takes nothing
    most = 0
    for n in range(1000):
        stream.append(Chunk(f"w{n}"))
        most = max(most, len(stuck.outbox))
        assert len(stuck.outbox) <= 10
    await hubs.settled("s1", 1001)
    if hubs.owner is hubs.reader:  # (a mirror takes the events in its own task, unseen by this loop)
        assert most == 10  # the bound was reached, not merely respected
    assert stuck.dropped and stuck.outbox == [] and writer.writes == []
    await asyncio.sleep(0)
    assert stuck not in hubs.reader.streams["s1"].subscribers  # let go at once, its socket still paused
    writer.resume()
    with pytest.raises(SubscriberDropped):
        await asyncio.wait_for(serving, 5)
    # It may resume from the log where it was.
    resumed = await hubs.reader.resume("s1", after=991)
    assert [entry[0] for entry in await asyncio.wait_for(_first_entries(resumed, 10), 5)] == list(range(992, 1002))


async def test_a_slow_reader_gets_what_queued_while_paused_in_one_write_in_order():
    """The socket pauses with events in flight, then drains: what queued meanwhile goes out in one write, after
    what was written before, with nothing lost. Fails when a flush while paused drops the outbox or writes it
    anyway (Subscriber.flush without its can_write check)."""
    hub = StreamHub(100, retention_seconds=60, queue_limit=10)
    stream = make_stream(hub)
    subscriber = hub.subscribe("s1", after=0)
    writer = RecordingWriter()
    serving = asyncio.ensure_future(serve_all(subscriber, writer))
    await asyncio.sleep(0)
    stream.append(Chunk("a"))
    await asyncio.sleep(0)
    writer.paused = True
    for text in "bcdefg":
        stream.append(Chunk(text))
        await asyncio.sleep(0)
    assert len(subscriber.outbox) == 6 and len(writer.writes) == 2  # start, then a; the rest waits
    writer.resume()
    await asyncio.sleep(0)
    stream.append(Done("c1", "m1", "end_turn"))
    entries = await asyncio.wait_for(serving, 5)
    assert [len(frames) for frames in writer.writes[:3]] == [1, 1, 6]
    assert [entry[0] for entry in entries] == list(range(1, 10))


async def test_a_burst_of_events_in_one_turn_is_one_write():
    """Fails when each event is written on its own (a flush per push instead of once per loop turn)."""
    hub = StreamHub(100, retention_seconds=60, queue_limit=10)
    stream = make_stream(hub)
    subscriber = hub.subscribe("s1", after=1)
    writer = RecordingWriter()
    serving = asyncio.ensure_future(serve_all(subscriber, writer))
    await asyncio.sleep(0)
    for n in range(8):
        stream.append(Chunk(f"w{n}"))
    await asyncio.sleep(0)
    assert [len(frames) for frames in writer.writes] == [8]
    subscriber.abandon()
    await asyncio.wait_for(serving, 5)


async def test_a_reader_resuming_from_0_of_a_long_log_pages_it_within_its_bound_and_misses_nothing(hubs):
    """Fails when the backlog is framed whole and lifts the bound to it (the old hub: a first batch of 3,001
    events for a reader bounded at 10), and when a live event reaches a reader still paging (twice,
    in-process)."""
    stream = make_stream(hubs.owner, log_limit=10_000)
    hubs.reader.log_limit = 10_000
    for n in range(3000):
        stream.append(Chunk(f"w{n}"))
    await hubs.settled("s1", 3001)
    reader = await hubs.reader.resume("s1", after=0)
    written = 0

    def on_write(writer: RecordingWriter) -> None:
        nonlocal written
        assert len(writer.writes[-1]) <= 10  # the queue bound, whatever the backlog
        written += len(writer.writes[-1])
        # Live events while it pages (a few: a mirror may hand them over at once): they are in the log,
        # and come in their turn.
        if written % 400 < len(writer.writes[-1]) and stream.last_id < 3009:
            stream.append(Chunk("live"))
        elif written >= 3001 and not stream.finished:
            stream.append(Done("c1", "m1", "end_turn"))

    async with asyncio.timeout(10):
        entries = await serve_all(reader, RecordingWriter(on_write))

    assert [entry[0] for entry in entries] == list(range(1, stream.last_id + 1))
    assert entries[-1][1] == "done"


async def _first_entries(subscriber: Subscriber, count: int) -> list:
    def enough(writer: RecordingWriter) -> None:
        if len(writer.entries) >= count:
            subscriber.abandon()

    return (await serve_all(subscriber, RecordingWriter(enough)))[:count]


async def test_cursors_outside_the_log_are_not_resumable(hubs):
    stream = make_stream(hubs.owner, log_limit=5)
    hubs.reader.log_limit = 5
    for n in range(20):
        stream.append(Chunk(f"w{n}"))
    stream.append(Done("c1", "m1", "end_turn"))
    await hubs.settled("s1", 22)
    with pytest.raises(GoneError):
        await hubs.reader.resume("s1", after=23)
    with pytest.raises(GoneError):
        await hubs.reader.resume("s1", after=3)
    assert (await read_all(await hubs.reader.resume("s1", after=18)))[0][0] == 19


async def test_an_unknown_stream_is_not_resumable_and_cannot_be_cancelled(hubs):
    with pytest.raises(NotFoundError) as unknown:
        await hubs.reader.resume("no-such-stream", after=0)
    assert unknown.value.code == "not_resumable"
    with pytest.raises(NotFoundError):
        await hubs.reader.request_cancel("no-such-stream")


async def test_a_cancel_sent_to_the_reader_reaches_the_stream_where_it_is_generated(hubs):
    stream = make_stream(hubs.owner)
    cancelled = asyncio.Event()

    async def generate() -> None:
        stream.running = True
        try:
            await asyncio.Event().wait()  # an answer that never ends by itself
        except asyncio.CancelledError:
            stream.append(Done("c1", "m1", "cancelled"))
            cancelled.set()

    hubs.owner.run(stream, generate())
    await asyncio.sleep(0)  # the task starts: a cancel can now be delivered into it
    await hubs.settled("s1", 1)
    watcher = await hubs.reader.resume("s1", after=0)

    assert await hubs.reader.request_cancel("s1") is True

    async with asyncio.timeout(5):
        await cancelled.wait()
    entries = await read_all(watcher)
    assert [(entry[0], entry[1]) for entry in entries] == [(1, "start"), (2, "done")]
    assert await hubs.reader.request_cancel("s1") is False  # it has ended


async def test_an_idle_subscriber_gets_its_keepalive_frame_after_a_whole_idle_interval(hubs):
    make_stream(hubs.owner)
    await hubs.settled("s1", 1)
    subscriber = await hubs.reader.resume("s1", after=1, keepalive=True)
    writer = RecordingWriter()
    serving = asyncio.ensure_future(subscriber.serve(writer, entry_frame, b": keepalive\n\n"))
    await asyncio.sleep(0)
    subscriber.keepalive_tick()  # had activity (just subscribed): not yet
    await asyncio.sleep(0)
    assert writer.writes == []
    subscriber.keepalive_tick()  # a whole interval with nothing
    await asyncio.sleep(0)
    assert writer.writes == [[b": keepalive\n\n"]]
    subscriber.abandon()
    await asyncio.wait_for(serving, 5)
    assert subscriber not in hubs.reader.keepalive_targets


async def test_finished_streams_are_kept_within_a_count_so_memory_stays_flat():
    hub = StreamHub(100, retention_seconds=300, retention_max=3)
    for n in range(10):
        stream = hub.create(f"s{n}", "c", "m", "model")

        async def finish(stream: LiveStream = stream) -> None:
            stream.append(Done("c", "m", "end_turn"))

        hub.run(stream, finish())
        await stream.task  # type: ignore[misc]
        await asyncio.sleep(0)  # let the done callback run
    assert sorted(hub.streams) == ["s7", "s8", "s9"]
    with pytest.raises(Exception) as gone:
        hub.subscribe("s0")
    assert getattr(gone.value, "code", None) == "not_resumable"


async def test_finished_streams_expire_in_the_order_they_finished_each_after_the_retention_time():
    hub = StreamHub(100, retention_seconds=0.05, retention_max=100)
    finish_order = ["a", "b", "c"]
    for stream_id in finish_order:
        stream = hub.create(stream_id, "c", "m", "model")

        async def finish(stream: LiveStream = stream) -> None:
            stream.append(Done("c", "m", "end_turn"))

        hub.run(stream, finish())
        await stream.task  # type: ignore[misc]
        await asyncio.sleep(0.02)  # the next one finishes later, so each has its own expiry time
    seen_gone: list[str] = []
    async with asyncio.timeout(5):
        while len(seen_gone) < len(finish_order):
            for stream_id in finish_order:
                if stream_id not in hub.streams and stream_id not in seen_gone:
                    seen_gone.append(stream_id)
            await asyncio.sleep(0.005)  # waiting for the expiry timer, which reschedules itself per stream
    assert seen_gone == finish_order
    assert hub.finished == {} and hub._expiry is None  # no timer left behind once nothing is retained


# --- across instances (Redis only) ------------------------------------------------------------------

needs_redis = pytest.mark.skipif(not REDIS_URL, reason="set TEST_REDIS_URL=redis://127.0.0.1:6379/7 to run")


def kill(hub: StreamHub) -> None:
    """What SIGKILL leaves: the tasks stop, the lease and running list stay in Redis until the lease runs out."""
    from server.redis_hub import RedisStreamHub

    assert isinstance(hub, RedisStreamHub)
    for task in [*hub._tasks, hub._writer, hub._keepalive_task]:
        if task is not None:
            task.cancel()
    for stream in hub.streams.values():
        stream.sink = None  # a dead process writes nothing more


@needs_redis
async def test_an_instance_that_dies_mid_stream_is_ended_as_interrupted_once_for_every_watcher():
    from server.hub import Orphan

    prefix = f"test-{uuid.uuid4().hex[:12]}"
    orphans: list[Orphan] = []

    async def save(orphan: Orphan) -> bool:
        orphans.append(orphan)
        return True

    owner = await open_redis_hub(prefix, lease_seconds=0.3)
    survivors = [await open_redis_hub(prefix, lease_seconds=0.3, on_orphan=save) for _ in range(2)]
    stream = make_stream(owner)
    hubs = [Hubs(owner, survivor) for survivor in survivors]
    generating = asyncio.ensure_future(asyncio.Event().wait())
    try:
        for n in range(3):
            stream.append(Chunk(f"w{n} "))
        watchers = []
        for pair in hubs:
            await pair.settled("s1", 4)
            watchers.append(await pair.reader.resume("s1", after=2))

        kill(owner)

        ends = [await read_all(watcher) for watcher in watchers]
        for entries in ends:
            assert [(entry[0], entry[1]) for entry in entries] == [(3, "chunk"), (4, "chunk"), (5, "error")]
            assert '"code":"interrupted"' in entries[-1][2] and '"messageId":"m1"' in entries[-1][2]
        assert len(orphans) == 1  # one survivor claimed it
        assert (orphans[0].message_id, [e[1] for e in orphans[0].entries]) == ("m1", ["start"] + ["chunk"] * 3)
        assert owner.instance_id not in await survivors[0].live_instances()
    finally:
        generating.cancel()
        for hub in survivors:
            await hub.shutdown(0)
            await hub.close()
        await owner.redis.aclose()
        await owner.reader.aclose()


async def test_an_sse_response_ends_in_the_same_write_as_its_last_event_and_sends_nothing_after():
    from server.transports.sse import EventStreamResponse

    hub = StreamHub(100, retention_seconds=60, queue_limit=10)
    stream = make_stream(hub)
    subscriber = hub.subscribe("s1", after=0, keepalive=True)
    messages: list[dict] = []
    disconnected = asyncio.Event()

    async def receive() -> dict:
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        messages.append(message)
        if message.get("more_body") is False:
            subscriber.keepalive_tick()  # a keepalive sweep right after the end must not add a write
            subscriber.keepalive_tick()

    response = asyncio.ensure_future(EventStreamResponse(subscriber)({"type": "http"}, receive, send))
    await asyncio.sleep(0)
    stream.append(Chunk("hello"))
    await asyncio.sleep(0)
    stream.append(Done("c1", "m1", "end_turn"))
    async with asyncio.timeout(5):
        await response
    disconnected.set()

    bodies = [m for m in messages if m["type"] == "http.response.body"]
    assert [m["more_body"] for m in bodies] == [True] * (len(bodies) - 1) + [False]
    assert b"id: 3\nevent: done\n" in bodies[-1]["body"]  # start, chunk, done
    whole = b"".join(m["body"] for m in bodies)
    assert [line for line in whole.split(b"\n") if line.startswith(b"id: ")] == [b"id: 1", b"id: 2", b"id: 3"]
    assert subscriber not in hub.keepalive_targets and stream.subscribers == []


# --- the folded event log ---------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(limit=st.integers(min_value=1, max_value=200),
       operations=st.lists(st.one_of(
           st.tuples(st.sampled_from(["chunk", "thinking", "cost", "done"]), st.text(max_size=12)),
           st.just("clear")), max_size=400))
def test_the_folded_log_holds_exactly_what_a_plain_bounded_list_would(limit, operations):
    log = EventLog(limit)
    reference: deque[tuple[str, str]] = deque(maxlen=limit)
    for operation in operations:
        if operation == "clear":
            log.clear()
            reference.clear()
        else:
            name, text = operation
            data = json.dumps({"text": text}, ensure_ascii=False)
            log.append(name, data.encode())
            reference.append((name, data))
        assert len(log) == len(reference)
    assert log.last_name() == (reference[-1][0] if reference else None)
    for start in {0, 1, len(reference) // 2, max(len(reference) - 1, 0), len(reference)}:
        assert list(log.entries(start)) == list(reference)[start:]
        # What the Redis copy sends: names and data alternating, from the open block alone when it holds them
        # (a mutation of that shortcut's first index, or of its test, fails here).
        lines = [bytes(part).decode() for part in log.lines(start)]
        assert list(zip(lines[::2], lines[1::2], strict=True)) == list(reference)[start:]


async def test_text_with_newlines_and_every_kind_of_separator_reaches_the_reader_exactly(hubs):
    """Each event travels to Redis as lines of one argument (name, then JSON data). Fails if an event's data could
    hold a raw newline (data not JSON-escaped) or the script split it anywhere but at the lines it writes."""
    texts = ["a\nb", "\r\n\r\n", "\u2028\u2029", "tab\tand \"quotes\" \\ back", "日本語 ünï", "\n", "data: x\n\n"]
    stream = make_stream(hubs.owner)
    for text in texts:
        stream.append(Chunk(text))
    stream.append(Done("c1", "m1", "end_turn"))
    copy = await hubs.settled("s1", len(texts) + 2)
    assert [json.loads(data)["text"] for name, data in copy.log.entries(1) if name == "chunk"] == texts


@pytest.mark.skipif(not REDIS_URL, reason="set TEST_REDIS_URL=redis://127.0.0.1:6379/7 to run the hub tests on Redis")
async def test_events_that_arrive_within_the_write_interval_share_one_redis_write():
    """50 events 1 ms apart with a 100 ms write interval reach Redis in a few writes. Fails (about 50 writes) if
    the write loop no longer waits out the interval after a write."""
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    owner = await open_redis_hub(prefix, write_interval=0.1)
    reader = await open_redis_hub(prefix)
    writes = 0
    write = owner._write  # type: ignore[attr-defined]

    async def counted(copies):  # type: ignore[no-untyped-def]
        nonlocal writes
        writes += 1
        await write(copies)

    owner._write = counted  # type: ignore[attr-defined]
    try:
        stream = make_stream(owner)
        for n in range(50):
            stream.append(Chunk(f"w{n}"))
            await asyncio.sleep(0.001)
        stream.append(Done("c1", "m1", "end_turn"))
        copy = await Hubs(owner, reader).settled("s1", 52)
        assert [data for name, data in copy.log.entries(1) if name == "chunk"] == [
            f'{{"text":"w{n}"}}' for n in range(50)]
        assert writes <= 3
    finally:
        for hub in (owner, reader):
            await hub.shutdown(0)
            await hub.close()


@pytest.mark.skipif(not REDIS_URL, reason="set TEST_REDIS_URL=redis://127.0.0.1:6379/7 to run the hub tests on Redis")
async def test_the_running_list_holds_each_running_answers_latest_usage_and_lets_go_of_a_finished_one():
    """What a survivor saves a dead instance's answers with: the running list (a Redis hash) has each running
    stream's message and its latest usage, taken in the same script call as the events, and loses a stream once
    its last event is in. Fails if the script's HSET of usage copies or its HDEL of ended streams is dropped, or
    if a usage change no longer moves the mark that sends the copy again."""
    from server.protocol.answer import AnswerState
    from server.protocol.anthropic import ReplyState

    prefix = f"test-{uuid.uuid4().hex[:12]}"
    owner = await open_redis_hub(prefix)
    running = f"{prefix}:running:{owner.instance_id}"  # type: ignore[attr-defined]

    async def listed() -> dict[str, dict]:
        return {key.decode(): json.loads(value)
                for key, value in (await owner.redis.hgetall(running)).items()}  # type: ignore[attr-defined]

    async def until(check) -> dict[str, dict]:  # type: ignore[no-untyped-def]
        async with asyncio.timeout(5):
            while not check(entries := await listed()):  # noqa: ASYNC110 - the state is in Redis: polled
                await asyncio.sleep(0.01)
        return entries

    def started(stream_id: str) -> LiveStream:
        stream = make_stream(owner, stream_id=stream_id)
        stream.reply = AnswerState(ReplyState("claude-haiku-4-5"))
        stream.reply.current.feed("message_start", json.dumps(
            {"type": "message_start", "message": {"id": "m", "usage": {"input_tokens": 11, "output_tokens": 1}}}))
        stream.append(Chunk("a"))
        return stream

    try:
        first, second = started("s1"), started("s2")
        entries = await until(lambda entries: {"s1", "s2"} <= set(entries))
        assert entries["s1"]["messageId"] == "m1" and entries["s1"]["usage"]["input_tokens"] == 11
        first.reply.current.feed("message_delta", json.dumps(  # type: ignore[union-attr]
            {"type": "message_delta", "delta": {}, "usage": {"output_tokens": 7}}))
        first.append(Chunk("b"))
        await until(lambda entries: entries.get("s1", {}).get("usage", {}).get("output_tokens") == 7)
        second.append(Done("c1", "m1", "end_turn"))
        entries = await until(lambda entries: "s2" not in entries)
        assert set(entries) == {"s1"}
    finally:
        await owner.shutdown(0)
        await owner.close()
