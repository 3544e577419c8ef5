"""The project's errors, and their one mapping to gRPC status codes.

Two kinds, as in vLLM: one request failed (`RequestError` and its children), or a component
is unusable (`EngineDead`). Every message starts with "roundhouse: " so a caller can tell
them from transport errors.
"""
from __future__ import annotations

import grpc


class RoundhouseError(Exception):
    """Base of every error the project raises on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    retryable: bool = False

    def __init__(self, message: str):
        super().__init__(message if message.startswith("roundhouse: ") else f"roundhouse: {message}")

    @property
    def message(self) -> str:
        return str(self)


class RequestError(RoundhouseError):
    """One request cannot be served; others are unaffected."""


class InvalidRequest(RequestError):
    """The request itself is wrong: fix it before sending again."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str):
        self.field = field
        super().__init__(f"invalid {field}: {problem}")


class ModelNotFound(RequestError):
    """The request names a model that is not configured."""

    code = grpc.StatusCode.NOT_FOUND


class JobNotFound(RequestError):
    """A job id that is unknown, or whose record has expired."""

    code = grpc.StatusCode.NOT_FOUND


class ModelPinned(RequestError):
    """An operator asked to evict a pinned model."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class DeadlineExpired(RequestError):
    """The request's deadline passed before it could finish."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unavailable(RequestError):
    """The system cannot serve the request now; sending it again later may succeed."""

    code = grpc.StatusCode.UNAVAILABLE
    retryable = True


class QueueFull(RequestError):
    """Admission refused: too many requests are waiting."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    retryable = True

    def __init__(self, message: str, retry_after_s: float = 1.0):
        self.retry_after_s = retry_after_s
        super().__init__(message)


class RateLimited(QueueFull):
    """Admission refused: the caller's tenant is over one of its limits (roundhouse.tenancy)."""

    def __init__(self, limit: str, message: str, retry_after_s: float):
        self.limit = limit
        super().__init__(message, retry_after_s)


class Unauthenticated(RequestError):
    """No API key, or one the router does not know. The message never repeats the key."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(RequestError):
    """The caller's tenant may not use what it asked for."""

    code = grpc.StatusCode.PERMISSION_DENIED


class DuplicateRequest(RequestError):
    """A request (or job) with this id is already in flight."""

    code = grpc.StatusCode.ALREADY_EXISTS


class GenerationFailed(RequestError):
    """The engine failed this one request."""

    code = grpc.StatusCode.INTERNAL


class EngineDead(RoundhouseError):
    """The engine is unusable; every request on it fails until it is loaded again."""

    code = grpc.StatusCode.UNAVAILABLE
    retryable = True
