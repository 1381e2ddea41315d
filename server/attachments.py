"""Attachments' checks (issue 19): what a file is, from its bytes, and whether it may be sent.

Pure: no I/O. The media type is the one the bytes' magic number names, never what the client claims; a file
whose bytes name no type the Messages API takes, or another one than claimed, is refused (415). Sizes:

- `RELAY_MAX_ATTACHMENT_BYTES` (Settings.max_attachment_bytes) bounds each file and, one setting for both, the
  files of one message together (413 too_large). Its default, 24 MiB, is the API's 32 MB request limit less
  base64's third: a PDF of that size still fits one request.
- An image is also bounded by the API's own limit, 5 MB of base64 per image (IMAGE_MAX_BYTES of raw bytes):
  a bigger one the API would refuse, so it is refused here first. A PDF may have at most 100 pages (the
  API's limit; see ContextWindow's estimate, which counts pages).
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from dataclasses import dataclass
from typing import Any

from .errors import BadRequestError, TooLargeError, UnsupportedMediaTypeError

IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")
PDF = "application/pdf"
MEDIA_TYPES = (*IMAGE_TYPES, PDF)
#: The API's limit of an image: 5 MB of base64 (5 * 1024 * 1024 characters), so 3.75 MiB of bytes.
IMAGE_MAX_BYTES = 5 * 1024 * 1024 * 3 // 4
#: The API's limit of a request, 32 MB, less base64's growth: the default of RELAY_MAX_ATTACHMENT_BYTES.
DEFAULT_MAX_ATTACHMENT_BYTES = 24 * 1024 * 1024
#: The API's limit of a PDF's pages.
PDF_MAX_PAGES = 100
NAME_LIMIT = 255
#: Attachments of one message at most.
PER_MESSAGE = 20


def detect_media_type(data: bytes) -> str | None:
    """The media type the bytes' magic number names, among MEDIA_TYPES; None: none of them."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if len(data) >= 12 and data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "image/webp"
    if data.startswith(b"%PDF-"):
        return PDF
    return None


def checked_media_type(data: bytes, claimed: str | None, max_bytes: int) -> str:
    """The file's media type, from its bytes, once it may be sent.

    Raises:
        UnsupportedMediaTypeError (415, unsupported_media_type, details.detectedType: the type the bytes name,
            or null): not an image or PDF the API takes, or not the type `claimed` (when claimed).
        TooLargeError (413, too_large): empty, over `max_bytes`, or an image over the API's IMAGE_MAX_BYTES.
    """
    detected = detect_media_type(data)
    claim = None if claimed is None else claimed.strip().lower()
    if detected is None:
        raise UnsupportedMediaTypeError(
            "the file is not a PNG, JPEG, GIF or WebP image nor a PDF (checked from its bytes)",
            details={"detectedType": None, "claimedType": claimed})
    if claim not in (None, "", "application/octet-stream") and claim != detected and not (
            claim == "image/jpg" and detected == "image/jpeg"):
        raise UnsupportedMediaTypeError(f"the file is {detected} (checked from its bytes), not {claimed}",
                                        details={"detectedType": detected, "claimedType": claimed})
    if len(data) > max_bytes:
        raise TooLargeError(f"the file is {len(data)} bytes; the limit is {max_bytes}",
                            details={"size": len(data), "limit": max_bytes})
    if detected in IMAGE_TYPES and len(data) > IMAGE_MAX_BYTES:
        raise TooLargeError(f"the image is {len(data)} bytes; the API takes images of at most {IMAGE_MAX_BYTES}"
                            " bytes (5 MB of base64)", details={"size": len(data), "limit": IMAGE_MAX_BYTES})
    if detected == PDF and pdf_pages(data) > PDF_MAX_PAGES:
        raise TooLargeError(f"the PDF has {pdf_pages(data)} pages; the API takes at most {PDF_MAX_PAGES}",
                            details={"pages": pdf_pages(data), "limit": PDF_MAX_PAGES})
    return detected


_PAGE = re.compile(rb"/Type\s*/Page(?![a-zA-Z])")


def pdf_pages(data: bytes) -> int:
    """A PDF's pages, roughly: its page objects (`/Type /Page`) as written in the file, at least 1. Exact for
    PDFs whose page objects are not inside compressed object streams; those count as 1 page each stream."""
    return max(1, len(_PAGE.findall(data)))


#: The estimate of an image's tokens: the API counts width * height / 750 and scales an image down to about
#: 1.15 megapixels first, so no image costs more than about 1,600 tokens.
IMAGE_TOKENS = 1600
#: The estimate of a PDF page's tokens: its text (up to a few thousand tokens) and its page as an image.
PDF_PAGE_TOKENS = 3000


def file_tokens(media_type: str, data: bytes) -> int:
    """The conservative token estimate of a checked file: IMAGE_TOKENS, or PDF_PAGE_TOKENS a PDF page."""
    return pdf_pages(data) * PDF_PAGE_TOKENS if media_type == PDF else IMAGE_TOKENS


