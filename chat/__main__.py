"""``python -m chat``: one chat instance on ``PORT``."""

from chat.app import build
from chat.settings import ChatSettings
from common.config import load_settings_or_exit
from common.service import run


def main() -> None:
    settings = load_settings_or_exit(ChatSettings)
    run(settings, "chat", build)


if __name__ == "__main__":
    main()
