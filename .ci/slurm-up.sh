#!/usr/bin/env bash
# A single-node SLURM cluster for the tests, on the loopback address only: munged, slurmctld and slurmd as root,
# every file under one directory of its own (default /tmp/selfreplay-slurm). Needs Debian's slurm-wlm and munge
# (apt-get install -y slurm-wlm munge). A requeued job waits cred_expire seconds (10 here, 120 by default) before
# it starts again. Prints the line to export (SLURM_CONF) once `sinfo` shows the node idle.
#   .ci/slurm-up.sh [DIR]      start (refuses a DIR already running)
#   .ci/slurm-up.sh --down [DIR]  stop the daemons this script started there
set -euo pipefail

if [[ "${1:-}" == "--down" ]]; then
    dir="${2:-/tmp/selfreplay-slurm}"
    for name in slurmd slurmctld munged; do
        pidfile="$dir/$name.pid"
        if [[ -f "$pidfile" ]]; then
            pid="$(cat "$pidfile")"
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            rm -f "$pidfile"
        fi
    done
    exit 0
fi

dir="${1:-/tmp/selfreplay-slurm}"
if [[ -f "$dir/slurmctld.pid" ]] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null; then
    echo "slurm-up: a cluster already runs from $dir (stop it with: $0 --down $dir)" >&2
    exit 1
fi
for tool in munged slurmctld slurmd sinfo; do
    command -v "$tool" >/dev/null || { echo "slurm-up: $tool not found (apt-get install -y slurm-wlm munge)" >&2; exit 1; }
done
mkdir -p "$dir"/{state,spool,munge,log}
chmod 700 "$dir/munge"

# munge: a key of our own, its own socket (slurm finds it through AuthInfo)
[[ -f "$dir/munge/munge.key" ]] || dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$dir/munge/munge.key"
munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
       --pid-file="$dir/munged.pid" --seed-file="$dir/munge/munge.seed" --log-file="$dir/log/munged.log"

cat > "$dir/slurm.conf" <<CONF
ClusterName=selfreplay-test
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=${SLURM_CRED_EXPIRE:-10}
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
JobRequeue=1
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=30
MinJobAge=300
NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF

export SLURM_CONF="$dir/slurm.conf"
slurmctld -c -f "$SLURM_CONF"  # -c: no jobs left over from an earlier start
slurmd -f "$SLURM_CONF" -N localhost
for _ in $(seq 120); do
    if [[ "$(sinfo -h -N -o %t 2>/dev/null | head -n1)" == "idle" ]]; then
        echo "export SLURM_CONF=$SLURM_CONF"
        exit 0
    fi
    sleep 0.5
done
echo "slurm-up: the node did not become idle in 60s; logs in $dir/log" >&2
sinfo -N >&2 || true
exit 1
