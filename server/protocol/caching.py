"""Prompt caching: where a Messages API request marks its cache breakpoints, and the API's rules for them.

Pure: no I/O. The relay marks explicit block breakpoints (`cache_control` on content blocks) rather than
the request-level automatic `cache_control`: block breakpoints are documented for every model in the price
table, while the automatic form is newer and always sits on the last block, so it cannot keep a breakpoint
off a prefix below the model's minimum, nor give the system prompt its own entry that every conversation of
an agent shares. Rules from https://platform.claude.com/docs/en/build-with-claude/prompt-caching (read
2026-12-02): at most 4 breakpoints a request; `type` is `ephemeral`, `ttl` is `5m` (the default) or `1h`; a
`1h` breakpoint may not come after a `5m` one; a hit is looked for at the breakpoint and at the block
boundaries up to 20 blocks before it, so turn N+1's breakpoint finds the prefix turn N wrote.

`cache_marked` places at most two breakpoints: the system prompt (shared by every conversation of the agent)
and the newest user message (the prefix the next turn reads back). Each is left out when the prefix it ends
is estimated below the model's minimum (MIN_CACHEABLE_TOKENS). The estimate is server/protocol/tokens.py's
rule, one token per 4 UTF-8 bytes: Claude's tokenizer gives ordinary text more tokens than that, so a
prefix estimated at the minimum is at least that long; one just above it may stay unmarked for a turn.
"""

from __future__ import annotations

from typing import Any

from ..pricing import min_cacheable_tokens
from .tokens import prefix_tokens

PROMPT_CACHE_MODES = ("off", "5m", "1h")
MAX_BREAKPOINTS = 4
TTLS = ("5m", "1h")
#: Block boundaries before a breakpoint at which the API looks for an earlier cache entry.
LOOKBACK_BLOCKS = 20


def cache_control(mode: str) -> dict[str, str]:
    """The breakpoint marker for `mode` ("5m" or "1h")."""
    return {"type": "ephemeral", "ttl": "1h"} if mode == "1h" else {"type": "ephemeral"}


def _marked(block: Any, marker: dict[str, str]) -> dict[str, Any]:
    """A copy of the content block (a string is a text block) with the marker on it."""
    copy = {"type": "text", "text": block} if isinstance(block, str) else dict(block)
    copy["cache_control"] = marker
    return copy


def cache_marked(payload: dict[str, Any], mode: str) -> dict[str, Any]:
    """The request body `payload` with its breakpoints for `mode`; `payload` itself is not changed.

    Marks the system prompt's last block and the newest user message's last block, each only when the
    estimated tokens up to and including it reach the model's minimum. "off", or nothing long enough:
    `payload` as it is.
    """
    if mode not in TTLS:
        return payload
    minimum = min_cacheable_tokens(str(payload.get("model", "")))
    totals = prefix_tokens(payload)
    marker = cache_control(mode)
    result = dict(payload)
    system = payload.get("system")
    system_blocks = (1 if system else 0) if not isinstance(system, list) else len(system)
    if system_blocks and totals[system_blocks - 1][1] >= minimum:
        result["system"] = ([*system[:-1], _marked(system[-1], marker)] if isinstance(system, list)
                            else [_marked(system, marker)])
    messages = list(payload.get("messages") or [])
    newest = next((i for i in range(len(messages) - 1, -1, -1) if messages[i].get("role") == "user"), None)
    if newest is None:
        return result
    content = messages[newest].get("content")
    blocks = content if isinstance(content, list) else [content] if content else []
    if not blocks:
        return result
    # The running total after the newest user message's last block: the blocks before it, in reading order.
    position = system_blocks - 1 + sum(_block_count(m) for m in messages[:newest + 1])
    if totals[position][1] < minimum:
        return result
    message = dict(messages[newest])
    message["content"] = [*blocks[:-1], _marked(blocks[-1], marker)]
    messages[newest] = message
    result["messages"] = messages
    return result


def _block_count(message: Any) -> int:
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, list):
        return len(content)
    return 1 if content else 0


def breakpoints(request: dict[str, Any]) -> list[tuple[int, Any]]:
    """Every (reading-order block index, cache_control value) of the request, in reading order.

    The request-level automatic `cache_control` counts as a breakpoint on the last block.
    """
    blocks = [block for block, _ in prefix_tokens(request)]
    found = [(index, block["cache_control"]) for index, block in enumerate(blocks)
             if isinstance(block, dict) and "cache_control" in block]
    if "cache_control" in request and blocks:
        last = len(blocks) - 1
        if not any(index == last for index, _ in found):
            found.append((last, request["cache_control"]))
    return found


def breakpoint_errors(request: dict[str, Any]) -> list[str]:
    """What the Messages API would refuse (400 invalid_request_error) in the request's breakpoints; empty: none.

    At most MAX_BREAKPOINTS; each `{"type": "ephemeral"}` with an optional `ttl` of 5m or 1h; no 1h after a 5m.
    """
    errors: list[str] = []
    marks = breakpoints(request)
    if len(marks) > MAX_BREAKPOINTS:
        errors.append(f"A maximum of {MAX_BREAKPOINTS} blocks with cache_control may be provided."
                      f" Found {len(marks)}.")
    seen_5m = False
    for _, mark in marks:
        if not isinstance(mark, dict) or mark.get("type") != "ephemeral":
            errors.append("cache_control.type: Input should be 'ephemeral'")
            continue
        ttl = mark.get("ttl", "5m")
        if ttl not in TTLS:
            errors.append(f"cache_control.ttl: Input should be '5m' or '1h', got {ttl!r}")
        elif ttl == "1h" and seen_5m:
            errors.append("a ttl='1h' cache_control block must not come after a ttl='5m' cache_control block")
        seen_5m = seen_5m or ttl == "5m"
    return errors
