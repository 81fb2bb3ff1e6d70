"""Typed errors, one per `error_type` of the API; the message is the server's."""

from __future__ import annotations


class PromptserveError(Exception):
    """Base class: an error response from a promptserve server."""

    error_type = "internal"

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class ValidationError(PromptserveError):
    error_type = "validation"


class UnauthorizedError(PromptserveError):
    error_type = "unauthorized"


class NotFoundError(PromptserveError):
    error_type = "not_found"


class ConflictError(PromptserveError):
    error_type = "conflict"


class TooLargeError(PromptserveError):
    error_type = "too_large"


class OverloadedError(PromptserveError):
    """The server's queue is full; retry after `retry_after` seconds (from the Retry-After header)."""

    error_type = "overloaded"

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, status)
        self.retry_after = retry_after


class UnavailableError(PromptserveError):
    error_type = "unavailable"


class InternalError(PromptserveError):
    error_type = "internal"


ERRORS_BY_TYPE: dict[str, type[PromptserveError]] = {
    cls.error_type: cls
    for cls in (
        ValidationError,
        UnauthorizedError,
        NotFoundError,
        ConflictError,
        TooLargeError,
        OverloadedError,
        UnavailableError,
        InternalError,
    )
}
ERROR_TYPE_BY_STATUS = {
    400: "validation",
    401: "unauthorized",
    404: "not_found",
    409: "conflict",
    413: "too_large",
    422: "validation",
    429: "overloaded",
    503: "unavailable",
}


def make_error(
    error_type: str | None, message: str, status: int | None = None, retry_after: float | None = None
) -> PromptserveError:
    """The typed error for an `error_type`; a body without one (a proxy's page) falls back on the status."""
    if error_type not in ERRORS_BY_TYPE and status is not None:
        error_type = ERROR_TYPE_BY_STATUS.get(status, "internal" if status >= 500 else "validation")
    cls = ERRORS_BY_TYPE.get(error_type or "", PromptserveError)
    if cls is OverloadedError:
        return OverloadedError(message, status, retry_after)
    return cls(message, status)


__all__ = [
    "ConflictError",
    "InternalError",
    "NotFoundError",
    "OverloadedError",
    "PromptserveError",
    "TooLargeError",
    "UnauthorizedError",
    "UnavailableError",
    "ValidationError",
    "make_error",
]
