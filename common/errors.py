"""Typed errors. Domain code raises these; the base handler turns them into JSON responses."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from pydantic import ValidationError
from tornado.web import HTTPError


def describe_validation_error(exc: ValidationError, *, environment: bool = False) -> str:
    """One part per failure, naming its field: ``field: message`` for request
    input; ``NAME: message (got 'value')`` for settings read from the environment, where
    a rule across several variables has no name and speaks for itself."""
    parts = []
    for err in exc.errors():
        name = ".".join(str(p) for p in err["loc"])
        if environment:
            if name:
                parts.append(f"{name.upper()}: {err['msg']} (got {err.get('input')!r})")
            else:
                parts.append(str(err["msg"]).removeprefix("Value error, "))
        else:
            msg = "unexpected field" if err["type"] == "extra_forbidden" else err["msg"]
            parts.append(f"{name or 'body'}: {msg}")
    return "; ".join(parts)


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


@contextmanager
def translate_errors(
    caught: type[Exception] | tuple[type[Exception], ...], into: Callable[[Exception], Exception]
) -> Iterator[None]:
    """Raise ``into(error)`` (chained) for each ``caught`` error of the block: the one place
    where a driver's errors become the service's typed ones, e.g.
    ``with translate_errors(PyMongoError, lambda e: StoreUnavailable("...")):``."""
    try:
        yield
    except caught as e:
        raise into(e) from e
