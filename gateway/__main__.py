"""`python -m gateway`: run the API gateway."""

from common.config import load_settings_or_exit
from common.service import run
from gateway.app import build
from gateway.settings import GatewaySettings


def main() -> None:
    run(load_settings_or_exit(GatewaySettings), "gateway", build)


if __name__ == "__main__":
    main()
