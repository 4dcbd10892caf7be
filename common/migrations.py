"""The ``migrate`` command every service with an Alembic tree offers (``python -m <service> migrate``)."""

from __future__ import annotations

import sys
from typing import Callable


def migrate_command(prog: str, upgrade: Callable[[str], None], database_url: str, variable: str) -> int:
    """Upgrade the database at ``database_url`` (read from ``variable``) to head; an exit code."""
    from sqlalchemy.exc import OperationalError

    try:
        upgrade(database_url)
    except OperationalError as e:
        print(f"{prog} migrate: cannot reach {variable}: {e.orig}", file=sys.stderr)
        return 1
    print(f"{prog} migrate: database at head")
    return 0
