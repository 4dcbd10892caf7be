"""What authen and chat share as participants of the deletion coordinator.

- :func:`crash_point`: the test-only hook that makes a participant exit at a named
  point (``PARTICIPANT_CRASH_AT``, refused unless ``BARBER_TEST_HOOKS=1``).
- :class:`CoordinatorClient`: asks the coordinator (inside any gateway, found through
  discovery) what was decided for a transaction this participant holds prepared.
"""

from __future__ import annotations

import json
import logging
import os

from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from common.discovery import InstanceView
from common.internal import SERVICE_TOKEN_HEADER

log = logging.getLogger("barber.participant")

PARTICIPANT_CRASH_POINTS = ("after_prepare",)


def crash_point(enabled: bool, configured: str, point: str) -> None:
    if enabled and configured == point:
        log.critical("test hook: crashing at %s", point)
        logging.shutdown()
        os._exit(70)


class CoordinatorClient:
    def __init__(self, discovery_url: str, secret: str) -> None:
        self.view = InstanceView(discovery_url, "gateway")
        self._secret = secret

    async def start(self) -> None:
        await self.view.start(initial_timeout_s=1.0)

    async def stop(self) -> None:
        await self.view.stop()

    async def outcome(self, gid: str) -> str | None:
        """'commit', 'abort', or None while undecided. Raises when no gateway answers."""
        last: Exception | None = None
        for gateway in self.view.instances:
            try:
                resp = await AsyncHTTPClient().fetch(
                    f"{gateway.url}/internal/coordinator/transactions/{gid}",
                    headers={SERVICE_TOKEN_HEADER: self._secret}, request_timeout=5, connect_timeout=2,
                )
                return json.loads(resp.body)["decision"]
            except (HTTPClientError, OSError, ValueError, KeyError) as e:
                last = e
        raise ConnectionError(f"no coordinator answered about {gid}: {last}")
