#!/bin/sh
# Make .env for `docker compose` from .env.example, with a new random value for every
# variable whose example value is `generate`. An existing .env is never touched.
#   deploy/init-env.sh [TARGET]   (default: .env beside compose.yml)
set -eu
here="$(cd "$(dirname "$0")/.." && pwd)"
target="${1:-$here/.env}"
if [ -e "$target" ]; then
    printf 'init-env: %s exists; leaving it as it is\n' "$target" >&2
    exit 0
fi
umask 077
tmp="$target.tmp.$$"
trap 'rm -f "$tmp"' EXIT
while IFS= read -r line || [ -n "$line" ]; do
    case "$line" in
        *=generate)
            # 24 random bytes as hex: URL-safe, so it can stand inside the services' URLs.
            value="$(od -An -tx1 -N24 /dev/urandom | tr -d ' \n')"
            printf '%s=%s\n' "${line%%=*}" "$value" ;;
        *) printf '%s\n' "$line" ;;
    esac
done < "$here/.env.example" > "$tmp"
mv "$tmp" "$target"
trap - EXIT
printf 'init-env: wrote %s (mode 600)\n' "$target" >&2
