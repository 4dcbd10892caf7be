"""authen as a deletion participant: prepared transactions, idempotence, saga steps."""

from __future__ import annotations

import uuid

import psycopg

from tests.http import call
from tests.stackproc import StackProcess
from tests.test_chat_support import make_user

PASSWORD = "correct horse"


def headers(stack: StackProcess) -> dict[str, str]:
    return {"X-Service-Token": stack.layout.service_secret.read_text().strip()}


def prepared_gids(stack: StackProcess) -> list[str]:
    with psycopg.connect(stack.layout.pg_dsn("authen"), autocommit=True) as conn:
        return [r[0] for r in conn.execute("SELECT gid FROM pg_prepared_xacts").fetchall()]


async def tx(stack: StackProcess, action: str, gid: str, index: int = 0, user_id: int | None = None):
    body = {"user_id": user_id} if user_id is not None else None
    return await call("POST", f"{stack.url('authen', index)}/internal/tx/{gid}/{action}", body, headers=headers(stack))


async def signin_code(stack: StackProcess, username: str, index: int = 0) -> int:
    reply = await call(
        "POST", stack.url("authen", index) + "/authen/signin", {"username": username, "password": PASSWORD}
    )
    return reply.code


async def check_code(stack: StackProcess, user_id: int, index: int) -> int:
    return (await call("GET", f"{stack.url('authen', index)}/utilities/check?user_id={user_id}")).code


async def test_prepare_then_commit_from_the_other_instance(stack: StackProcess) -> None:
    user = await make_user(stack, "customer")
    gid = f"test-tx-{uuid.uuid4()}"
    reply = await tx(stack, "prepare", gid, 0, user.id)
    assert reply.code == 200 and reply.json["state"] == "prepared", reply
    assert gid in prepared_gids(stack)
    # A repeated prepare (the coordinator retrying) is answered from the database.
    reply = await tx(stack, "prepare", gid, 1, user.id)
    assert reply.code == 200 and reply.json["state"] == "prepared", reply
    status = await call("GET", f"{stack.url('authen', 1)}/internal/tx/{gid}", headers=headers(stack))
    assert status.json["state"] == "prepared"
    listed = await call("GET", f"{stack.url('authen', 0)}/internal/tx?state=prepared", headers=headers(stack))
    assert gid in [t["gid"] for t in listed.json["transactions"]]

    reply = await tx(stack, "commit", gid, 1)
    assert reply.code == 200 and reply.json["state"] == "committed", reply
    assert gid not in prepared_gids(stack)
    # Gone at once on both instances (read-your-writes across instances).
    assert await check_code(stack, user.id, 0) == 404
    assert await check_code(stack, user.id, 1) == 404
    assert await signin_code(stack, user.username) == 401
    # Idempotent commit; an abort after the commit is refused.
    assert (await tx(stack, "commit", gid, 0)).json["state"] == "committed"
    assert (await tx(stack, "abort", gid, 0)).code == 409


async def test_prepare_then_abort_keeps_the_user(stack: StackProcess) -> None:
    user = await make_user(stack, "employee")
    gid = f"test-tx-{uuid.uuid4()}"
    assert (await tx(stack, "prepare", gid, 0, user.id)).code == 200
    reply = await tx(stack, "abort", gid, 1)
    assert reply.code == 200 and reply.json["state"] == "aborted", reply
    assert gid not in prepared_gids(stack)
    assert await signin_code(stack, user.username) == 200
    assert (await tx(stack, "abort", gid, 0)).json["state"] == "aborted"
    assert (await tx(stack, "commit", gid, 0)).code == 409
    assert (await tx(stack, "prepare", gid, 0, user.id)).code == 409


async def test_votes_no_and_refuses_bad_calls(stack: StackProcess) -> None:
    user = await make_user(stack, "customer")
    gid = f"test-tx-{uuid.uuid4()}"
    reply = await tx(stack, "prepare", gid, 0, 987_654_321)
    assert reply.code == 404 and "detail" in reply.json
    # A second transaction on a user already held by a prepared one votes no.
    held = f"test-tx-{uuid.uuid4()}"
    assert (await tx(stack, "prepare", held, 0, user.id)).code == 200
    try:
        reply = await tx(stack, "prepare", gid, 1, user.id)
        assert reply.code == 409 and "locked" in reply.json["detail"], reply
    finally:
        assert (await tx(stack, "abort", held, 0)).code == 200
    assert (await tx(stack, "commit", f"test-tx-{uuid.uuid4()}", 0)).code == 409
    base = stack.url("authen")
    assert (await call("POST", f"{base}/internal/tx/{gid}/prepare", {"user_id": user.id})).code == 403
    assert (
        await call(
            "POST", f"{base}/internal/tx/{gid}/prepare", {"user_id": user.id}, headers={"X-Service-Token": "wrong"}
        )
    ).code == 403
    assert (await call("POST", f"{base}/internal/tx/bad'gid/abort", headers=headers(stack))).code == 400
    assert (
        await call("POST", f"{base}/internal/tx/{gid}/prepare", {"user_id": "x"}, headers=headers(stack))
    ).code == 400
    assert (await call("GET", f"{base}/internal/tx?state=committed", headers=headers(stack))).code == 400
    assert await signin_code(stack, user.username) == 200


async def test_saga_steps(stack: StackProcess) -> None:
    user = await make_user(stack, "customer")
    base = stack.url("authen")
    h = headers(stack)
    reply = await call("POST", f"{base}/internal/users/{user.id}/deactivate", headers=h)
    assert reply.code == 200 and reply.json["is_active"] is False
    assert await signin_code(stack, user.username) == 401
    assert await check_code(stack, user.id, 1) == 404
    reply = await call("POST", f"{base}/internal/users/{user.id}/reactivate", headers=h)
    assert reply.code == 200 and reply.json["is_active"] is True
    assert await signin_code(stack, user.username, 1) == 200
    reply = await call("DELETE", f"{base}/internal/users/{user.id}", headers=h)
    assert reply.code == 200 and reply.json["deleted"] is True
    reply = await call("DELETE", f"{base}/internal/users/{user.id}", headers=h)
    assert reply.code == 200 and reply.json["deleted"] is False
    assert (await call("POST", f"{base}/internal/users/{user.id}/deactivate", headers=h)).code == 404
    assert await signin_code(stack, user.username) == 401
