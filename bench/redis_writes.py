"""What copying every event to Redis costs the generating instance: CPU per chunk, against the in-process hub.

    taskset -c 0 .venv/bin/python -m bench.redis_writes --redis-url redis://127.0.0.1:6379/7 \
        [--streams 500] [--chunks 40] [--intervals-ms 2,10]

N streams of the RedisStreamHub each get one chunk every 50 ms (20 deltas/s, spread evenly over the 50 ms), as
the capacity workload sends them, with the writer's interval (RELAY_REDIS_WRITE_MS) set to each value given; the
same load on the in-process StreamHub is the floor. Printed per case: this process's CPU per chunk (user +
system, under uvloop, as the relay runs) and the number of writes. No upstream, no HTTP: only the hub and its
Redis copy, so the difference is the copy's own cost. Run it pinned to one core, with Redis on the other, and
compare figures from one invocation (the machine's speed moves between runs). Its keys expire 60 s after the run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid

import uvloop

from server.events import Chunk, Done, Start
from server.hub import StreamHub
from server.protocol.answer import AnswerState
from server.protocol.anthropic import ReplyState
from server.redis_hub import RedisStreamHub

TICK_S = 0.05  # one chunk per stream per tick: 20 deltas/s
SLICES = 25  # the streams' chunks of a tick, spread over this many equal slices of it


async def measure(hub: StreamHub, streams: int, chunks: int) -> float:
    """This process's CPU seconds for `chunks` paced chunks on each of `streams` streams, and their end."""
    running = []
    for n in range(streams):
        stream = hub.create(f"bench-{uuid.uuid4().hex}", "conversation", f"message-{n}", "claude-sonnet-4-5")
        stream.reply = AnswerState(ReplyState("claude-sonnet-4-5"))
        stream.append(Start(stream.id, "conversation", "claude-sonnet-4-5", stream.message_id))
        running.append(stream)
    await asyncio.sleep(0.2)
    began = time.process_time()
    for _ in range(chunks):
        for k in range(SLICES):
            for stream in running[k::SLICES]:
                stream.append(Chunk("hello world "))
            await asyncio.sleep(TICK_S / SLICES)
    for stream in running:
        stream.append(Done("conversation", stream.message_id, "end_turn"))  # ends the stream
    await asyncio.sleep(0.3)  # the last writes
    return time.process_time() - began


class CountingHub(RedisStreamHub):
    writes = 0

    async def _write(self, copies):  # type: ignore[no-untyped-def]
        self.writes += 1
        await super()._write(copies)


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.redis_writes", description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--chunks", type=int, default=40)
    parser.add_argument("--intervals-ms", default="2,10")
    args = parser.parse_args(argv)
    total = args.streams * args.chunks
    floor = await measure(StreamHub(2000, 60), args.streams, args.chunks)
    print(f"in-process hub: {floor / total * 1e6:.1f} us CPU per chunk ({args.streams} streams x {args.chunks})")
    for interval in (float(value) for value in args.intervals_ms.split(",")):
        hub = CountingHub(args.redis_url, 2000, 60, prefix=f"bench-writes-{os.getpid()}",
                          write_interval=interval / 1000)
        await hub.open()
        try:
            cpu = await measure(hub, args.streams, args.chunks)
        finally:
            await hub.close()
        print(f"Redis copy, writes at least {interval:g} ms apart: {cpu / total * 1e6:.1f} us CPU per chunk "
              f"(+{(cpu - floor) / total * 1e6:.1f} over the in-process hub), {hub.writes} writes")
    return 0


if __name__ == "__main__":
    sys.exit(uvloop.run(main()))
