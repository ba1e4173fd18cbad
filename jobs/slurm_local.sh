#!/bin/bash
# A real SLURM cluster on this machine for tests and laptops (Debian: slurmctld slurmd slurm-client munge).
#
#   bash jobs/slurm_local.sh start DIR [N]  # installs (idempotent, needs root + apt), starts munged/slurmctld/slurmd
#   bash jobs/slurm_local.sh stop DIR       # stops exactly the daemons it started (by PID)
#
# N nodes node1..nodeN (default 1), each a network namespace on a private bridge (jobs/netns_cluster.sh) with
# its own slurmd, slurmctld in node1's: SLURM's daemons listen on every interface, and inside a namespace every
# interface is the node's loopback or the bridge, which the host has no address on, so nothing outside this
# machine's namespaces can reach them. The clients (sbatch, squeue, scontrol, scancel, sinfo, srun, sacct) run
# inside node1: `start` writes wrappers that do so into DIR/bin and prints `PATH=DIR/bin:$PATH`. Everything lives under DIR (config, state, spool, logs,
# pid files). Clients find the cluster through SLURM_CONF=DIR/slurm.conf, which `start` prints as its last line.
set -euo pipefail
cmd=${1:?start|stop}
dir=$(mkdir -p "${2:?state directory}" && cd "$2" && pwd)
here=$(cd "$(dirname "$0")" && pwd)

stop() {
    for pidfile in "$dir"/slurmd*.pid "$dir/slurmctld.pid" "$dir/munged.pid"; do
        if [ -f "$pidfile" ]; then
            pid=$(cat "$pidfile")
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            rm -f "$pidfile"
        fi
    done
    if [ -f "$dir/munge_dir" ]; then rm -rf "$(cat "$dir/munge_dir")" "$dir/munge_dir"; fi
    if [ -d "$dir/netns" ]; then bash "$here/netns_cluster.sh" stop "$dir/netns"; rm -rf "$dir/netns"; fi
}

if [ "$cmd" = stop ]; then stop; exit 0; fi
[ "$cmd" = start ] || { echo "usage: $0 start|stop DIR [N]" >&2; exit 2; }
nodes=${3:-1}

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null || ! command -v sbatch >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurmctld slurmd slurm-client munge >/dev/null
fi
stop  # a previous cluster in the same directory
mkdir -p "$dir/state" "$dir/spool"
# munged runs as the munge user: its files live in a directory that user can reach (DIR may be private)
munge_dir=$(mktemp -d /tmp/videoar-munge.XXXXXX)
chmod 755 "$munge_dir"
chown munge:munge "$munge_dir"
echo "$munge_dir" > "$dir/munge_dir"
[ -s /etc/munge/munge.key ] || { mungekey --create >/dev/null 2>&1 || create-munge-key -f >/dev/null; }
runuser -u munge -- /usr/sbin/munged --socket="$munge_dir/munge.socket" --pid-file="$munge_dir/munged.pid" \
    --log-file="$munge_dir/munged.log" --seed-file="$munge_dir/munged.seed"
cp "$munge_dir/munged.pid" "$dir/munged.pid"

cpus=$(nproc)
bash "$here/netns_cluster.sh" start "$dir/netns" "$nodes" > "$dir/nodes"  # lines: NAME NETNS IP
# slurmctld checks its own hostname (the machine's: the nodes share it), reached at node1's address
controller="$(hostname -s)($(awk 'NR == 1 {print $3}' "$dir/nodes"))"
node_lines=$(awk -v c="$cpus" '{print "NodeName=" $1 " NodeAddr=" $3 " CPUs=" c " State=UNKNOWN"}' "$dir/nodes")
node_names=$(awk '{printf "%s%s", sep, $1; sep = ","}' "$dir/nodes")
cat > "$dir/slurm.conf" <<EOF
ClusterName=videoar-local
SlurmctldHost=$controller
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$munge_dir/munge.socket
$node_lines
PartitionName=debug Nodes=$node_names Default=YES MaxTime=INFINITE State=UP
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
JobRequeue=1
ReturnToService=2
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd-%n.log
SlurmctldPort=$((6817 + RANDOM % 1000))
SlurmdPort=$((7817 + RANDOM % 1000))
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/jobcomp.txt
EOF
export SLURM_CONF=$dir/slurm.conf
mkdir -p "$dir/bin"
for tool in sbatch squeue scontrol scancel sinfo srun sacct; do  # run where the controller is reachable
    printf '#!/bin/bash\nexec bash %s exec %s node1 env SLURM_CONF=%s %s "$@"\n' "$here/netns_cluster.sh" \
        "$dir/netns" "$SLURM_CONF" "$(command -v "$tool" || echo "/usr/bin/$tool")" > "$dir/bin/$tool"
    chmod +x "$dir/bin/$tool"
done
bash "$here/netns_cluster.sh" exec "$dir/netns" node1 slurmctld -i -f "$SLURM_CONF"
while read -r name _ _; do
    mkdir -p "$dir/spool/$name"
    bash "$here/netns_cluster.sh" exec "$dir/netns" "$name" slurmd -N "$name" -f "$SLURM_CONF"
done < "$dir/nodes"
PATH="$dir/bin:$PATH"
for _ in $(seq 100); do
    up=$(sinfo -h -N -o %T 2>/dev/null | grep -cE '^(idle|mixed|allocated)' || true)
    if [ "${up:-0}" -ge "$nodes" ]; then
        echo "PATH=$dir/bin:\$PATH"
        echo "SLURM_CONF=$SLURM_CONF"
        exit 0
    fi
    sleep 0.3
done
echo "slurm did not come up; see $dir/slurmctld.log and $dir/slurmd-*.log" >&2
exit 1
