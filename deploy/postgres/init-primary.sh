#!/bin/sh
# Run once by the official postgres image when it initialises the primary's data folder
# (mounted into /docker-entrypoint-initdb.d/): creates Barber's databases and the role
# the replicas stream with, and lets that role make replication connections.
#   BARBER_DATABASES      comma-separated database names
#   REPLICATION_USER      role with the REPLICATION attribute (password auth)
#   REPLICATION_PASSWORD  its password
#   POSTGRES_USER, PGDATA set by the image
set -eu
: "${BARBER_DATABASES:?}" "${REPLICATION_USER:?}" "${REPLICATION_PASSWORD:?}" "${POSTGRES_USER:?}" "${PGDATA:?}"

sql() {
    psql -v ON_ERROR_STOP=1 --no-psqlrc --username "$POSTGRES_USER" --dbname postgres "$@"
}

for db in $(printf '%s' "$BARBER_DATABASES" | tr ',' ' '); do
    if [ "$(sql -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'")" != "1" ]; then
        sql -c "CREATE DATABASE \"$db\" OWNER \"$POSTGRES_USER\""
    fi
done

# psql variables quote the password (:'pw'); they are expanded only in input read from stdin.
sql -v role="$REPLICATION_USER" -v pw="$REPLICATION_PASSWORD" <<'SQL'
SELECT format('CREATE ROLE %I WITH REPLICATION LOGIN', :'role')
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'role') \gexec
SELECT format('ALTER ROLE %I WITH REPLICATION LOGIN PASSWORD %L', :'role', :'pw') \gexec
SQL

line="host replication $REPLICATION_USER all scram-sha-256"
grep -qxF "$line" "$PGDATA/pg_hba.conf" || printf '%s\n' "$line" >> "$PGDATA/pg_hba.conf"
