"""Ports, folders and the environment handed to every service, from one port offset.

Every port of the local stack is a base port plus ``PORT_OFFSET``; the test suite uses
another offset so it can run beside a ``make up`` stack. The services never see the
offset: they get explicit URLs through :func:`service_env`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stack.topology import CLUSTER_NODES, PG_REPLICAS, PG_USER

BASE_PORTS: dict[str, int | tuple[int, ...]] = {
    "gateway": 8000,
    "discovery": 8500,
    "authen": (8101, 8102),
    "chat": (8201, 8202),
    "etl": 8300,
    "postgres": tuple(15432 + i for i in range(1 + PG_REPLICAS)),
    "redis": 16379,
    "redis_cluster": tuple(17001 + i for i in range(CLUSTER_NODES)),
    "mongo": 27018,
}

# Environment variables handed to the setup steps (create-admin) and to no service.
SETUP_ONLY_ENV = ("BARBER_ADMIN_PASSWORD",)


@dataclass(frozen=True)
class Layout:
    state_dir: Path
    port_offset: int = 0

    def port(self, name: str, index: int = 0) -> int:
        base = BASE_PORTS[name]
        return (base[index] if isinstance(base, tuple) else base) + self.port_offset

    def ports(self, name: str) -> list[int]:
        base = BASE_PORTS[name]
        return [p + self.port_offset for p in (base if isinstance(base, tuple) else (base,))]

    # -- folders -------------------------------------------------------------------
    @property
    def keys_dir(self) -> Path:
        return self.state_dir / "keys"

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def jwt_private_key(self) -> Path:
        return self.keys_dir / "jwt_ed25519.pem"

    @property
    def jwt_public_key(self) -> Path:
        return self.keys_dir / "jwt_ed25519.pub"

    @property
    def service_secret(self) -> Path:
        return self.keys_dir / "service_secret"

    # -- URLs ----------------------------------------------------------------------
    def pg_url(self, database: str, index: int = 0, driver: str = "postgresql+psycopg") -> str:
        return f"{driver}://{PG_USER}@127.0.0.1:{self.port('postgres', index)}/{database}"

    def pg_dsn(self, database: str, index: int = 0) -> str:
        """A libpq/psycopg DSN (no SQLAlchemy driver prefix)."""
        return self.pg_url(database, index, driver="postgresql")

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.port('redis')}/0"

    @property
    def redis_cluster_nodes(self) -> str:
        return ",".join(f"127.0.0.1:{p}" for p in self.ports("redis_cluster"))

    @property
    def mongo_url(self) -> str:
        return f"mongodb://127.0.0.1:{self.port('mongo')}/"

    @property
    def discovery_url(self) -> str:
        return f"http://127.0.0.1:{self.port('discovery')}"

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.port('gateway')}"


def signing_env(layout: Layout) -> dict[str, str]:
    """What only authen gets: the path of the private key that signs tokens."""
    return {"JWT_PRIVATE_KEY_FILE": str(layout.jwt_private_key.resolve())}


def service_env(layout: Layout) -> dict[str, str]:
    """The environment every service process gets: every URL and public key path,
    explicitly (the private key's path only through :func:`signing_env`)."""
    replicas = ",".join(layout.pg_url("authen", i) for i in (1, 2))
    warehouse_replicas = ",".join(layout.pg_url("warehouse", i) for i in (1, 2))
    return {
        "DISCOVERY_URL": layout.discovery_url,
        "REDIS_URL": layout.redis_url,
        "REDIS_CLUSTER_NODES": layout.redis_cluster_nodes,
        "MONGO_URL": layout.mongo_url,
        "AUTHEN_DATABASE_URL": layout.pg_url("authen"),
        "AUTHEN_REPLICA_URLS": replicas,
        "COORDINATOR_DATABASE_URL": layout.pg_url("coordinator"),
        "WAREHOUSE_DATABASE_URL": layout.pg_url("warehouse"),
        "WAREHOUSE_REPLICA_URLS": warehouse_replicas,
        "GATEWAY_PUBLIC_URL": layout.gateway_url,
        "JWT_PUBLIC_KEY_FILE": str(layout.jwt_public_key.resolve()),
        "SERVICE_SECRET_FILE": str(layout.service_secret.resolve()),
    }
