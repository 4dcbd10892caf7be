"""Secrets never reach the logs (they are shipped to Elasticsearch): after everything else.

Named to run last, so it scans what the whole suite made every process log: no bearer
token (anything JWT-shaped), no password the tests use, no service secret. It first
makes the requests most likely to leak on its own, so it means something when run alone
too: a token in a query string of a failing request, a socket with `?token=`, wrong and
right passwords.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

from tests.http import call
from tests.stackproc import ADMIN_PASSWORD, StackProcess
from tests.test_chat_support import ChatClient, make_user, socket_url, start_chat
from tests.util import wait_until

TESTS = Path(__file__).resolve().parent
JWT = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{16,}")
# Password literals in the tests: `"password": "..."`, `password: str = "..."`, `PASSWORD = "..."`.
PASSWORD_LITERAL = re.compile(r"(?:[\"']password[\"']\s*:\s*|password\s*:\s*str\s*=\s*|PASSWORD\s*=\s*)\"([^\"]{6,})\"")
LEAK_PASSWORD = "never-log-this-password-7"


def used_passwords() -> set[str]:
    found = {ADMIN_PASSWORD, LEAK_PASSWORD}
    for path in TESTS.glob("*.py"):
        found.update(PASSWORD_LITERAL.findall(path.read_text()))
    return found


def scan(logs: Path, needles: dict[str, re.Pattern[str]]) -> list[str]:
    hits = []
    for path in sorted(logs.glob("*.log")):
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for what, rx in needles.items():
                if rx.search(line):
                    # The report must not spread what it found.
                    hits.append(f"{path.name}:{n}: {what}: {rx.sub('<found here>', line)[:300]}")
    return hits


async def make_leaky_requests(stack: StackProcess) -> None:
    gateway = stack.url("gateway")
    customer = await make_user(stack, "customer")
    barber = await make_user(stack, "employee")
    chat_id = await start_chat(stack.url("chat", 0), customer, barber)
    token = customer.token
    # Tokens in query strings of requests that fail in different places.
    await call("GET", f"{gateway}/chat/chats/history?id={chat_id}&before=-1&token={token}", token=token)
    await call("GET", f"{gateway}/chat/nowhere?token={token}")
    await call("GET", f"{stack.url('chat', 0)}/chats/history?id={chat_id}&limit=x&token={token}")
    await call("GET", f"{gateway}/authen/utilities/check?user_id=x&token={token}")
    # Tornado logs the whole URI of a query that is not UTF-8 (its own HTTPError with a log message).
    await call("GET", f"{gateway}/chat/chats/history?id=%ff&token={token}", token=token)
    # A socket authenticated by ?token=, and one refused with a bad token.
    client = await ChatClient.connect(socket_url(gateway, chat_id, token, via_gateway=True))
    client.conn.close()
    refused = await ChatClient.connect(socket_url(gateway, chat_id, token[:-4] + "AAAA", via_gateway=True))
    await refused.closed.wait()
    # Wrong and right passwords.
    await call("POST", f"{gateway}/authen/authen/signin", {"username": customer.username, "password": LEAK_PASSWORD})
    await call("POST", f"{gateway}/authen/authen/signup", {"username": "x", "password": LEAK_PASSWORD})
    # The last one, marked: once its id is in the logs, so is everything before it.
    marker = f"logscan{uuid.uuid4().hex}"
    await call(
        "POST",
        f"{gateway}/authen/authen/signin?token={token}",
        {"username": customer.username, "password": LEAK_PASSWORD},
        headers={"X-Request-ID": marker},
    )
    logs = stack.state_dir / "logs"
    await wait_until(
        lambda: marker in (logs / "gateway.log").read_text(errors="replace"),
        timeout=30,
        message="the marked request in the gateway's log",
    )
    await wait_until(
        lambda: any(marker in p.read_text(errors="replace") for p in logs.glob("authen*.log")),
        timeout=30,
        message="the marked request in an authen log",
    )


async def test_no_token_password_or_secret_in_any_log(stack: StackProcess) -> None:
    await make_leaky_requests(stack)
    logs = stack.state_dir / "logs"
    assert sorted(p.name for p in logs.glob("*.log")), "no logs to scan"
    needles = {"token": JWT}
    for password in used_passwords():
        needles[f"password {password!r}"] = re.compile(re.escape(password))
    secret = stack.layout.service_secret.read_text().strip()
    assert len(secret) >= 16
    needles["service secret"] = re.compile(re.escape(secret))
    hits = scan(logs, needles)
    assert not hits, f"{len(hits)} secrets in the logs:\n" + "\n".join(hits[:30])
