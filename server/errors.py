"""Every error a user can see, as one tree.

    RelayError(code, message, retryable, status)
      BadRequestError          400, invalid input
        TooLargeError          413, message over the size limit
        ContextTooLongError    413, the conversation does not fit the model's context window
      UnauthorizedError        401, no or an invalid token or session
        TokenExpiredError      401, a JWT whose `exp` has passed (retryable: get a new token)
      BudgetError              402, the user's daily spending budget is used up
      ForbiddenError           403, a cross-site request (Origin not allowed)
      NotFoundError            404, unknown conversation, agent or stream, or another user's
      ConflictError            409, busy (an answer is generating) or not_continuable
      GoneError                410, a stream whose log has expired
      LimitError               429, a limit was reached (`limit` names it, retry_after tells when)
      UpstreamError            the model's API failed (auth, rate_limited, overloaded...)
        UpstreamTimeoutError   connect, first-event or idle timeout
      ProtocolError            the upstream stream is malformed
      StorageUnavailableError  503, the database cannot take writes now (down, restarting, disk full)

A transport turns a RelayError into a 4xx JSON body or an `error` event; no other
exception reaches a user. Messages never contain keys or tokens.
"""

from __future__ import annotations

from typing import Any


class RelayError(Exception):
    """An error with a stable code that a client can act on."""

    code = "internal_error"
    status = 500
    retryable = False

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        retryable: bool | None = None,
        status: int | None = None,
        retry_after: float | None = None,
        message_id: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if retryable is not None:
            self.retryable = retryable
        if status is not None:
            self.status = status
        self.retry_after = retry_after
        self.message_id = message_id
        self.details = details  # extra camelCase fields for the client, e.g. {"limit": ...}

    def to_json(self) -> dict[str, Any]:
        """The body of a 4xx/5xx HTTP answer: {"error": {"code", "message"}}."""
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.retry_after is not None:
            body["retryAfter"] = self.retry_after
        if self.message_id is not None:
            body["messageId"] = self.message_id
        if self.details:
            body.update(self.details)
        return {"error": body}


class BadRequestError(RelayError):
    code = "invalid_request"
    status = 400


class TooLargeError(BadRequestError):
    code = "too_large"
    status = 413


class UnsupportedMediaTypeError(BadRequestError):
    """A file that is not of a type the relay takes (checked from its bytes); details.detectedType names it."""

    code = "unsupported_media_type"
    status = 415


class ContextTooLongError(TooLargeError):
    """The request would not fit the model's context window (`details`: inputTokens, contextWindow)."""

    code = "context_too_long"


class UnauthorizedError(RelayError):
    code = "unauthorized"
    status = 401


class TokenExpiredError(UnauthorizedError):
    code = "token_expired"
    retryable = True


class BudgetError(RelayError):
    code = "budget_exceeded"
    status = 402
    retryable = True


class ForbiddenError(RelayError):
    code = "forbidden"
    status = 403


class NotFoundError(RelayError):
    code = "not_found"
    status = 404


class ConflictError(RelayError):
    code = "conflict"
    status = 409


class GoneError(RelayError):
    code = "not_resumable"
    status = 410


class LimitError(RelayError):
    code = "rate_limited"
    status = 429
    retryable = True


class UpstreamError(RelayError):
    code = "upstream_error"
    status = 502
    retryable = True


class UpstreamTimeoutError(UpstreamError):
    code = "timeout"
    status = 504


class ProtocolError(UpstreamError):
    code = "protocol_error"
    retryable = False


def one_line(exc: BaseException) -> str:
    """Any exception as one short line for an operator (its type and message, whitespace folded)."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:300]


class StorageUnavailableError(RelayError):
    """The database cannot be reached or cannot take writes (restarting, disk full): try again shortly."""

    code = "storage_unavailable"
    status = 503
    retryable = True
