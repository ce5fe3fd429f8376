#!/usr/bin/env bash
# Stop the single-node Slurm started by .ci/slurm-up.sh, by the pids in its pid files (never by name).
set -uo pipefail
STATE=${DEEPMOSAIC_SLURM_DIR:-/tmp/deepmosaic-slurm}

alive() {
    local pid=$1
    [ -n "$pid" ] && [ -r "/proc/$pid/stat" ] || return 1
    local state
    state=$(sed -E 's/^[0-9]+ \(.*\) ([A-Za-z]).*/\1/' "/proc/$pid/stat")
    [ "$state" != Z ] && [ "$state" != X ]
}

for f in "$STATE/slurmd.pid" "$STATE/slurmctld.pid" /run/munge/munged.pid; do
    [ -s "$f" ] || continue
    pid=$(cat "$f")
    if alive "$pid"; then
        kill "$pid"
        for _ in $(seq 100); do alive "$pid" || break; sleep 0.1; done
        if alive "$pid"; then kill -9 "$pid"; fi
        echo "slurm-down: stopped $(basename "$f" .pid) (pid $pid)"
    fi
    rm -f "$f"
done
exit 0
