"""The coordinator's exceptions: one base class, one subclass per kind of failure.

Each error that can reach a client carries the HTTP status and a short machine-readable
`code`; the error middleware turns it into a JSON body `{"error": {"code", "message"}}`.
Caller misuse (a bad config value) raises the built-in `ValueError` instead.
"""

from __future__ import annotations

from edge_sdk.errors import FedlmError


class CoordinatorError(FedlmError):
    """Base class of every error the coordinator raises on purpose."""

    status: int = 500
    code: str = "coordinator_error"


class BadRequestError(CoordinatorError):
    """A request body is not what the endpoint takes: bad msgpack or JSON, wrong content type."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, code: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status


class AuthError(CoordinatorError):
    """A request has no bearer token, or a token (or join token) that does not match."""

    status = 401
    code = "unauthorized"


class ForbiddenError(CoordinatorError):
    """An authenticated client asked for something it may not do (e.g. post as another client)."""

    status = 403
    code = "forbidden"


class RateLimitedError(CoordinatorError):
    """A client (or an address, for /v1/join) exceeded its request budget."""

    status = 429
    code = "rate_limited"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BusyError(RateLimitedError):
    """The coordinator holds as many update bodies in memory as it may; retry after a while."""

    status = 503
    code = "busy"


class UpdateRejectedError(CoordinatorError):
    """An update is well-formed bytes but not acceptable: wrong model, shapes, LoRA spec, NaN."""

    status = 422
    code = "invalid_update"

    def __init__(self, message: str, code: str = "invalid_update") -> None:
        super().__init__(message)
        self.code = code


class ConflictError(CoordinatorError):
    """A valid update that conflicts with the coordinator's state (round closed, task done)."""

    status = 409
    code = "conflict"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class DuplicateUpdateError(ConflictError):
    """An update id was seen before (a retry is answered with 409, never stored twice)."""

    code = "duplicate_update"


class StaleUpdateError(ConflictError):
    """An update's base version is older than the strategy accepts (or not the current round)."""

    code = "stale_update"


class StorageError(CoordinatorError):
    """The database is unreadable, of another schema version, or belongs to another task."""

    status = 500
    code = "storage_error"


class AggregationError(CoordinatorError):
    """An aggregation could not produce a usable global adapter (e.g. a non-finite result).

    Never reaches a client: the coordinator finds the update at fault, drops it and aggregates
    the rest (`Coordinator.aggregate`)."""

    code = "aggregation_failed"


class ContributionError(AggregationError):
    """One update's effect on the global adapter is unusable (non-finite norm or weight)."""

    code = "bad_contribution"

    def __init__(self, update_id: str, reason: str) -> None:
        super().__init__(f"update {update_id!r}: {reason}")
        self.update_id = update_id
        self.reason = reason


class PortInUseError(CoordinatorError):
    """The coordinator's TCP port is taken by another process."""
