"""What a reply cost: Anthropic's price table and cost_of(usage, model).

Pure: no I/O. Money is Decimal from this table to the database, never a float and
never rounded: a token count times a price with at most three decimals, divided by
a power of ten, is exact well within Decimal's default 28 digits.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import date
from decimal import Decimal

logger = logging.getLogger(__name__)

#: The day the prices below were taken from PRICES_SOURCE: the revision of the
#: "Model pricing" table that added Claude Opus 4.5 (released that day).
PRICES_AS_OF = date(2025, 11, 24)
PRICES_SOURCE = "https://platform.claude.com/docs/en/about-claude/pricing"

MILLION = Decimal(1_000_000)
THOUSAND = Decimal(1_000)

#: Web search, a server tool: $10 per 1,000 searches on every model, tokens extra.
WEB_SEARCH_PER_THOUSAND = Decimal("10")


@dataclass(frozen=True, slots=True)
class Price:
    """One model's prices: USD per million tokens, web search per thousand requests."""

    input: Decimal
    output: Decimal
    cache_write_5m: Decimal
    cache_write_1h: Decimal
    cache_read: Decimal
    web_search: Decimal = WEB_SEARCH_PER_THOUSAND


def _price(input: str, cache_write_5m: str, cache_write_1h: str, cache_read: str, output: str) -> Price:
    # Arguments in the published table's column order, as strings: no float on the way.
    return Price(
        input=Decimal(input),
        output=Decimal(output),
        cache_write_5m=Decimal(cache_write_5m),
        cache_write_1h=Decimal(cache_write_1h),
        cache_read=Decimal(cache_read),
    )


_HAIKU_4_5 = _price("1", "1.25", "2", "0.10", "5")

#: Keyed by the model's alias in the API. Columns: base input, 5-minute cache write,
#: 1-hour cache write, cache hit, output. Long-context (>200K input tokens, 1M beta)
#: and batch prices are not modelled.
PRICES: dict[str, Price] = {
    "claude-opus-4-5": _price("5", "6.25", "10", "0.50", "25"),
    "claude-opus-4-1": _price("15", "18.75", "30", "1.50", "75"),
    "claude-opus-4": _price("15", "18.75", "30", "1.50", "75"),
    "claude-sonnet-4-5": _price("3", "3.75", "6", "0.30", "15"),
    "claude-sonnet-4": _price("3", "3.75", "6", "0.30", "15"),
    "claude-3-7-sonnet": _price("3", "3.75", "6", "0.30", "15"),
    "claude-haiku-4-5": _HAIKU_4_5,
    "claude-3-5-haiku": _price("0.80", "1", "1.6", "0.08", "4"),
    "claude-3-haiku": _price("0.25", "0.30", "0.50", "0.03", "1.25"),
    "claude-3-opus": _price("15", "18.75", "30", "1.50", "75"),
    # Retired; kept so that old recordings and conversations still show a cost.
    "claude-3-5-sonnet": _price("3", "3.75", "6", "0.30", "15"),
    # The built-in offline demo model. Demo price: the same as claude-haiku-4-5,
    # so that demo answers show a realistic cost.
    "deltarelay-offline": _HAIKU_4_5,
}

#: The shortest prefix, in tokens, that each model caches: a cache_control breakpoint on a shorter prefix
#: is processed uncached, without an error (the request shows no cache write or read). Keyed like PRICES.
#: Taken 2026-12-02 from the "Cache limitations" list of
#: https://platform.claude.com/docs/en/build-with-claude/prompt-caching (quoted in
#: https://github.com/anthropics/anthropic-sdk-python/issues/1194): 4096 for Opus 4.5 and Haiku 4.5; 1024 for
#: Sonnet 4.5, Opus 4.1, Opus 4, Sonnet 4 and Sonnet 3.7; 2048 for Haiku 3.5 and Haiku 3. The retired Claude 3
#: Opus and 3.5 Sonnet are 1024, from the same page's earlier revisions. The offline model is Haiku 4.5's.
MIN_CACHEABLE_TOKENS: dict[str, int] = {
    "claude-opus-4-5": 4096,
    "claude-opus-4-1": 1024,
    "claude-opus-4": 1024,
    "claude-sonnet-4-5": 1024,
    "claude-sonnet-4": 1024,
    "claude-3-7-sonnet": 1024,
    "claude-haiku-4-5": 4096,
    "claude-3-5-haiku": 2048,
    "claude-3-haiku": 2048,
    "claude-3-opus": 1024,
    "claude-3-5-sonnet": 1024,
    "deltarelay-offline": 4096,
}


def min_cacheable_tokens(model_id: str) -> int:
    """The model's shortest cacheable prefix; for a model not in the table, the largest minimum of any model
    in it (a breakpoint on too short a prefix is wasted, one left out costs a saving)."""
    key = resolve_model(model_id)
    return MIN_CACHEABLE_TOKENS[key] if key is not None else max(MIN_CACHEABLE_TOKENS.values())


