#!/usr/bin/env bash
# Stop the single-node Slurm started by .ci/slurm-up.sh, by the pids in its pid files (never by name).
set -uo pipefail
. "$(dirname "$0")/slurm-lib.sh"

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
