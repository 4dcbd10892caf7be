"""Session fixtures: the real local stack, started once by the same launcher as `make up`.

TEST_PORT_OFFSET (default 1000) moves every port, so the suite runs beside a `make up`
stack (offset 0). TEST_STACK_DIR keeps the state in a given folder instead of a new
temporary one (and keeps it afterwards, for looking at the logs).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.http import call
from tests.stackproc import ADMIN_PASSWORD, ADMIN_USERNAME, StackProcess


@pytest.fixture(scope="session")
def stack() -> Iterator[StackProcess]:
    offset = int(os.environ.get("TEST_PORT_OFFSET", "1000"))
    keep_dir = os.environ.get("TEST_STACK_DIR")
    proc = StackProcess(offset, Path(keep_dir).resolve() if keep_dir else None)
    proc.start()
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
    reply = await call("POST", stack.url("gateway") + "/authen/authen/signin",
                       {"username": ADMIN_USERNAME, "password": ADMIN_PASSWORD})
    assert reply.code == 200, reply
    return reply.json["token"]
