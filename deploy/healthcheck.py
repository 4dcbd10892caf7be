"""The container health check: GET a service's status endpoint on this instance.

``python deploy/healthcheck.py [PATH ...]`` exits 0 when any of the paths answers 200 on
``127.0.0.1:$PORT`` (default paths: ``/utilities/status`` and ``/status``, between them
every service's status endpoint), 1 otherwise. Standard library only: it runs every few
seconds in every container and must start fast.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

DEFAULT_PATHS = ("/utilities/status", "/status")


def healthy(port: int, paths: list[str], timeout_s: float = 3.0) -> bool:
    for path in paths:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout_s) as resp:
                if resp.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            continue
    return False


def main(argv: list[str]) -> int:
    port = os.environ.get("PORT", "")
    if not port.isdigit():
        print("healthcheck: PORT is not set", file=sys.stderr)
        return 1
    return 0 if healthy(int(port), argv or list(DEFAULT_PATHS)) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
