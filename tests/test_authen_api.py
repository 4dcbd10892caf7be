"""authen's endpoints against the real stack: every route and its errors."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
from tornado.httpclient import AsyncHTTPClient

from authen.handlers import SLEEPY_MAX_S, sleepy_seconds
from common.tokens import TokenVerifier
from tests.http import call
from tests.procs import start_service
from tests.stackproc import ROOT, StackProcess
from tests.test_authen_support import new_username, signup, status, user_body
from tests.util import free_port, wait_until


@pytest.fixture(scope="module")
def verifier(stack: StackProcess) -> TokenVerifier:
    return TokenVerifier.from_file(Path(stack.env["JWT_PUBLIC_KEY_FILE"]))


# -- sign-up ----------------------------------------------------------------------------
async def test_signup_creates_user_visible_through_the_other_instance(a1: str, a2: str) -> None:
    body, reply = await signup(a1, type_="employee")
    assert reply.code == 201, reply
    assert reply.json["detail"] and isinstance(reply.json["user_id"], int)
    user_id = reply.json["user_id"]

    check = await call("GET", f"{a2}/utilities/check?user_id={user_id}")
    assert check.code == 200, check
    assert check.json == {
        "id": user_id,
        "username": body["username"],
        "first_name": "Ada",
        "last_name": "Lovelace",
        "type": "employee",
    }


async def test_signup_username_taken_case_insensitively(a1: str, a2: str) -> None:
    name = new_username("Taken")
    _, first = await signup(a1, username=name)
    assert first.code == 201, first
    _, again = await signup(a2, username=name.upper())
    assert again.code == 409, again
    assert "taken" in again.json["detail"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"username": "ab"}, "username"),
        ({"username": "x" * 151}, "username"),
        ({"username": "has space"}, "username"),
        ({"username": "semi;colon"}, "username"),
        ({"password": "short"}, "password"),
        ({"password": "p" * 129}, "password"),
        ({"first_name": ""}, "first_name"),
        ({"last_name": "n" * 151}, "last_name"),
        ({"type": "admin"}, "type"),
        ({"type": "barber"}, "type"),
        ({"username": 12345}, "username"),
        ({"extra": "field"}, "extra"),
    ],
)
async def test_signup_rejects_bad_fields_naming_them(a1: str, change: dict, field: str) -> None:
    body = {**user_body(), **change}
    reply = await call("POST", a1 + "/authen/signup", body)
    assert reply.code == 400, reply
    assert field in reply.json["detail"]


@pytest.mark.parametrize("missing", ["username", "password", "first_name", "last_name", "type"])
async def test_signup_rejects_missing_field(a1: str, missing: str) -> None:
    body = user_body()
    del body[missing]
    reply = await call("POST", a1 + "/authen/signup", body)
    assert reply.code == 400, reply
    assert missing in reply.json["detail"]


@pytest.mark.parametrize(
    ("raw", "ctype", "needle"),
    [
        (b"{not json", "application/json", "JSON"),
        (b'["a", "list"]', "application/json", "object"),
        (b"", "application/json", "JSON"),
        (b'{"username": "abc"}', "text/plain", "Content-Type"),
        (b"\xff\xfe", "application/json", "JSON"),
        # json raises RecursionError, not ValueError, on this; it fits under the body limit.
        (b"[" * 60_000, "application/json", "nested"),
        # PostgreSQL text cannot hold U+0000: refused before it reaches the database.
        (
            b'{"username": "nul\\u0000name", "password": "long enough", "first_name": "A", "last_name": "B",'
            b' "type": "customer"}',
            "application/json",
            "U+0000",
        ),
        (
            b'{"username": "nulname", "password": "long enough", "first_name": "A\\u0000", "last_name": "B",'
            b' "type": "customer"}',
            "application/json",
            "U+0000",
        ),
    ],
)
async def test_signup_rejects_malformed_bodies(a1: str, raw: bytes, ctype: str, needle: str) -> None:
    reply = await call("POST", a1 + "/authen/signup", raw=raw, headers={"Content-Type": ctype})
    assert reply.code == 400, reply
    assert needle in reply.json["detail"]


async def test_signin_refuses_nul_in_the_username(a1: str) -> None:
    reply = await call(
        "POST",
        a1 + "/authen/signin",
        raw=b'{"username": "a\\u0000b", "password": "whatever1"}',
        headers={"Content-Type": "application/json"},
    )
    assert reply.code == 400 and "U+0000" in reply.json["detail"], reply


async def test_oversize_body_is_413(a1: str) -> None:
    reply = await call(
        "POST",
        a1 + "/authen/signup",
        raw=b'{"username": "' + b"a" * 200_000 + b'"}',
        headers={"Content-Type": "application/json"},
    )
    assert reply.code == 413, reply
    assert "detail" in reply.json


@pytest.mark.parametrize("size", [200_000, 20_000_000])
async def test_declared_oversize_body_is_413_json_without_being_read(a1: str, size: int) -> None:
    """Also past Tornado's own 16 MiB cap, which alone would answer a bare 400."""
    reply = await call(
        "POST",
        a1 + "/authen/signup",
        raw=b"x" * size,
        headers={"Content-Type": "application/json", "X-Request-ID": "oversize-1"},
        timeout=60,
    )
    assert reply.code == 413, reply
    assert "larger than" in reply.json["detail"]
    assert reply.headers["X-Request-ID"] == "oversize-1"
    assert (await call("GET", a1 + "/utilities/status")).code == 200


