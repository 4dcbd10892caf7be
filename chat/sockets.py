"""The sockets each user holds on this chat instance: the per-user cap, and closing a
user's sockets when their tokens are revoked (the user deleted or deactivated)."""

from __future__ import annotations

from typing import Protocol


class UserSocket(Protocol):
    issued_at: int

    def close_with(self, code: int, reason: str) -> None: ...


class UserSockets:
    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.by_user: dict[int, set[UserSocket]] = {}
        self.refused = 0

    def add(self, user_id: int, sock: UserSocket) -> bool:
        """Count ``sock`` as one of the user's; False (not counted) when they hold ``cap``."""
        held = self.by_user.setdefault(user_id, set())
        if len(held) >= self.cap:
            self.refused += 1
            return False
        held.add(sock)
        return True

    def discard(self, user_id: int, sock: UserSocket) -> None:
        held = self.by_user.get(user_id)
        if held is not None:
            held.discard(sock)
            if not held:
                del self.by_user[user_id]

    def revoked(self, user_id: int, mark: int, code: int, reason: str) -> int:
        """Close the user's sockets opened with a token issued at or before ``mark``."""
        closing = [s for s in self.by_user.get(user_id, ()) if s.issued_at <= mark]
        for sock in closing:
            sock.close_with(code, reason)
        return len(closing)
