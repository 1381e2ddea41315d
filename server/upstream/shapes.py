"""What the offline model answers beyond plain text, and which requests it refuses as the API would.

Pure: no I/O. `server/upstream/offline.py` streams the blocks `plan` returns; the in-process transport and
`python -m server.mock_upstream` both refuse with `request_refusal` (the one check, so both say the same).

The shapes follow the recorded real streams in tests/data/anthropic-streams/ (docs_web_search.sse,
rec_sonnet35_text_then_tool_use.sse, rec_sonnet37_extended_thinking_curl.sse). Directives in the text of the
newest user message (the newest one that is not only tool results):

- `[search]`, when the request offers web search (a tool whose type starts with `web_search_`): a
  server_tool_use block (input `{"query": <the message text without directives>}`), a web_search_tool_result
  block with 2 or 3 results (or a `max_uses_exceeded` error once the turn used `max_uses`), then text blocks
  whose citations arrive as citations_delta before their text; usage counts
  `server_tool_use.web_search_requests`. With `pause`, the response stops with `pause_turn` after the results;
  sending the same messages plus that assistant content finishes it.
- `[tool]`, when the request has client tools (tools without a `type`, or `type: custom`): a tool_use block for
  the first one, its input built from its input_schema (each required string property gets the message text
  without directives, a number or integer 1, a boolean true, anything else null), stop_reason `tool_use`. When
  the request ends with a user message of tool results, the answer is text quoting each result's content.
- both: the search, then the tool call in the same response, then (after the tool results) the final text.

With `thinking: {type: enabled}` the first response of a turn starts with a thinking block whose signature is
an HMAC-SHA256 (base64) of its text under a key drawn once per process: `verify_signature` tells whether a
thinking block sent back is byte for byte one this process issued.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

_SIGNING_KEY = secrets.token_bytes(32)

SEARCH_DIRECTIVE = "[search]"
TOOL_DIRECTIVE = "[tool]"
IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")
_IMAGE_MAGIC = {"image/png": (b"\x89PNG\r\n\x1a\n",), "image/jpeg": (b"\xff\xd8\xff",),
                "image/gif": (b"GIF87a", b"GIF89a"), "image/webp": (b"RIFF",)}
MIN_THINKING_BUDGET = 1024


def sign_thinking(thinking: str) -> str:
    """The signature this process issues for a thinking text."""
    return base64.b64encode(hmac.new(_SIGNING_KEY, thinking.encode(), hashlib.sha256).digest()).decode()


def verify_signature(thinking: Any, signature: Any) -> bool:
    """True when `signature` is the one this process issued for exactly `thinking`."""
    if not isinstance(thinking, str) or not isinstance(signature, str):
        return False
    return hmac.compare_digest(sign_thinking(thinking), signature)


def _blocks(message: Any) -> list[Any]:
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, list):
        return content
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return []


def _is_tool_results(message: Any) -> bool:
    """A user message made only of tool_result blocks (the answer to a tool call, not a new question)."""
    blocks = _blocks(message)
    return bool(blocks) and all(isinstance(b, dict) and b.get("type") == "tool_result" for b in blocks)


def turn_start(messages: list[Any]) -> int:
    """The index of the newest user message that asks something (not only tool results); -1 when none."""
    for index in range(len(messages) - 1, -1, -1):
        message = messages[index]
        if isinstance(message, dict) and message.get("role") == "user" and not _is_tool_results(message):
            return index
    return -1


def text_of(message: Any) -> str:
    """The message's text blocks joined by spaces."""
    return " ".join(str(b.get("text", "")) for b in _blocks(message) if isinstance(b, dict) and b.get("type") == "text")


def without_directives(text: str) -> str:
    """The text with `[search]` and `[tool]` removed and its whitespace collapsed."""
    text = re.sub(r"\[(search|tool)\]", " ", text, flags=re.IGNORECASE)
    return " ".join(text.split())


def web_search_tool(request: dict[str, Any]) -> dict[str, Any] | None:
    """The request's web search tool definition, if it offers one."""
    for tool in request.get("tools") or []:
        if isinstance(tool, dict) and str(tool.get("type", "")).startswith("web_search_"):
            return tool
    return None


def client_tools(request: dict[str, Any]) -> list[dict[str, Any]]:
    """The request's client tools: those the caller runs (no server tool type)."""
    return [tool for tool in request.get("tools") or []
            if isinstance(tool, dict) and tool.get("type") in (None, "custom") and tool.get("name")]


