#!/bin/sh
# Entrypoint of a PostgreSQL streaming replica (run as the postgres user). On first start
# (no standby in PGDATA yet) it copies the primary with pg_basebackup through its own
# replication slot, so the primary keeps the WAL the replica has not received yet; then
# it runs postgres, which streams from the primary (-R wrote primary_conninfo and
# primary_slot_name). Later starts reuse the data folder as it is.
#   PGDATA                data folder of this replica
#   PRIMARY_HOST          the primary; PRIMARY_PORT (5432)
#   REPLICATION_USER      a role with REPLICATION; REPLICATION_PASSWORD its password (may be empty)
#   REPLICATION_SLOT      this replica's slot (created on the primary unless it exists)
#   PRIMARY_WAIT_S        how long to wait for the primary to accept connections (120)
# Arguments are passed on to postgres (e.g. -c hot_standby=on).
set -eu
# shellcheck source=deploy/lib/wait-for.sh
. "$(dirname "$0")/../lib/wait-for.sh"
: "${PGDATA:?}" "${PRIMARY_HOST:?}" "${REPLICATION_USER:?}" "${REPLICATION_SLOT:?}"
PRIMARY_PORT="${PRIMARY_PORT:-5432}"
PRIMARY_WAIT_S="${PRIMARY_WAIT_S:-120}"
if [ -n "${REPLICATION_PASSWORD:-}" ]; then
    PGPASSWORD="$REPLICATION_PASSWORD"
    export PGPASSWORD
fi

log() { printf 'replica: %s\n' "$*" >&2; }

if [ -s "$PGDATA/PG_VERSION" ] && [ -f "$PGDATA/standby.signal" ]; then
    log "standby data present in $PGDATA; starting it"
else
    wait_for "$PRIMARY_WAIT_S" "the primary $PRIMARY_HOST:$PRIMARY_PORT" \
        pg_isready -q -h "$PRIMARY_HOST" -p "$PRIMARY_PORT" -U "$REPLICATION_USER" -d postgres
    pg_receivewal --create-slot --if-not-exists --slot="$REPLICATION_SLOT" \
        -h "$PRIMARY_HOST" -p "$PRIMARY_PORT" -U "$REPLICATION_USER" --no-password
    # A base backup interrupted part-way leaves files behind; it needs an empty folder.
    mkdir -p "$PGDATA"
    find "$PGDATA" -mindepth 1 -delete
    log "base backup of $PRIMARY_HOST:$PRIMARY_PORT through slot $REPLICATION_SLOT"
    # -R writes primary_conninfo from this connection: the replica shows up on the primary
    # (pg_stat_replication) under its slot's name.
    pg_basebackup -d "application_name=$REPLICATION_SLOT" -h "$PRIMARY_HOST" -p "$PRIMARY_PORT" \
        -U "$REPLICATION_USER" --no-password -D "$PGDATA" -R -X stream -c fast -S "$REPLICATION_SLOT"
    chmod 700 "$PGDATA"
fi

exec postgres -D "$PGDATA" "$@"
