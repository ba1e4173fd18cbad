#!/bin/bash
# A real Prometheus server on 127.0.0.1 for tests and laptops (Debian: prometheus, which ships promtool).
#
#   bash jobs/prometheus_local.sh start DIR [CONFIG]   # installs (idempotent, needs root + apt), starts prometheus
#   bash jobs/prometheus_local.sh stop DIR             # stops exactly the server it started (by PID)
#
# CONFIG defaults to configs/prometheus/prometheus.yml (relative paths in it are relative to its folder). The TSDB,
# log, pid and URL live under DIR; `start` listens on a free loopback port and prints PROMETHEUS_URL=... last.
# Where systemd runs, Debian's package also enables its own prometheus.service (all interfaces, :9090); this
# script neither uses nor starts it.
set -euo pipefail
cmd=${1:?start|stop}
dir=$(mkdir -p "${2:?state directory}" && cd "$2" && pwd)

stop() {
    if [ -f "$dir/prometheus.pid" ]; then
        pid=$(cat "$dir/prometheus.pid")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        rm -f "$dir/prometheus.pid"
    fi
}

# the first line of an HTTP/1.0 reply from 127.0.0.1:$port (bash's /dev/tcp: no curl needed)
http_status() {
    { printf 'GET %s HTTP/1.0\r\n\r\n' "$1" >&3; head -n 1 <&3; } 2>/dev/null 3<>"/dev/tcp/127.0.0.1/$port"
}

if [ "$cmd" = stop ]; then stop; exit 0; fi
[ "$cmd" = start ] || { echo "usage: $0 start|stop DIR [CONFIG]" >&2; exit 2; }
config=$(realpath "${3:-$(dirname "$0")/../configs/prometheus/prometheus.yml}")

apt_install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null; }
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
    apt_install || { apt-get update -q >/dev/null && apt_install; }
fi
stop  # a previous server in the same directory
mkdir -p "$dir/data"
for _ in $(seq 5); do  # another process may take the port between the check and the bind: try another one
    port=$((20000 + RANDOM % 20000))
    if http_status / >/dev/null; then continue; fi  # something answers there
    prometheus --config.file="$config" --storage.tsdb.path="$dir/data" --web.listen-address="127.0.0.1:$port" \
        </dev/null >>"$dir/prometheus.log" 2>&1 &
    echo $! > "$dir/prometheus.pid"
    for _ in $(seq 150); do
        if http_status /-/ready | grep -q ' 200 '; then
            echo "http://127.0.0.1:$port" > "$dir/url"
            echo "PROMETHEUS_URL=http://127.0.0.1:$port"
            exit 0
        fi
        kill -0 "$(cat "$dir/prometheus.pid")" 2>/dev/null || break
        sleep 0.2
    done
    stop
    grep -q 'address already in use' "$dir/prometheus.log" || break
done
echo "prometheus did not come up; see $dir/prometheus.log:" >&2
tail -n 20 "$dir/prometheus.log" >&2
exit 1