def tool_input(tool: dict[str, Any], text: str) -> dict[str, Any]:
    """The input the offline model gives a tool: each required property by its schema type."""
    schema = tool.get("input_schema")
    schema = schema if isinstance(schema, dict) else {}
    properties = schema.get("properties")
    properties = properties if isinstance(properties, dict) else {}
    built: dict[str, Any] = {}
    for name in schema.get("required") or []:
        prop = properties.get(name)
        kind = prop.get("type") if isinstance(prop, dict) else None
        if kind == "string":
            built[name] = text
        elif kind in ("number", "integer"):
            built[name] = 1
        elif kind == "boolean":
            built[name] = True
        else:
            built[name] = None
    return built


def search_results(query: str, allowed_domains: Any = None) -> list[dict[str, Any]]:
    """2 or 3 deterministic results for a query, shaped as the API's web_search_result blocks.

    Their sites are example.com, example.org, example.net, or the tool's allowed_domains when it has some.
    """
    digest = hashlib.sha256(query.encode()).hexdigest()
    slug = "-".join(re.findall(r"[a-z0-9]+", query.lower())[:6]) or "search"
    count = 2 + int(digest[0], 16) % 2
    sites = ["example.com", "example.org", "example.net"]
    if isinstance(allowed_domains, list) and allowed_domains:
        sites = [str(allowed_domains[n % len(allowed_domains)]) for n in range(3)]
    ages = ["April 30, 2025", None, "2 days ago"]
    return [{
        "type": "web_search_result",
        "title": f"{query or 'Search'}: source {n + 1} ({sites[n]})",
        "url": f"https://{sites[n]}/{slug}/{digest[n * 8:n * 8 + 8]}",
        "encrypted_content": base64.b64encode(f"offline result {n + 1} for {query}".encode()).decode(),
        "page_age": ages[n],
    } for n in range(count)]


def citation(result: dict[str, Any], index: int) -> dict[str, Any]:
    """The web_search_result_location citation of a result, as a citations_delta carries it."""
    return {
        "type": "web_search_result_location",
        "cited_text": f"Offline search result {index + 1}: {result['title']}.",
        "url": result["url"],
        "title": result["title"],
        "encrypted_index": base64.b64encode(f"{result['url']}#{index}".encode()).decode(),
    }


@dataclass(slots=True)
class Block:
    """One content block to stream: its content_block_start shape and its deltas (in order)."""

    start: dict[str, Any]
    deltas: Sequence[dict[str, Any]] = field(default_factory=list)
    output_tokens: int = 0


@dataclass(slots=True)
class Plan:
    """A response: its blocks (None for a plain demo answer), stop reason and web search requests."""

    blocks: list[Block] | None
    stop_reason: str = "end_turn"
    web_search_requests: int = 0


def _tokens(text: str) -> int:
    return (len(text.encode()) + 3) // 4


def _words(text: str) -> list[str]:
    parts = text.split(" ")
    return [parts[0]] + [" " + word for word in parts[1:]]


def _text_block(text: str, citations: list[dict[str, Any]] | None = None) -> Block:
    deltas: list[dict[str, Any]] = [{"type": "citations_delta", "citation": c} for c in citations or []]
    words = _words(text)
    deltas += [{"type": "text_delta", "text": word} for word in words]
    return Block({"type": "text", "text": ""}, deltas, len(words))


def _json_pieces(value: Any, size: int = 12) -> list[dict[str, Any]]:
    text = orjson.dumps(value).decode()
    pieces = [""] + [text[i:i + size] for i in range(0, len(text), size)]
    return [{"type": "input_json_delta", "partial_json": piece} for piece in pieces]


def _json_tokens(value: Any) -> int:
    return _tokens(orjson.dumps(value).decode())


def _quote(text: str, words: int = 8) -> str:
    parts = text.split()
    return " ".join(parts[:words]) + (" …" if len(parts) > words else "")


def _result_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(b.get("text", "")) for b in content if isinstance(b, dict) and b.get("type") == "text")
    return ""