async def test_chunked_oversize_body_is_413(a1: str) -> None:
    async def produce(write) -> None:
        for _ in range(4):
            await write(b"y" * 50_000)

    client = AsyncHTTPClient()
    reply = await client.fetch(
        a1 + "/authen/signup",
        method="POST",
        body_producer=produce,
        raise_error=False,
        headers={"Content-Type": "application/json"},
    )
    assert reply.code == 413 and "larger than" in json.loads(reply.body)["detail"], reply


async def test_concurrent_signups_of_one_name_give_one_201_and_one_409(a1: str, a2: str) -> None:
    for _ in range(4):
        name = new_username("race")
        replies = await asyncio.gather(signup(a1, username=name), signup(a2, username=name.upper()))
        codes = sorted(r.code for _, r in replies)
        assert codes == [201, 409], replies


# -- sign-in ----------------------------------------------------------------------------
async def test_signin_returns_a_verifiable_token(a1: str, a2: str, verifier: TokenVerifier) -> None:
    body, created = await signup(a1, type_="employee")
    assert created.code == 201
    reply = await call(
        "POST", a2 + "/authen/signin", {"username": body["username"].upper(), "password": body["password"]}
    )
    assert reply.code == 200, reply
    assert reply.json["user_id"] == created.json["user_id"]
    assert reply.json["token_type"] == "Bearer"
    assert reply.json["expires_in"] > 0
    claims = verifier.verify(reply.json["token"])
    assert claims.user_id == created.json["user_id"]
    assert claims.user_type == "employee"
    assert claims.expires_at - claims.issued_at == reply.json["expires_in"]


async def test_signin_failures_look_the_same_for_unknown_users(a1: str) -> None:
    body, created = await signup(a1)
    assert created.code == 201
    wrong = await call("POST", a1 + "/authen/signin", {"username": body["username"], "password": "wrong password"})
    unknown = await call("POST", a1 + "/authen/signin", {"username": new_username("ghost"), "password": "whatever1"})
    assert wrong.code == unknown.code == 401
    assert wrong.json == unknown.json
    assert "token" not in wrong.raw.decode()


@pytest.mark.parametrize(
    "body",
    [
        {"username": "abc"},
        {"password": "abcdefgh"},
        {"username": "abc", "password": "abcdefgh", "x": 1},
        {"username": 1, "password": "abcdefgh"},
        {"username": "abc", "password": ""},
    ],
)
async def test_signin_rejects_bad_bodies(a1: str, body: dict) -> None:
    reply = await call("POST", a1 + "/authen/signin", body)
    assert reply.code == 400, reply
    assert reply.json["detail"]


