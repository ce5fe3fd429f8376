#!/usr/bin/env bash
# Start a single-node Slurm on this (Debian, root, no systemd) machine for the `slurm` tests.
# Idempotent: installs the packages if missing, (re)writes the config, starts munged, slurmctld and
# slurmd only if they are not running, and waits until `sinfo` shows the node idle.
# Facts behind each step: ../shared/reference/HPC.md. Stop with .ci/slurm-down.sh.
set -euo pipefail

. "$(dirname "$0")/slurm-lib.sh"
CONF=/etc/slurm/slurm.conf
WAIT_S=${DEEPMOSAIC_SLURM_WAIT:-60}

say() { echo "slurm-up: $*"; }

if [ "$(id -u)" != 0 ]; then
    say "needs root (installs packages and starts daemons); run it as root or skip the slurm tests"; exit 1
fi

# 1. packages
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
   || ! command -v sinfo >/dev/null; then
    say "installing munge and slurm (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends munge slurmctld slurmd slurm-client >/dev/null \
        || { apt-get update >/dev/null && apt-get install -y --no-install-recommends munge slurmctld slurmd slurm-client >/dev/null; }
fi

# 2. config (resources from `slurmd -C`; ~90% of RealMemory, more would mark the node INVAL)
mkdir -p "$STATE/state" "$STATE/spool" /etc/slurm
read -r CPUS REALMEM < <(slurmd -C | head -1 | sed -E 's/.*CPUs=([0-9]+).*RealMemory=([0-9]+).*/\1 \2/')
MEM=$(( REALMEM * 9 / 10 ))
NEW=$(mktemp)
cat > "$NEW" <<CONF
# written by deepmosaic .ci/slurm-up.sh: a single-node test cluster
ClusterName=deepmosaic
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmdTimeout=60
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
if ! cmp -s "$NEW" "$CONF"; then
    install -m 0644 "$NEW" "$CONF"
    CHANGED=1
else
    CHANGED=0
fi
rm -f "$NEW"

# 3. daemons
mkdir -p /run/munge && chown munge:munge /run/munge && chmod 0755 /run/munge
if ! alive "$(pid_of /run/munge/munged.pid)"; then
    say "starting munged"
    runuser -u munge -- /usr/sbin/munged --force
fi
if [ "$CHANGED" = 1 ]; then  # a new config: restart the Slurm daemons that run with the old one
    for f in "$STATE/slurmd.pid" "$STATE/slurmctld.pid"; do
        p=$(pid_of "$f"); if alive "$p"; then kill "$p"; fi
    done
    for _ in $(seq 50); do alive "$(pid_of "$STATE/slurmctld.pid")" || alive "$(pid_of "$STATE/slurmd.pid")" || break; sleep 0.1; done
fi
if ! alive "$(pid_of "$STATE/slurmctld.pid")"; then
    say "starting slurmctld"
    /usr/sbin/slurmctld
fi
if ! alive "$(pid_of "$STATE/slurmd.pid")"; then
    say "starting slurmd"
    /usr/sbin/slurmd -N localhost
fi

# 4. wait for the node
for _ in $(seq $(( WAIT_S * 2 ))); do
    st=$(sinfo -h -N -n localhost -o %t 2>/dev/null || true)
    case "$st" in
        idle*|mix*|alloc*) say "node localhost is $st (state, logs: $STATE)"; exit 0 ;;
        *inval*|*drain*|*down*) scontrol update nodename=localhost state=resume 2>/dev/null || true ;;
    esac
    sleep 0.5
done
say "node not idle after ${WAIT_S}s (sinfo: '${st:-no answer}'); see $STATE/slurmctld.log and $STATE/slurmd.log"
exit 1
