"""The admin API (mounted in the gateway) and the participants' outcome query."""

from __future__ import annotations

from typing import Any

from common.errors import NotFound
from common.handler import CONTEXT, BaseHandler
from common.openapi import api
from coordinator.context import CoordinatorContext
from coordinator.schemas import (
    DeleteQuery,
    DeletionStarted,
    Transaction,
    TransactionList,
    TransactionPath,
    TransactionsQuery,
)


class CoordinatorHandler(BaseHandler):
    @property
    def context(self) -> CoordinatorContext:
        return self.settings[CONTEXT]


class DeleteUserHandler(CoordinatorHandler):
    @api(
        "Delete a user and all their chats, atomically (admin)",
        query=DeleteQuery,
        responses={200: DeletionStarted, 202: DeletionStarted},
        errors=(403, 404, 409, 502, 503),
        auth=True,
        headers={202: {"Location": "the transaction's URL"}},
    )
    async def delete(self, user_id: str) -> None:
        self.require_user("admin")
        mode = self.parse_query(DeleteQuery).mode
        if int(user_id) < 1:
            raise NotFound(f"no user with id {user_id}")
        tx = await self.context.coordinator.delete_user(int(user_id), mode)
        body: dict[str, Any] = {"transaction_id": str(tx.id), "state": tx.state}
        if tx.mode == "saga":
            self.set_header("Location", f"/admin/transactions/{tx.id}")
            self.write_json(body, status=202)
            return
        if tx.state == "aborted":
            body["detail"] = tx.detail
        self.write_json(body)


class TransactionHandler(CoordinatorHandler):
    @api(
        "A deletion's state, participants and steps (admin)",
        responses={200: Transaction},
        errors=(400, 403, 404, 503),
        auth=True,
        path=TransactionPath,
    )
    async def get(self, raw_id: str) -> None:
        self.require_user("admin")
        tx = await self.context.coordinator.txlog.get(self.parse_path(TransactionPath, raw_id).transaction_id)
        if tx is None:
            raise NotFound(f"no transaction {raw_id}")
        self.write_json(tx.to_json())


class TransactionListHandler(CoordinatorHandler):
    @api(
        "Deletions, newest first (admin)",
        query=TransactionsQuery,
        responses={200: TransactionList},
        errors=(403, 503),
        auth=True,
    )
    async def get(self) -> None:
        self.require_user("admin")
        q = self.parse_query(TransactionsQuery)
        txs = await self.context.coordinator.txlog.list(q.state, q.user_id, q.limit)
        self.write_json({"transactions": [tx.to_json() for tx in txs]})


class OutcomeHandler(CoordinatorHandler):
    """A participant left prepared asks what was decided (service credential only)."""

    async def get(self, gid: str) -> None:
        self.require_service()
        self.write_json({"gid": gid, "decision": await self.context.coordinator.outcome(gid)})


def routes() -> list[tuple[str, type[CoordinatorHandler]]]:
    return [
        (r"/admin/users/([0-9]{1,18})", DeleteUserHandler),
        (r"/admin/transactions", TransactionListHandler),
        (r"/admin/transactions/([^/]+)", TransactionHandler),
        (r"/internal/coordinator/transactions/([^/]+)", OutcomeHandler),
    ]