async def test_repeated_failures_lock_the_username_for_this_client_across_instances(a1: str, a2: str) -> None:
    body, created = await signup(a1)
    assert created.code == 201
    bad = {"username": body["username"], "password": "not the password"}
    codes = []
    # The default limit is 5 failures per window; alternate instances: the count is shared.
    for i in range(5):
        codes.append((await call("POST", (a1, a2)[i % 2] + "/authen/signin", bad)).code)
    assert codes == [401] * 5
    locked = await call("POST", a2 + "/authen/signin", bad)
    assert locked.code == 429, locked
    assert int(locked.headers["Retry-After"]) >= 1
    # Even the right password is refused to this client while the username is locked for it
    # (another client is not: tests/test_hardening_services.py).
    right = await call("POST", a1 + "/authen/signin", {"username": body["username"], "password": body["password"]})
    assert right.code == 429
    # Another username is unaffected.
    other, made = await signup(a1)
    assert made.code == 201
    ok = await call("POST", a1 + "/authen/signin", {"username": other["username"], "password": other["password"]})
    assert ok.code == 200


async def test_parallel_guesses_cannot_outrun_the_lockout(a1: str, a2: str) -> None:
    """Each attempt takes its slot before the (slow) password check, so twenty guesses
    at once get at most five checks, whichever instance they reach."""
    body, created = await signup(a1)
    assert created.code == 201
    bad = {"username": body["username"], "password": "not the password"}
    replies = await asyncio.gather(*(call("POST", (a1, a2)[i % 2] + "/authen/signin", bad) for i in range(20)))
    codes = sorted(r.code for r in replies)
    assert codes == [401] * 5 + [429] * 15, codes
    right = await call("POST", a2 + "/authen/signin", {"username": body["username"], "password": body["password"]})
    assert right.code == 429


async def test_successful_signin_resets_the_failure_count(a1: str) -> None:
    body, created = await signup(a1)
    assert created.code == 201
    bad = {"username": body["username"], "password": "not the password"}
    good = {"username": body["username"], "password": body["password"]}
    for _ in range(4):
        assert (await call("POST", a1 + "/authen/signin", bad)).code == 401
    assert (await call("POST", a1 + "/authen/signin", good)).code == 200
    for _ in range(4):
        assert (await call("POST", a1 + "/authen/signin", bad)).code == 401
    assert (await call("POST", a1 + "/authen/signin", good)).code == 200


async def test_without_redis_signin_fails_open_and_reads_use_the_primary(stack: StackProcess, a1: str) -> None:
    body, created = await signup(a1)
    assert created.code == 201
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    async with await start_service(stack, "authen", extra_env={"REDIS_URL": dead_redis}, name="authen-noredis") as svc:
        bad = {"username": body["username"], "password": "not the password"}
        # The guard cannot count: no lockout (fail open), and still 401s, never 500s.
        codes = [(await call("POST", svc.url + "/authen/signin", bad)).code for _ in range(7)]
        assert codes == [401] * 7
        good = await call(
            "POST", svc.url + "/authen/signin", {"username": body["username"], "password": body["password"]}
        )
        assert good.code == 200, good
        made, reply = await signup(svc.url)
        assert reply.code == 201, reply
        # The shared high-water mark is unknown, so reads go to the primary (always fresh).
        check = await call("GET", f"{svc.url}/utilities/check?user_id={reply.json['user_id']}")
        assert check.code == 200 and check.json["username"] == made["username"]
        db = (await status(svc.url))["database"]
        assert db["high_water_mark_store"] == "unavailable"
        assert db["reads"]["primary"] >= 9 and db["reads"]["replica-1"] == db["reads"]["replica-2"] == 0
    assert "failing open" in svc.tail(400)  # the fail-open is logged


