"""AnswerState: one answer across its upstream requests (a tool loop's rounds), summed.

Pure: no I/O, no await. Each round is a ReplyState; the answer's text and thinking are the rounds' joined,
its usage and cost the exact sum over them, and `messages` the API messages the rounds made (each round's
assistant content, the tool results sent back), which is what the answer stands for in later requests.
"""

from __future__ import annotations

from dataclasses import fields
from decimal import Decimal
from typing import Any

from ..events import Cost
from ..pricing import Usage
from .anthropic import ReplyState

_USAGE_FIELDS = tuple(f.name for f in fields(Usage))


def append_message(messages: list[dict[str, Any]], role: str, content: list[dict[str, Any]]) -> None:
    """Add a message to `messages`, merged into the last one when it has the same role (the API alternates)."""
    if not content:
        return
    if messages and messages[-1]["role"] == role:
        earlier = messages[-1]["content"]
        earlier = [{"type": "text", "text": earlier}] if isinstance(earlier, str) else list(earlier)
        messages[-1] = {"role": role, "content": earlier + content}
    else:
        messages.append({"role": role, "content": list(content)})


class AnswerState:
    """The rounds of one answer, the current one last; the core starts each round and records its messages."""

    def __init__(self, first: ReplyState) -> None:
        self.rounds: list[ReplyState] = [first]
        self.messages: list[dict[str, Any]] = []
        self.recorded = False  # the current round's content is in `messages`
        self.tools_running = False  # between a tool_use stop and the round that takes the results
        self.tool_calls = 0
        self.tool_errors = 0
        self._rounds_changed = 0  # rounds replaced or added: with the current round's reports, `usage_mark`

    @property
    def current(self) -> ReplyState:
        return self.rounds[-1]

    def retry(self, reply: ReplyState) -> None:
        """The current round again, from nothing (its failed attempt sent no content): `reply` replaces it."""
        self.rounds[-1] = reply
        self._rounds_changed += 1

    def next_round(self, reply: ReplyState) -> None:
        """The current round is recorded; `reply` is the next request's."""
        self.rounds.append(reply)
        self._rounds_changed += 1
        self.recorded = False
        self.tools_running = False

    def record(self, role: str = "assistant", content: list[dict[str, Any]] | None = None) -> None:
        """Add a message: by default the current round's own content (content_blocks())."""
        if content is None:
            content = self.current.content_blocks()
            self.recorded = True
        append_message(self.messages, role, content)

    def final_messages(self, unanswered: str) -> list[dict[str, Any]]:
        """`messages` with the current round's content, and, when the last assistant content has tool calls no
        result answered (a cancel, the round limit), an error result for each saying `unanswered`: the
        history sent in the next turn must pair every tool_use with its tool_result."""
        messages = list(self.messages)
        if not self.recorded:
            append_message(messages, "assistant", self.current.content_blocks())
        if messages and messages[-1]["role"] == "assistant":
            ids = [block["id"] for block in messages[-1]["content"]
                   if isinstance(block, dict) and block.get("type") == "tool_use"]
            append_message(messages, "user", [{"type": "tool_result", "tool_use_id": tool_id, "content": unanswered,
                                               "is_error": True} for tool_id in ids])
        return messages

    def blocks(self, unanswered: str) -> list[dict[str, Any]] | None:
        """What is saved as the answer's blocks: final_messages(), or None for one round of plain text."""
        messages = self.final_messages(unanswered)
        if not messages:
            return None
        if len(messages) == 1 and messages[0]["role"] == "assistant" and all(
                set(block) == {"type", "text"} and block["type"] == "text" for block in messages[0]["content"]):
            return None
        return messages

    @property
    def text(self) -> str:
        """The answer's text: every round's, joined as it was streamed."""
        return "".join(reply.text for reply in self.rounds)

    @property
    def thinking(self) -> str:
        return "".join(reply.thinking for reply in self.rounds)

    @property
    def chunk_count(self) -> int:
        return sum(reply.chunk_count for reply in self.rounds)

    @property
    def has_content(self) -> bool:
        """Whether any round sent content (or tools ran)."""
        return self.tool_calls > 0 or any(reply.has_content for reply in self.rounds)

    @property
    def stop_reason(self) -> str | None:
        """The last round's stop reason."""
        return self.current.stop_reason

    @property
    def model(self) -> str:
        return self.rounds[0].model

    @property
    def usage_mark(self) -> tuple[int, int]:
        """Equal for two reads of `usage` only if nothing could have changed it between them (cheap: no sum)."""
        return self._rounds_changed, self.current.usage_reports

    @property
    def usage(self) -> Usage:
        """The usage of every round, summed."""
        return Usage(**{name: sum(getattr(reply.usage, name) for reply in self.rounds) for name in _USAGE_FIELDS})

    def cost_event(self, estimated: bool = False) -> Cost:
        """The answer's Cost: tokens summed over the rounds, cost the sum of each round's exact cost (None when
        a round's model has no price). `estimated`: the answer was cancelled or failed; the current round's
        output is then estimated as ReplyState.cost_event does, and an answer stopped while its tools ran is
        marked estimated too."""
        costs = [reply.cost_event(estimated and reply is self.current) for reply in self.rounds]
        prices = [cost.total_cost for cost in costs]
        first = costs[0]
        return Cost(
            input_tokens=sum(cost.input_tokens for cost in costs),
            output_tokens=sum(cost.output_tokens for cost in costs),
            cache_creation_input_tokens=sum(cost.cache_creation_input_tokens for cost in costs),
            cache_read_input_tokens=sum(cost.cache_read_input_tokens for cost in costs),
            total_cost=None if any(price is None for price in prices) else sum(
                (price for price in prices if price is not None), Decimal(0)),
            model=first.model,
            estimated=any(cost.estimated for cost in costs) or (estimated and self.tools_running),
            context_window=first.context_window,
            truncated_messages=first.truncated_messages,
            last_request_tokens=None if len(costs) == 1 else next(
                (cost.context_tokens for cost in reversed(costs) if cost.context_tokens), 0),
        )
