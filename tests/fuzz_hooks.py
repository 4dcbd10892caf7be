"""Schemathesis hooks for tests/test_fuzz.py (loaded by the `st` process through SCHEMATHESIS_HOOKS).

Settings come from the environment the test sets:
FUZZ_ADMIN_TOKEN, FUZZ_CUSTOMER_TOKEN  bearer tokens (/admin and /etl paths get the admin's)
FUZZ_VICTIMS                           user ids the fuzzer may delete (comma list)
FUZZ_CHAT_ID                           a chat of the fuzzing customer, so that /chats/connect
                                       and /chats/history reach the database, not only the 404
FUZZ_BARBER_ID                         the barber of that chat (for the analytics of one barber)
FUZZ_STATIC_FILE                       a file the etl service serves under /static/
"""

from __future__ import annotations

import os
import re
import zlib
from typing import Any

import schemathesis

ADMIN_TOKEN = os.environ.get("FUZZ_ADMIN_TOKEN", "")
CUSTOMER_TOKEN = os.environ.get("FUZZ_CUSTOMER_TOKEN", "")
VICTIMS = [v for v in os.environ.get("FUZZ_VICTIMS", "").split(",") if v]
CHAT_ID = os.environ.get("FUZZ_CHAT_ID", "")
BARBER_ID = os.environ.get("FUZZ_BARBER_ID", "")
STATIC_FILE = os.environ.get("FUZZ_STATIC_FILE", "")
# An id no user has: deletions the fuzzer aims anywhere but at a victim go here (404).
NOBODY = "999999999999999"
ID_RE = re.compile(r"[0-9]{1,18}")


@schemathesis.auth(refresh_interval=None, retry_on=[])
class Tokens:
    """The admin's token on the admin and analytics APIs, the customer's everywhere else."""

    def get(self, case: schemathesis.Case, ctx: schemathesis.AuthContext) -> str:
        return ADMIN_TOKEN if case.operation.path.startswith(("/admin/", "/etl/")) else CUSTOMER_TOKEN

    def set(self, case: schemathesis.Case, data: str, ctx: schemathesis.AuthContext) -> None:
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}


def _pick(value: Any, choices: list[str]) -> str:
    return choices[zlib.crc32(str(value).encode()) % len(choices)]


def _mostly(value: Any) -> bool:
    """Three in four values (decided by the value, so a run is repeatable)."""
    return zlib.crc32(str(value).encode()) % 4 != 0


def _real_path_parameter(case: schemathesis.Case, name: str, real: str, valid: re.Pattern[str]) -> None:
    value = (case.path_parameters or {}).get(name)
    if real and value is not None and valid.fullmatch(str(value)) and _mostly(value):
        case.path_parameters = {**case.path_parameters, name: real}


@schemathesis.hook
def before_call(context: schemathesis.HookContext, case: schemathesis.Case, kwargs: dict[str, Any]) -> None:
    """Deletions only ever reach the victims (or nobody): every other user, the fuzzer's own
    and the admin included, must survive the run. Three in four valid chat ids, barber ids
    and static paths become real ones, so those operations reach more than their 404."""
    op = case.operation
    if op.method.upper() == "DELETE" and op.path == "/admin/users/{user_id}":
        uid = (case.path_parameters or {}).get("user_id")
        if uid is not None and ID_RE.fullmatch(str(uid)) and str(int(str(uid))) not in VICTIMS:
            case.path_parameters = {**case.path_parameters, "user_id": _pick(uid, [*VICTIMS, NOBODY])}
    if CHAT_ID and op.path in ("/chat/chats/connect", "/chat/chats/history"):
        chat = (case.query or {}).get("id")
        if isinstance(chat, str) and 0 < len(chat) <= 64 and _mostly(chat):
            case.query = {**case.query, "id": CHAT_ID}
    if op.path == "/etl/analytics/barbers/{barber_id}/daily":
        _real_path_parameter(case, "barber_id", BARBER_ID, ID_RE)
    if op.path == "/etl/static/{path}":
        _real_path_parameter(case, "path", STATIC_FILE, re.compile(r"[^/]+"))
