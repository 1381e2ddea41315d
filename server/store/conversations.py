"""Conversations and messages: a turn's start, an answer's saves, interrupted answers, and their reads."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Collection, Generator, Iterable, Mapping
from typing import Any

import orjson

from ..attachments import InlineAttachment
from ..errors import BadRequestError, ConflictError, NotFoundError, TooLargeError
from .attachments import attachment_ids, claim, insert_attachment, resolve_history, typed_references
from .base import StoreBase
from .queries import ALL, ONE, Operation, Query
from .records import FinishedElsewhereError, Reply, Status, Turn, new_id, now, storable_id

# A conversation with its message count and the exact sum of its costs (NULL: none priced), summed by the
# database: NUMERIC on PostgreSQL, whole nano-dollars on SQLite (see migration 0005).
_CONVERSATION = (
    "SELECT c.id, c.agent_id, c.title, c.created_at, c.updated_at, c.owner_id, c.active_leaf_id,"
    " (SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id) AS message_count,"
    " (SELECT SUM(m.cost) FROM messages m WHERE m.conversation_id = c.id) AS total_cost"
    " FROM conversations c"
)

# The stop reasons of an answer that may be continued (see begin_continue).
CONTINUABLE = frozenset({"max_tokens", "cancelled"})
TITLE_LIMIT = 80  # a new conversation's title: its first message, cut at a word boundary
_USAGE_COLUMNS = ("id, message_id, conversation_id, owner_id, agent_id, model, created_at, completed_at,"
                  " input_tokens, output_tokens, cache_creation_input_tokens, cache_read_input_tokens, cost,"
                  " cost_estimated")
_EARLIER = ("COALESCE((SELECT SUM(u.{column}) FROM usage u WHERE u.message_id = m.id"
            " AND u.id <> COALESCE(m.stream_id, m.id)), 0)")


def _usage_insert(where: str, source: str = "messages") -> str:
    """One usage row for each answer matched by `where` (on `source` m: messages, or a CTE of the rows an
    UPDATE just returned), finished in this transaction: what its latest generation spent, the message's totals
    less its earlier generations' rows (a continue adds to the message). Exact: integer and NUMERIC arithmetic
    in the database. Idempotent: a row has its stream's id."""
    spent = ", ".join(f"m.{column} - {_EARLIER.format(column=column)}" for column in (
        "input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "cost"))
    return (f"INSERT INTO usage ({_USAGE_COLUMNS}) SELECT COALESCE(m.stream_id, m.id), m.id, m.conversation_id,"
            f" c.owner_id, c.agent_id, m.model, m.created_at, m.completed_at, {spent}, m.cost_estimated"
            f" FROM {source} m JOIN conversations c ON c.id = m.conversation_id WHERE m.role = 'assistant'"
            f" AND m.completed_at IS NOT NULL AND ({where}) ON CONFLICT (id) DO NOTHING")


def _record_usage(message_ids: list[str]) -> Generator[Query, Any, None]:
    """The ledger's rows of answers just finished (a step of an operation), a few hundred at a time."""
    for first in range(0, len(message_ids), 500):
        part = {f"m{n}": message_id for n, message_id in enumerate(message_ids[first:first + 500])}
        if part:
            yield Query(_usage_insert(f"m.id IN ({', '.join(':' + key for key in part)})"), part)


def title_of(text: str) -> str:
    """A conversation's title from its first message: whitespace folded, cut at a word boundary to at most
    TITLE_LIMIT characters with "…" when cut."""
    folded = " ".join(text.split())
    if len(folded) <= TITLE_LIMIT:
        return folded or "New conversation"
    head = folded[:TITLE_LIMIT - 1]
    cut = head.rfind(" ")
    return (head[:cut] if cut > 0 else head).rstrip() + "…"


def encode_cursor(row: dict[str, Any]) -> str:
    """The listing cursor after `row`: its (updated_at, id), opaque to clients."""
    return base64.urlsafe_b64encode(orjson.dumps([row["updated_at"], row["id"]])).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[str, str]:
    """Raises: BadRequestError: not a cursor this server made."""
    try:
        value = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, binascii.Error, orjson.JSONDecodeError):
        raise BadRequestError("before must be a nextBefore cursor from an earlier listing") from None
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)):
        raise BadRequestError("before must be a nextBefore cursor from an earlier listing")
    return value[0], value[1]


def active_path(rows: list[Any], leaf_id: str | None) -> list[Any]:
    """The chain of rows (each with `id` and `parent_id`) from the root to `leaf_id`, in order; without a leaf
    that the rows hold, the chain to the last row (by their order)."""
    by_id = {row["id"]: row for row in rows}
    if leaf_id not in by_id:
        if not rows:
            return []
        leaf_id = rows[-1]["id"]
    path: list[Any] = []
    current: str | None = leaf_id
    while current is not None and current in by_id and len(path) <= len(rows):
        path.append(by_id[current])
        current = by_id[current]["parent_id"]
    path.reverse()
    return path


def newest_leaf(rows: list[Any], message_id: str) -> str:
    """The leaf reached from `message_id` by following each message's newest child (rows in creation order)."""
    newest_child: dict[str, str] = {}
    for row in rows:
        if row["parent_id"] is not None:
            newest_child[row["parent_id"]] = row["id"]  # later rows are newer
    current = message_id
    for _ in range(len(rows)):
        if current not in newest_child:
            break
        current = newest_child[current]
    return current


