#!/bin/sh
# The image's entrypoint: every service registers with discovery under ADVERTISE_HOST,
# so each container (one of several under `docker compose up --scale authen=4`) must
# register its own address on the compose network, not 127.0.0.1. Unless it is set
# explicitly, use the address the container's hostname resolves to (Docker maps it in
# /etc/hosts), then exec the command so that it is PID 1 and receives SIGTERM itself.
set -eu

if [ -z "${ADVERTISE_HOST:-}" ]; then
    ADVERTISE_HOST="$(python -c 'import socket; print(socket.gethostbyname(socket.gethostname()))')"
    export ADVERTISE_HOST
fi

exec "$@"
