"""Transformation with pandas: validate raw documents, attach each message to its chat,
and compute reply times.

A *reply* to a customer's message is the barber's next message in the same chat (by
``seq``); its time is the difference of the two ``created_at``. Every customer message
before one barber message gets that same reply (each its own wait).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger("barber.etl.transform")

MESSAGE_COLUMNS = ["chat_id", "seq", "sender_id", "created_at"]
CHAT_COLUMNS = ["chat_id", "customer_id", "employee_id", "created_at"]
# Times travel as integer microseconds since the epoch (PostgreSQL's resolution), so a
# message reads back from the warehouse exactly as it was extracted.
WORKING_COLUMNS = ["chat_key", "seq", "barber_id", "sender_role", "sent_us"]
WORKING_DTYPES = {"chat_key": "int64", "seq": "int64", "barber_id": "int64", "sent_us": "int64"}


@dataclass
class Skipped:
    """Source rows left out of a run, with the reason, so the run record can count them."""

    rows: list[tuple[str, str]] = field(default_factory=list)

    def add(self, doc_id: Any, reason: str) -> None:
        self.rows.append((str(doc_id), reason))
        log.warning("skipped source row %s: %s", doc_id, reason, extra={"barber.etl.skipped_id": str(doc_id)})

    def __len__(self) -> int:
        return len(self.rows)


def _int(v: Any) -> int | None:
    # bool is an int in Python but never a valid id or seq.
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return None


def _time(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        return None
    return float(v)


def messages_frame(docs: Iterable[dict[str, Any]], skipped: Skipped) -> pd.DataFrame:
    """Valid messages as ``chat_id, seq, sender_id, created_at``; the others go to ``skipped``."""
    rows = []
    for d in docs:
        chat_id = d.get("chat_id")
        seq = _int(d.get("seq"))
        sender = d.get("sender")
        sender_id = _int(sender.get("id")) if isinstance(sender, dict) else None
        created = _time(d.get("created_at"))
        if not isinstance(chat_id, str) or not chat_id:
            skipped.add(d.get("_id"), "message without a valid chat_id")
        elif seq is None or seq < 1:
            skipped.add(d.get("_id"), "message without a valid seq")
        elif sender_id is None:
            skipped.add(d.get("_id"), "message without a valid sender.id")
        elif created is None:
            skipped.add(d.get("_id"), "message without a valid created_at")
        else:
            rows.append((chat_id, seq, sender_id, created))
    frame = pd.DataFrame.from_records(rows, columns=MESSAGE_COLUMNS)
    return frame.astype({"seq": "int64", "sender_id": "int64", "created_at": "float64"})


def chats_frame(docs: Iterable[dict[str, Any]], skipped: Skipped) -> pd.DataFrame:
    rows = []
    for d in docs:
        customer = _int(d.get("customer_id"))
        employee = _int(d.get("employee_id"))
        created = _time(d.get("created_at"))
        if not isinstance(d.get("_id"), str) or customer is None or employee is None or created is None:
            skipped.add(d.get("_id"), "chat with a missing or mistyped field")
        else:
            rows.append((d["_id"], customer, employee, created))
    frame = pd.DataFrame.from_records(rows, columns=CHAT_COLUMNS)
    return frame.astype({"customer_id": "int64", "employee_id": "int64", "created_at": "float64"})


def attach_chats(messages: pd.DataFrame, chats: pd.DataFrame, skipped: Skipped) -> pd.DataFrame:
    """Messages with their chat (``chats``: chat_id, chat_key, barber_id, customer_id) and
    the sender's role; a message whose chat is gone, or whose sender is not one of the
    chat's two parties, is skipped."""
    merged = messages.merge(chats, on="chat_id", how="left")
    orphan = merged["chat_key"].isna()
    for chat_id, seq in merged.loc[orphan, ["chat_id", "seq"]].itertuples(index=False):
        skipped.add(f"{chat_id}:{seq}", "message whose chat is gone")
    merged = merged[~orphan]
    is_barber = merged["sender_id"] == merged["barber_id"]
    stranger = ~is_barber & (merged["sender_id"] != merged["customer_id"])
    for chat_id, seq in merged.loc[stranger, ["chat_id", "seq"]].itertuples(index=False):
        skipped.add(f"{chat_id}:{seq}", "message from someone outside the chat")
    merged = merged[~stranger].copy()
    merged["sender_role"] = np.where(merged["sender_id"] == merged["barber_id"], "barber", "customer")
    merged["sent_us"] = (merged["created_at"] * 1e6).round()
    return merged.astype(WORKING_DTYPES)[WORKING_COLUMNS]


def compute_replies(work: pd.DataFrame) -> pd.DataFrame:
    """For every customer message, the barber's next message in the chat.

    ``work`` holds, per chat, every message from the earliest one whose reply may have
    changed onwards (see :mod:`etl.load`), so the next barber message is in it if it
    exists. Adds ``reply_seq``, ``reply_us`` and ``reply_s`` (seconds).
    """
    work = work.astype(WORKING_DTYPES).sort_values(["chat_key", "seq"], kind="stable").reset_index(drop=True)
    is_barber = work["sender_role"] == "barber"
    # The next barber message strictly after each row: shift within the chat, then
    # carry the nearest later barber message backwards (never across chats).
    barber_seq = work["seq"].where(is_barber)
    barber_at = work["sent_us"].where(is_barber)
    nxt = pd.DataFrame(
        {
            "chat_key": work["chat_key"],
            "seq": barber_seq.groupby(work["chat_key"]).shift(-1),
            "at": barber_at.groupby(work["chat_key"]).shift(-1),
        }
    )
    filled = nxt.groupby("chat_key", sort=False)[["seq", "at"]].bfill()
    customer = ~is_barber
    work["reply_seq"] = filled["seq"].where(customer).astype("Int64")
    work["reply_us"] = filled["at"].where(customer).astype("Int64")
    # Clocks of two chat instances may differ slightly; a wait is never negative.
    work["reply_s"] = ((work["reply_us"] - work["sent_us"]) / 1e6).astype("float64").clip(lower=0.0)
    return work