def refuse_if_busy(rows: list[dict[str, Any]]) -> None:
    """Raises: ConflictError (busy, with the running streamId): an answer among a conversation's messages (as
    `_tree` gives them, oldest first) is still being generated."""
    for row in reversed(rows):
        if row["role"] == "assistant" and row["status"] == Status.STREAMING.value:
            raise ConflictError("an answer of this conversation is still being generated; wait for it or cancel"
                                " it", code="busy", details={"streamId": row["stream_id"]})


#: Called with a turn's conversation id (None: a new one), history and Turn.counted before the turn is written:
#: what it raises refuses the turn.
HistoryCheck = Callable[[str | None, list[dict[str, Any]], tuple[int, int] | None], None]

_INSERT_MESSAGE = (
    "INSERT INTO messages (id, conversation_id, parent_id, seq, role, content, model, status, stream_id,"
    " trace_session_id, task_trace_id, created_at, completed_at, instance_id)"
    " VALUES (:id, :conv, :parent, :seq, :role, :content, :model, :status, :stream, :ts, :tt, :t, :done, :instance)"
)
_MESSAGE_COLUMNS = (
    "id, conversation_id, parent_id, seq, role, content, thinking, model, status, stop_reason, input_tokens,"
    " output_tokens, cache_creation_input_tokens, cache_read_input_tokens, cost, cost_estimated, error_code,"
    " stream_id, trace_session_id, task_trace_id, created_at, completed_at, blocks"
)


