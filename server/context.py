"""Context-window management: how many input tokens a request will have, and which history fits the model.

Pure: no I/O, no await. The core asks `ContextWindow.fit` before each upstream call and tells it what the
upstream counted afterwards (`Fitting.learn`); transports never see this module.

The estimate. A request is the system prompt and a list of messages (`history`). What the upstream already
counted is taken from the upstream: the previous answer's reported input tokens (input + cache writes + cache
reads) cover the system prompt and every message before that answer, and a refusal's "prompt is too long: N
tokens" covers the request it refused. What was added since is estimated with one conservative rule:
one token per BYTES_PER_TOKEN UTF-8 bytes, rounded up, plus MESSAGE_ALLOWANCE tokens a message. Claude's
tokenizer is not published; the rule is chosen to over-count ordinary text, which takes more bytes a token
than 3 (its margin). A text denser than 3 bytes a token is under-counted: the upstream then
refuses with "prompt is too long", which is mapped to `context_too_long`, learned from, and retried once
with a shorter history (see server/core.py).

When older turns are dropped, the counted part that remains is scaled by its share of the estimate (the
upstream gave one figure for the whole request, not one per message).

A refusal also names the window ("> M maximum"): a smaller one than the table's (a beta, a proxy in front of
the API) is kept for the conversation.

Sources (checked 2025-11-24, see server/pricing.py LIMITS_SOURCE): each model's context window and max
output; "The context window refers to all the text a language model can reference when generating a
response, including the response itself" (https://platform.claude.com/docs/en/build-with-claude/context-windows),
and the API refuses input + max_tokens over the window with 400 "input length and `max_tokens` exceed
context limit: N + K > M" (seen on Claude 3.7 to 4.5: continuedev/continue#8454), an input alone over it with
"prompt is too long: N tokens > M maximum" (earendil-works/pi#102, claude-opus-4-5).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from .attachments import block_estimate
from .errors import ContextTooLongError, TooLargeError
from .pricing import model_limits

#: The conservative rule for text the upstream has not counted yet: one token per this many UTF-8 bytes.
BYTES_PER_TOKEN = 3
#: Tokens a message costs beyond its text (role and turn markers), over-counted as its text is.
MESSAGE_ALLOWANCE = 8
#: A saved answer's input tokens are taken for its whole history only if they average at most this many bytes.
SAVED_BYTES_PER_TOKEN = 6
#: With RELAY_COUNT_TOKENS, a plan whose estimate and max_tokens come this close to the window (a share of it)
#: is counted by the API before it is sent.
COUNT_MARGIN = 0.1
#: Conversations whose last count is remembered in one process (the least recently used one is forgotten).
REMEMBERED_CONVERSATIONS = 10_000


def estimate_text(text: str) -> int:
    """The conservative estimate of a text's tokens: one per BYTES_PER_TOKEN UTF-8 bytes, rounded up."""
    return -(-len(text.encode()) // BYTES_PER_TOKEN)


def estimate_message(message: dict[str, Any]) -> int:
    """A message's conservative estimate: its text (a string, or its blocks' texts) plus MESSAGE_ALLOWANCE, and
    its images and PDFs by server.attachments.block_estimate (per image, per PDF page: not their base64)."""
    content = message.get("content", "")
    files = 0
    if isinstance(content, list):
        parts: list[str] = []
        for block in content:
            counted = block_estimate(block) if isinstance(block, dict) else None
            if counted is not None:
                files += counted
            else:
                parts.append(str(block.get("text", block)) if isinstance(block, dict) else str(block))
        text = "".join(parts)
    else:
        text = str(content)
    return estimate_text(text) + files + MESSAGE_ALLOWANCE


def _digest(system: str, messages: list[dict[str, Any]]) -> bytes:
    hasher = hashlib.blake2b(system.encode(), digest_size=16)
    for message in messages:
        hasher.update(b"\x00" + str(message.get("role")).encode() + b"\x00" + str(message.get("content")).encode())
    return hasher.digest()


@dataclass(frozen=True, slots=True)
class Counted:
    """The upstream's count of one request: the system prompt and history[start:end] were `tokens` tokens.

    `digest` identifies the system prompt and those messages, so a count is only applied to the same text.
    """

    start: int
    end: int
    tokens: int
    digest: bytes

    @classmethod
    def of(cls, system: str, history: list[dict[str, Any]], start: int, end: int, tokens: int) -> Counted:
        return cls(start, end, tokens, _digest(system, history[start:end]))

    @classmethod
    def saved(cls, system: str, history: list[dict[str, Any]], end: int, tokens: int) -> Counted | None:
        """The count an answer's saved usage gives for the system prompt and history[:end] (the messages before
        it), or None when the figure is too small to be that whole request (no text averages more than
        SAVED_BYTES_PER_TOKEN bytes a token): that answer's own request was truncated."""
        size = len(system.encode()) + sum(len(str(message.get("content", "")).encode()) for message in history[:end])
        if tokens <= 0 or tokens * SAVED_BYTES_PER_TOKEN < size:
            return None
        return cls.of(system, history, 0, end, tokens)

    def applies_to(self, system: str, history: list[dict[str, Any]]) -> bool:
        return self.end <= len(history) and self.digest == _digest(system, history[self.start:self.end])


@dataclass(frozen=True, slots=True)
class Plan:
    """What one upstream call sends: history[dropped:], and its estimated input tokens."""

    messages: list[dict[str, Any]]
    dropped: int  # the oldest messages of the history not sent (`truncatedMessages`)
    input_tokens: int  # the estimate for the request sent
    context_window: int


class ContextWindow:
    """Fits conversations into their model's window and remembers, per conversation, the upstream's last count.

    The memory is per process and bounded (REMEMBERED_CONVERSATIONS); without it (a restart, another
    instance) the previous answer's saved usage is the count (see `fit`'s `stored`).
    """

    def __init__(self, remembered: int = REMEMBERED_CONVERSATIONS) -> None:
        self._counts: OrderedDict[str, Counted] = OrderedDict()
        self._windows: dict[str, int] = {}  # a window an upstream refusal reported, smaller than the table's
        self._limit = remembered

    def remember(self, conversation_id: str, counted: Counted, window: int | None = None) -> None:
        """The upstream counted this conversation's request so (and, refusing it, named its window): later
        estimates start from it."""
        self._counts[conversation_id] = counted
        self._counts.move_to_end(conversation_id)
        if window is not None:
            self._windows[conversation_id] = min(window, self._windows.get(conversation_id, window))
        while len(self._counts) > self._limit:
            forgotten, _ = self._counts.popitem(last=False)
            self._windows.pop(forgotten, None)

    def counted(self, conversation_id: str | None) -> Counted | None:
        return None if conversation_id is None else self._counts.get(conversation_id)

    def fit(self, conversation_id: str | None, model: str, system: str, history: list[dict[str, Any]],
            max_tokens: int, policy: str, stored: Counted | None = None) -> Plan:
        """The history to send so that input + max_tokens fits the model's window.

        Under "truncate" the oldest messages are dropped two at a time (a user message and its answer, so the
        request still starts with a user message); the system prompt and the last user message (with what
        follows it: a continued answer) are never dropped. Under "error" nothing is dropped.

        Args:
            stored: the count the database gives (the previous answer's usage), used when this process
                remembers none for the conversation.

        Raises:
            TooLargeError (too_large): the system prompt and the last user message alone do not fit.
            ContextTooLongError (context_too_long, details inputTokens and contextWindow): under "error",
                the whole history does not fit.
        """
        window = model_limits(model).context_window
        if conversation_id is not None and conversation_id in self._windows:
            window = min(window, self._windows[conversation_id])
        room = window - max_tokens
        # What this process remembers is newer than what the database gives: the database's only without it.
        count = self.counted(conversation_id) or stored
        counts = [count] if count is not None and count.applies_to(system, history) else []
        sizes = [estimate_message(message) for message in history]
        last_user = max((i for i, m in enumerate(history) if m.get("role") == "user"), default=0)
        system_tokens = estimate_text(system)

        def estimate(start: int) -> int:
            for count in counts:
                if count.start <= start < count.end:
                    # The counted part still sent, scaled by its share of the estimate of what was counted.
                    whole = system_tokens + sum(sizes[count.start:count.end])
                    kept = system_tokens + sum(sizes[start:count.end])
                    return -(-count.tokens * kept // whole) + sum(sizes[count.end:])
            return system_tokens + sum(sizes[start:])

        full = estimate(0)
        alone = estimate(last_user)
        if alone > room:
            raise TooLargeError(f"this message needs about {alone} tokens with the system prompt, and the model's"
                                f" context window is {window} tokens with {max_tokens} kept for the answer: send"
                                " a shorter message", details={"inputTokens": alone, "contextWindow": window})
        if full <= room:
            return Plan(history, 0, full, window)
        if policy == "error":
            raise ContextTooLongError(
                f"this conversation needs about {full} input tokens and the model's context window is {window}"
                f" tokens with {max_tokens} kept for the answer: start a new conversation",
                details={"inputTokens": full, "contextWindow": window})
        start = 0
        while start + 2 <= last_user and estimate(start) > room:
            start += 2
        return Plan(history[start:], start, estimate(start), window)


@dataclass(slots=True)
class Fitting:
    """One answer's context: the plan sent, and how to plan again after the upstream counted or refused it."""

    manager: ContextWindow
    conversation_id: str
    model: str
    system: str
    history: list[dict[str, Any]]
    max_tokens: int
    policy: str
    stored: Counted | None = None
    count: bool = False  # ask the API's token count when the plan is near the window (see near_limit)
    plan: Plan = field(init=False)

    def __post_init__(self) -> None:
        self.plan = self.manager.fit(self.conversation_id, self.model, self.system, self.history,
                                     self.max_tokens, self.policy, self.stored)

    def near_limit(self) -> bool:
        """Whether the API's count is asked for: counting is on and the plan's estimate with max_tokens is
        within COUNT_MARGIN of the window, where a denser text than the rule assumes could not fit."""
        plan = self.plan
        return self.count and plan.input_tokens + self.max_tokens > plan.context_window * (1 - COUNT_MARGIN)

    def learn(self, tokens: int, window: int | None = None) -> None:
        """The upstream counted the plan's request at `tokens` input tokens (its usage, or its refusal's figure,
        with the `window` the refusal named)."""
        start = self.plan.dropped
        self.manager.remember(self.conversation_id,
                              Counted.of(self.system, self.history, start, len(self.history), tokens), window)

    def refit(self) -> Plan:
        """Plan again from what was learned (see `learn`); the new plan is kept.

        Raises:
            TooLargeError, ContextTooLongError: as ContextWindow.fit.
        """
        self.plan = self.manager.fit(self.conversation_id, self.model, self.system, self.history,
                                     self.max_tokens, self.policy)
        return self.plan
