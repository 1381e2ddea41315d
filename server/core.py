"""The one streaming core: a user message in, relay events out, the answer saved once.

Transport-agnostic: it never frames or writes anything. It appends events to the
stream's log in the hub; transports read that log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncGenerator, Coroutine
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any, Protocol

import orjson
from starlette.types import Scope

from .attachments import file_tokens, message_blocks
from .auth import ANONYMOUS, Authenticator, User
from .config import Agent, Settings
from .context import ContextWindow, Counted, Fitting
from .errors import NotFoundError, ProtocolError, RelayError, StorageUnavailableError, UpstreamError
from .events import Cost, Done, Error, RelayEvent, Start, error_event
from .hub import LiveStream, Orphan, StreamHub, Subscriber
from .limits import Limits, Reservation
from .logs import fields
from .metrics import Metrics
from .pricing import Usage, cost_of
from .protocol.answer import AnswerState, append_message
from .protocol.anthropic import ReplyState, TextParts, estimate_tokens, redact
from .protocol.frames import AnswerCommand, Regenerate, SendMessage
from .protocol.sse import SSEEvent
from .store import FinishedElsewhereError, Reply, Status, Store, Turn, new_id, now
from .store.conversations import HistoryCheck
from .tools import ToolEndpoint, tool_result_block
from .upstream.anthropic import UpstreamRequest

log = logging.getLogger("deltarelay.core")


class Upstream(Protocol):
    @property
    def secrets(self) -> tuple[str, ...]:
        """The credentials it sends (its API key): masked in every error a user is shown."""

    def events(self, request: UpstreamRequest) -> AsyncGenerator[SSEEvent, None]: ...

    async def count_tokens(self, request: UpstreamRequest) -> int | None:
        """The request's input tokens as the API counts them; None: not known."""


@dataclass(frozen=True, slots=True)
class Job:
    """One answer to generate."""

    stream_id: str
    conversation_id: str
    message_id: str
    request: UpstreamRequest
    trace_session_id: str | None = None
    agent_id: str = "default"
    user_message_id: str | None = None
    parent_id: str | None = None  # the answer's parent (its user message)
    base: Reply | None = None  # a continued answer as it was: what is saved adds the new text and usage to it
    context: Fitting | None = None  # the history's fit to the model's window: learned from, refit on a refusal
    tools: ToolEndpoint | None = None  # where the agent's own tools run; None: a tool_use stop ends the answer
    max_tool_rounds: int = 8  # upstream requests past the first (tool results, pause_turn) at most
    user_id: str | None = None  # who asked: named in each tool call
    user_name: str = "anonymous"


@dataclass(slots=True)
class Outcome:
    """How an answer went, for metrics and the stream's end log line (times from time.monotonic)."""

    status: Status = Status.STREAMING
    cost: Cost | None = None
    error_code: str | None = None
    started_at: float = field(default_factory=time.monotonic)
    first_chunk_at: float | None = None
    finished_at: float = 0.0
    chunks: int = 0
    retries: int = 0
    upstream_errors: list[str] = field(default_factory=list)  # codes, retried failures included
    tool_calls: int = 0
    tool_errors: int = 0  # tool results that are errors (the app's own, a timeout, a failed call)


