"""Issue 10, the services' part: each test makes one attack from the review against the
real stack (or the real code it concerns) and checks it no longer works.

Lone surrogates (3), account lock-out (5), sign-up cost and load shedding (6), sockets
per user and the chat list's size (7), tokens outliving deletion and expiry (8), tokens
in logs (9), and the smaller ones (10): discovery's per-name events, the admin password
in every service's environment, key files through planted links, the admin's name taken
by a sign-up, and status pages showing addresses and errors to anyone.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from pydantic import ValidationError

from authen.guard import progressive_delay
from authen.settings import AuthenSettings
from chat.store import Store, iso_now
from common.logs import redact
from common.tokens import MAX_TOKEN_TTL_S, TokenSigner, generate_keypair
from tests.http import call
from tests.procs import start_service
from tests.stackproc import ADMIN_PASSWORD, ROOT, StackProcess
from tests.test_authen_support import new_username, signup, user_body
from tests.test_chat_support import ChatClient, make_user, socket_url, start_chat
from tests.util import wait_until

PASSWORD = "correct horse"


# -- 3: a lone surrogate fails alone -------------------------------------------------------
async def test_lone_surrogate_in_a_frame_is_refused_and_others_are_stored(stack: StackProcess, c1: str) -> None:
    customer = await make_user(stack, "customer")
    employee = await make_user(stack, "employee")
    bystander = await make_user(stack, "customer")
    chat_id = await start_chat(c1, customer, employee)
    other_chat = await start_chat(c1, bystander, employee)
    bad = await ChatClient.connect(socket_url(c1, chat_id, customer.token))
    good = await ChatClient.connect(socket_url(c1, other_chat, bystander.token))
    try:
        # Sent together, so that they may share a write batch.
        await asyncio.gather(
            bad.send_raw('{"type": "chat_message", "message": "\\ud800"}'),
            bad.send_raw('{"type": "chat_message", "message": "hi", "client_id": "\\udfff"}'),
            *(good.send(f"fine {i}") for i in range(5)),
        )
        errors = await bad.wait_errors(2)
        assert [e["code"] for e in errors] == ["malformed", "malformed"], errors
        assert all("UTF-8" in e["detail"] for e in errors), errors
        assert [m["message"] for m in await good.wait_messages(5)] == [f"fine {i}" for i in range(5)]
        assert not good.errors
        # The refused frames took no seq: the chat goes on from 1.
        await bad.send("after")
        assert (await bad.wait_messages(1))[0]["seq"] == 1
    finally:
        await bad.close()
        await good.close()


async def test_lone_surrogate_in_a_json_body_is_a_400(a1: str) -> None:
    raw = json.dumps(user_body()).replace('"Ada"', '"\\ud800"').encode()
    reply = await call("POST", a1 + "/authen/signup", raw=raw, headers={"Content-Type": "application/json"})
    assert reply.code == 400, reply
    assert "UTF-8" in reply.json["detail"]


async def test_an_unstorable_document_fails_alone_in_a_batch(stack: StackProcess) -> None:
    store = Store.connect(stack.env["MONGO_URL"], "chat")
    try:
        chat_id = uuid.uuid4().hex
        now = 1.0

        def doc(seq: int, text: str) -> dict:
            return {
                "_id": uuid.uuid4().hex,
                "chat_id": chat_id,
                "seq": seq,
                "message": text,
                "sender": {"id": 1, "first_name": "A", "last_name": "B"},
                "sent_at": iso_now(now),
                "created_at": now,
            }

        outcomes = await store.insert_messages([doc(1, "one"), doc(2, "\ud800"), doc(3, "three")])
        assert [(o.ok, o.invalid) for o in outcomes] == [(True, False), (False, True), (True, False)]
        stored = await store.messages_after(chat_id, 0, 10)
        assert [m.public["message"] for m in stored] == ["one", "three"]
        await store.messages.delete_many({"chat_id": {"$eq": chat_id}})
    finally:
        await store.close()


# -- 5: nobody can lock the owner out ------------------------------------------------------
async def test_an_attackers_failures_do_not_lock_out_the_owner(stack: StackProcess) -> None:
    gw = stack.url("gateway")
    body, reply = await signup(stack.url("authen", 0))
    assert reply.code == 201, reply
    username = body["username"]
    wrong = {"username": username, "password": "wrong password"}
    # The attacker (another address, through the gateway) uses up its attempts...
    codes = [(await call("POST", gw + "/authen/authen/signin", wrong, source_ip="127.0.0.2")).code for _ in range(6)]
    assert codes == [401] * 5 + [429], codes
    # ...also with the right password, and from the same address under another spelling.
    right = {"username": username.upper(), "password": body["password"]}
    assert (await call("POST", gw + "/authen/authen/signin", right, source_ip="127.0.0.2")).code == 429
    # The owner, from elsewhere, signs in.
    owner = await call(
        "POST",
        gw + "/authen/authen/signin",
        {"username": username, "password": body["password"]},
        source_ip="127.0.0.3",
    )
    assert owner.code == 200, owner
    assert owner.json["user_id"] == reply.json["user_id"]


async def test_a_direct_client_cannot_choose_its_address(stack: StackProcess, a1: str) -> None:
    body, reply = await signup(a1)
    assert reply.code == 201, reply
    wrong = {"username": body["username"], "password": "wrong password"}
    # From an address that is no trusted proxy, X-Forwarded-For is ignored: a new
    # spelling of the address on each try does not give new attempts.
    codes = [
        (
            await call(
                "POST", a1 + "/authen/signin", wrong, headers={"X-Forwarded-For": f"10.9.8.{i}"}, source_ip="127.0.0.4"
            )
        ).code
        for i in range(6)
    ]
    assert codes == [401] * 5 + [429], codes
    # From a trusted proxy (the gateway's address), its last X-Forwarded-For entry is the client.
    ok = await call(
        "POST",
        a1 + "/authen/signin",
        {"username": body["username"], "password": body["password"]},
        headers={"X-Forwarded-For": "127.0.0.4, 10.1.2.3"},
    )
    assert ok.code == 200, ok


@pytest.mark.unit
def test_the_delay_grows_past_the_soft_threshold_and_is_capped() -> None:
    assert progressive_delay(20, slow_after=20, max_delay_s=2.0) == 0
    assert progressive_delay(21, slow_after=20, max_delay_s=2.0) == pytest.approx(0.1)
    assert progressive_delay(25, slow_after=20, max_delay_s=2.0) == pytest.approx(0.5)
    assert progressive_delay(500, slow_after=20, max_delay_s=2.0) == 2.0


# -- 6: sign-up does not hash for a taken name; the hashing queue is bounded ----------------
async def test_a_taken_name_costs_no_hash(stack: StackProcess) -> None:
    async with await start_service(stack, "authen", name="authen-hashcount") as svc:
        body, first = await signup(svc.url)
        assert first.code == 201, first
        headers = stack.service_headers()
        before = (await call("GET", svc.url + "/utilities/status", headers=headers)).json["password_hashing"]
        again = await call("POST", svc.url + "/authen/signup", {**body, "username": body["username"].upper()})
        assert again.code == 409, again
        after = (await call("GET", svc.url + "/utilities/status", headers=headers)).json["password_hashing"]
        assert after["hashed"] == before["hashed"]


async def test_the_hashing_queue_sheds_load_with_a_dependency_503(stack: StackProcess) -> None:
    # One hash at a time, each slow: concurrent sign-ups past the first are shed at once.
    env = {
        "AUTHEN_HASH_QUEUE_MAX": "1",
        "AUTHEN_HASH_THREADS": "1",
        "ARGON2_TIME_COST": "40",
        "ARGON2_MEMORY_KIB": "65536",
    }
    async with await start_service(stack, "authen", extra_env=env, name="authen-shed") as svc:
        replies = await asyncio.gather(*(signup(svc.url) for _ in range(6)))
        codes = sorted(r.code for _, r in replies)
        assert codes.count(201) >= 1 and codes.count(503) >= 1 and set(codes) <= {201, 503}, codes
        shed = [r for _, r in replies if r.code == 503]
        assert all(r.headers["X-Dependency-Unavailable"] == "password-hashing" for r in shed)
        assert all("try again" in r.json["detail"] for r in shed)


# -- 7: sockets per user, and a bounded chat list ------------------------------------------
async def test_sockets_per_user_are_capped(stack: StackProcess) -> None:
    customer = await make_user(stack, "customer")
    employee = await make_user(stack, "employee")
    async with await start_service(stack, "chat", extra_env={"CHAT_MAX_SOCKETS_PER_USER": "2"}, name="chat-cap") as svc:
        chat_id = await start_chat(svc.url, customer, employee)
        held = [await ChatClient.connect(socket_url(svc.url, chat_id, customer.token)) for _ in range(2)]
        try:
            await held[1].send("both open")
            await held[0].wait_messages(1)
            extra = await ChatClient.connect(socket_url(svc.url, chat_id, customer.token))
            assert await extra.wait_closed() == 4429
            assert "at most 2" in (extra.close_reason or "")
            # Another user is not affected, and a closed socket frees its place.
            other = await ChatClient.connect(socket_url(svc.url, chat_id, employee.token))
            await held.pop().close()

            async def reopened() -> bool:
                client = await ChatClient.connect(socket_url(svc.url, chat_id, customer.token))
                await client.send("again")
                try:
                    await client.wait_messages(1, timeout=5)
                    held.append(client)
                    return True
                except AssertionError:
                    await client.close()
                    return False

            await wait_until(reopened, timeout=15, message="a socket in the freed place")
            await other.close()
        finally:
            for client in held:
                await client.close()


async def test_the_chat_list_is_paginated(stack: StackProcess, c1: str) -> None:
    customer = await make_user(stack, "customer")
    employees = [await make_user(stack, "employee") for _ in range(3)]
    for employee in employees:
        await start_chat(c1, customer, employee)
    whole = await call("GET", c1 + "/chats/list/my", token=customer.token)
    assert whole.code == 200 and len(whole.json) == 3
    first = await call("GET", c1 + "/chats/list/my?limit=2", token=customer.token)
    rest = await call("GET", c1 + "/chats/list/my?limit=2&offset=2", token=customer.token)
    assert [c["chat_id"] for c in first.json + rest.json] == [c["chat_id"] for c in whole.json]
    assert len(first.json) == 2
    for bad in ("limit=0", "limit=501", "offset=-1", "limit=x"):
        reply = await call("GET", f"{c1}/chats/list/my?{bad}", token=customer.token)
        assert reply.code == 400, (bad, reply)


# -- 8: tokens do not outlive what they grant -----------------------------------------------
async def test_a_deleted_users_token_is_refused_everywhere(stack: StackProcess, admin_token: str) -> None:
    gw, c1 = stack.url("gateway"), stack.url("chat", 0)
    customer = await make_user(stack, "customer")
    assert (await call("GET", gw + "/chat/chats/list/my", token=customer.token)).code == 200
    reply = await call("DELETE", f"{gw}/admin/users/{customer.id}?mode=2pc", token=admin_token, timeout=60)
    assert reply.code == 200, reply

    async def refused() -> bool:
        at_gateway = await call("GET", gw + "/chat/chats/list/my", token=customer.token)
        at_chat = await call("GET", c1 + "/chats/list/my", token=customer.token)
        return at_gateway.code == 401 and at_chat.code == 401 and "revoked" in at_chat.json["detail"]

    await wait_until(refused, timeout=10, message="the deleted user's token refused")


async def make_admin(stack: StackProcess) -> tuple[int, str]:
    """A second admin account (create-admin is the only way to make one)."""
    username = new_username("boss")
    env = {**os.environ, **stack.env}
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "authen", "create-admin", "--username", username, "--password", PASSWORD],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    reply = await call(
        "POST", stack.url("gateway") + "/authen/authen/signin", {"username": username, "password": PASSWORD}
    )
    assert reply.code == 200, reply
    return reply.json["user_id"], reply.json["token"]


async def test_a_deleted_admin_loses_delete_rights(stack: StackProcess, admin_token: str) -> None:
    gw = stack.url("gateway")
    boss_id, boss_token = await make_admin(stack)
    victim = await make_user(stack, "customer")
    # The saga's first step deactivates the admin, which revokes their tokens.
    reply = await call("DELETE", f"{gw}/admin/users/{boss_id}?mode=saga", token=admin_token, timeout=60)
    assert reply.code in (200, 202), reply

    async def refused() -> bool:
        probe = await call("GET", f"{gw}/admin/transactions?user_id={victim.id}", token=boss_token)
        return probe.code == 401

    await wait_until(refused, timeout=15, message="the deleted admin's token refused")
    attempt = await call("DELETE", f"{gw}/admin/users/{victim.id}?mode=2pc", token=boss_token, timeout=60)
    assert attempt.code == 401, attempt
    assert (await call("GET", f"{stack.url('authen', 0)}/utilities/check?user_id={victim.id}")).code == 200


async def test_deactivation_revokes_and_closes_the_users_sockets(stack: StackProcess, c1: str) -> None:
    customer = await make_user(stack, "customer")
    employee = await make_user(stack, "employee")
    chat_id = await start_chat(c1, customer, employee)
    client = await ChatClient.connect(socket_url(c1, chat_id, customer.token))
    peer = await ChatClient.connect(socket_url(c1, chat_id, employee.token))
    a1 = stack.url("authen", 0)
    try:
        await client.send("before")
        await peer.wait_messages(1)
        reply = await call("POST", f"{a1}/internal/users/{customer.id}/deactivate", headers=stack.service_headers())
        assert reply.code == 200, reply
        assert await client.wait_closed(timeout=15) == 4401
        assert client.close_reason == "token revoked"
        assert not peer.closed.is_set()  # the other party's socket stays

        # Every process refreshes its copy of the marks on its own (TOKEN_REVOCATION_REFRESH_S):
        # chat-1 closing the socket says nothing of when the gateway's copy has the mark.
        async def refused() -> bool:
            reply = await call("GET", stack.url("gateway") + "/chat/chats/list/my", token=customer.token)
            return reply.code == 401

        await wait_until(refused, timeout=10, message="the gateway refusing the deactivated user's token")
    finally:
        await call("POST", f"{a1}/internal/users/{customer.id}/reactivate", headers=stack.service_headers())
        await client.close()
        await peer.close()
    # Reactivated, the user signs in again and gets a working token.
    again = await call("POST", a1 + "/authen/signin", {"username": customer.username, "password": PASSWORD})
    assert again.code == 200, again


async def test_a_socket_closes_when_its_token_expires(stack: StackProcess, c1: str) -> None:
    customer = await make_user(stack, "customer")
    employee = await make_user(stack, "employee")
    chat_id = await start_chat(c1, customer, employee)
    short = TokenSigner.from_file(stack.layout.jwt_private_key, 3).issue(customer.id, "customer")
    client = await ChatClient.connect(socket_url(c1, chat_id, short))
    try:
        await client.send("while valid")
        await client.wait_messages(1)
        assert await client.wait_closed(timeout=20) == 4401
        assert client.close_reason == "token expired"
    finally:
        await client.close()


@pytest.mark.unit
def test_the_token_lifetime_is_capped() -> None:
    assert AuthenSettings(authen_token_ttl_s=MAX_TOKEN_TTL_S).authen_token_ttl_s == MAX_TOKEN_TTL_S
    with pytest.raises(ValidationError):
        AuthenSettings(authen_token_ttl_s=MAX_TOKEN_TTL_S + 1)


# -- 9: no token in any log line -----------------------------------------------------------
async def test_tornados_own_log_lines_carry_no_token(stack: StackProcess, c1: str, a1: str) -> None:
    user = await make_user(stack, "customer")
    # An undecodable argument makes tornado itself log the request, full URI included.
    rid = uuid.uuid4().hex
    reply = await call(
        "GET",
        f"{c1}/chats/history?id=%ff&token={user.token}",
        headers={"Authorization": f"Bearer {user.token}", "X-Request-ID": rid},
    )
    assert reply.code == 400, reply
    reply = await call(
        "GET",
        f"{a1}/utilities/check?user_id=%ff&token={user.token}",
        headers={"Sec-WebSocket-Protocol": f"bearer, {user.token}"},
    )
    assert reply.code == 400, reply
    logs = stack.layout.logs_dir

    def logged() -> bool:
        return all(
            "Invalid unicode" in (logs / f"{name}.log").read_text(errors="replace") for name in ("chat-1", "authen-1")
        )

    await wait_until(logged, timeout=10, message="tornado's warning in both logs")
    for name in ("chat-1", "authen-1", "gateway"):
        text = (logs / f"{name}.log").read_text(errors="replace")
        assert user.token not in text, name
        assert user.token.split(".")[2] not in text, name  # not even the signature
    assert "token=[REDACTED]" in (logs / "chat-1.log").read_text(errors="replace")


@pytest.mark.unit
def test_redact_covers_every_spelling() -> None:
    jwt_like = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl"
    for line in (
        f"GET /x?token={jwt_like}&a=1",
        f"Authorization: Bearer {jwt_like}",
        f"'Sec-Websocket-Protocol': 'bearer, {jwt_like}'",
        f"proto bearer.{jwt_like}",
        f"in a message {jwt_like} somewhere",
        "X-Service-Token: sekrit-value-123",
    ):
        out = redact(line)
        assert jwt_like not in out and "sekrit" not in out, out
        assert "[REDACTED]" in out
    assert redact("GET /chats/history?id=5 200") == "GET /chats/history?id=5 200"


# -- 10: the smaller ones ------------------------------------------------------------------
async def test_discovery_keeps_no_event_per_asked_name(stack: StackProcess) -> None:
    base = stack.url("discovery")
    for _i in range(30):
        name = f"nosuch-{uuid.uuid4().hex[:8]}"
        assert (await call("GET", f"{base}/services/{name}")).code == 200
        assert (await call("GET", f"{base}/services/{name}?version=x&wait=0.01")).code == 200
    status = (await call("GET", base + "/status")).json
    # What remains are the services' own long polls, at most one per type they watch.
    assert status["watch_events"] <= 5, status


async def test_only_create_admin_sees_the_admin_password(stack: StackProcess) -> None:
    processes = stack.control.status()["processes"]
    services = [n for n in processes if n.split("-")[0] in ("authen", "chat", "gateway", "discovery")]
    assert len(services) >= 6, processes
    for name in services:
        pid = processes[name]["pid"]
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert not any(v.startswith(b"BARBER_ADMIN_PASSWORD=") for v in environ), name
    # The admin account was created all the same.
    assert ADMIN_PASSWORD not in (stack.layout.logs_dir / "authen-1.log").read_text(errors="replace")


@pytest.mark.unit
def test_key_files_are_never_written_through_a_planted_link(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_text("precious")
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "jwt.pem").symlink_to(target)
    generate_keypair(keys / "jwt.pem", keys / "jwt.pub")
    assert target.read_text() == "precious"
    assert not (keys / "jwt.pem").is_symlink()
    assert (keys / "jwt.pem").stat().st_mode & 0o777 == 0o600
    assert b"PRIVATE KEY" in (keys / "jwt.pem").read_bytes()
    # Both planted as links to existing files: still replaced, never used.
    (keys / "jwt.pem").unlink()
    (keys / "jwt.pem").symlink_to(target)
    generate_keypair(keys / "jwt.pem", keys / "jwt.pub")
    assert target.read_text() == "precious" and not (keys / "jwt.pem").is_symlink()


async def test_the_admin_name_cannot_be_taken_by_a_sign_up(stack: StackProcess) -> None:
    boss = new_username("chief")
    env = {"BARBER_ADMIN_USERNAME": boss}
    async with await start_service(stack, "authen", extra_env=env, name="authen-reserved") as svc:
        _, taken = await signup(svc.url, username=boss.upper())
        assert taken.code == 409, taken
    run_env = {**os.environ, **stack.env, **env, "BARBER_ADMIN_PASSWORD": PASSWORD}
    created = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "authen", "create-admin", "--if-configured"],
        cwd=ROOT,
        env=run_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert created.returncode == 0 and "created" in created.stdout, created


async def test_create_admin_does_not_fail_the_stack_when_the_name_is_held(stack: StackProcess, a1: str) -> None:
    # A name held before sign-up reserved it (here: an ordinary account's name).
    body, reply = await signup(a1)
    assert reply.code == 201, reply
    run_env = {
        **os.environ,
        **stack.env,
        "BARBER_ADMIN_USERNAME": body["username"].upper(),
        "BARBER_ADMIN_PASSWORD": PASSWORD,
    }
    argv = [sys.executable, "-m", "authen", "create-admin"]
    lenient = await asyncio.to_thread(
        subprocess.run, [*argv, "--if-configured"], cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=60
    )
    assert lenient.returncode == 0 and "no admin account" in lenient.stderr, lenient
    strict = await asyncio.to_thread(
        subprocess.run, argv, cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=60
    )
    assert strict.returncode == 1, strict


async def test_status_pages_show_details_only_to_services_and_admins(stack: StackProcess, admin_token: str) -> None:
    gw = stack.url("gateway")
    pg_port = str(stack.layout.port("postgres"))
    for path in ("/authen/utilities/status", "/chat/utilities/status"):
        public = await call("GET", gw + path)
        assert public.code == 200, public
        assert set(public.json) == {"status", "service", "instance"}, public.json
        assert pg_port not in public.raw.decode()
        customer = await make_user(stack, "customer")
        assert set((await call("GET", gw + path, token=customer.token)).json) == {"status", "service", "instance"}
        detailed = await call("GET", gw + path, token=admin_token)
        assert len(detailed.json) > 3, detailed.json
    detailed = await call("GET", gw + "/authen/utilities/status", token=admin_token)
    assert "database" in detailed.json
    direct = await call("GET", stack.url("authen", 0) + "/utilities/status", headers=stack.service_headers())
    assert pg_port in direct.raw.decode()
    # The gateway's own: instance addresses and breakers only for services and admins.
    public = await call("GET", gw + "/status")
    assert public.code == 200 and set(public.json) == {"status", "service", "instance"}, public.json
    chat_port = str(stack.layout.port("chat"))
    assert chat_port not in public.raw.decode()
    for headers in ({"Authorization": f"Bearer {admin_token}"}, stack.service_headers()):
        detailed = await call("GET", gw + "/status", headers=headers)
        assert chat_port in detailed.raw.decode() and "breaker" in detailed.raw.decode()
