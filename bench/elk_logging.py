"""The cost of one ECS log line (common/logs.py), with and without the per-line `event.id`
that Filebeat turns into the document id. Run by hand: `python bench/elk_logging.py [N]`.

Prints microseconds per line for an access-log-like line written to /dev/null.
"""

from __future__ import annotations

import logging
import sys
import time
import timeit
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import logs  # noqa: E402


def per_line_us(n: int) -> float:
    log = logging.getLogger("bench.elk")
    extra = {
        "http.request.method": "GET",
        "url.path": "/authen/list/employee",
        "http.response.status_code": 200,
        "event.duration": 1_234_567,
        "client.ip": "127.0.0.1",
        "barber.route": "/authen/list",
        "barber.upstream.service": "authen",
        "barber.upstream.instance": "127.0.0.1:8101",
    }
    t0 = time.perf_counter()
    for _ in range(n):
        log.info("GET /authen/list/employee 200", extra=extra)
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5_000
    logs.setup_logging("gateway", instance="127.0.0.1:8000")
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(open("/dev/null", "w"))
    original = logs.uuid.uuid4

    class _Fixed:
        hex = "0" * 32

    # Alternating rounds, best of each: on a busy machine the minimum is the stable figure.
    with_id, without_id = [], []
    for _ in range(7):
        with_id.append(per_line_us(n))
        logs.uuid.uuid4 = lambda: _Fixed()  # type: ignore[assignment]
        try:
            without_id.append(per_line_us(n))
        finally:
            logs.uuid.uuid4 = original
    uuid_us = min(timeit.repeat(lambda: uuid.uuid4().hex, number=n, repeat=7)) / n * 1e6
    print(
        f"ECS line: {min(with_id):.1f} us with a fresh event.id, {min(without_id):.1f} us with a constant one; "
        f"uuid4().hex alone: {uuid_us:.2f} us ({n} lines per round, best of 7)"
    )


if __name__ == "__main__":
    main()
