"""The admin API (mounted in the gateway) and the participants' outcome query."""

from __future__ import annotations

import uuid

from common.errors import BadRequest, NotFound
from common.handler import BaseHandler
from coordinator.deletion import Coordinator

TX_STATES = ("running", "committed", "aborted")


class CoordinatorHandler(BaseHandler):
    def initialize(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator


def _tx_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError as e:
        raise BadRequest("transaction id must be a UUID") from e


class DeleteUserHandler(CoordinatorHandler):
    async def delete(self, user_id: str) -> None:
        self.require_user("admin")
        mode = self.get_query_argument("mode", "2pc")
        if mode not in ("2pc", "saga"):
            raise BadRequest("mode: must be 2pc or saga")
        tx = await self.coordinator.delete_user(int(user_id), mode)
        body = {"transaction_id": str(tx.id), "state": tx.state}
        if tx.mode == "saga":
            self.set_header("Location", f"/admin/transactions/{tx.id}")
            self.write_json(body, status=202)
            return
        if tx.state == "aborted":
            body["detail"] = tx.detail
        self.write_json(body)


class TransactionHandler(CoordinatorHandler):
    async def get(self, raw_id: str) -> None:
        self.require_user("admin")
        tx = await self.coordinator.txlog.get(_tx_id(raw_id))
        if tx is None:
            raise NotFound(f"no transaction {raw_id}")
        self.write_json(tx.to_json())


class TransactionListHandler(CoordinatorHandler):
    async def get(self) -> None:
        self.require_user("admin")
        state = self.get_query_argument("state", None) or None
        if state is not None and state not in TX_STATES:
            raise BadRequest(f"state: must be one of {', '.join(TX_STATES)}")
        user_id = self.query_int("user_id", minimum=1) if "user_id" in self.request.query_arguments else None
        limit = self.query_int("limit", 50, minimum=1, maximum=500)
        txs = await self.coordinator.txlog.list(state, user_id, limit)
        self.write_json({"transactions": [tx.to_json() for tx in txs]})


class OutcomeHandler(CoordinatorHandler):
    """A participant left prepared asks what was decided (service credential only)."""

    async def get(self, gid: str) -> None:
        self.require_service()
        self.write_json({"gid": gid, "decision": await self.coordinator.outcome(gid)})


def routes(coordinator: Coordinator) -> list:
    args = {"coordinator": coordinator}
    return [
        (r"/admin/users/([0-9]{1,18})", DeleteUserHandler, args),
        (r"/admin/transactions", TransactionListHandler, args),
        (r"/admin/transactions/([^/]+)", TransactionHandler, args),
        (r"/internal/coordinator/transactions/([^/]+)", OutcomeHandler, args),
    ]
