#!/bin/sh
# One-shot job: make a Redis Cluster of the given nodes unless it exists already.
#   CLUSTER_NODES     the nodes, host:port, separated by commas or spaces
#   CLUSTER_REPLICAS  replicas per master (the masters are the rest)
#   CLUSTER_WAIT_S    how long to wait for the nodes and for cluster_state:ok (60)
# Exit 0 when the cluster is (now) complete and serving every slot. Every node empty and
# alone: it creates the cluster. Every node already knowing all the others: nothing to
# do. Anything in between (a node replaced, a creation cut short) needs an operator, so
# the job says so and fails rather than wiping data.
set -eu
# shellcheck source=deploy/lib/wait-for.sh
. "$(dirname "$0")/../lib/wait-for.sh"
: "${CLUSTER_NODES:?}" "${CLUSTER_REPLICAS:?}"
CLUSTER_WAIT_S="${CLUSTER_WAIT_S:-60}"

log() { printf 'redis-cluster: %s\n' "$*" >&2; }

# One field of CLUSTER INFO of a node.
info() {
    redis-cli -h "$1" -p "$2" cluster info | tr -d '\r' | sed -n "s/^$3://p"
}

# redis-cli --cluster create wants addresses, not names.
addrs=""
count=0
for node in $(printf '%s' "$CLUSTER_NODES" | tr ',' ' '); do
    host="${node%:*}"
    port="${node##*:}"
    ip="$(getent hosts "$host" 2>/dev/null | awk '{ print $1; exit }')" || ip=""
    [ -n "$ip" ] || ip="$host"
    wait_for "$CLUSTER_WAIT_S" "$node to answer" redis-cli -h "$ip" -p "$port" ping
    addrs="$addrs $ip:$port"
    count=$((count + 1))
done

fresh=0
complete=0
for addr in $addrs; do
    known="$(info "${addr%:*}" "${addr##*:}" cluster_known_nodes)"
    assigned="$(info "${addr%:*}" "${addr##*:}" cluster_slots_assigned)"
    [ "$known" = "1" ] && [ "$assigned" = "0" ] && fresh=$((fresh + 1))
    [ "$known" = "$count" ] && complete=$((complete + 1))
done

if [ "$complete" -eq "$count" ]; then
    log "the cluster of $count nodes exists; nothing to do"
elif [ "$fresh" -eq "$count" ]; then
    log "creating the cluster:$addrs ($CLUSTER_REPLICAS replica(s) per master)"
    # shellcheck disable=SC2086  # one argument per node
    redis-cli --cluster create $addrs --cluster-replicas "$CLUSTER_REPLICAS" --cluster-yes
else
    log "the nodes are neither all empty nor one complete cluster ($fresh empty, $complete complete of $count);"
    log "repair it by hand (redis-cli --cluster check/fix/add-node), then run this job again"
    exit 1
fi

# Done when every node serves every slot and sees every other node in its role.
replicas=$((count - count / (CLUSTER_REPLICAS + 1)))
cluster_ok() {
    for addr in $addrs; do
        [ "$(info "${addr%:*}" "${addr##*:}" cluster_state)" = "ok" ] || return 1
        [ "$(info "${addr%:*}" "${addr##*:}" cluster_slots_ok)" = "16384" ] || return 1
        [ "$(info "${addr%:*}" "${addr##*:}" cluster_known_nodes)" = "$count" ] || return 1
        seen="$(redis-cli -h "${addr%:*}" -p "${addr##*:}" cluster nodes | grep -c slave)" || return 1
        [ "$seen" = "$replicas" ] || return 1
    done
}
wait_for "$CLUSTER_WAIT_S" "every node to serve all slots and see $replicas replicas" cluster_ok
log "cluster ok"
