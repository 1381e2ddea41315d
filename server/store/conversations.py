"""Conversations and messages: a turn's start, an answer's saves, interrupted answers, and their reads."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from ..errors import NotFoundError, TooLargeError
from .base import StoreBase
from .queries import ALL, ONE, Operation, Query
from .records import FinishedElsewhereError, Reply, Status, Turn, new_id, now, storable_id

# A conversation with its message count and the exact sum of its costs (NULL: none priced), summed by the
# database: NUMERIC on PostgreSQL, whole nano-dollars on SQLite (see migration 0005).
_CONVERSATION = (
    "SELECT c.id, c.agent_id, c.title, c.created_at, c.updated_at, c.owner_id,"
    " (SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id) AS message_count,"
    " (SELECT SUM(m.cost) FROM messages m WHERE m.conversation_id = c.id) AS total_cost"
    " FROM conversations c"
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
    ) -> Turn:
        """Save the user's message and an empty assistant message; return the history to send.

        `instance_id` names the server instance that generates the answer (see interrupt_unfinished).

        Raises:
            NotFoundError: conversation_id names no conversation of owner_id; nothing is saved.
            TooLargeError: the conversation already holds max_history messages; nothing is saved.
        """

        # PostgreSQL takes the conversation's write and both messages as one statement (data-modifying CTE),
        # a new conversation's whole start in one round trip; SQLite's writer batches statements anyway.
        one_statement = not self.is_sqlite

        def operation() -> Operation[Turn]:
            stamp = now()
            history: list[dict[str, str]] = []
            if conversation_id is None:
                conv_id = new_id()
                title = " ".join(user_text.split())[:80] or "New conversation"
                conversation_sql = ("INSERT INTO conversations (id, agent_id, title, created_at, updated_at, owner_id)"
                                    " VALUES (:conv, :agent, :title, :t, :t, :owner)")
                conversation_params: dict[str, Any] = {"agent": agent_id, "title": title, "owner": owner_id}
                seq = 0
            else:
                conv_id = conversation_id
                found = yield Query("SELECT owner_id FROM conversations WHERE id = :id", {"id": conv_id}, ONE)
                # Another user's conversation is "not found": its existence is not theirs to learn.
                if found is None or found[0] != owner_id:
                    raise NotFoundError(f"conversation {conv_id} not found")
                rows = yield Query(
                    "SELECT role, content, seq FROM messages WHERE conversation_id = :id ORDER BY seq",
                    {"id": conv_id}, ALL,
                )
                if max_history is not None and len(rows) + 2 > max_history:
                    raise TooLargeError(
                        f"this conversation has {len(rows)} messages and the limit is {max_history};"
                        " start a new conversation", code="history_too_long")
                history = _history([(row[0], row[1]) for row in rows])
                seq = (rows[-1][2] + 1) if rows else 0
                conversation_sql = "UPDATE conversations SET updated_at = :t WHERE id = :conv"
                conversation_params = {}
            user_id, assistant_id = new_id(), new_id()
            # One trace session per conversation unless the caller names one.
            trace_session = trace_session_id or conv_id
            messages_sql = (
                "INSERT INTO messages (id, conversation_id, seq, role, content, model, status, stream_id,"
                " trace_session_id, task_trace_id, created_at, completed_at, instance_id)"
                " VALUES (:uid, :conv, :useq, :urole, :content, NULL, :complete, :stream, :ts, :tt, :t, :t, :instance),"
                " (:aid, :conv, :aseq, :arole, '', :model, :streaming, :stream, :ts, :tt, :t, NULL, :instance)"
            )
            messages_params = {
                "conv": conv_id, "t": stamp, "stream": stream_id, "ts": trace_session, "tt": task_trace_id,
                "instance": instance_id, "uid": user_id, "useq": seq, "urole": "user", "content": user_text,
                "complete": Status.COMPLETE.value, "aid": assistant_id, "aseq": seq + 1, "arole": "assistant",
                "model": model, "streaming": Status.STREAMING.value,
            }
            if one_statement:
                yield Query(f"WITH conversation AS ({conversation_sql}) {messages_sql}",
                            {**conversation_params, **messages_params}, alone=conversation_id is None)
            else:
                yield Query(conversation_sql, {"conv": conv_id, "t": stamp, **conversation_params})
                yield Query(messages_sql, messages_params)
            history.append({"role": "user", "content": user_text})
            return Turn(conv_id, user_id, assistant_id, _history([(m["role"], m["content"]) for m in history]),
                        trace_session)

        return await self.answer_write(operation())

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

        def operation() -> Operation[bool]:
            rows = yield Query(
                "UPDATE messages SET content = :content, thinking = :thinking, model = :model, status = :status,"
                " stop_reason = :stop, input_tokens = :inp, output_tokens = :out,"
                " cache_creation_input_tokens = :cw, cache_read_input_tokens = :cr, cost = :cost,"
                " cost_estimated = :est, error_code = :err, completed_at = :t"
                " WHERE id = :id AND (status = :streaming OR (status = :status AND completed_at = :t)) RETURNING id",
                {
                    "content": reply.content, "thinking": reply.thinking, "model": reply.model,
                    "status": reply.status.value, "stop": reply.stop_reason, "inp": reply.input_tokens,
                    "out": reply.output_tokens, "cw": reply.cache_creation_input_tokens,
                    "cr": reply.cache_read_input_tokens,
                    "cost": cost, "est": 1 if reply.cost_estimated else 0, "err": reply.error_code, "t": finished_at,
                    "id": message_id, "streaming": Status.STREAMING.value,
                },
                ALL,
                alone=True,
            )
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
            found = yield Query(f"SELECT COUNT(*) FROM messages WHERE status = :s AND ({clause})", params, ONE)
            if found[0]:
                yield Query(f"UPDATE messages SET status = :i, completed_at = :t WHERE status = :s AND ({clause})",
                            {"i": Status.INTERRUPTED.value, "t": now(), **params})
            return int(found[0])

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
            return len(rows)

        return await self.write(operation())

    async def list_conversations(self, owner_id: str | None = None, limit: int = 100,
                                 every_owner: bool = False) -> list[dict[str, Any]]:
        """The most recent conversations of owner_id (None: made in open mode), or of everyone."""
        select = _CONVERSATION
        order = " ORDER BY c.updated_at DESC, c.id LIMIT :limit"
        if every_owner:
            rows = await self._fetch_all(select + order, {"limit": limit})
        elif owner_id is None:
            rows = await self._fetch_all(select + " WHERE c.owner_id IS NULL" + order, {"limit": limit})
        else:
            rows = await self._fetch_all(select + " WHERE c.owner_id = :owner" + order,
                                           {"limit": limit, "owner": owner_id})
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

    async def list_messages(self, conversation_id: str) -> list[dict[str, Any]]:
        await self.get_conversation(conversation_id)
        rows = await self._fetch_all(
            "SELECT id, conversation_id, seq, role, content, thinking, model, status, stop_reason, input_tokens,"
            " output_tokens, cache_creation_input_tokens, cache_read_input_tokens, cost, cost_estimated,"
            " error_code, stream_id, trace_session_id, task_trace_id, created_at, completed_at"
            " FROM messages WHERE conversation_id = :id ORDER BY seq",
            {"id": conversation_id},
        )
        return [self._message(row) for row in rows]

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
        """The UTF-8 size of a conversation's messages, which an answer in it sends upstream (0: not owner_id's)."""
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
        return int(total or 0)


def _history(messages: list[tuple[str, str]]) -> list[dict[str, str]]:
    """The Messages API history: empty answers dropped, consecutive same-role turns merged.

    A failed or cancelled answer keeps what the user saw (its partial text); an answer
    with no text at all would be an empty turn, which the API rejects.
    """
    history: list[dict[str, str]] = []
    for role, content in messages:
        if not content:
            continue
        if history and history[-1]["role"] == role:
            history[-1] = {"role": role, "content": history[-1]["content"] + "\n\n" + content}
        else:
            history.append({"role": role, "content": content})
    return history


