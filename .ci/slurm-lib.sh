# Shared by .ci/slurm-up.sh and .ci/slurm-down.sh (sourced).
STATE=${DEEPMOSAIC_SLURM_DIR:-/tmp/deepmosaic-slurm}

# A pid is alive if /proc/PID exists and the process is not a zombie (a killed daemon may linger as one).
alive() {
    local pid=$1
    [ -n "$pid" ] && [ -r "/proc/$pid/stat" ] || return 1
    local state
    state=$(sed -E 's/^[0-9]+ \(.*\) ([A-Za-z]).*/\1/' "/proc/$pid/stat")
    [ "$state" != Z ] && [ "$state" != X ]
}
pid_of() { [ -s "$1" ] && cat "$1" || true; }