def cache_read_savings(cache_read_tokens: int, model_id: str) -> Decimal | None:
    """What `cache_read_tokens` saved against uncached input, exactly: tokens x (input - cache read price)
    per million. None for a model without a price."""
    key = resolve_model(model_id)
    if key is None:
        return None
    price = PRICES[key]
    return cache_read_tokens * (price.input - price.cache_read) / MILLION


#: Other names of the same models: the API's `-0` aliases, and the new word order
#: (family before version) for the Claude 3 generation.
ALIASES: dict[str, str] = {
    "claude-opus-4-0": "claude-opus-4",
    "claude-sonnet-4-0": "claude-sonnet-4",
    "claude-sonnet-3-7": "claude-3-7-sonnet",
    "claude-sonnet-3-5": "claude-3-5-sonnet",
    "claude-haiku-3-5": "claude-3-5-haiku",
    "claude-haiku-3": "claude-3-haiku",
    "claude-opus-3": "claude-3-opus",
}

# A snapshot date (claude-haiku-4-5-20251001) or the moving `-latest` alias.
_VERSION_SUFFIX = re.compile(r"-(?:\d{8}|latest)$")


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one reply, as the Messages API reports them."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_5m_input_tokens: int = 0
    cache_creation_1h_input_tokens: int = 0
    web_search_requests: int = 0


def resolve_model(model_id: str) -> str | None:
    """The PRICES key for a model id, or None when the model is unknown.

    `claude-haiku-4-5`, `claude-haiku-4-5-20251001` and `claude-3-5-sonnet-latest`
    all resolve; so do the aliases in ALIASES, dated or not.
    """
    for candidate in (model_id, _VERSION_SUFFIX.sub("", model_id)):
        if candidate in PRICES:
            return candidate
        if candidate in ALIASES:
            return ALIASES[candidate]
    return None


_warned_models: set[str] = set()


def cost_of(usage: Usage, model: str) -> Decimal | None:
    """The exact USD cost of `usage` on `model`; None for a model without a price.

    An unknown model is logged once per model id and never raises: a missing
    price must not fail a reply.
    """
    key = resolve_model(model)
    if key is None:
        if model not in _warned_models:
            _warned_models.add(model)
            logger.warning("no price for model %r: its replies show no cost", model)
        return None
    price = PRICES[key]

    # Cache writes: the 5m/1h split when the API gives it; any part of the total
    # that the split does not cover (older responses give only the total) is
    # priced at the 5-minute rate, the default TTL.
    write_5m = usage.cache_creation_5m_input_tokens
    write_1h = usage.cache_creation_1h_input_tokens
    unsplit = usage.cache_creation_input_tokens - write_5m - write_1h
    if unsplit > 0:
        write_5m += unsplit

    per_million = (
        usage.input_tokens * price.input
        + usage.output_tokens * price.output
        + write_5m * price.cache_write_5m
        + write_1h * price.cache_write_1h
        + usage.cache_read_input_tokens * price.cache_read
    )
    return per_million / MILLION + usage.web_search_requests * price.web_search / THOUSAND


@dataclass(frozen=True, slots=True)
class ModelLimits:
    """One model's limits in tokens: its context window (input and output together) and its most output."""

    context_window: int
    max_output: int


#: The day the limits below were taken from LIMITS_SOURCE (each model's overview page there: "Context window:
#: 200K tokens · Max output: 64K tokens"). The 1M-token context beta of some models is not modelled: a
#: conversation past 200K is truncated (or refused) as for any other model.
LIMITS_AS_OF = date(2025, 11, 24)
LIMITS_SOURCE = "https://platform.claude.com/docs/en/about-claude/models/overview"

#: Keyed like PRICES (look up with model_limits).
MODEL_LIMITS: dict[str, ModelLimits] = {
    "claude-opus-4-5": ModelLimits(200_000, 64_000),
    "claude-opus-4-1": ModelLimits(200_000, 32_000),
    "claude-opus-4": ModelLimits(200_000, 32_000),
    "claude-sonnet-4-5": ModelLimits(200_000, 64_000),
    "claude-sonnet-4": ModelLimits(200_000, 64_000),
    "claude-3-7-sonnet": ModelLimits(200_000, 64_000),
    "claude-haiku-4-5": ModelLimits(200_000, 64_000),
    "claude-3-5-haiku": ModelLimits(200_000, 8_192),
    "claude-3-haiku": ModelLimits(200_000, 4_096),
    "claude-3-opus": ModelLimits(200_000, 4_096),
    "claude-3-5-sonnet": ModelLimits(200_000, 8_192),
    # The offline demo model: claude-haiku-4-5's limits, as it has its price.
    "deltarelay-offline": ModelLimits(200_000, 64_000),
}

#: A model the table does not know (a new one): the window every current model has at least.
DEFAULT_LIMITS = ModelLimits(200_000, 64_000)


def model_limits(model_id: str) -> ModelLimits:
    """The limits of a model id (resolved as resolve_model does: dated ids and aliases too); DEFAULT_LIMITS for
    a model the table does not know."""
    key = resolve_model(model_id)
    return MODEL_LIMITS.get(key, DEFAULT_LIMITS) if key is not None else DEFAULT_LIMITS
