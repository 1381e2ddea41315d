"""Attachments: files stored once, owned like their message, resolved into history as base64 blocks.

A message holds its files as references (`{"type": "image"|"document", "source": {"type": "attachment",
"id"}}`, see migration 0008); `resolve_history` turns them into the API's base64 sources each time a history
is built, so every turn that includes the message sends its files. Bytes live in the `attachments` table
(migration 0009 says why).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Generator, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from ..attachments import PDF, InlineAttachment, file_tokens, reference
from ..errors import ConflictError, NotFoundError
from .base import StoreBase
from .queries import ALL, ONE, Query
from .records import new_id, now, storable_id

#: An upload no message used is removed once it is this old (the next upload removes it).
UNUSED_SECONDS = 24 * 3600


def _owned(attachment_id: str, owner_id: str | None) -> tuple[str, dict[str, Any]]:
    """The WHERE clause and parameters of owner_id's attachment (None: one uploaded in open mode)."""
    if owner_id is None:
        return "id = :id AND owner_id IS NULL", {"id": attachment_id}
    return "id = :id AND owner_id = :owner", {"id": attachment_id, "owner": owner_id}


def insert_attachment(owner_id: str | None, attachment: InlineAttachment, attachment_id: str | None = None
                      ) -> Generator[Query, Any, dict[str, Any]]:
    """Save a checked file, used by no message yet (a step of an operation), under `attachment_id` (None: a new
    id); {id, name, mediaType, size}.

    Uploads no message used for more than a day are removed first, as sessions are: the table holds no more
    unused files than a day's uploads.
    """
    cutoff = (datetime.now(UTC) - timedelta(seconds=UNUSED_SECONDS)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    yield Query("DELETE FROM attachments WHERE message_id IS NULL AND created_at < :cutoff", {"cutoff": cutoff})
    attachment_id = attachment_id or "att_" + new_id()
    yield Query("INSERT INTO attachments (id, owner_id, conversation_id, message_id, name, media_type, size,"
                " tokens, sha256, data, created_at) VALUES (:id, :owner, NULL, NULL, :name, :type, :size, :tokens,"
                " :sha, :data, :t)",
                {"id": attachment_id, "owner": owner_id, "name": attachment.name, "type": attachment.media_type,
                 "size": len(attachment.data), "tokens": file_tokens(attachment.media_type, attachment.data),
                 "sha": hashlib.sha256(attachment.data).hexdigest(),
                 "data": attachment.data, "t": now()})
    return {"id": attachment_id, "name": attachment.name, "mediaType": attachment.media_type,
            "size": len(attachment.data)}


def attachment_ids(blocks: Iterable[Any]) -> list[str]:
    """The ids of the attachment references among content blocks, in order."""
    found: list[str] = []
    for block in blocks:
        if isinstance(block, dict) and block.get("type") in ("image", "document"):
            source = block.get("source")
            if isinstance(source, dict) and source.get("type") == "attachment" and isinstance(source.get("id"), str):
                found.append(source["id"])
    return found


def claim(ids: list[str], owner_id: str | None, conversation_id: str, message_id: str
          ) -> Generator[Query, Any, dict[str, str]]:
    """Give owner_id's unused attachments `ids` to a message (a step of the operation that saves it); their
    media types by id.

    Raises:
        NotFoundError: an id names no attachment of owner_id's (another user's is not found either).
        ConflictError (attachment_used): one already belongs to another message.
    """
    types: dict[str, str] = {}
    for attachment_id in ids:
        where, params = _owned(attachment_id, owner_id)
        row = yield Query(f"SELECT message_id, media_type FROM attachments WHERE {where}", params, ONE)
        if row is None:
            raise NotFoundError(f"attachment {attachment_id[:64]} not found")
        if row[0] is not None:
            raise ConflictError(f"attachment {attachment_id[:64]} belongs to another message; upload it again",
                                code="attachment_used")
        types[attachment_id] = str(row[1])
    for attachment_id in ids:
        yield Query("UPDATE attachments SET conversation_id = :conv, message_id = :msg WHERE id = :id",
                    {"conv": conversation_id, "msg": message_id, "id": attachment_id})
    return types


def typed_references(blocks: list[dict[str, Any]], types: dict[str, str]) -> list[dict[str, Any]]:
    """The blocks with each attachment reference's type ("image" or "document") its file's."""
    typed: list[dict[str, Any]] = []
    for block in blocks:
        ids = attachment_ids([block])
        typed.append(reference(ids[0], types[ids[0]]) if ids and ids[0] in types else block)
    return typed


def resolve_history(history: list[dict[str, Any]]) -> Generator[Query, Any, list[dict[str, Any]]]:
    """The history with each attachment reference replaced by the API's base64 block (a step of an
    operation): an image `{"type": "image", "source": {"type": "base64", "media_type", "data"}}`, a PDF
    `{"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data"}, "title"}`.
    A reference to a file that is gone (it cannot be, while its conversation exists) becomes a text block
    saying so, so the history stays one the API takes. No query when the history has no references."""
    wanted = sorted({attachment_id for message in history if isinstance(message.get("content"), list)
                     for attachment_id in attachment_ids(message["content"])})
    if not wanted:
        return history
    names = {f"a{n}": attachment_id for n, attachment_id in enumerate(wanted)}
    rows = yield Query(f"SELECT id, name, media_type, data FROM attachments WHERE id IN"
                       f" ({', '.join(':' + key for key in names)})", names, ALL)
    files = {str(row[0]): (str(row[1]), str(row[2]), bytes(row[3])) for row in rows or []}
    resolved: list[dict[str, Any]] = []
    for message in history:
        content = message.get("content")
        if not isinstance(content, list):
            resolved.append(message)
            continue
        blocks: list[Any] = []
        for block in content:
            ids = attachment_ids([block])
            if not ids:
                blocks.append(block)
                continue
            found = files.get(ids[0])
            if found is None:
                blocks.append({"type": "text", "text": "[an attached file that is no longer stored]"})
                continue
            name, media_type, data = found
            source = {"type": "base64", "media_type": media_type, "data": base64.b64encode(data).decode()}
            if media_type == PDF:
                blocks.append({"type": "document", "source": source, "title": name})
            else:
                blocks.append({"type": "image", "source": source})
        resolved.append({**message, "content": blocks})
    return resolved


class AttachmentQueries(StoreBase):
    """Attachments: upload, read, and the size a conversation's files add to its requests."""

    async def add_attachment(self, owner_id: str | None, attachment: InlineAttachment) -> dict[str, Any]:
        """Save a checked file (see server/attachments.py) that no message uses yet: {id, name, mediaType,
        size}. A message's `attachmentIds` then gives it to that message (see begin_turn)."""
        return await self.write(insert_attachment(owner_id, attachment))

    async def get_attachment(self, attachment_id: str, owner_id: str | None) -> dict[str, Any]:
        """owner_id's attachment: {id, name, media_type, size, sha256, data, conversation_id, message_id}.

        Raises:
            NotFoundError: no attachment of owner_id's by that id (another user's is not found either).
        """
        row = None
        if storable_id(attachment_id):
            where, params = _owned(attachment_id, owner_id)
            row = await self._fetch_one(
                f"SELECT id, name, media_type, size, sha256, data, conversation_id, message_id FROM attachments"
                f" WHERE {where}", params)
        if row is None:
            raise NotFoundError(f"attachment {attachment_id[:64]} not found")
        found = dict(row._mapping)
        found["data"] = bytes(found["data"])
        return found

    async def attachment_tokens(self, attachment_ids: tuple[str, ...], owner_id: str | None) -> int:
        """The token estimate (see server/attachments.py file_tokens) of owner_id's attachments among the ids
        (another user's count 0: the turn that names them is refused)."""
        total = 0
        for attachment_id in attachment_ids:
            if storable_id(attachment_id):
                where, params = _owned(attachment_id, owner_id)
                total += int(await self._fetch_val(f"SELECT tokens FROM attachments WHERE {where}", params) or 0)
        return total