def plan(request: dict[str, Any], pause: bool = False) -> Plan:
    """What the offline model answers to a request (already validated by `request_refusal`).

    A plain demo answer (blocks None) when thinking is off and no directive applies.
    """
    messages = [m for m in request.get("messages") or [] if isinstance(m, dict)]
    start = turn_start(messages)
    asked = text_of(messages[start]) if start >= 0 else ""
    lowered = asked.lower()
    question = without_directives(asked)
    search_tool = web_search_tool(request)
    tools = client_tools(request)
    want_search = SEARCH_DIRECTIVE in lowered and search_tool is not None
    want_tool = TOOL_DIRECTIVE in lowered and bool(tools)
    thinking = request.get("thinking")
    thinks = isinstance(thinking, dict) and thinking.get("type") == "enabled"
    turn = messages[start + 1:] if start >= 0 else []
    turn_blocks = [b for m in turn if m.get("role") == "assistant" for b in _blocks(m) if isinstance(b, dict)]
    searches = sum(1 for b in turn_blocks if b.get("type") == "server_tool_use" and b.get("name") == "web_search")
    called = any(b.get("type") == "tool_use" for b in turn_blocks)
    last = messages[-1] if messages else {}
    continuing = last.get("role") == "assistant"
    after_tools = last.get("role") == "user" and _is_tool_results(last)
    if not (thinks or want_search or want_tool or after_tools):
        return Plan(None)

    blocks: list[Block] = []
    result = Plan(blocks)
    if thinks and not any(m.get("role") == "assistant" for m in turn):
        steps = []
        if want_search and not searches:
            steps.append("search the web first")
        if want_tool and not called:
            steps.append(f"call the {tools[0]['name']} tool")
        thought = (f"The user wrote “{_quote(question)}”. "
                   + (f"I should {' and then '.join(steps)}." if steps else "I can answer this directly.")
                   + " This is the offline model thinking, so the answer is a demo.")
        deltas: list[dict[str, Any]] = [{"type": "thinking_delta", "thinking": w} for w in _words(thought)]
        deltas.append({"type": "signature_delta", "signature": sign_thinking(thought)})
        blocks.append(Block({"type": "thinking", "thinking": "", "signature": ""}, deltas, _tokens(thought)))

    if after_tools:
        names = {b.get("id"): b.get("name") for b in _blocks(messages[-2]) if isinstance(b, dict)
                 and b.get("type") == "tool_use"} if len(messages) > 1 else {}
        for item in _blocks(last):
            name = names.get(item.get("tool_use_id"), "the tool")
            verb = "failed with" if item.get("is_error") else "returned"
            blocks.append(_text_block(f"The tool {name} {verb}: “{_result_text(item.get('content'))}”."))
        blocks.append(_text_block("This is the offline model's answer after the tool call."))
        return result

    results: list[dict[str, Any]] | None = None
    if want_search and not searches:
        blocks.append(_text_block(f"I'll search the web for “{_quote(question)}”."))
        tool_id = "srvtoolu_offline_" + uuid.uuid4().hex[:20]
        query = {"query": question}
        blocks.append(Block({"type": "server_tool_use", "id": tool_id, "name": "web_search", "input": {}},
                            _json_pieces(query), _json_tokens(query)))
        max_uses = search_tool.get("max_uses") if search_tool is not None else None
        content: Any
        if isinstance(max_uses, int) and max_uses <= searches:
            content = {"type": "web_search_tool_result_error", "error_code": "max_uses_exceeded"}
        else:
            results = search_results(question, search_tool.get("allowed_domains") if search_tool else None)
            content = results
            result.web_search_requests = 1
        blocks.append(Block({"type": "web_search_tool_result", "tool_use_id": tool_id, "content": content}))
        if pause:
            result.stop_reason = "pause_turn"
            return result
        _cited(blocks, results)
    elif want_search and continuing:
        previous = [b for b in _blocks(last) if isinstance(b, dict)]
        if previous and previous[-1].get("type") == "web_search_tool_result":
            content = previous[-1].get("content")
            _cited(blocks, content if isinstance(content, list) else None)

    if want_tool and not called:
        tool = tools[0]
        if not blocks or blocks[-1].start.get("type") != "text":
            blocks.append(_text_block(f"I'll call {tool['name']}."))
        arguments = tool_input(tool, question)
        blocks.append(Block({"type": "tool_use", "id": "toolu_offline_" + uuid.uuid4().hex[:20],
                             "name": tool["name"], "input": {}}, _json_pieces(arguments), _json_tokens(arguments)))
        result.stop_reason = "tool_use"
        return result
    if not any(b.start.get("type") == "text" for b in blocks):
        blocks.append(_text_block("This is deltarelay's offline demo model: no ANTHROPIC_API_KEY is set, so this"
                                  f" answer is made up locally. You wrote: “{_quote(question)}”."))
    return result


def _cited(blocks: list[Block], results: list[dict[str, Any]] | None) -> None:
    """The text after a search: one cited sentence per result, or the failure when the search failed."""
    if not results:
        blocks.append(_text_block("The web search returned nothing I can cite."))
        return
    blocks.append(_text_block("Here is what I found:\n\n"))
    for n, item in enumerate(results):
        if isinstance(item, dict) and item.get("url"):
            blocks.append(_text_block(f"Source {n + 1} says this about the question.",
                                      [citation(item, n)]))
    blocks.append(_text_block("\n\nThat is the offline model's summary of the search."))