class ConversationQueries(StoreBase):
    """Conversations and their messages."""

    async def begin_turn(
        self,
        *,
        conversation_id: str | None,
        agent_id: str,
        user_text: str,
        model: str,
        stream_id: str,
        task_trace_id: str,
        trace_session_id: str | None = None,
        owner_id: str | None = None,
        max_history: int | None = None,
        instance_id: str | None = None,
        parent_message_id: str | None = None,
        parent_given: bool = False,
        check: HistoryCheck | None = None,
        user_blocks: list[dict[str, Any]] | None = None,
        attachments: Mapping[str, InlineAttachment] | None = None,
    ) -> Turn:
        """Save the user's message and an empty assistant message; return the history to send.

        `user_blocks`: the user message's content blocks when it is more than its text (attachments, as
        references: see migration 0008); saved with it and sent as its content. Each reference names an
        attachment of owner_id's that no message uses yet, or one of `attachments` (checked files sent with
        the message, by the ids the blocks give them), saved here: the message's files become its own in this
        transaction, and the history carries them as base64 blocks (see server/store/attachments.py).

        The user message follows the conversation's active leaf, or with `parent_given` the answer
        `parent_message_id` (None: a new first message); the new answer becomes the active leaf, and the
        history is the path from the root to it. `instance_id` names the server instance that generates
        the answer (see interrupt_unfinished).

        Raises:
            NotFoundError: conversation_id (or the parent) names no conversation of owner_id, or a reference
                no attachment of owner_id's; nothing is saved.
            ConflictError (attachment_used): a reference names an attachment another message uses.
            BadRequestError: the parent is not an answer.
            ConflictError (busy): an answer of the conversation is still generating; nothing is saved.
            TooLargeError: the path already holds max_history messages; nothing is saved.
            Whatever `check` raises, called with the history and Turn.counted before anything is written;
                nothing is saved.
        """

        # PostgreSQL takes the conversation's write and both messages as one statement (data-modifying CTE),
        # a new conversation's whole start in one round trip; SQLite's writer batches statements anyway.
        one_statement = not self.is_sqlite

        def operation() -> Operation[Turn]:
            stamp = now()
            path: list[dict[str, Any]] = []
            parent_id: str | None = None
            conv_id = conversation_id
            if parent_given and parent_message_id is not None:
                found = yield Query("SELECT conversation_id, role FROM messages WHERE id = :id",
                                    {"id": parent_message_id}, ONE)
                if found is None or (conv_id is not None and found[0] != conv_id):
                    raise NotFoundError(f"message {parent_message_id} not found")
                if found[1] != "assistant":
                    raise BadRequestError("parentMessageId must be an answer (an assistant message): the new"
                                          " message follows it")
                conv_id = found[0]
            if conv_id is None:
                conv_id = new_id()
                conversation_sql = ("INSERT INTO conversations (id, agent_id, title, created_at, updated_at, owner_id,"
                                    " active_leaf_id) VALUES (:conv, :agent, :title, :t, :t, :owner, :aid)")
                conversation_params: dict[str, Any] = {"agent": agent_id, "title": title_of(user_text),
                                                       "owner": owner_id}
                seq = 0
            else:
                leaf = yield from self._owned(conv_id, owner_id, parent_message_id or "")
                # A message sent while an answer is being written would follow a half-written answer (or, as
                # an edit, race it for the active leaf): refused, as every chat product refuses it.
                rows = yield from self._tree(conv_id)
                refuse_if_busy(rows)
                parent_id = parent_message_id if parent_given else (
                    active_path(rows, leaf)[-1]["id"] if rows else None)
                path = active_path(rows, parent_id) if parent_id is not None else []
                if max_history is not None and len(path) + 2 > max_history:
                    raise TooLargeError(
                        f"this conversation has {len(path)} messages and the limit is {max_history};"
                        " start a new conversation", code="history_too_long")
                seq = (rows[-1]["seq"] + 1) if rows else 0
                conversation_sql = "UPDATE conversations SET updated_at = :t, active_leaf_id = :aid WHERE id = :conv"
                conversation_params = {}
            user_id, assistant_id = new_id(), new_id()
            # The message's files become its own (owner_id's, unused: else nothing is saved) before any of
            # them is read into the history.
            for attachment_id, attachment in (attachments or {}).items():
                yield from insert_attachment(owner_id, attachment, attachment_id)
            files = attachment_ids(user_blocks or [])
            blocks = user_blocks
            if files:
                blocks = typed_references(user_blocks or [], (yield from claim(files, owner_id, conv_id, user_id)))
            user_json = None if blocks is None else orjson.dumps([{"role": "user", "content": blocks}]).decode()
            history = yield from resolve_history(
                _history([*path, {"role": "user", "content": user_text, "blocks": user_json}]))
            counted = _counted(path)
            if check is not None:
                check(conv_id, history, counted)
            # One trace session per conversation unless the caller names one.
            trace_session = trace_session_id or conv_id
            messages_sql = (
                "INSERT INTO messages (id, conversation_id, parent_id, seq, role, content, model, status, stream_id,"
                " trace_session_id, task_trace_id, created_at, completed_at, instance_id, blocks)"
                " VALUES (:uid, :conv, :parent, :useq, :urole, :content, NULL, :complete, :stream, :ts, :tt, :t, :t,"
                " :instance, :ublocks),"
                " (:aid, :conv, :uid, :aseq, :arole, '', :model, :streaming, :stream, :ts, :tt, :t, NULL, :instance,"
                " NULL)"
            )
            messages_params = {
                "conv": conv_id, "t": stamp, "stream": stream_id, "ts": trace_session, "tt": task_trace_id,
                "instance": instance_id, "uid": user_id, "parent": parent_id, "useq": seq, "urole": "user",
                "content": user_text, "ublocks": user_json, "complete": Status.COMPLETE.value, "aid": assistant_id,
                "aseq": seq + 1,
                "arole": "assistant", "model": model, "streaming": Status.STREAMING.value,
            }
            if one_statement:
                # Alone (no transaction around it) only when nothing was read before it.
                yield Query(f"WITH conversation AS ({conversation_sql}) {messages_sql}",
                            {**conversation_params, **messages_params}, alone=conversation_id is None and not
                            (parent_given and parent_message_id is not None) and not files)
            else:
                yield Query(conversation_sql, {"conv": conv_id, "t": stamp, "aid": assistant_id, **conversation_params})
                yield Query(messages_sql, messages_params)
            return Turn(conv_id, user_id, assistant_id, history, trace_session, parent_id=user_id, counted=counted)

        return await self.answer_write(operation())

    async def begin_regenerate(self, *, answer_id: str, model: str, stream_id: str, task_trace_id: str,
                               owner_id: str | None = None, max_history: int | None = None,
                               instance_id: str | None = None, check: HistoryCheck | None = None) -> Turn:
        """Save a new empty answer beside `answer_id` (the same user message's child), made the active leaf;
        the history is the path from the root to that user message.

        Raises:
            NotFoundError: no answer of owner_id's by that id. ConflictError (busy): an answer of the
                conversation is still generating. TooLargeError, or what `check` raises: as begin_turn.
                Nothing is saved.
        """

        def operation() -> Operation[Turn]:
            found = yield from self._answer(answer_id, owner_id)
            conv_id, user_id = found["conversation_id"], found["parent_id"]
            rows = yield from self._tree(conv_id)
            refuse_if_busy(rows)
            path = active_path(rows, user_id) if user_id is not None else []
            if max_history is not None and len(path) + 1 > max_history:
                raise TooLargeError(f"this conversation has {len(path)} messages and the limit is {max_history};"
                                    " start a new conversation", code="history_too_long")
            history = yield from resolve_history(_history(path))
            counted = _counted(path)
            if check is not None:
                check(conv_id, history, counted)
            stamp, assistant_id = now(), new_id()
            trace_session = found["trace_session_id"] or conv_id
            yield Query(_INSERT_MESSAGE, {
                "conv": conv_id, "stream": stream_id, "ts": trace_session, "tt": task_trace_id, "t": stamp,
                "instance": instance_id, "id": assistant_id, "parent": user_id, "seq": rows[-1]["seq"] + 1,
                "role": "assistant", "content": "", "model": model, "status": Status.STREAMING.value, "done": None})
            yield Query("UPDATE conversations SET active_leaf_id = :leaf, updated_at = :t WHERE id = :id",
                        {"leaf": assistant_id, "t": stamp, "id": conv_id})
            return Turn(conv_id, user_id or "", assistant_id, history, trace_session, parent_id=user_id,
                        counted=counted)

        return await self.answer_write(operation())

    async def begin_continue(self, *, answer_id: str, stream_id: str, task_trace_id: str,
                             owner_id: str | None = None, instance_id: str | None = None,
                             check: HistoryCheck | None = None) -> Turn:
        """Reopen the answer `answer_id` (stopped at max_tokens, or cancelled) for more text: it is `streaming`
        again under `stream_id`, keeps its text and usage (returned as Turn.base, to which the new text and
        usage are added), and the history ends with it as the assistant's turn. The active leaf becomes the
        newest leaf under it.

        Raises:
            NotFoundError: no answer of owner_id's by that id. ConflictError (busy, not_continuable): an answer
                of the conversation is still generating, or this one did not stop so. What `check` raises,
                as begin_turn. Nothing is saved.
        """

        def operation() -> Operation[Turn]:
            found = yield from self._answer(answer_id, owner_id)
            conv_id = found["conversation_id"]
            rows = yield from self._tree(conv_id)
            refuse_if_busy(rows)
            if found["stop_reason"] not in CONTINUABLE:
                raise ConflictError(f"only an answer stopped at max_tokens or cancelled can be continued; this"
                                    f" one's stop reason is {found['stop_reason']}", code="not_continuable")
            path = active_path(rows, answer_id)
            history = yield from resolve_history(_history(path))
            _strip_final_assistant(history)
            counted = _counted(path)
            if check is not None:
                check(conv_id, history, counted)
            stamp = now()
            yield Query("UPDATE messages SET status = :s, stream_id = :stream, task_trace_id = :tt,"
                        " stop_reason = NULL, error_code = NULL, completed_at = NULL, instance_id = :instance"
                        " WHERE id = :id", {"s": Status.STREAMING.value, "stream": stream_id, "tt": task_trace_id,
                                            "instance": instance_id, "id": answer_id})
            yield Query("UPDATE conversations SET active_leaf_id = :leaf, updated_at = :t WHERE id = :id",
                        {"leaf": newest_leaf(rows, answer_id), "t": stamp, "id": conv_id})
            base = Reply(
                content=found["content"], thinking=found["thinking"], model=found["model"] or "",
                status=Status.STREAMING, stop_reason=None, input_tokens=int(found["input_tokens"]),
                output_tokens=int(found["output_tokens"]),
                cache_creation_input_tokens=int(found["cache_creation_input_tokens"]),
                cache_read_input_tokens=int(found["cache_read_input_tokens"]),
                cost=self._cost_value(found["cost"]), cost_estimated=bool(found["cost_estimated"]),
                blocks=orjson.loads(found["blocks"]) if found["blocks"] else None)
            trace_session = found["trace_session_id"] or conv_id
            return Turn(conv_id, found["parent_id"] or "", answer_id, history, trace_session,
                        parent_id=found["parent_id"], base=base, counted=counted)

        return await self.answer_write(operation())

    def _owned(self, conversation_id: str, owner_id: str | None, message_id: str = ""
               ) -> Generator[Query, Any, str | None]:
        """The active leaf of owner_id's conversation (a step of an operation).

        Raises:
            NotFoundError: no conversation of owner_id's by that id; another user's is "not found" too:
                its existence is not theirs to learn.
        """
        found = yield Query("SELECT owner_id, active_leaf_id FROM conversations WHERE id = :id",
                            {"id": conversation_id}, ONE)
        if found is None or found[0] != owner_id:
            raise NotFoundError(f"message {message_id} not found" if message_id else
                                f"conversation {conversation_id} not found")
        return None if found[1] is None else str(found[1])

    def _answer(self, answer_id: str, owner_id: str | None) -> Generator[Query, Any, dict[str, Any]]:
        """An answer of owner_id's, every column (a step of an operation).

        Raises:
            NotFoundError: no answer by that id in a conversation of owner_id's.
        """
        row = yield Query(f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id = :id AND role = 'assistant'",
                          {"id": answer_id}, ONE)
        if row is None:
            raise NotFoundError(f"message {answer_id} not found")
        found = dict(zip(_MESSAGE_COLUMNS.split(", "), row, strict=True))
        yield from self._owned(found["conversation_id"], owner_id, answer_id)
        return found

    def _tree(self, conversation_id: str) -> Generator[Query, Any, list[dict[str, Any]]]:
        """A conversation's messages, oldest first: id, parent_id, role, content, seq, status, stream_id (a step
        of an operation), and prompt_tokens: the input tokens (cache included) an answer's request had."""
        rows = yield Query("SELECT id, parent_id, role, content, seq, status, stream_id,"
                           " input_tokens + cache_creation_input_tokens + cache_read_input_tokens, blocks FROM messages"
                           " WHERE conversation_id = :id ORDER BY seq", {"id": conversation_id}, ALL)
        return [{"id": r[0], "parent_id": r[1], "role": r[2], "content": r[3], "seq": r[4], "status": r[5],
                 "stream_id": r[6], "prompt_tokens": int(r[7] or 0), "blocks": r[8]} for r in rows]

    async def save_reply(self, message_id: str, reply: Reply) -> None:
        """Write an assistant message's final state; a message is finished exactly once.

        RETURNING makes the check and the write one atomic statement. A retry of a save whose commit went
        through (its reply lost with the connection) matches its own write by `reply.finished_at`.

        Raises:
            FinishedElsewhereError: the message was already finished (by another process perhaps); nothing
                is written.
            StorageUnavailableError: the database cannot take the write now; retrying later may work.
        """
        finished_at = reply.finished_at or now()
        cost = self._cost_param(reply.cost)

        update = (
            "UPDATE messages SET content = :content, thinking = :thinking, model = :model, status = :status,"
            " stop_reason = :stop, input_tokens = :inp, output_tokens = :out,"
            " cache_creation_input_tokens = :cw, cache_read_input_tokens = :cr, cost = :cost,"
            " cost_estimated = :est, error_code = :err, completed_at = :t, blocks = :blocks"
            " WHERE id = :id AND (status = :streaming OR (status = :status AND completed_at = :t))")
        one_statement = not self.is_sqlite

        def operation() -> Operation[bool]:
            # The ledger's row goes in the same transaction: reports and budgets sum it, whatever is deleted
            # later. PostgreSQL: one statement (the UPDATE's new row feeds the INSERT; a CTE cannot read it back).
            sql = (f"WITH saved AS ({update} RETURNING id, stream_id, conversation_id, role, model, created_at,"
                   " completed_at, input_tokens, output_tokens, cache_creation_input_tokens, cache_read_input_tokens,"
                   f" cost, cost_estimated), ledger AS ({_usage_insert('TRUE', 'saved')}) SELECT id FROM saved"
                   ) if one_statement else update + " RETURNING id"
            rows = yield Query(
                sql,
                {
                    "content": reply.content, "thinking": reply.thinking, "model": reply.model,
                    "status": reply.status.value, "stop": reply.stop_reason, "inp": reply.input_tokens,
                    "out": reply.output_tokens, "cw": reply.cache_creation_input_tokens,
                    "cr": reply.cache_read_input_tokens,
                    "cost": cost, "est": 1 if reply.cost_estimated else 0, "err": reply.error_code, "t": finished_at,
                    "blocks": None if reply.blocks is None else orjson.dumps(reply.blocks).decode(),
                    "id": message_id, "streaming": Status.STREAMING.value,
                },
                ALL,
                alone=one_statement,
            )
            if rows and not one_statement:
                yield Query(_usage_insert("m.id = :id"), {"id": message_id})
            return bool(rows)

        if not await self.answer_write(operation()):
            raise FinishedElsewhereError(f"message {message_id} was already finished")

    async def save_progress(self, replies: Collection[tuple[str, Reply]]) -> None:
        """Write the text and usage so far of answers still `streaming` (a crash then loses only what came
        since); a message already finished is left as it is. The status stays `streaming`.

        Raises:
            StorageUnavailableError: the database cannot take the write now.
        """

        costs = [self._cost_param(reply.cost) for _, reply in replies]
        if not self.is_sqlite and len(replies) > 1:
            # PostgreSQL: the whole batch in one statement, one round trip, its rows given as arrays.
            def batched() -> Operation[None]:
                yield Query(
                    "UPDATE messages AS m SET content = v.content, thinking = v.thinking, model = v.model,"
                    " input_tokens = v.inp, output_tokens = v.out, cache_creation_input_tokens = v.cw,"
                    " cache_read_input_tokens = v.cr, cost = v.cost, cost_estimated = v.est"
                    " FROM unnest(:ids::text[], :contents::text[], :thinkings::text[], :models::text[],"
                    " :inps::bigint[], :outs::bigint[], :cws::bigint[], :crs::bigint[], :costs::numeric[],"
                    " :ests::int[]) AS v(id, content, thinking, model, inp, out, cw, cr, cost, est)"
                    " WHERE m.id = v.id AND m.status = :streaming",
                    {
                        "ids": [message_id for message_id, _ in replies],
                        "contents": [reply.content for _, reply in replies],
                        "thinkings": [reply.thinking for _, reply in replies],
                        "models": [reply.model for _, reply in replies],
                        "inps": [reply.input_tokens for _, reply in replies],
                        "outs": [reply.output_tokens for _, reply in replies],
                        "cws": [reply.cache_creation_input_tokens for _, reply in replies],
                        "crs": [reply.cache_read_input_tokens for _, reply in replies],
                        "costs": costs,
                        "ests": [1 if reply.cost_estimated else 0 for _, reply in replies],
                        "streaming": Status.STREAMING.value,
                    },
                    alone=True,
                )

            await self.answer_write(batched())
            return

        def operation() -> Operation[None]:
            for (message_id, reply), cost in zip(replies, costs, strict=True):
                yield Query(
                    "UPDATE messages SET content = :content, thinking = :thinking, model = :model,"
                    " input_tokens = :inp, output_tokens = :out, cache_creation_input_tokens = :cw,"
                    " cache_read_input_tokens = :cr, cost = :cost, cost_estimated = :est"
                    " WHERE id = :id AND status = :streaming",
                    {
                        "content": reply.content, "thinking": reply.thinking, "model": reply.model,
                        "inp": reply.input_tokens, "out": reply.output_tokens,
                        "cw": reply.cache_creation_input_tokens, "cr": reply.cache_read_input_tokens,
                        "cost": cost, "est": 1 if reply.cost_estimated else 0, "id": message_id,
                        "streaming": Status.STREAMING.value,
                    },
                    alone=len(replies) == 1,
                )

        await self.answer_write(operation())

    async def interrupt_unfinished(self, live_instances: Collection[str] = ()) -> int:
        """Mark messages left `streaming` by instances that are gone as `interrupted`, keeping their text.

        Gone: not in `live_instances` (what the hub knows is alive) and holding no instance lease (see
        hold_instance), or named by no instance at all (an answer from before instances were recorded).
        The check and the update are one transaction, so an instance that starts meanwhile is never touched.
        """
        live = set(live_instances)

        def operation() -> Operation[int]:
            params: dict[str, Any] = {"s": Status.STREAMING.value}
            rows = yield Query("SELECT DISTINCT instance_id FROM messages WHERE status = :s", params, ALL)
            gone: list[str] = []
            for row in rows:
                instance = row[0]
                if instance is None or instance in live:
                    continue
                if not (yield from self._lease_held(instance)):
                    gone.append(instance)
            named = {f"i{n}": instance for n, instance in enumerate(gone)}
            clause = "instance_id IS NULL" + (f" OR instance_id IN ({', '.join(f':{k}' for k in named)})"
                                              if named else "")
            params.update(named)
            found = yield Query(f"SELECT id FROM messages WHERE status = :s AND ({clause})", params, ALL)
            if found:
                yield Query(f"UPDATE messages SET status = :i, completed_at = :t WHERE status = :s AND ({clause})",
                            {"i": Status.INTERRUPTED.value, "t": now(), **params})
                yield from _record_usage([str(row[0]) for row in found])
            return len(found)

        return await self.write(operation())

    async def interrupt_instance(self, instance_id: str) -> int:
        """Mark the `streaming` messages of an instance that is gone as `interrupted` (what Redis did not know).

        An instance whose lease is still held is alive whatever Redis says: nothing of it is touched.
        """

        def operation() -> Operation[int]:
            if (yield from self._lease_held(instance_id)):
                return 0
            params = {"s": Status.STREAMING.value, "instance": instance_id}
            rows = yield Query("SELECT id FROM messages WHERE status = :s AND instance_id = :instance", params,
                               ALL)
            yield Query(
                "UPDATE messages SET status = :i, completed_at = :t"
                " WHERE status = :s AND instance_id = :instance",
                {"i": Status.INTERRUPTED.value, "t": now(), **params},
            )
            yield from _record_usage([str(row[0]) for row in rows])
            return len(rows)

        return await self.write(operation())

    async def list_conversations(self, owner_id: str | None = None, limit: int = 100,
                                 every_owner: bool = False, before: str | None = None,
                                 query: str | None = None) -> list[dict[str, Any]]:
        """The most recent conversations of owner_id (None: made in open mode), or of everyone: newest updated
        first, after the cursor `before` (see encode_cursor), whose title holds `query` (any case)."""
        clauses: list[str] = []
        params: dict[str, Any] = {"limit": limit}
        if not every_owner:
            clauses.append("c.owner_id IS NULL" if owner_id is None else "c.owner_id = :owner")
            if owner_id is not None:
                params["owner"] = owner_id
        if before is not None:
            params["bu"], params["bid"] = decode_cursor(before)
            clauses.append("(c.updated_at < :bu OR (c.updated_at = :bu AND c.id > :bid))")
        if query:
            escaped = query.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            params["q"] = f"%{escaped}%"
            clauses.append("LOWER(c.title) LIKE :q ESCAPE '\\'")
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = await self._fetch_all(_CONVERSATION + where + " ORDER BY c.updated_at DESC, c.id LIMIT :limit", params)
        return [self._conversation(row) for row in rows]

    def _conversation(self, row: Any) -> dict[str, Any]:
        conversation = dict(row._mapping)
        conversation["total_cost"] = self._cost_value(conversation["total_cost"])
        return conversation

    async def get_conversation(self, conversation_id: str) -> dict[str, Any]:
        if not storable_id(conversation_id):
            raise NotFoundError("conversation not found")
        row = await self._fetch_one(_CONVERSATION + " WHERE c.id = :id", {"id": conversation_id})
        if row is None:
            raise NotFoundError(f"conversation {conversation_id} not found")
        return self._conversation(row)

    def _message(self, row: Any) -> dict[str, Any]:
        """A message row, its cost as exact decimal text (None: unpriced)."""
        message = dict(row._mapping)
        cost = self._cost_value(message["cost"])
        message["cost"] = None if cost is None else format(cost, "f")
        return message

    async def list_messages(self, conversation_id: str, path: bool = False) -> list[dict[str, Any]]:
        """Every message of a conversation, parents before children (or, with `path`, the chain from the root
        to its active leaf), each with its `parent_id` and its `sibling_index` and `sibling_count` among the
        messages of the same parent, by creation order.

        Raises:
            NotFoundError: no such conversation.
        """
        conversation = await self.get_conversation(conversation_id)
        rows = await self._fetch_all(f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE conversation_id = :id"
                                     " ORDER BY seq", {"id": conversation_id})
        messages = [self._message(row) for row in rows]
        siblings: dict[str | None, list[dict[str, Any]]] = {}
        for message in messages:
            siblings.setdefault(message["parent_id"], []).append(message)
        for group in siblings.values():
            for index, message in enumerate(group):
                message["sibling_index"], message["sibling_count"] = index, len(group)
        return active_path(messages, conversation["active_leaf_id"]) if path else messages

    async def set_active_leaf(self, conversation_id: str, message_id: str) -> str:
        """Make the newest leaf under `message_id` the conversation's active leaf (following each message's
        newest child); that leaf's id.

        Raises:
            NotFoundError: the message is not one of this conversation's.
        """

        def operation() -> Operation[str]:
            rows = yield from self._tree(conversation_id)
            if not any(row["id"] == message_id for row in rows):
                raise NotFoundError(f"message {message_id} not found in this conversation")
            leaf = newest_leaf(rows, message_id)
            yield Query("UPDATE conversations SET active_leaf_id = :leaf WHERE id = :id",
                        {"leaf": leaf, "id": conversation_id})
            return leaf

        if not (storable_id(conversation_id) and storable_id(message_id)):
            raise NotFoundError(f"message {message_id[:64]} not found in this conversation")
        return await self.write(operation())

    async def rename_conversation(self, conversation_id: str, title: str) -> None:
        """Set a conversation's title (the caller checks its length).

        Raises:
            NotFoundError: no such conversation.
        """

        def operation() -> Operation[bool]:
            rows = yield Query("UPDATE conversations SET title = :title WHERE id = :id RETURNING id",
                               {"title": title, "id": conversation_id}, ALL)
            return bool(rows)

        if not storable_id(conversation_id) or not await self.write(operation()):
            raise NotFoundError(f"conversation {conversation_id[:64]} not found")

    async def continued_part(self, message_id: str, stream_id: str, text: str, thinking: str) -> Reply | None:
        """What an answer held before the continue that `stream_id` generates, for a survivor that saves the
        continue from its log alone (`text`, `thinking`): None when the stream is no continue.

        Its usage is the ledger's rows of the earlier generations. Its text is the row's text without the
        longest end that starts the continuation's `text` (what a partial save of it wrote): exact unless the
        earlier part itself ends with a start of the continuation longer than what was saved.
        """
        if not (storable_id(message_id) and storable_id(stream_id)):
            return None
        earlier = await self._fetch_one(
            "SELECT COUNT(*), COALESCE(SUM(input_tokens), 0), COALESCE(SUM(output_tokens), 0),"
            " COALESCE(SUM(cache_creation_input_tokens), 0), COALESCE(SUM(cache_read_input_tokens), 0), SUM(cost)"
            " FROM usage WHERE message_id = :m AND id <> :s", {"m": message_id, "s": stream_id})
        row = await self._fetch_one("SELECT content, thinking, model FROM messages WHERE id = :m", {"m": message_id})
        if earlier is None or not earlier[0] or row is None:
            return None
        return Reply(content=_without_start_of(str(row[0]), text), thinking=_without_start_of(str(row[1]), thinking),
                     model=str(row[2] or ""), status=Status.STREAMING, stop_reason=None,
                     input_tokens=int(earlier[1]), output_tokens=int(earlier[2]),
                     cache_creation_input_tokens=int(earlier[3]), cache_read_input_tokens=int(earlier[4]),
                     cost=self._cost_value(earlier[5]))

    async def agent_of_answer(self, answer_id: str, owner_id: str | None) -> str:
        """The agent of the conversation of an answer of owner_id's.

        Raises:
            NotFoundError: no answer of owner_id's by that id (another user's is not found either).
        """
        row = None
        if storable_id(answer_id):
            row = await self._fetch_one(
                "SELECT c.agent_id, c.owner_id FROM messages m JOIN conversations c ON c.id = m.conversation_id"
                " WHERE m.id = :id AND m.role = 'assistant'", {"id": answer_id})
        if row is None or row[1] != owner_id:
            raise NotFoundError(f"message {answer_id[:64]} not found")
        return str(row[0])

    async def conversation_of_message(self, message_id: str) -> str | None:
        if not storable_id(message_id):
            return None
        row = await self._fetch_one("SELECT conversation_id FROM messages WHERE id = :id", {"id": message_id})
        return None if row is None else str(row[0])

    async def running_streams(self, conversation_id: str) -> list[str]:
        """The streams of a conversation's answers still `streaming` (on any instance)."""
        rows = await self._fetch_all("SELECT stream_id FROM messages WHERE conversation_id = :id AND status = :s"
                                     " AND role = 'assistant' AND stream_id IS NOT NULL",
                                     {"id": conversation_id, "s": Status.STREAMING.value})
        return [str(row[0]) for row in rows]

    async def delete_conversation(self, conversation_id: str) -> int:
        """Delete a conversation, all its messages and their attachments in one transaction; the usage rows of
        its answers stay.

        An answer still `streaming` (one that a cancel did not end in time) is written to the ledger as it was
        last saved, so what it spent stays counted; its own later save then finds nothing to finish. The
        number of messages deleted.

        Raises:
            NotFoundError: no such conversation.
        """

        def operation() -> Operation[int]:
            found = yield Query("SELECT id FROM conversations WHERE id = :id", {"id": conversation_id}, ONE)
            if found is None:
                raise NotFoundError(f"conversation {conversation_id[:64]} not found")
            stamp = now()
            yield Query("UPDATE messages SET completed_at = :t WHERE conversation_id = :id AND status = :s"
                        " AND role = 'assistant'", {"t": stamp, "id": conversation_id, "s": Status.STREAMING.value})
            yield Query(_usage_insert("m.conversation_id = :id AND m.status = :s"),
                        {"id": conversation_id, "s": Status.STREAMING.value})
            rows = yield Query("DELETE FROM messages WHERE conversation_id = :id RETURNING id",
                               {"id": conversation_id}, ALL)
            yield Query("DELETE FROM attachments WHERE conversation_id = :id", {"id": conversation_id})
            yield Query("DELETE FROM conversations WHERE id = :id", {"id": conversation_id})
            return len(rows)

        if not storable_id(conversation_id):
            raise NotFoundError("conversation not found")
        return await self.write(operation())

    async def answer_of_stream(self, stream_id: str) -> str | None:
        """The id of the assistant message a stream produced, if any."""
        if not storable_id(stream_id):
            return None
        row = await self._fetch_one(
            "SELECT id FROM messages WHERE stream_id = :s AND role = 'assistant'", {"s": stream_id}
        )
        return None if row is None else str(row[0])

    async def get_message(self, message_id: str) -> dict[str, Any] | None:
        row = await self._fetch_one("SELECT * FROM messages WHERE id = :id", {"id": message_id})
        return None if row is None else self._message(row)

    async def owner_of_stream(self, stream_id: str) -> tuple[bool, str | None]:
        """(whether the stream is known, the id of the user whose conversation it answers)."""
        if not storable_id(stream_id):
            return False, None
        row = await self._fetch_one(
            "SELECT c.owner_id FROM messages m JOIN conversations c ON c.id = m.conversation_id"
            " WHERE m.stream_id = :s AND m.role = 'assistant'", {"s": stream_id}
        )
        return (False, None) if row is None else (True, row[0])


    async def history_bytes(self, conversation_id: str, owner_id: str | None) -> int:
        """The UTF-8 size of a conversation's messages, which an answer in it sends upstream, with its files at
        4 bytes a token of their estimate (0: not owner_id's)."""
        if not storable_id(conversation_id):
            return 0
        size = "LENGTH(CAST(m.content AS BLOB))" if self.is_sqlite else "OCTET_LENGTH(m.content)"
        owner_clause = "c.owner_id IS NULL" if owner_id is None else "c.owner_id = :owner"
        params: dict[str, Any] = {"id": conversation_id}
        if owner_id is not None:
            params["owner"] = owner_id
        total = await self.reads.fetch_val(
            f"SELECT COALESCE(SUM({size}), 0) FROM messages m JOIN conversations c ON c.id = m.conversation_id"
            f" WHERE m.conversation_id = :id AND {owner_clause}", params)
        if not total:
            return 0
        # A file counts as the text its estimate of tokens stands for (4 bytes a token, as the budget reads
        # bytes), not as its base64: an image costs its pixels, not its bytes.
        files = await self.reads.fetch_val("SELECT COALESCE(SUM(tokens), 0) FROM attachments WHERE conversation_id"
                                           " = :id", {"id": conversation_id})
        return int(total) + 4 * int(files or 0)


