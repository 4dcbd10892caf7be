"""The shape of a Barber deployment, shared by the local stack and ``compose.yml``.

The local launcher (``stack/datatier.py``, ``stack/layout.py``) builds its data tier from
these values, and ``tests/test_compose.py`` checks ``compose.yml`` against the same ones,
so the two ways to run Barber cannot drift apart: same databases, same replication, same
server settings, same services (``stack.services.SERVICES``).
"""

from __future__ import annotations

# -- PostgreSQL -----------------------------------------------------------------------
PG_USER = "barber"
# authen (users), coordinator (the deletion log), warehouse (the ETL's star schema).
DATABASES = ("authen", "coordinator", "warehouse")
# Streaming read replicas of the primary, each through its own replication slot
# (``replica1``, ``replica2``...).
PG_REPLICAS = 2
# Server settings both runs give every PostgreSQL node (the local stack adds its ports
# and folders). Replication needs wal_level/max_wal_senders/slots; 2PC needs
# max_prepared_transactions > 0.
PG_SETTINGS: dict[str, str] = {
    "wal_level": "replica",
    "max_wal_senders": "10",
    "max_replication_slots": "10",
    "max_prepared_transactions": "64",
    "max_connections": "200",
    "hot_standby": "on",
    "hot_standby_feedback": "on",
    "wal_keep_size": "128MB",
    # Faster status updates make replica lag and read-your-writes visible quickly.
    "wal_receiver_status_interval": "1s",
}


def replica_slot(index: int) -> str:
    """The replication slot of replica ``index`` (1-based)."""
    return f"replica{index}"


# -- Redis ----------------------------------------------------------------------------
# Standalone Redis: discovery's registry (expiry events), gateway limits, chat fan-out.
REDIS_SETTINGS: dict[str, str] = {"notify-keyspace-events": "Ex"}

# The Redis Cluster holding chat's user cache: masters, each with this many replicas.
CLUSTER_MASTERS = 3
CLUSTER_REPLICAS_PER_MASTER = 1
CLUSTER_NODES = CLUSTER_MASTERS * (1 + CLUSTER_REPLICAS_PER_MASTER)
CLUSTER_SETTINGS: dict[str, str] = {
    "cluster-enabled": "yes",
    # Short timeouts so a failed master's replica takes over within seconds.
    "cluster-node-timeout": "2000",
    "cluster-replica-validity-factor": "0",
    "cluster-require-full-coverage": "no",
}

# -- MongoDB --------------------------------------------------------------------------
CHAT_MONGO_DB = "chat"

# -- Services -------------------------------------------------------------------------
# Modules with an Alembic tree, migrated by ``python -m <module> migrate`` before the
# services start (compose's one-shot ``migrate`` job runs every one of them).
MIGRATED_MODULES = ("authen", "coordinator", "etl")
