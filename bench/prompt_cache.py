"""What prompt caching saves: the same 20-turn conversation with RELAY_PROMPT_CACHE off and on.

    .venv/bin/python -m bench.prompt_cache [--turns 20] [--mode 5m|1h]

Each run is the whole relay in-process (create_app on a temporary SQLite file, answers streamed over SSE
through httpx's ASGI transport) against the offline model, whose emulated prompt cache
(server/upstream/offline.py, PromptCache) counts tokens by server/protocol/tokens.py's rule. The agent has a
system prompt of SYSTEM_BYTES bytes (a support agent's instructions and reference text: over the offline
model's 4,096-token minimum, as Claude Haiku 4.5's); every user message is the same length. It prints, per
run, the tokens the `cost` events reported (input, cache writes, cache reads) and the exact total cost, then
what caching saved. The figures depend on nothing but the rule, so tests/test_prompt_cache.py asserts them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import httpx
from httpx_sse import aconnect_sse

from server.app import create_app
from server.config import load_settings
from server.upstream.offline import OfflineOptions, OfflineTransport

TURNS = 20
_PARAGRAPH = ("You answer questions about the Acme 3000 espresso machine: its parts, its cleaning cycle, its"
              " error codes and its warranty. Quote the manual where you can and say so when you cannot. ")
SYSTEM_BYTES = 20_000
SYSTEM_PROMPT = (_PARAGRAPH * (SYSTEM_BYTES // len(_PARAGRAPH) + 1))[:SYSTEM_BYTES]


def user_message(turn: int) -> str:
    """The user's message of turn `turn` (1-based): 200 bytes, different each turn."""
    return f"Turn {turn:02d}: what does the manual say about descaling, and how often should I do it? ".ljust(200, ".")


@dataclass
class Run:
    """One conversation's totals, summed from its answers' `cost` events."""

    mode: str
    answers: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_write_tokens: int = 0
    cache_read_tokens: int = 0
    cost: Decimal = field(default_factory=Decimal)


async def conversation(mode: str, turns: int = TURNS, directory: Path | None = None) -> Run:
    """Run one conversation of `turns` turns with RELAY_PROMPT_CACHE=`mode`; its totals."""
    with tempfile.TemporaryDirectory() as scratch:
        database = f"sqlite:///{directory or Path(scratch)}/prompt-cache-{mode}.db"
        settings = load_settings({}, database_url=database, system_prompt=SYSTEM_PROMPT, prompt_cache=mode,
                                 offline_delay_ms=0.0)
        app = create_app(settings, OfflineTransport(OfflineOptions(delay_ms=0)))
        run = Run(mode)
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1", timeout=60) as client:
            conversation_id = None
            for turn in range(1, turns + 1):
                body: dict[str, str] = {"message": user_message(turn)}
                if conversation_id is not None:
                    body["conversationId"] = conversation_id
                async with aconnect_sse(client, "POST", "/api/command-center/message", json=body) as source:
                    source.response.raise_for_status()
                    async for event in source.aiter_sse():
                        data = json.loads(event.data, parse_float=Decimal)
                        if event.event == "start":
                            conversation_id = data["conversationId"]
                        elif event.event == "error":
                            raise RuntimeError(f"turn {turn}: {data}")
                        elif event.event == "cost":
                            run.answers += 1
                            run.input_tokens += data["inputTokens"]
                            run.output_tokens += data["outputTokens"]
                            run.cache_write_tokens += data["cacheCreationInputTokens"]
                            run.cache_read_tokens += data["cacheReadInputTokens"]
                            run.cost += Decimal(data["totalCost"])
        return run


def report(off: Run, on: Run) -> str:
    lines = [f"{'prompt cache':<13} {'answers':>7} {'input':>8} {'cache write':>11} {'cache read':>10}"
             f" {'output':>7} {'cost (USD)':>12}"]
    for run in (off, on):
        lines.append(f"{run.mode:<13} {run.answers:>7} {run.input_tokens:>8} {run.cache_write_tokens:>11}"
                     f" {run.cache_read_tokens:>10} {run.output_tokens:>7} {format(run.cost, 'f'):>12}")
    saved = off.cost - on.cost
    lines.append(f"caching {on.mode} saved ${format(saved, 'f')}: {saved / off.cost:.1%} of the uncached cost")
    return "\n".join(lines)


async def main_async(turns: int, mode: str) -> None:
    off = await conversation("off", turns)
    on = await conversation(mode, turns)
    print(f"{turns} turns, system prompt {SYSTEM_BYTES} bytes, user messages 200 bytes, model deltarelay-offline")
    print(report(off, on))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.prompt_cache", description=__doc__.split("\n")[0])
    parser.add_argument("--turns", type=int, default=TURNS)
    parser.add_argument("--mode", choices=("5m", "1h"), default="5m", help="the caching run's TTL")
    args = parser.parse_args()
    asyncio.run(main_async(args.turns, args.mode))


if __name__ == "__main__":
    main()
