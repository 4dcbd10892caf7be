"""Gateway domain code without HTTP or servers: breaker, header/path policy, settings."""

from __future__ import annotations

import pytest

from common.config import ConfigError, load_settings
from common.handler import websocket_token
from gateway.breaker import BreakerConfig, CircuitBreaker, State
from gateway.policy import (
    UnsafePath,
    check_service_path,
    downstream_response_headers,
    is_public,
    upstream_request_headers,
)
from gateway.settings import GatewaySettings, RateRule

pytestmark = pytest.mark.unit


class Clock:
    """A hand-driven monotonic clock (time is an input of the breaker, not a mock)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def breaker(clock: Clock, **kw: float) -> tuple[CircuitBreaker, list[tuple[State, State]]]:
    transitions: list[tuple[State, State]] = []
    config = BreakerConfig(
        **{
            "failures": 3,
            "open_s": 1.0,
            "open_max_s": 4.0,
            "half_open_trials": 2,
            "min_requests": 10,
            "failure_rate": 0.5,
            "window_s": 10.0,
            **kw,
        }
    )
    b = CircuitBreaker("i", config, clock=clock, on_transition=lambda _n, o, n: transitions.append((o, n)))
    return b, transitions


def test_breaker_opens_after_consecutive_failures_and_heals_through_half_open() -> None:
    clock = Clock()
    b, transitions = breaker(clock)
    for _ in range(2):
        assert b.try_acquire()
        b.record_failure()
    assert b.current() is State.CLOSED
    b.record_success()  # a success resets the consecutive count
    for _ in range(3):
        b.record_failure()
    assert b.current() is State.OPEN
    assert not b.try_acquire()
    # Re-admission is jittered within +-30% of the wait.
    clock.now += 0.69
    assert b.current() is State.OPEN
    clock.now += 0.62
    assert b.current() is State.HALF_OPEN
    # Half-open: a bounded number of trials, no more.
    assert b.try_acquire() and b.try_acquire()
    assert not b.try_acquire()
    b.record_success(State.HALF_OPEN)
    assert b.current() is State.HALF_OPEN
    assert not b.try_acquire()  # one trial still out, one succeeded: the budget is spent
    b.record_success(State.HALF_OPEN)
    assert b.current() is State.CLOSED
    assert transitions == [(State.CLOSED, State.OPEN), (State.OPEN, State.HALF_OPEN), (State.HALF_OPEN, State.CLOSED)]


def test_breaker_trial_failure_reopens_with_a_longer_capped_wait() -> None:
    clock = Clock()
    b, _ = breaker(clock)
    for _ in range(3):
        b.record_failure()
    waits = []
    for _ in range(5):
        waits.append(b.open_until - clock.now)
        clock.now = b.open_until
        assert b.try_acquire()
        b.record_failure(State.HALF_OPEN)
        assert b.current() is State.OPEN
    assert 0.7 <= waits[0] <= 1.3 and 1.4 <= waits[1] <= 2.6
    assert all(w <= 4.0 * 1.3 for w in waits), waits  # capped, never removed for good
    clock.now = b.open_until
    assert b.try_acquire() and b.try_acquire()
    b.record_success(State.HALF_OPEN)
    b.record_success(State.HALF_OPEN)
    assert b.current() is State.CLOSED


def test_breaker_opens_on_failure_rate_over_the_window() -> None:
    clock = Clock()
    b, _ = breaker(clock, failures=100)
    for i in range(9):
        (b.record_failure if i % 2 else b.record_success)()
    assert b.current() is State.CLOSED  # 4 of 9: under the minimum request count
    b.record_failure()
    assert b.current() is State.OPEN  # 5 of 10 failed


def test_breaker_unused_half_open_slot_is_given_back() -> None:
    clock = Clock()
    b, _ = breaker(clock)
    for _ in range(3):
        b.record_failure()
    clock.now = b.open_until
    assert b.try_acquire() and b.try_acquire() and not b.try_acquire()
    b.release_unused(State.HALF_OPEN)
    assert b.try_acquire()


def test_public_paths() -> None:
    assert is_public("POST", "/authen/authen/signin")
    assert is_public("POST", "/authen/authen/signup")
    assert is_public("GET", "/authen/list/employee")
    assert is_public("GET", "/authen/utilities/status")
    assert is_public("GET", "/chat/utilities/status")
    assert is_public("GET", "/authen/utilities/sleepy")
    assert is_public("POST", "/authen/utilities/sleepy")
    assert not is_public("GET", "/authen/utilities/check")
    assert not is_public("GET", "/authen/authen/signin")
    assert not is_public("GET", "/chat/chats/list/my")
    assert not is_public("POST", "/authen/authen/signin/../x")
    assert is_public("GET", "/etl/dashboard")
    assert is_public("GET", "/etl/static/vendor/chartjs/chart.umd.min.js")
    assert not is_public("POST", "/etl/dashboard")
    assert not is_public("GET", "/etl/analytics/barbers")
    assert not is_public("GET", "/etl/static/")
    assert is_public("GET", "/etl/static/dashboard.js")
    assert not is_public("GET", "/etl/runs")


@pytest.mark.parametrize("rest", ["internal/x", "internal", "Internal/x", "%69nternal/x", "/internal/x"])
def test_internal_paths_are_refused(rest: str) -> None:
    with pytest.raises(PermissionError):
        check_service_path(rest)


@pytest.mark.parametrize("rest", ["a/../internal/x", "./internal", "a/%2e%2e/internal", "a%2Finternal", "a\\b"])
def test_unsafe_paths_are_refused(rest: str) -> None:
    with pytest.raises(UnsafePath):
        check_service_path(rest)


def test_ordinary_paths_pass_unchanged() -> None:
    assert check_service_path("utilities/status") == "/utilities/status"
    assert check_service_path("chats/history") == "/chats/history"
    assert check_service_path("internals/x") == "/internals/x"


def test_request_header_hygiene() -> None:
    client = [
        ("Host", "gw.example"),
        ("Connection", "keep-alive, X-Secret-Hop"),
        ("Keep-Alive", "timeout=5"),
        ("X-Secret-Hop", "1"),
        ("Transfer-Encoding", "chunked"),
        ("Upgrade", "h2c"),
        ("TE", "trailers"),
        ("Proxy-Authorization", "Basic x"),
        ("X-User", "1"),
        ("x-user", "2"),
        ("X-User-Type", "admin"),
        ("X-Service-Token", "guess"),
        ("X-Request-ID", "spoofed"),
        ("Content-Length", "3"),
        ("Authorization", "Bearer t"),
        ("Accept", "application/json"),
        ("X-Custom", "a"),
        ("X-Custom", "b"),
        ("X-Forwarded-For", "10.0.0.1"),
    ]
    out = upstream_request_headers(
        client,
        request_id="rid",
        client_ip="127.0.0.9",
        host="gw.example",
        proto="http",
        user_id=42,
        user_type="customer",
    )
    names = [k.lower() for k, _ in out]
    for gone in (
        "host",
        "connection",
        "keep-alive",
        "x-secret-hop",
        "transfer-encoding",
        "upgrade",
        "te",
        "proxy-authorization",
        "x-service-token",
        "content-length",
    ):
        assert gone not in names
    assert [v for k, v in out if k.lower() == "x-user"] == ["42"]
    assert [v for k, v in out if k.lower() == "x-user-type"] == ["customer"]
    assert [v for k, v in out if k.lower() == "x-request-id"] == ["rid"]
    assert [v for k, v in out if k == "X-Custom"] == ["a", "b"]
    assert ("Authorization", "Bearer t") in out
    assert ("X-Forwarded-For", "10.0.0.1, 127.0.0.9") in out
    assert ("X-Forwarded-Host", "gw.example") in out
    anonymous = upstream_request_headers(
        client, request_id="r", client_ip="1.2.3.4", host=None, proto="http", user_id=None, user_type=None
    )
    assert not [k for k, _ in anonymous if k.lower() in ("x-user", "x-user-type")]


def test_response_header_hygiene() -> None:
    out = downstream_response_headers(
        [
            ("Content-Type", "application/json"),
            ("Connection", "close"),
            ("Transfer-Encoding", "chunked"),
            ("Set-Cookie", "a=1"),
            ("Set-Cookie", "b=2"),
            ("Content-Length", "10"),
            ("ETag", '"x"'),
        ]
    )
    assert out == [("Content-Type", "application/json"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("ETag", '"x"')]


def test_websocket_token_sources() -> None:
    assert websocket_token("q", ["bearer", "p"]) == "q"
    assert websocket_token(None, ["bearer", "tok"]) == "tok"
    assert websocket_token(None, ["chat.v1", "bearer.tok2"]) == "tok2"
    assert websocket_token(None, ["chat.v1"]) is None
    assert websocket_token(None, ["bearer"]) is None
    assert websocket_token(None, [], "Bearer tok3") == "tok3"
    assert websocket_token(None, ["bearer.tok4"], "Bearer tok3") == "tok4"


def test_rate_rules_and_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    rule = RateRule(path="/authen/authen/signin", methods=["post"], rate_per_s=1, burst=2)
    assert rule.matches("POST", "/authen/authen/signin") and not rule.matches("GET", "/authen/authen/signin")
    prefix = RateRule(path="/chat/*", rate_per_s=1, burst=1)
    assert prefix.matches("GET", "/chat/chats/list/my") and not prefix.matches("GET", "/authen/x")
    defaults = GatewaySettings()
    assert defaults.port == 8000 and defaults.lb_policy == "round_robin"
    assert any(r.matches("POST", "/authen/authen/signin") for r in defaults.rate_limits)
    monkeypatch.setenv("RATE_LIMITS", '[{"path": "/authen/utilities/status", "rate_per_s": 0.5, "burst": 3}]')
    monkeypatch.setenv("LB_POLICY", "least_outstanding")
    s = load_settings(GatewaySettings)
    assert s.lb_policy == "least_outstanding" and s.rate_limits[0].burst == 3
    monkeypatch.setenv("LB_POLICY", "random")
    with pytest.raises(ConfigError, match="LB_POLICY"):
        load_settings(GatewaySettings)