# -- employee list ------------------------------------------------------------------------
async def test_employee_list_has_barbers_only_in_id_order(a1: str, a2: str) -> None:
    barbers = []
    for _ in range(3):
        body, reply = await signup(a1, type_="employee")
        assert reply.code == 201
        barbers.append((reply.json["user_id"], body["username"]))
    _customer, c_reply = await signup(a1, type_="customer")
    assert c_reply.code == 201

    reply = await call("GET", a2 + "/list/employee?limit=1000")
    assert reply.code == 200, reply
    listed = reply.json
    ids = [u["id"] for u in listed]
    assert ids == sorted(ids)
    for user_id, username in barbers:
        assert {"id": user_id, "username": username, "first_name": "Ada", "last_name": "Lovelace"} in listed
    assert c_reply.json["user_id"] not in ids
    assert all(set(u) == {"id", "username", "first_name", "last_name"} for u in listed)


async def test_employee_list_paginates(a1: str) -> None:
    for _ in range(3):
        assert (await signup(a1, type_="employee"))[1].code == 201
    everything = (await call("GET", a1 + "/list/employee?limit=1000")).json
    assert len(everything) >= 3
    page = (await call("GET", a1 + "/list/employee?limit=2&offset=1")).json
    assert page == everything[1:3]
    default = (await call("GET", a1 + "/list/employee")).json
    assert default == everything[:100]


@pytest.mark.parametrize("query", ["limit=0", "limit=abc", "limit=1001", "offset=-1", "offset=x"])
async def test_employee_list_rejects_bad_paging(a1: str, query: str) -> None:
    reply = await call("GET", f"{a1}/list/employee?{query}")
    assert reply.code == 400, reply
    assert query.split("=")[0] in reply.json["detail"]


# -- check --------------------------------------------------------------------------------
async def test_check_unknown_user_is_404(a1: str) -> None:
    reply = await call("GET", f"{a1}/utilities/check?user_id=987654321987")
    assert reply.code == 404, reply
    assert reply.json["detail"]


# An id no user can have (outside 1..2**63-1) is bad input, like any unbounded number.
@pytest.mark.parametrize(
    "query",
    ["user_id=abc", "user_id=1.5", "user_id=", "", "user_id=0", "user_id=-4", f"user_id={2**63}", f"user_id={2**70}"],
)
async def test_check_needs_an_integer(a1: str, query: str) -> None:
    reply = await call("GET", f"{a1}/utilities/check?{query}")
    assert reply.code == 400, reply
    assert "user_id" in reply.json["detail"]


# -- status and sleepy ----------------------------------------------------------------------
async def test_status_shows_instance_and_database_view(a1: str, stack: StackProcess) -> None:
    body = await status(a1)
    assert body["status"] == "ok"
    assert body["service"] == "authen"
    assert body["instance"].endswith(f":{stack.layout.port('authen', 0)}")
    db = body["database"]
    assert db["primary"]["healthy"] is True
    assert [r["name"] for r in db["replicas"]] == ["replica-1", "replica-2"]
    for r in db["replicas"]:
        assert {"healthy", "lag_s", "lsn", "reads", "replay_paused"} <= set(r)
    assert set(db["reads"]) == {"primary", "replica-1", "replica-2"}


async def test_sleepy_get_and_post_sleep_and_are_counted(a1: str) -> None:
    before = (await status(a1))["sleepy"]["received"]
    got = await call("GET", f"{a1}/utilities/sleepy?seconds=0.05")
    posted = await call("POST", f"{a1}/utilities/sleepy?seconds=0", raw=b"")
    assert got.code == 200 and posted.code == 200, (got, posted)
    assert got.json["seconds"] == 0.05
    after = (await status(a1))["sleepy"]["received"]
    assert after - before == 2


async def test_sleepy_holds_the_request_while_others_are_served(a1: str) -> None:
    sleeper = asyncio.ensure_future(call("GET", f"{a1}/utilities/sleepy?seconds=1.5"))
    try:

        async def active() -> bool:
            return (await status(a1))["sleepy"]["active"] >= 1

        await wait_until(active, timeout=5, message="sleepy request in progress")
        assert not sleeper.done()
    finally:
        reply = await sleeper
    assert reply.code == 200


