"""`python -m discovery`: run the discovery service."""

from common.config import load_settings_or_exit
from common.service import run
from discovery.app import build
from discovery.settings import DiscoverySettings


def main() -> None:
    run(load_settings_or_exit(DiscoverySettings), "discovery", build)


if __name__ == "__main__":
    main()