class Relay:
    """Starts answers: validates against configuration and database, then runs them in the hub."""

    def __init__(self, settings: Settings, store: Store, upstream: Upstream, hub: StreamHub,
                 limits: Limits | None = None, auth: Authenticator | None = None,
                 metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.store = store
        self.upstream = upstream
        self.hub = hub
        self.limits = limits or Limits(settings, store)
        self.auth = auth or Authenticator(settings, store)
        self.metrics = metrics or Metrics()
        self.metrics.count_chunks_of_running(self._running_chunks)
        self.limits.on_refusal = lambda limit: self.metrics.refused.labels(limit).inc()
        self.retry = RetryPolicy(settings.retry_attempts, settings.retry_base_delay, settings.retry_max_wait)
        self.save = SavePolicy(settings.save_wait_seconds, settings.save_retry_seconds)
        self._bases: dict[str, Reply] = {}  # stream id -> the answer it continues, as it was (see Job.base)
        self.context = ContextWindow()

    async def admit(self, scope: Scope) -> User:
        """The user behind a request, counted against their requests per minute.

        Raises:
            UnauthorizedError, ForbiddenError, LimitError.
        """
        user = await self.auth.user(scope)
        self.limits.request(user)
        return user

    async def start(self, command: AnswerCommand, user: User = ANONYMOUS) -> LiveStream:
        """Save the user's message (or, to regenerate or continue, take the answer named) and start generating
        the answer.

        Raises:
            NotFoundError: unknown agent, or no conversation (or answer) of this user's by that id.
            ConflictError: busy (the conversation has an answer generating), or not_continuable.
            LimitError / BudgetError: one of the user's limits is reached.
            TooLargeError: the conversation's history is at its limit, or the message alone does not fit the
                model's context window (too_large).
            ContextTooLongError: under the agent's "error" context policy, the conversation does not fit the
                model's context window (context_too_long, with inputTokens and contextWindow).
            RelayError: the server is shutting down (503, retryable).
            Nothing is saved when any of these is raised.
        """
        if not self.hub.accepting:
            raise RelayError("the server is shutting down; try again", code="shutting_down", status=503,
                             retryable=True)
        if isinstance(command, SendMessage):
            agent = self.settings.agent(command.agent_id)
            if agent is None:
                raise NotFoundError(f"agent {command.agent_id} not found")
        else:
            # The conversation's own agent (the default one when that agent is no longer configured).
            agent_id = await self.store.agent_of_answer(command.message_id, user.id)
            agent = self.settings.agent(agent_id) or self.settings.agent(None)
            if agent is None:
                raise NotFoundError(f"agent {agent_id} not found")
        self.limits.take_stream(user)
        reservation: Reservation | None = None
        try:
            stream_id = new_id()
            if self.limits.budgeted:
                reservation = await self.limits.reserve(user, stream_id, await self._worst_case(agent, command, user))
            turn = await self._begin(command, agent, stream_id, user)
        except BaseException:
            self.limits.give_stream(user)
            self.limits.release(reservation)
            raise
        fitting = self._fitting(agent, turn)
        request = agent_request(agent, fitting.plan.messages)
        tools = None
        if agent.tools_url is not None and self.settings.tools_secret is not None:
            tools = ToolEndpoint(agent.tools_url, self.settings.tools_secret, self.settings.tools_timeout,
                                 self.settings.proxies)
        job = Job(stream_id, turn.conversation_id, turn.assistant_message_id, request, turn.trace_session_id,
                  agent.id, turn.user_message_id, turn.parent_id, turn.base, fitting, tools, agent.max_tool_rounds,
                  user.id, user.name)
        stream = self.hub.create(stream_id, turn.conversation_id, turn.assistant_message_id, agent.model)
        if turn.base is not None:
            self._bases[stream_id] = turn.base
        outcome = Outcome()
        self.hub.run(stream, self._observed(user, job, outcome,
                                            run_stream(job, self.upstream, self.store, stream, self.retry, outcome,
                                                       self.save),
                                            reservation))
        self.metrics.started.inc()
        self.metrics.generating.inc()
        log.info("stream started", extra=fields(
            event="stream_start", streamId=stream_id, conversationId=job.conversation_id, user=user.name,
            agent=agent.id, model=agent.model, traceSessionId=job.trace_session_id, taskTraceId=stream_id,
            truncatedMessages=fitting.plan.dropped, estimatedInputTokens=fitting.plan.input_tokens))
        return stream

    def _fitting(self, agent: Agent, turn: Turn) -> Fitting:
        """The turn's history fit to the agent's model (see server/context.py); `check` already refused what
        does not fit, with nothing saved."""
        stored = None
        if turn.counted is not None:
            stored = Counted.saved(agent.system, turn.history, *turn.counted)
        return Fitting(self.context, turn.conversation_id, agent.model, agent.system, turn.history,
                       agent.max_tokens, agent.context_policy, stored, count=self.settings.count_tokens)

    def _check(self, agent: Agent) -> HistoryCheck:
        """The store's check of a turn's history before it is written: raises what ContextWindow.fit raises."""
        def check(conversation_id: str | None, history: list[dict[str, str]], counted: tuple[int, int] | None
                  ) -> None:
            stored = Counted.saved(agent.system, history, *counted) if counted is not None else None
            self.context.fit(conversation_id, agent.model, agent.system, history, agent.max_tokens,
                             agent.context_policy, stored)
        return check

    async def _begin(self, command: AnswerCommand, agent: Agent, stream_id: str, user: User) -> Turn:
        """The command's first write: the user's message and an empty answer, a new answer beside one, or an
        answer reopened."""
        if isinstance(command, SendMessage):
            # Its files (uploaded ones by id, inline ones saved with it) as references, then its text.
            blocks, files = message_blocks(command.message, command.attachment_ids, command.attachments)
            return await self.store.begin_turn(
                conversation_id=command.conversation_id, agent_id=agent.id, user_text=command.message,
                model=agent.model, stream_id=stream_id, task_trace_id=stream_id, owner_id=user.id,
                max_history=self.settings.max_history_messages, instance_id=self.hub.instance_id,
                parent_message_id=command.parent_message_id, parent_given=command.parent_given,
                check=self._check(agent), user_blocks=blocks, attachments=files)
        if isinstance(command, Regenerate):
            return await self.store.begin_regenerate(
                answer_id=command.message_id, model=agent.model, stream_id=stream_id, task_trace_id=stream_id,
                owner_id=user.id, max_history=self.settings.max_history_messages, instance_id=self.hub.instance_id,
                check=self._check(agent))
        return await self.store.begin_continue(answer_id=command.message_id, stream_id=stream_id,
                                               task_trace_id=stream_id, owner_id=user.id,
                                               instance_id=self.hub.instance_id,
                                               check=self._check(agent))

    async def _worst_case(self, agent: Agent, command: AnswerCommand, user: User) -> Decimal | None:
        """The most an answer can cost: max_tokens at the output price, and its input (the system prompt, the
        conversation so far and the message) at one token per 4 UTF-8 bytes, as for a cancelled answer's
        output, at the input price or, with prompt caching on, at the agent's cache write price (all of it
        could be written). None: the model has no price."""
        size = len(agent.system.encode())
        conversation_id: str | None
        if isinstance(command, SendMessage):
            size += len(command.message.encode())
            # Files at 4 bytes a token of their estimate (server/attachments.py), not their base64.
            size += 4 * sum(file_tokens(file.media_type, file.data) for file in command.attachments)
            if command.attachment_ids:
                size += 4 * await self.store.attachment_tokens(command.attachment_ids, user.id)
            conversation_id = command.conversation_id
        else:
            conversation_id = await self.store.conversation_of_message(command.message_id)
        if conversation_id is not None:
            size += await self.store.history_bytes(conversation_id, user.id)
        tokens = estimate_tokens(size)
        if agent.prompt_cache == "1h":
            usage = Usage(cache_creation_input_tokens=tokens, cache_creation_1h_input_tokens=tokens)
        elif agent.prompt_cache == "5m":
            usage = Usage(cache_creation_input_tokens=tokens, cache_creation_5m_input_tokens=tokens)
        else:
            usage = Usage(input_tokens=tokens)
        return cost_of(replace(usage, output_tokens=agent.max_tokens), agent.model)

    async def delete_conversation(self, conversation_id: str) -> list[str]:
        """Cancel every answer of the conversation still generating, on any instance, wait (a bounded while)
        for them to be saved, then delete it and its messages; the streams cancelled.

        Its usage rows stay: reports and budgets count what it spent. Its streams are not resumable after.

        Raises:
            NotFoundError: no such conversation (the caller checks that the user may see it).
        """
        running = await self.store.running_streams(conversation_id)
        cancelled: list[str] = []
        for stream_id in running:
            try:
                if await self.hub.request_cancel(stream_id):
                    cancelled.append(stream_id)
            except NotFoundError:
                pass  # its instance is gone: the delete below records what its row holds
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.save_wait_seconds + DELETE_WAIT_SECONDS
        while running and loop.time() < deadline:
            await asyncio.sleep(0.02)
            running = await self.store.running_streams(conversation_id)
        await self.store.delete_conversation(conversation_id)
        log.info("conversation deleted", extra=fields(event="conversation_deleted", conversationId=conversation_id,
                                                      cancelledStreams=cancelled))
        return cancelled

    async def _observed(self, user: User, job: Job, outcome: Outcome, work: Coroutine[Any, Any, Outcome],
                        reservation: Reservation | None = None) -> None:
        """Run a stream under the user's limits (one concurrent-stream slot; its worst case held in the budget
        until it is saved, then its cost), then count it in the metrics and log its end."""
        try:
            await work
        finally:
            self._bases.pop(job.stream_id, None)
            self.limits.give_stream(user)
            self.limits.settle(reservation, outcome.cost.total_cost if outcome.cost is not None else None)
            self.metrics.generating.dec()
        self._report(user, job, outcome)

    def _report(self, user: User, job: Job, outcome: Outcome) -> None:
        metrics = self.metrics
        status = outcome.status.value
        metrics.finished.labels(status).inc()
        metrics.chunks_finished += outcome.chunks
        duration = outcome.finished_at - outcome.started_at
        metrics.duration.observe(duration)
        for code in outcome.upstream_errors:
            metrics.upstream_errors.labels(code).inc()
        if outcome.retries:
            metrics.retries.inc(outcome.retries)
        if outcome.tool_calls:
            metrics.tool_calls.labels("ok").inc(outcome.tool_calls - outcome.tool_errors)
            if outcome.tool_errors:
                metrics.tool_calls.labels("error").inc(outcome.tool_errors)
        first_token = None
        if outcome.first_chunk_at is not None:
            first_token = outcome.first_chunk_at - outcome.started_at
            metrics.first_token.observe(first_token)
        cost = outcome.cost
        if cost is not None:
            metrics.record_answer(cost.model, cost.input_tokens, cost.output_tokens, cost.cache_creation_input_tokens,
                                  cost.cache_read_input_tokens, cost.total_cost)
        log.info("stream ended", extra=fields(
            event="stream_end", streamId=job.stream_id, conversationId=job.conversation_id, user=user.name,
            agent=job.agent_id, model=cost.model if cost else job.request.model, status=status,
            errorCode=outcome.error_code,
            inputTokens=cost.input_tokens if cost else 0, outputTokens=cost.output_tokens if cost else 0,
            cacheCreationInputTokens=cost.cache_creation_input_tokens if cost else 0,
            cacheReadInputTokens=cost.cache_read_input_tokens if cost else 0,
            cost=format(cost.total_cost, "f") if cost and cost.total_cost is not None else None,
            chunks=outcome.chunks, retries=outcome.retries, toolCalls=outcome.tool_calls,
            timeToFirstTokenMs=round(first_token * 1000, 1) if first_token is not None else None,
            durationMs=round(duration * 1000, 1), traceSessionId=job.trace_session_id, taskTraceId=job.stream_id))

    async def save_progress(self) -> None:
        """Every `partial_save_seconds`, save the text and usage so far of each running answer that changed
        since (a timer, never a write per chunk), so that after a crash its row holds what came until then.

        Runs until cancelled; a database that cannot take the writes is tried again at the next tick.
        """
        interval = self.settings.partial_save_seconds
        if not interval:
            return
        saved: dict[str, int] = {}  # stream id -> its last event id at its last partial save
        while True:
            await asyncio.sleep(interval)
            marks: dict[str, int] = {}
            due: list[LiveStream] = []
            for stream in self.hub.active():
                reply = stream.reply
                if reply is None or not stream.running or stream.finalizing or stream.message_id is None:
                    continue
                marks[stream.id] = stream.last_id
                if saved.get(stream.id) != stream.last_id and (reply.has_content or reply.usage.input_tokens):
                    due.append(stream)
            # A batch at a time, each built just before its write: the loop runs other work in between.
            for first in range(0, len(due), PROGRESS_BATCH):
                part: list[tuple[str, str, Reply]] = []
                for stream in due[first:first + PROGRESS_BATCH]:
                    if stream.reply is not None and stream.message_id is not None and not stream.finalizing:
                        partial = _added(self._bases.get(stream.id), _partial(stream.reply))
                        part.append((stream.id, stream.message_id, partial))
                try:
                    await self.store.save_progress([(message_id, reply) for _, message_id, reply in part])
                except StorageUnavailableError:
                    for stream_id, _, _ in part:
                        marks.pop(stream_id, None)  # not saved: try again next time
                except Exception:
                    log.exception("could not save the progress of %d answers", len(part))
            saved = marks

    def _running_chunks(self) -> int:
        return sum(stream.reply.chunk_count for stream in self.hub.active() if stream.reply is not None)

    async def check_access(self, stream_id: str, user: User, code: str = "not_resumable") -> None:
        """Another user's stream is reported exactly as an unknown one, and so is a stream whose answer the
        database no longer has (its conversation was deleted) or that a continue of its answer replaced.

        Raises:
            NotFoundError: the stream answers no conversation this user may see.
        """
        known, owner_id = await self.store.owner_of_stream(stream_id)
        if not known or not user.can_see(owner_id):
            raise NotFoundError(f"stream {stream_id} not found or expired", code=code)

    async def cancel(self, stream_id: str, user: User = ANONYMOUS) -> bool:
        """Stop a stream this user may see; True when it was still running.

        Raises:
            NotFoundError: unknown, expired or another user's stream.
        """
        await self.check_access(stream_id, user, code="not_found")
        try:
            return await self.hub.request_cancel(stream_id)
        except NotFoundError as exc:
            exc.code = "not_found"
            raise


def agent_request(agent: Agent, messages: list[dict[str, Any]]) -> UpstreamRequest:
    """The first upstream request of an answer of `agent`: its model, limits, prompt, tools, thinking, betas."""
    return UpstreamRequest(model=agent.model, max_tokens=agent.max_tokens, messages=messages, system=agent.system,
                           prompt_cache=agent.prompt_cache, tools=agent.request_tools,
                           thinking=None if agent.thinking_budget is None else
                           {"type": "enabled", "budget_tokens": agent.thinking_budget},
                           betas=agent.request_betas)


# Partial saves are written this many answers to a transaction, so other writes (stream starts) pass between.
PROGRESS_BATCH = 50
# A delete waits this long (past the save wait) for the answers it cancelled to be saved.
DELETE_WAIT_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class SavePolicy:
    """How an answer's save outlasts a database that cannot take writes (down, restarting, disk full).

    The stream's `done` waits for the save up to `wait_seconds` after its first failed attempt: `done`
    always means saved, and a short outage (a PostgreSQL restart takes seconds) passes unseen. Past it the
    stream ends with a retryable `storage_unavailable` error instead, and the save goes on being retried with
    backoff (first_delay, doubling to max_delay) until `retry_seconds` after the answer ended; past that it is
    given up (logged): the row keeps its last partial save and the next start marks it `interrupted`. The
    answers waiting so are at most those that were running (a new one cannot start without a write), and
    each keeps its user's concurrent-stream slot until its save ends.
    """

    wait_seconds: float = 10.0
    retry_seconds: float = 600.0
    first_delay: float = 0.05
    max_delay: float = 1.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retries before the first delta: bounded in count and in total wait."""

    attempts: int = 3
    base_delay: float = 0.5
    max_wait: float = 10.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with jitter, never shorter than the upstream's retry-after."""
        backoff = self.base_delay * (2**attempt) * (0.5 + random.random() / 2)
        return float(max(backoff, retry_after or 0.0))


async def resume(relay: Relay, stream_id: str, after: int, keepalive: bool = False,
                 user: User = ANONYMOUS, transport: str = "sse") -> Subscriber:
    """A reader of a stream from after event `after`, for either transport.

    Raises:
        NotFoundError/GoneError (code not_resumable): the stream cannot be served (or is another user's);
            the error carries the saved answer's messageId when the database knows the stream, so the
            client can load it.
    """
    await relay.check_access(stream_id, user)
    try:
        subscriber = await relay.hub.resume(stream_id, after, keepalive)
        relay.metrics.resumes.labels(transport).inc()
        return subscriber
    except RelayError as exc:
        if exc.message_id is None:
            exc.message_id = await relay.store.answer_of_stream(stream_id)
        raise


async def run_stream(job: Job, upstream: Upstream, store: Store, stream: LiveStream,
                     retry: RetryPolicy | None = None, outcome: Outcome | None = None,
                     save: SavePolicy | None = None) -> Outcome:
    """Relay one answer into `stream`'s log and save it exactly once, however it ends; how it went.

    One `start`, one `cost` and one `done` (or the answer's own `error`) per answer, however many upstream
    requests it takes: a response that stops for `tool_use` has its calls run at the agent's toolsUrl
    (concurrently, see server/tools.py), a `tool_result` event appended for each, and the results sent back
    in the next request; one that stops for `pause_turn` is sent back to be continued. At most
    `job.max_tool_rounds` requests follow the first; past that the answer ends with the last response's stop
    reason. Each request is retried under `retry` until its first content. The `cost` is the exact sum over
    the requests. The stream ends only once the answer is saved; see SavePolicy for a database that cannot
    take it yet.
    """
    retry = retry or RetryPolicy()
    outcome = outcome or Outcome()
    save = save or SavePolicy()
    stream.running = True
    context = job.context
    stream.append(Start(job.stream_id, job.conversation_id, job.request.model, job.message_id, job.parent_id,
                        job.user_message_id, context.plan.dropped if context is not None else 0))
    answer = AnswerState(_reply_state(job))
    stream.reply = answer
    status = Status.COMPLETE
    failure: RelayError | None = None
    try:
        if stream.stop_status is not None:  # cancelled before the core began
            raise asyncio.CancelledError
        if context is not None and context.near_limit():
            job = await _counted(job, context, upstream)
        job = await _round(job, upstream, stream, answer, retry, outcome, first=True)
        rounds = 0
        while rounds < job.max_tool_rounds:
            reply = answer.current
            calls = reply.tool_calls() if reply.stop_reason == "tool_use" and job.tools is not None else []
            if calls and job.tools is not None:
                answer.record()
                answer.tools_running = True
                results = await job.tools.run(calls, job.conversation_id, job.message_id, job.user_id,
                                              job.user_name)
                for result in results:
                    stream.append(result)
                outcome.tool_calls += len(results)
                outcome.tool_errors += sum(1 for result in results if result.is_error)
                answer.tool_calls, answer.tool_errors = outcome.tool_calls, outcome.tool_errors
                answer.record("user", [tool_result_block(result) for result in results])
            elif reply.stop_reason == "pause_turn":
                answer.record()  # a server tool's long turn: sent back as it is, the API goes on with it
            else:
                break
            rounds += 1
            answer.next_round(_reply_state(job, reply.citation_count))
            await _round(job, upstream, stream, answer, retry, outcome)
    except RelayError as exc:
        # A failure's words reach a user in this stream's `error` event: whichever path made them (an HTTP
        # error body, an `error` event mid-stream) and whatever of the key they echo, the key stops here.
        exc.message = redact(exc.message, upstream.secrets)
        status, failure = Status.ERROR, exc
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        status = Status.INTERRUPTED if stream.stop_status == "interrupted" else Status.CANCELLED
    except Exception:  # a bug, not the user's fault: log it, still save and end the stream
        log.exception("stream %s failed", job.stream_id)
        status, failure = Status.ERROR, RelayError("internal error while relaying the answer")

    stream.finalizing = True
    finished = status is Status.COMPLETE
    cost = answer.cost_event(estimated=not finished)
    if finished or answer.has_content:
        stream.append(cost)
    failing: asyncio.Future[None] = asyncio.get_running_loop().create_future()  # set at its first failure
    record = _added(job.base, _record(answer, status, cost, failure))
    saving = asyncio.ensure_future(_save(store, job, record, save, failing))
    await _wait(saving, None, failing)
    told = False
    if not await _wait(saving, save.wait_seconds):
        # The database cannot take the answer yet: say so rather than `done`, and keep trying to save it.
        stream.append(Error("storage_unavailable", "the database cannot take writes now: this answer is kept and"
                            " saved when it can", True, retry_after=1.0, message_id=job.message_id))
        told = True
        outcome.error_code = "storage_unavailable"
        await _wait(saving, None)
    problem = saving.exception()
    message_id: str | None = job.message_id
    if isinstance(problem, FinishedElsewhereError):
        log.error("stream %s: its message %s was already finished elsewhere (marked interrupted by another"
                  " process?): this answer is not saved", job.stream_id, job.message_id)
        status = Status.INTERRUPTED
        failure = RelayError("this answer was ended as interrupted elsewhere before it could be saved",
                             code="interrupted", retryable=True)
    elif isinstance(problem, StorageUnavailableError):
        log.error("stream %s: gave up saving message %s; its row keeps the text of its last partial save and"
                  " is marked interrupted at the next start", job.stream_id, job.message_id)
        failure = RelayError("the database could not take this answer", code="storage_unavailable",
                             retryable=True, status=503)
    elif problem is not None:
        log.error("could not save message %s of stream %s", job.message_id, job.stream_id, exc_info=problem)
        failure, message_id = RelayError("internal error while saving the answer"), None
    elif told:
        log.warning("stream %s: message %s is saved after all", job.stream_id, job.message_id)
    if not told:
        stream.append(_ending(job, status, failure if problem is not None or status is Status.ERROR else None,
                              answer, message_id))
    outcome.status = status
    outcome.cost = cost
    if outcome.error_code is None:
        outcome.error_code = failure.code if failure is not None else None
    outcome.chunks = answer.chunk_count
    outcome.finished_at = time.monotonic()
    return outcome


async def save_orphan(store: Store, orphan: Orphan) -> bool:
    """Save the partial answer of a stream whose instance died, from its logged events, as `interrupted`.

    The output tokens are estimated from the text, as for a cancel; input and cache tokens are the
    last usage the dead instance copied to Redis. False when the answer was already finished.
    The log holds only what this stream generated: for a continue (issue 17) the part it continued is added
    back from the database (see Store.continued_part).
    """
    text, thinking = TextParts(), TextParts()
    model = orphan.model
    for _, name, data in orphan.entries:
        if name == "chunk":
            text.add(orjson.loads(data)["text"])
        elif name == "thinking":
            thinking.add(orjson.loads(data)["text"])
        elif name == "start":
            model = orjson.loads(data).get("model") or model
    content, thought = text.value(), thinking.value()
    known = {key: value for key, value in orphan.usage.items() if key in Usage.__dataclass_fields__}
    usage = replace(Usage(**known), output_tokens=estimate_tokens(len(content.encode()) + len(thought.encode())))
    record = Reply(
        content=content, thinking=thought, model=model, status=Status.INTERRUPTED, stop_reason=None,
        input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
        cache_creation_input_tokens=usage.cache_creation_input_tokens,
        cache_read_input_tokens=usage.cache_read_input_tokens, cost=cost_of(usage, model), cost_estimated=True,
    )
    record = _added(await store.continued_part(orphan.message_id, orphan.stream_id, content, thought), record)
    try:
        await store.save_reply(orphan.message_id, record)
    except FinishedElsewhereError:
        return False
    return True


async def _round(job: Job, upstream: Upstream, stream: LiveStream, answer: AnswerState, retry: RetryPolicy,
                 outcome: Outcome, first: bool = False) -> Job:
    """One upstream request of the answer into `answer.current`, retried (under `retry`) until it sent content;
    `job` as it stands after (the first request may be refit to a shorter history).

    Raises:
        RelayError: the request failed and is not retried.
    """
    context = job.context if first else None
    attempt, waited = 0, 0.0
    refit = False  # the one retry with a shorter history after the upstream refused the request for length
    while True:
        attempt_reply = answer.current
        request = job.request if first else replace(job.request, messages=_with_rounds(job.request.messages,
                                                                                       answer.messages))
        try:
            await _relay_attempt(request, upstream, stream, attempt_reply, outcome)
            if context is not None:
                usage = attempt_reply.usage
                counted = usage.input_tokens + usage.cache_creation_input_tokens + usage.cache_read_input_tokens
                if counted:
                    context.learn(counted)
            return job
        except RelayError as exc:
            if isinstance(exc, UpstreamError):
                outcome.upstream_errors.append(exc.code)
            if exc.code == "context_too_long" and context is not None and not attempt_reply.has_content:
                shorter = _refit(context, exc, refit)
                if shorter is not None:
                    refit = True
                    job = replace(job, request=replace(job.request, messages=shorter))
                    answer.retry(_reply_state(job))
                    log.info("stream %s: the upstream refused the request for length; retrying without the"
                             " oldest %d messages", job.stream_id, context.plan.dropped)
                    continue
            # Once a delta went out, a retry would repeat text: only a clean failure is retried.
            delay = retry.delay(attempt, exc.retry_after)
            if not exc.retryable or attempt_reply.has_content or attempt >= retry.attempts \
                    or waited + delay > retry.max_wait:
                raise
            attempt, waited = attempt + 1, waited + delay
            outcome.retries += 1
            log.info("stream %s: upstream %s, retry %d in %.2fs", job.stream_id, exc.code, attempt, delay)
            await asyncio.sleep(delay)
            answer.retry(_reply_state(job, _earlier_citations(answer)))


def _earlier_citations(answer: AnswerState) -> int:
    """The citations of the rounds before the current one: where the current round's numbering starts."""
    return answer.rounds[-2].citation_count if len(answer.rounds) > 1 else 0


def _with_rounds(messages: list[dict[str, Any]], rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The history followed by the answer's messages so far, same-role neighbours merged (a continue's prefill
    and the first round's content are one assistant turn)."""
    merged = list(messages)
    for message in rounds:
        append_message(merged, message["role"], message["content"])
    return merged


async def _relay_attempt(request: UpstreamRequest, upstream: Upstream, stream: LiveStream, reply: ReplyState,
                         outcome: Outcome) -> None:
    # No await in this loop but the upstream's own: the upstream's deadlines
    # (asyncio.timeout inside its generator) must only ever interrupt its reads.
    append = stream.append
    # aclosing: leaving at message_stop closes the upstream response now, not when the generator is collected.
    async with contextlib.aclosing(upstream.events(request)) as upstream_events:
        async for upstream_event in upstream_events:
            for event in reply.feed(upstream_event.event, upstream_event.data):
                append(event)
            if outcome.first_chunk_at is None and reply.chunk_count:
                outcome.first_chunk_at = time.monotonic()
            if reply.finished:
                return
    raise ProtocolError("the model's stream ended before message_stop")



def _reply_state(job: Job, citation_base: int = 0) -> ReplyState:
    """A new ReplyState for one attempt at `job`, its cost event carrying the attempt's context plan, its
    citations numbered after the `citation_base` the answer's earlier rounds made."""
    context = job.context
    if context is None:
        return ReplyState(job.request.model, citation_base=citation_base)
    return ReplyState(job.request.model, context.plan.context_window, context.plan.dropped,
                      citation_base=citation_base)


async def _counted(job: Job, context: Fitting, upstream: Upstream) -> Job:
    """`job` after the API counted its request (RELAY_COUNT_TOKENS, near the window only): with a shorter
    history when the count shows the estimate was short.

    Raises:
        ContextTooLongError, TooLargeError: it does not fit, under the "error" policy, or at all.
    """
    tokens = await upstream.count_tokens(job.request)
    if tokens is None or tokens + context.max_tokens <= context.plan.context_window:
        return job
    context.learn(tokens)
    plan = context.refit()
    return replace(job, request=replace(job.request, messages=plan.messages))


def _refit(context: Fitting, exc: RelayError, retried: bool) -> list[dict[str, Any]] | None:
    """After the upstream refused the request for length: learn the figure it gave, and under "truncate"
    (once per answer) the shorter history to retry with; None: no retry, `exc` stands.

    Raises:
        TooLargeError, ContextTooLongError: what is left does not fit either (ContextWindow.fit).
    """
    details = exc.details or {}
    tokens, window = details.get("inputTokens"), details.get("contextWindow")
    if isinstance(tokens, int):
        context.learn(tokens, window if isinstance(window, int) else None)
    if retried or context.policy != "truncate" or not isinstance(tokens, int):
        return None
    before = context.plan.dropped
    plan = context.refit()
    return plan.messages if plan.dropped > before else None


def _ending(job: Job, status: Status, failure: RelayError | None, reply: AnswerState,
            message_id: str | None) -> RelayEvent:
    """The stream's last event: `done`, or the `error` that ended it."""
    if failure is not None:
        return replace(error_event(failure), message_id=message_id)
    if status is Status.INTERRUPTED:
        return Error("interrupted", "the server stopped before the answer was finished", True, message_id=message_id)
    return Done(job.conversation_id, message_id, "cancelled" if status is Status.CANCELLED else reply.stop_reason)


#: The result saved for a tool call that was never run, so the next turn's history pairs it (AnswerState.blocks).
_UNANSWERED = {
    Status.COMPLETE: "not run: the answer reached its limit of tool rounds",
    Status.CANCELLED: "not run: the answer was cancelled",
    Status.INTERRUPTED: "not run: the server stopped",
    Status.ERROR: "not run: the answer ended with an error",
}


def _record(reply: AnswerState, status: Status, cost: Cost, failure: RelayError | None) -> Reply:
    """What is saved of an answer that ended with `status`: every round's text joined, usage and cost summed,
    and the rounds' API messages (None for one round of plain text: such a row is its text alone)."""
    usage = reply.usage
    return Reply(
        content=reply.text,
        thinking=reply.thinking,
        model=reply.model,
        status=status,
        stop_reason="cancelled" if status is Status.CANCELLED else reply.stop_reason,
        input_tokens=usage.input_tokens,
        output_tokens=cost.output_tokens,
        cache_creation_input_tokens=usage.cache_creation_input_tokens,
        cache_read_input_tokens=usage.cache_read_input_tokens,
        cost=cost.total_cost,
        cost_estimated=cost.estimated,
        error_code=failure.code if failure is not None else None,
        finished_at=now(),
        blocks=reply.blocks(_UNANSWERED.get(status, _UNANSWERED[Status.ERROR])),
    )


def _added(base: Reply | None, reply: Reply) -> Reply:
    """`reply` appended to the answer it continues (`base`): text joined, tokens and exact costs summed, blocks
    (when either has them) the base's messages followed by the reply's, same-role neighbours merged."""
    if base is None:
        return reply
    costs = [cost for cost in (base.cost, reply.cost) if cost is not None]
    blocks: list[dict[str, Any]] | None = None
    if base.blocks is not None or reply.blocks is not None:
        blocks = []
        for part, text in ((base.blocks, base.content), (reply.blocks, reply.content)):
            messages: list[dict[str, Any]] = part if part is not None else [
                {"role": "assistant", "content": [{"type": "text", "text": text}]}] if text else []
            for message in messages:
                append_message(blocks, message["role"], message["content"])
    return replace(
        reply, content=base.content + reply.content, thinking=base.thinking + reply.thinking,
        input_tokens=base.input_tokens + reply.input_tokens, output_tokens=base.output_tokens + reply.output_tokens,
        cache_creation_input_tokens=base.cache_creation_input_tokens + reply.cache_creation_input_tokens,
        cache_read_input_tokens=base.cache_read_input_tokens + reply.cache_read_input_tokens,
        cost=sum(costs, Decimal(0)) if costs else None, cost_estimated=base.cost_estimated or reply.cost_estimated,
        blocks=blocks)


def _partial(reply: AnswerState) -> Reply:
    """What is saved of an answer still being written: its text so far, costed as a cancel now would be."""
    cost = reply.cost_event(estimated=True)
    return Reply(
        content=reply.text, thinking=reply.thinking, model=reply.model, status=Status.STREAMING, stop_reason=None,
        input_tokens=cost.input_tokens, output_tokens=cost.output_tokens,
        cache_creation_input_tokens=cost.cache_creation_input_tokens,
        cache_read_input_tokens=cost.cache_read_input_tokens, cost=cost.total_cost, cost_estimated=cost.estimated,
    )


async def _save(store: Store, job: Job, record: Reply, policy: SavePolicy,
                failing: asyncio.Future[None] | None = None) -> None:
    """Save the answer, retrying with backoff while the database cannot take writes (see SavePolicy);
    `failing` is set when the first attempt fails so.

    Raises:
        FinishedElsewhereError: the message was finished by someone else; nothing is written.
        StorageUnavailableError: the database still could not take it when the retries ran out.
    """
    loop = asyncio.get_running_loop()
    give_up = loop.time() + max(policy.retry_seconds, policy.wait_seconds)
    delay = policy.first_delay
    while True:
        try:
            await store.save_reply(job.message_id, record)
            return
        except StorageUnavailableError:
            if failing is not None and not failing.done():
                failing.set_result(None)
            if loop.time() + delay > give_up:
                raise
            if delay == policy.first_delay:
                log.warning("stream %s: the database cannot take its answer yet; retrying for up to %.0f s",
                            job.stream_id, give_up - loop.time())
            await asyncio.sleep(delay)
            delay = min(delay * 2, policy.max_delay)


async def _wait(saving: asyncio.Future[None], seconds: float | None, until: asyncio.Future[None] | None = None
                ) -> bool:
    """Wait for `saving` for up to `seconds` (None: no limit) or until `until` is done, through cancellations:
    the answer is saved and its stream ended, always. Whether `saving` ended."""
    loop = asyncio.get_running_loop()
    deadline = None if seconds is None else loop.time() + seconds
    waiting = [saving] if until is None else [saving, until]
    while not saving.done() and (until is None or not until.done()):
        left = None if deadline is None else deadline - loop.time()
        if left is not None and left <= 0:
            return False
        try:
            await asyncio.wait(waiting, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
    return saving.done()