@pytest.mark.parametrize("query", ["seconds=-1", "seconds=abc", "seconds=nan"])
async def test_sleepy_rejects_bad_seconds(a1: str, query: str) -> None:
    reply = await call("GET", f"{a1}/utilities/sleepy?{query}")
    assert reply.code == 400, reply
    assert "seconds" in reply.json["detail"]


@pytest.mark.unit
def test_sleepy_is_capped_at_60_seconds() -> None:
    assert sleepy_seconds(1000.0) == SLEEPY_MAX_S == 60.0
    assert sleepy_seconds(2.5) == 2.5


async def test_sleepy_absent_without_enable_sleepy(stack: StackProcess) -> None:
    async with await start_service(stack, "authen", extra_env={"ENABLE_SLEEPY": "0"}, name="authen-nosleepy") as svc:
        reply = await call("GET", f"{svc.url}/utilities/sleepy?seconds=0")
        assert reply.code == 404, reply
        assert "sleepy" not in (await status(svc.url))


async def test_unknown_route_and_method_answer_json(a1: str) -> None:
    missing = await call("GET", a1 + "/no/such/path")
    assert missing.code == 404 and missing.json["detail"]
    wrong_method = await call("DELETE", a1 + "/authen/signup")
    assert wrong_method.code == 405 and wrong_method.json["detail"]


# -- create-admin (used by the deletion issue) -----------------------------------------------
async def run_authen(stack: StackProcess, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "authen", *args],
        cwd=ROOT,
        env={**stack.env, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_create_admin_is_idempotent_and_admin_can_sign_in_at_once(stack: StackProcess, a2: str) -> None:
    name = new_username("admin")
    env = {"BARBER_ADMIN_PASSWORD": "admin password 1"}
    first = await run_authen(stack, "create-admin", "--username", name, env=env)
    assert first.returncode == 0, first.stderr
    assert "created" in first.stdout
    again = await run_authen(stack, "create-admin", "--username", name, env=env)
    assert again.returncode == 0, again.stderr
    assert "exists" in again.stdout
    reply = await call("POST", a2 + "/authen/signin", {"username": name, "password": "admin password 1"})
    assert reply.code == 200, reply
    check = await call("GET", f"{a2}/utilities/check?user_id={reply.json['user_id']}")
    assert check.json["type"] == "admin"


async def test_create_admin_refuses_a_non_admin_name_and_a_weak_password(stack: StackProcess, a1: str) -> None:
    body, reply = await signup(a1)
    assert reply.code == 201
    taken = await run_authen(stack, "create-admin", "--username", body["username"], "--password", "long enough pw")
    assert taken.returncode == 1 and "not an admin" in taken.stderr
    weak = await run_authen(stack, "create-admin", "--username", new_username("a"), "--password", "Zq7x")
    assert weak.returncode == 2 and "password" in weak.stderr
    assert "Zq7x" not in weak.stderr  # the password itself is never echoed


async def test_migrate_is_idempotent(stack: StackProcess) -> None:
    run = await run_authen(stack, "migrate")
    assert run.returncode == 0, run.stderr
    assert "head" in run.stdout


async def test_sigterm_lets_a_request_in_flight_finish(stack: StackProcess) -> None:
    """Graceful stop (common.service): deregister, stop accepting, finish what is in
    flight, then exit 0."""
    svc = await start_service(stack, "authen", extra_env={"ENABLE_SLEEPY": "1"}, name="authen-graceful")
    try:
        slow = asyncio.create_task(call("GET", svc.url + "/utilities/sleepy?seconds=2", timeout=30))

        async def in_flight() -> bool:
            return (await status(svc.url))["sleepy"]["active"] == 1

        await wait_until(in_flight, timeout=10, message="the sleepy request in flight")
        svc.terminate()
        reply = await slow
        assert reply.code == 200, reply
        assert await svc.wait_exit(20) == 0
        assert "draining in-flight requests" in svc.tail(50)
    finally:
        await svc.stop()
