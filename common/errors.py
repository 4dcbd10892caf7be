"""Typed errors. Domain code raises these; the base handler turns them into JSON responses."""

from __future__ import annotations

from tornado.web import HTTPError


class APIError(HTTPError):
    """An error with a client-facing ``detail``, rendered as ``{"detail": ...}``."""

    status: int = 500

    def __init__(self, detail: str, *, status: int | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(status or self.status)
        self.detail = detail
        self.headers = headers or {}

    def __str__(self) -> str:
        return f"{self.status_code}: {self.detail}"


class BadRequest(APIError):
    status = 400


class Unauthorized(APIError):
    status = 401


class Forbidden(APIError):
    status = 403


class NotFound(APIError):
    status = 404


class Conflict(APIError):
    status = 409


class PayloadTooLarge(APIError):
    status = 413

    @classmethod
    def over(cls, limit: int) -> PayloadTooLarge:
        return cls(f"request body larger than {limit} bytes")


class TooManyRequests(APIError):
    status = 429

    def __init__(self, detail: str, *, retry_after_s: float) -> None:
        super().__init__(detail, headers={"Retry-After": str(max(1, round(retry_after_s + 0.499)))})
        self.retry_after_s = retry_after_s


class BadGateway(APIError):
    status = 502


class ServiceUnavailable(APIError):
    status = 503


# Set on a 503 that an instance answers because something it depends on is down (its
# database, another service): the instance itself is healthy, so the gateway's circuit
# breaker does not count it against the instance (every instance would say the same).
DEPENDENCY_HEADER = "X-Dependency-Unavailable"


class DependencyUnavailable(ServiceUnavailable):
    """503: a dependency of this instance is down; ``dependency`` names it."""

    dependency = "dependency"

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail, headers={DEPENDENCY_HEADER: self.dependency, **(headers or {})})


class GatewayTimeout(APIError):
    status = 504