# --- refusals -----------------------------------------------------------------------------------------------

def _valid_base64(data: Any) -> bytes | None:
    if not isinstance(data, str) or not data:
        return None
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return None


def _source_error(where: str, kind: str, block: dict[str, Any]) -> str | None:
    source = block.get("source")
    if not isinstance(source, dict) or source.get("type") != "base64":
        found = source.get("type") if isinstance(source, dict) else None
        return f"{where}.{kind}.source: Input tag '{found}' found using 'type' is not accepted by the offline model" \
               " (it takes base64 sources only)"
    media_type = source.get("media_type")
    if kind == "image" and media_type not in IMAGE_TYPES:
        return f"{where}.image.source.base64.media_type: Input should be 'image/jpeg', 'image/png', 'image/gif'" \
               " or 'image/webp'"
    if kind == "document" and media_type != "application/pdf":
        return f"{where}.document.source.base64.media_type: Input should be 'application/pdf'"
    data = _valid_base64(source.get("data"))
    if data is None:
        return f"{where}.{kind}.source.base64.data: The {kind} data is not valid base64"
    if kind == "image" and not data.startswith(_IMAGE_MAGIC[str(media_type)]):
        return f"{where}.image.source.base64.data: Image does not match the provided media type {media_type}"
    if kind == "document" and not data.startswith(b"%PDF-"):
        return f"{where}.document.source.base64.data: The PDF specified was not valid."
    return None


def request_error(request: dict[str, Any]) -> str | None:
    """The API's invalid_request_error message for a request it would refuse for its shape; None: acceptable.

    Checked: thinking's budget (at least 1024, below max_tokens); image and document blocks (base64 sources,
    the API's media types, decodable data whose bytes match the type); tool_result ids against the previous
    assistant message's tool_use ids, and each tool_use answered in the next message; the signature of every
    thinking block of the current turn (the assistant messages after the newest user question; earlier turns'
    thinking blocks are left out of the model's context by the API, so they are not checked).
    """
    thinking = request.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") == "enabled":
        budget = thinking.get("budget_tokens")
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < MIN_THINKING_BUDGET:
            return "thinking.enabled.budget_tokens: Input should be greater than or equal to 1024"
        max_tokens = request.get("max_tokens")
        if isinstance(max_tokens, int) and max_tokens <= budget:
            return ("`max_tokens` must be greater than `thinking.budget_tokens`. Please consult our documentation at"
                    " https://docs.claude.com/en/docs/build-with-claude/extended-thinking"
                    "#max-tokens-and-context-window-size")
    messages = [m if isinstance(m, dict) else {} for m in request.get("messages") or []]
    start = turn_start(messages)
    for i, message in enumerate(messages):
        blocks = _blocks(message)
        for j, block in enumerate(blocks):
            if not isinstance(block, dict):
                continue
            kind = block.get("type")
            where = f"messages.{i}.content.{j}"
            if kind in ("image", "document"):
                error = _source_error(where, str(kind), block)
                if error:
                    return error
            elif kind == "tool_result":
                previous = _blocks(messages[i - 1]) if i > 0 and messages[i - 1].get("role") == "assistant" else []
                ids = {b.get("id") for b in previous if isinstance(b, dict) and b.get("type") == "tool_use"}
                if block.get("tool_use_id") not in ids:
                    return (f"{where}: unexpected `tool_use_id` found in `tool_result` blocks:"
                            f" {block.get('tool_use_id')}. Each `tool_result` block must have a corresponding"
                            " `tool_use` block in the previous message.")
            elif kind == "thinking" and message.get("role") == "assistant" and i > start:
                if not verify_signature(block.get("thinking"), block.get("signature")):
                    return f"{where}: Invalid `signature` in `thinking` block"
        if message.get("role") == "assistant":
            calls = [b.get("id") for b in blocks if isinstance(b, dict) and b.get("type") == "tool_use"]
            following = _blocks(messages[i + 1]) if i + 1 < len(messages) else []
            answered = {b.get("tool_use_id") for b in following
                        if isinstance(b, dict) and b.get("type") == "tool_result"}
            missing = [str(c) for c in calls if c not in answered]
            if missing:
                return (f"messages.{i}: `tool_use` ids were found without `tool_result` blocks immediately after:"
                        f" {', '.join(missing)}. Each `tool_use` block must have a corresponding `tool_result`"
                        " block in the next message.")
    return None
