#!/bin/bash
# An emulated multi-node cluster on one machine, for tests: N network namespaces ("nodes") joined by a private
# bridge (Linux: ip netns, veth; needs root / CAP_NET_ADMIN).
#
#   bash jobs/netns_cluster.sh start DIR [N]   # creates node1..nodeN; prints "NAME NETNS IP" per node
#   bash jobs/netns_cluster.sh stop DIR        # removes exactly what `start` made for DIR
#   bash jobs/netns_cluster.sh exec DIR NAME cmd ...   # run cmd on node NAME (e.g. node2)
#
# `exec` enters the node's network namespace and a private copy of the host's mounts with the node's hosts file
# over /etc/hosts (unlike `ip netns exec`, /sys stays the host's: slurmd needs its cgroups). `ip netns exec NETNS`
# works too for programs that need no /sys. Each node has loopback plus one address on the
# bridge; the bridge itself has no address, so nothing in the host namespace can reach the nodes and nothing the
# nodes send leaves the machine. Node names resolve inside the nodes through /etc/netns/NETNS/hosts (which
# `ip netns exec` mounts over /etc/hosts). Names are derived from DIR, so two clusters never collide.
set -euo pipefail
cmd=${1:?start|stop}
dir=$(mkdir -p "${2:?state directory}" && cd "$2" && pwd)
tag=$(printf '%s' "$dir" | sha1sum | cut -c1-6)
bridge="vbr$tag"
subnet="10.213.$((16#${tag:0:2} % 250))"

stop() {
    if [ -f "$dir/namespaces" ]; then
        while read -r ns; do
            ip netns del "$ns" 2>/dev/null || true
            rm -rf "/etc/netns/$ns"
        done < "$dir/namespaces"
    fi
    ip link del "$bridge" 2>/dev/null || true
    rm -f "$dir/namespaces" "$dir/nodes"
}

if [ "$cmd" = stop ]; then stop; exit 0; fi
if [ "$cmd" = exec ]; then
    node=${3:?node name}
    shift 3
    ns=$(awk -v n="$node" '$1 == n {print $2}' "$dir/nodes")
    [ -n "$ns" ] || { echo "$0: no node $node in $dir/nodes" >&2; exit 2; }
    exec nsenter --net="/run/netns/$ns" unshare --mount --propagation private \
        sh -c 'mount --bind "$0" /etc/hosts && exec "$@"' "/etc/netns/$ns/hosts" "$@"
fi
[ "$cmd" = start ] || { echo "usage: $0 start|stop DIR [N] | exec DIR NODE cmd ..." >&2; exit 2; }
n=${3:-2}
stop  # a previous cluster of the same directory
ip link add "$bridge" type bridge
ip link set "$bridge" up
hosts="127.0.0.1 localhost"
for i in $(seq 1 "$n"); do hosts="$hosts"$'\n'"$subnet.$((i + 1)) node$i"; done
for i in $(seq 1 "$n"); do
    ns="v$tag-n$i"
    ip netns add "$ns"
    echo "$ns" >> "$dir/namespaces"
    ip link add "v${tag}h$i" type veth peer name "v${tag}c$i"
    ip link set "v${tag}c$i" netns "$ns"
    ip link set "v${tag}h$i" master "$bridge" up
    ip -n "$ns" addr add "$subnet.$((i + 1))/24" dev "v${tag}c$i"
    ip -n "$ns" link set "v${tag}c$i" up
    ip -n "$ns" link set lo up
    mkdir -p "/etc/netns/$ns"
    # the machine's hostname resolves to the node's own address inside the node, as on a real cluster (gloo and
    # Ray pick the interface a process advertises from it)
    printf '%s\n%s %s\n' "$hosts" "$subnet.$((i + 1))" "$(hostname)" > "/etc/netns/$ns/hosts"
    printf 'node%s\n' "$i" > "/etc/netns/$ns/hostname"
    echo "node$i $ns $subnet.$((i + 1))" >> "$dir/nodes"
done
cat "$dir/nodes"