def _without_start_of(saved: str, continuation: str) -> str:
    """`saved` without its longest end that is a start of `continuation`."""
    for size in range(min(len(saved), len(continuation)), 0, -1):
        if saved.endswith(continuation[:size]):
            return saved[:-size]
    return saved


def _counted(path: list[dict[str, Any]]) -> tuple[int, int] | None:
    """The newest answer on `path` with text and a counted request: (how many messages of _history(path) come
    before it, its request's input tokens). An answer with text starts a new message of the history, so the
    messages before it are the same in the path's history and in its own request's."""
    for index in range(len(path) - 1, -1, -1):
        row = path[index]
        # An answer of several requests (a tool loop) saved their summed input: no one request's count.
        if row["role"] == "assistant" and row["content"] and row.get("prompt_tokens") and not _rounds(row):
            return len(_history(path[:index])), int(row["prompt_tokens"])
    return None


def _rounds(row: dict[str, Any]) -> bool:
    """Whether an answer's row may have come from more than one upstream request: its blocks hold a tool
    result (a tool loop) or a server tool's call (which may have stopped for pause_turn and been continued)."""
    blocks = str(row.get("blocks") or "")
    return '"tool_result"' in blocks or '"server_tool_use"' in blocks


def _history(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Messages API history of message rows (role, content, blocks): empty answers dropped, consecutive
    same-role turns merged.

    A row with `blocks` (JSON text: the API messages it stands for, see migration 0008) is sent as those
    messages, their content blocks unchanged (a thinking block's signature must come back byte for byte);
    any other row as its text. A failed or cancelled answer keeps what the user saw (its partial text); an
    answer with no text at all would be an empty turn, which the API rejects. Attachment references stay
    references here (the caller resolves them).
    """
    history: list[dict[str, Any]] = []
    for row in rows:
        blocks = row.get("blocks")
        messages = orjson.loads(blocks) if blocks else [{"role": row["role"], "content": row["content"]}]
        for message in messages:
            role, content = message["role"], message["content"]
            if not content:
                continue
            if history and history[-1]["role"] == role:
                earlier = history[-1]["content"]
                if isinstance(earlier, str) and isinstance(content, str):
                    content = earlier + "\n\n" + content
                else:
                    content = _as_blocks(earlier) + _as_blocks(content)
                history[-1] = {"role": role, "content": content}
            else:
                history.append({"role": role, "content": content})
    return history


def _as_blocks(content: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content)


def _strip_final_assistant(history: list[dict[str, Any]]) -> None:
    """A history ending with the assistant's turn, made one the API takes as a prefill: the API refuses a final
    assistant turn that ends with whitespace, so its last text is stripped at the end (and dropped if empty)."""
    if not history or history[-1]["role"] != "assistant":
        return
    content = history[-1]["content"]
    if isinstance(content, str):
        content = content.rstrip()
    else:
        content = list(content)
        while content and content[-1].get("type") == "text":
            text = str(content[-1].get("text", "")).rstrip()
            if text:
                content[-1] = {**content[-1], "text": text}
                break
            content.pop()
    if content:
        history[-1] = {"role": "assistant", "content": content}
    else:
        history.pop()
