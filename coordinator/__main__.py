"""``python -m coordinator migrate``: apply the coordinator log's Alembic migrations.

The gateway also applies them when it mounts the coordinator; a deployment runs this
first, once, so that several gateways starting together do not race on the upgrade.
"""

from __future__ import annotations

import argparse
import sys

from common.config import load_settings_or_exit
from common.migrations import migrate_command
from coordinator.settings import CoordinatorSettings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coordinator", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="apply the migrations (alembic upgrade head)")
    parser.parse_args(argv)

    from coordinator.migrations import upgrade

    settings = load_settings_or_exit(CoordinatorSettings)
    return migrate_command("coordinator", upgrade, settings.coordinator_database_url, "COORDINATOR_DATABASE_URL")


if __name__ == "__main__":
    sys.exit(main())
