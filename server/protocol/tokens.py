"""The emulated tokenizer: how the offline model and `server.mock_upstream` count a request's tokens.

Pure: no I/O. It is not Claude's tokenizer (that one is not published); it is one fixed rule, so that tests
can compute the exact figures an emulated answer reports (input, cache writes, cache reads):

- a text is one token per 4 UTF-8 bytes, rounded up (`text_tokens`);
- each message costs MESSAGE_OVERHEAD tokens plus its content blocks; a text block costs its text, any other
  block (an image, a document, a tool call) costs `text_tokens` of its compact JSON;
- the system prompt costs its text (a string, or the sum of its text blocks), with no overhead.

`prefix_tokens` gives the running total after each block of a request in the order the API reads them
(system, then each message's blocks), which is what prompt-cache emulation needs: a cache breakpoint on a
block covers every token up to and including that block.
"""

from __future__ import annotations

from typing import Any

import orjson

#: Tokens each message costs beyond its content (the role and the turn markers of a real tokenizer).
MESSAGE_OVERHEAD = 4


def text_tokens(text: str) -> int:
    """One token per 4 UTF-8 bytes, rounded up; an empty text is 0."""
    return (len(text.encode()) + 3) // 4


def block_tokens(block: Any) -> int:
    """A content block's tokens: a text block's text, any other block's compact JSON (cache_control excluded)."""
    if isinstance(block, str):
        return text_tokens(block)
    if not isinstance(block, dict):
        return 0
    if block.get("type") == "text":
        return text_tokens(str(block.get("text", "")))
    rest = {key: value for key, value in block.items() if key != "cache_control"}
    return text_tokens(orjson.dumps(rest, option=orjson.OPT_SORT_KEYS).decode())


def content_blocks(content: Any) -> list[Any]:
    """The blocks this rule counts in a message's (or the system prompt's) content: a list's items, or a
    non-empty string (or other value) alone."""
    if isinstance(content, list):
        return content
    return [content] if content else []


def prefix_tokens(request: dict[str, Any]) -> list[tuple[Any, int]]:
    """Each block of the request with the request's token count up to and including it, in reading order.

    The system prompt's blocks come first (a string system prompt is one block), then each message's: its
    first block's total includes the message's MESSAGE_OVERHEAD. A message with no content contributes
    its overhead to the next block's total.
    """
    totals: list[tuple[Any, int]] = []
    running = 0
    for block in content_blocks(request.get("system")):
        running += block_tokens(block)
        totals.append((block, running))
    for message in request.get("messages") or []:
        running += MESSAGE_OVERHEAD
        for block in content_blocks(message.get("content") if isinstance(message, dict) else None):
            running += block_tokens(block)
            totals.append((block, running))
    return totals


def request_tokens(request: dict[str, Any]) -> int:
    """The request's input tokens under the emulated rule: system, every message's overhead and blocks."""
    total = sum(block_tokens(block) for block in content_blocks(request.get("system")))
    for message in request.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        total += MESSAGE_OVERHEAD + sum(block_tokens(block) for block in content_blocks(content))
    return total
