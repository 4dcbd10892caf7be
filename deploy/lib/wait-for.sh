# shellcheck shell=sh
# Sourced by the bootstrap scripts: wait on a condition with a deadline, never a fixed sleep.
# wait_for SECONDS DESCRIPTION COMMAND [ARG...]: run COMMAND (output discarded) once a
# second until it succeeds; after SECONDS, say what was awaited and exit 1.
wait_for() {
    _limit="$1"
    _what="$2"
    shift 2
    _waited=0
    until "$@" >/dev/null 2>&1; do
        if [ "$_waited" -ge "$_limit" ]; then
            printf '%s: gave up after %ss waiting for %s\n' "$(basename "$0")" "$_limit" "$_what" >&2
            exit 1
        fi
        _waited=$((_waited + 1))
        sleep 1
    done
}
