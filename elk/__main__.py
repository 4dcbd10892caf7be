"""`python -m elk setup`: install Barber's Elasticsearch objects and Kibana dashboards.

Exit codes: 0 done (the report says what was created, updated or left unchanged),
1 Elasticsearch or Kibana refused or never became ready, 2 bad arguments or settings.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from common.config import load_settings_or_exit
from common.logs import setup_logging
from elk.install import SetupError, setup
from elk.settings import ElkSettings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m elk", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("setup", help="install index templates, ILM, pipelines and Kibana objects (idempotent)")
    args = parser.parse_args(argv)
    settings = load_settings_or_exit(ElkSettings)
    setup_logging("elk")
    if args.command == "setup":
        try:
            report = asyncio.run(setup(settings))
        except SetupError as e:
            print(f"elk setup failed: {e}", file=sys.stderr)
            return 1
        print(report.text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
