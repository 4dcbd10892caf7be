"""Session fixtures: the real local stack, started once by the same launcher as `make up`.

The stack starts when the first test that needs it (through `stack` or a fixture built on
it) runs, so `pytest -m unit` starts none. A test marked `unit` may not use the stack: that
is refused at collection.

TEST_PORT_OFFSET (default 1000) moves every port, so the suite runs beside a `make up`
stack (offset 0). TEST_STACK_DIR keeps the state in a given folder instead of a new
temporary one (and keeps it afterwards, for looking at the logs).

BARBER_TEST_STACK=running attaches to a stack already running (`make up`) instead, found
by STACK_DIR (.stack) and PORT_OFFSET (0) as it was started with; the suite never stops
it. Its admin account must be the one the tests sign in with: start it with the same
BARBER_ADMIN_PASSWORD (default for tests: admin-password-for-tests).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.http import call
from tests.stackproc import ADMIN_PASSWORD, ADMIN_USERNAME, ROOT, RunningStack, StackProcess

STACK_MODES = ("own", "running")


def stack_mode() -> str:
    mode = os.environ.get("BARBER_TEST_STACK", "own")
    if mode not in STACK_MODES:
        raise pytest.UsageError(f"BARBER_TEST_STACK={mode!r}: expected one of {', '.join(STACK_MODES)}")
    return mode


def pytest_configure(config: pytest.Config) -> None:
    stack_mode()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # `-m unit` promises a run without a stack; a unit test reaching it would start one.
    wrong = [
        item.nodeid
        for item in items
        if item.get_closest_marker("unit") is not None and "stack" in getattr(item, "fixturenames", ())
    ]
    if wrong:
        raise pytest.UsageError("marked unit but using the stack: " + ", ".join(wrong))


@pytest.fixture(scope="session")
def stack() -> Iterator[StackProcess]:
    if stack_mode() == "running":
        state_dir = Path(os.environ.get("STACK_DIR") or ROOT / ".stack").resolve()
        running = RunningStack(int(os.environ.get("PORT_OFFSET", "0")), state_dir)
        running.start()
        StackProcess.current = running
        yield running
        return
    offset = int(os.environ.get("TEST_PORT_OFFSET", "1000"))
    keep_dir = os.environ.get("TEST_STACK_DIR")
    proc = StackProcess(offset, Path(keep_dir).resolve() if keep_dir else None)
    proc.start()
    StackProcess.current = proc
    try:
        yield proc
    finally:
        code = proc.stop()
        if code not in (0, None):
            print(f"stack exited with {code}:\n{proc.tail()}")
        if not keep_dir and code == 0:
            proc.remove()


@pytest.fixture(scope="module")
def c1(stack: StackProcess) -> str:
    """The first chat instance's base URL."""
    return stack.url("chat", 0)


@pytest.fixture(scope="module")
def c2(stack: StackProcess) -> str:
    """The second chat instance's base URL."""
    return stack.url("chat", 1)


@pytest.fixture(scope="module")
def a1(stack: StackProcess) -> str:
    """The first authen instance's base URL."""
    return stack.url("authen", 0)


@pytest.fixture(scope="module")
def a2(stack: StackProcess) -> str:
    """The second authen instance's base URL."""
    return stack.url("authen", 1)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture(scope="module")
async def admin_token(stack: StackProcess) -> str:
    """A token of the admin account the stack creates."""
    reply = await call(
        "POST", stack.url("gateway") + "/authen/authen/signin", {"username": ADMIN_USERNAME, "password": ADMIN_PASSWORD}
    )
    assert reply.code == 200, reply
    return reply.json["token"]
