"""The hub's log and subscribers, in one event loop: numbering, replay, bounds, keepalive."""

from __future__ import annotations

import asyncio

import pytest

from server.errors import GoneError
from server.events import Chunk, Done
from server.hub import StreamHub, SubscriberDropped


def make_stream(log_limit: int = 100, queue_limit: int = 10):
    hub = StreamHub(log_limit, retention_seconds=60, queue_limit=queue_limit)
    return hub, hub.create("s1", "c1", "m1", "model")


async def read_all(subscriber) -> list:
    entries = []
    async with asyncio.timeout(5):
        async for batch in subscriber.batches():
            entries += batch
    return entries


async def test_a_subscriber_gets_the_backlog_then_live_events_with_no_gap_or_duplicate():
    hub, stream = make_stream()
    for n in range(3):
        stream.append(Chunk(f"w{n}"))
    subscriber = hub.subscribe("s1", after=1)
    stream.append(Chunk("w3"))
    stream.append(Done("c1", "m1", "end_turn"))

    entries = await read_all(subscriber)

    assert [entry[0] for entry in entries] == [2, 3, 4, 5]
    assert entries[-1][1] == "done"


async def test_a_reader_that_never_reads_is_dropped_at_its_bound_and_holds_no_more():
    hub, stream = make_stream(log_limit=10_000, queue_limit=10)
    stuck = hub.subscribe("s1", after=0)
    for n in range(1000):
        stream.append(Chunk(f"w{n}"))
        assert len(stuck.pending) <= 10
    assert stuck.dropped and stuck.pending == []
    with pytest.raises(SubscriberDropped):
        await read_all(stuck)
    # It may resume from the log where it was.
    assert len(await asyncio.wait_for(_first_batch(hub.subscribe("s1", after=990)), 5)) == 10


async def _first_batch(subscriber):
    async for batch in subscriber.batches():
        return batch


def test_cursors_outside_the_log_are_not_resumable():
    hub, stream = make_stream(log_limit=5)
    for n in range(20):
        stream.append(Chunk(f"w{n}"))
    with pytest.raises(GoneError):
        hub.subscribe("s1", after=21)
    with pytest.raises(GoneError):
        hub.subscribe("s1", after=3)
    assert hub.subscribe("s1", after=15).pending[0][0] == 16


async def test_an_idle_subscriber_gets_an_empty_batch_as_keepalive_after_a_whole_idle_interval():
    hub, stream = make_stream()
    subscriber = hub.subscribe("s1", after=0, keepalive=True)
    subscriber.keepalive_tick()  # had activity (just subscribed): not yet
    assert not subscriber.keepalive_due
    subscriber.keepalive_tick()  # a whole interval with nothing
    batches = subscriber.batches()
    assert await asyncio.wait_for(anext(batches), 5) == []
    await batches.aclose()
    assert subscriber not in hub.keepalive_targets


async def test_finished_streams_are_kept_within_a_count_so_memory_stays_flat():
    hub = StreamHub(100, retention_seconds=300, retention_max=3)
    for n in range(10):
        stream = hub.create(f"s{n}", "c", "m", "model")

        async def finish(stream=stream) -> None:
            stream.append(Done("c", "m", "end_turn"))

        hub.run(stream, finish())
        await stream.task
        await asyncio.sleep(0)  # let the done callback run
    assert sorted(hub.streams) == ["s7", "s8", "s9"]
    with pytest.raises(Exception) as gone:
        hub.subscribe("s0")
    assert getattr(gone.value, "code", None) == "not_resumable"


async def test_an_sse_response_ends_in_the_same_write_as_its_last_event_and_sends_nothing_after():
    from server.transports.sse import EventStreamResponse

    hub, stream = make_stream()
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
    assert [m["more_body"] for m in bodies] == [True, False]
    assert bodies[-1]["body"].startswith(b"id: 2\nevent: done\n")
    assert subscriber not in hub.keepalive_targets and stream.subscribers == []
