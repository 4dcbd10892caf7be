"""``python -m authen`` serves; ``migrate`` applies the Alembic migrations;
``create-admin`` creates the admin account (idempotent)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from authen.settings import AuthenSettings
from common.config import load_settings_or_exit
from common.errors import APIError, Conflict


def _migrate(settings: AuthenSettings) -> int:
    from authen.migrations import upgrade
    from common.migrations import migrate_command

    return migrate_command("authen", upgrade, settings.authen_database_url, "AUTHEN_DATABASE_URL")


async def _create_admin(settings: AuthenSettings, username: str, password: str, lenient: bool = False) -> int:
    from authen import users
    from authen.app import make_passwords, make_redis, make_router

    redis = make_redis(settings.redis_url)
    # Primary only, but the router still publishes the write's position, so the admin can
    # sign in at once through any instance.
    router = make_router(settings, redis, with_replicas=False)
    passwords = make_passwords(settings)
    try:
        deps = users.Deps(router=router, passwords=passwords, signer=None, guard=None)
        user_id, created = await users.create_admin(deps, username, password)
    except Conflict as e:
        # The name is held by an ordinary account (signed up before sign-up reserved
        # it): the stack still starts, without an admin, and says why.
        print(
            f"authen create-admin: no admin account: {e.detail}; choose another BARBER_ADMIN_USERNAME", file=sys.stderr
        )
        return 0 if lenient else 1
    except APIError as e:
        print(f"authen create-admin: {e.detail}", file=sys.stderr)
        return 1
    finally:
        await router.close()
        await redis.aclose()
        passwords.close()
    print(f"authen create-admin: {'created' if created else 'exists'} {username!r} (user_id {user_id})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m authen", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="serve HTTP (the default)")
    sub.add_parser("migrate", help="apply the database migrations (alembic upgrade head)")
    admin = sub.add_parser("create-admin", help="create the admin account unless it exists")
    admin.add_argument("--username", help="default: BARBER_ADMIN_USERNAME")
    admin.add_argument("--password", help="default: BARBER_ADMIN_PASSWORD")
    admin.add_argument(
        "--if-configured",
        action="store_true",
        help="do nothing (successfully) when no password is given or configured, and only "
        "warn when the username belongs to another account (the stack's mode)",
    )
    args = parser.parse_args(argv)

    settings = load_settings_or_exit(AuthenSettings)
    if args.command == "migrate":
        return _migrate(settings)
    if args.command == "create-admin":
        from pydantic import TypeAdapter, ValidationError

        from authen.users import Password, Username

        username = args.username or settings.barber_admin_username
        password = args.password or settings.barber_admin_password
        if args.if_configured and not password:
            print("authen create-admin: BARBER_ADMIN_PASSWORD not set; no admin account created")
            return 0
        try:
            TypeAdapter(Username).validate_python(username)
            TypeAdapter(Password).validate_python(password)
        except ValidationError as e:
            print(
                "authen create-admin: username must be 3-150 of letters, digits, _.@+- and the password "
                f"8-128 characters (set --password or BARBER_ADMIN_PASSWORD): {e.errors()[0]['msg']}",
                file=sys.stderr,
            )
            return 2
        return asyncio.run(_create_admin(settings, username, password, lenient=args.if_configured))

    from authen.app import build
    from common.service import run

    run(settings, "authen", build)
    return 0


if __name__ == "__main__":
    sys.exit(main())