def block_estimate(block: dict[str, Any]) -> int | None:
    """The conservative token estimate of an image or document block with a base64 source; None for any
    other block. An image is IMAGE_TOKENS; a PDF is PDF_PAGE_TOKENS a page (see pdf_pages)."""
    kind = block.get("type")
    source = block.get("source")
    if kind not in ("image", "document") or not isinstance(source, dict) or source.get("type") != "base64":
        return None
    if kind == "image":
        return IMAGE_TOKENS
    try:
        data = base64.b64decode(str(source.get("data", "")))
    except (binascii.Error, ValueError):
        return None
    return file_tokens(PDF, data)


def clean_name(raw: Any, fallback: str = "attachment") -> str:
    """A file name to keep and show: printable, without directories, at most NAME_LIMIT characters."""
    name = str(raw or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable()).strip()
    return name[:NAME_LIMIT] or fallback


_BASE64 = re.compile(rb"[A-Za-z0-9+/]*={0,2}")


def decode_base64(text: Any, what: str) -> bytes:
    """Strict base64 (the standard alphabet, padded, no whitespace).

    Raises:
        BadRequestError: not a string of such base64.
    """
    if not isinstance(text, str):
        raise BadRequestError(f"{what} must be a base64 string")
    raw = text.encode("ascii", "replace")
    if len(raw) % 4 or not _BASE64.fullmatch(raw):
        raise BadRequestError(f"{what} is not valid base64")
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequestError(f"{what} is not valid base64") from None


@dataclass(frozen=True, slots=True)
class InlineAttachment:
    """A file sent inline in a message (its bytes checked: see checked_media_type)."""

    name: str
    media_type: str
    data: bytes


def parse_inline(raw: Any, max_bytes: int) -> tuple[InlineAttachment, ...]:
    """A message's `attachments: [{name, mediaType, data (base64)}]`, each checked, at most `max_bytes` in all.

    Raises:
        BadRequestError (bad shape or base64), UnsupportedMediaTypeError, TooLargeError.
    """
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise BadRequestError("attachments must be a list of {name, mediaType, data}")
    if len(raw) > PER_MESSAGE:
        raise BadRequestError(f"a message may carry at most {PER_MESSAGE} attachments")
    found: list[InlineAttachment] = []
    total = 0
    for index, item in enumerate(raw):
        if not isinstance(item, dict):
            raise BadRequestError("attachments must be a list of {name, mediaType, data}")
        claimed = item.get("mediaType")
        if claimed is not None and not isinstance(claimed, str):
            raise BadRequestError(f"attachments[{index}].mediaType must be a string")
        data = decode_base64(item.get("data"), f"attachments[{index}].data")
        media_type = checked_media_type(data, claimed, max_bytes)
        total += len(data)
        if total > max_bytes:
            raise TooLargeError(f"the message's attachments are over {max_bytes} bytes in all",
                                details={"limit": max_bytes})
        found.append(InlineAttachment(clean_name(item.get("name")), media_type, data))
    return tuple(found)


def parse_ids(raw: Any) -> tuple[str, ...]:
    """A message's `attachmentIds: [..]` (ids from POST /api/attachments), each once.

    Raises:
        BadRequestError: not a list of ids.
    """
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(item, str) and 0 < len(item) <= 200 for item in raw):
        raise BadRequestError("attachmentIds must be a list of attachment ids")
    if len(raw) > PER_MESSAGE:
        raise BadRequestError(f"a message may carry at most {PER_MESSAGE} attachments")
    if len(set(raw)) != len(raw):
        raise BadRequestError("attachmentIds names an attachment twice")
    return tuple(raw)


def reference(attachment_id: str, media_type: str) -> dict[str, Any]:
    """The content block that stands for an attachment in a stored message (resolved when history is built)."""
    return {"type": "image" if media_type in IMAGE_TYPES else "document",
            "source": {"type": "attachment", "id": attachment_id}}


def message_blocks(text: str, attachment_ids: tuple[str, ...], inline: tuple[InlineAttachment, ...]
                   ) -> tuple[list[dict[str, Any]] | None, dict[str, InlineAttachment]]:
    """A user message's content blocks and the inline files to save with it (by the ids they are given):
    references to the uploaded files, then to the inline ones, then the text (when there is any). (None, {}):
    a plain message. A reference to an uploaded file says "image" until the store gives it the file's own
    type (see claim in server/store/attachments.py)."""
    if not attachment_ids and not inline:
        return None, {}
    files = {"att_" + secrets.token_hex(16): attachment for attachment in inline}
    blocks = [reference(attachment_id, "image/png") for attachment_id in attachment_ids]
    blocks += [reference(attachment_id, attachment.media_type) for attachment_id, attachment in files.items()]
    if text.strip():
        blocks.append({"type": "text", "text": text})
    return blocks, files


def encoded_size(size: int) -> int:
    """The base64 length of `size` bytes."""
    return (size + 2) // 3 * 4


def inline_room(max_attachment_bytes: int) -> int:
    """What a POST body or WebSocket frame may hold beyond its text limits for inline attachments: their
    base64 at the limit, and their names and media types (PER_MESSAGE of them)."""
    return encoded_size(max_attachment_bytes) + PER_MESSAGE * (NAME_LIMIT * 6 + 128)
