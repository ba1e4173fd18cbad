#!/bin/bash
# A real single-node SLURM cluster for tests and laptops (Debian: slurmctld slurmd slurm-client munge).
#
#   bash jobs/slurm_local.sh start DIR     # installs (idempotent, needs root + apt), starts munged/slurmctld/slurmd
#   bash jobs/slurm_local.sh stop DIR      # stops exactly the daemons it started (by PID)
#
# Everything lives under DIR (config, state, spool, logs, pid files). Clients find the cluster through
# SLURM_CONF=DIR/slurm.conf, which `start` prints as its last line.
set -euo pipefail
cmd=${1:?start|stop}
dir=$(mkdir -p "${2:?state directory}" && cd "$2" && pwd)

stop() {
    for name in slurmd slurmctld munged; do
        if [ -f "$dir/$name.pid" ]; then
            pid=$(cat "$dir/$name.pid")
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            rm -f "$dir/$name.pid"
        fi
    done
    if [ -f "$dir/munge_dir" ]; then rm -rf "$(cat "$dir/munge_dir")" "$dir/munge_dir"; fi
}

if [ "$cmd" = stop ]; then stop; exit 0; fi
[ "$cmd" = start ] || { echo "usage: $0 start|stop DIR" >&2; exit 2; }

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
cat > "$dir/slurm.conf" <<EOF
ClusterName=videoar-local
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$munge_dir/munge.socket
NodeName=localhost CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
JobRequeue=1
ReturnToService=2
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
SlurmctldPort=$((6817 + RANDOM % 1000))
SlurmdPort=$((7817 + RANDOM % 1000))
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/jobcomp.txt
EOF
export SLURM_CONF=$dir/slurm.conf
slurmctld -i -f "$SLURM_CONF"
slurmd -N localhost -f "$SLURM_CONF"
for _ in $(seq 100); do
    if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then echo "SLURM_CONF=$SLURM_CONF"; exit 0; fi
    sleep 0.3
done
echo "slurm did not come up; see $dir/slurmctld.log and $dir/slurmd.log" >&2
exit 1
