#!/bin/sh
# One-shot job: give Elasticsearch's built-in kibana_system user the password Kibana
# signs in with (security is on; the elastic superuser's password is ELASTIC_PASSWORD).
# Setting the same password again is harmless, so the job runs on every `up`.
#   ELASTICSEARCH_HOST  e.g. http://elasticsearch:9200
#   ELASTIC_PASSWORD    the elastic user's password
#   KIBANA_PASSWORD     the password to set (letters, digits, - and _ only)
set -eu
: "${ELASTICSEARCH_HOST:?}" "${ELASTIC_PASSWORD:?}" "${KIBANA_PASSWORD:?}"

case "$KIBANA_PASSWORD" in
    *[!A-Za-z0-9_-]*) printf 'kibana-password: KIBANA_PASSWORD may hold only letters, digits, - and _\n' >&2; exit 2 ;;
esac

# The credentials go to curl on stdin (-K -), not on its command line, where ps would show them.
printf 'user = "elastic:%s"\n' "$ELASTIC_PASSWORD" | curl -fsS -K - -X POST \
    -H 'Content-Type: application/json' \
    -d "{\"password\": \"$KIBANA_PASSWORD\"}" \
    "$ELASTICSEARCH_HOST/_security/user/kibana_system/_password" >/dev/null
printf 'kibana-password: kibana_system password set\n' >&2
