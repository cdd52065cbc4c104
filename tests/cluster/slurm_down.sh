#!/usr/bin/env bash
# Stops the Slurm daemons that tests/cluster/slurm_up.sh started (listed in $RUN_DIR/started), newest
# first, by their pid files; daemons that were already running before slurm_up.sh are left alone.
# Jobs still in a cluster that slurm_up.sh started are cancelled first. Safe to run more than once.
set -uo pipefail

RUN_DIR=/var/run/ringbench-slurm
STARTED=$RUN_DIR/started
log() { echo "slurm_down: $*" >&2; }
alive() { # name pid: a process of that name that is not a zombie
    [ "$(cat "/proc/$2/comm" 2>/dev/null)" = "$1" ] && [ "$(ps -o stat= -p "$2" 2>/dev/null | cut -c1)" != Z ]
}

if [ ! -s "$STARTED" ]; then
    echo "slurm down: nothing to stop (no daemon started by slurm_up.sh)"
    exit 0
fi

if grep -q '^slurmctld ' "$STARTED" && command -v squeue >/dev/null; then
    jobs=$(timeout 10 squeue -h -o '%i' 2>/dev/null | tr '\n' ' ' || true)
    if [ -n "${jobs// /}" ]; then
        log "cancelling jobs left in the queue: $jobs"
        # shellcheck disable=SC2086
        timeout 10 scancel $jobs || true
        sleep 2
    fi
fi

status=0
stopped=()
# Newest first: slurmd, slurmctld, then munged.
while read -r name pidfile; do
    [ -n "$name" ] || continue
    pid=$(cat "$pidfile" 2>/dev/null || true)
    if [ -z "$pid" ] || ! alive "$name" "$pid"; then
        log "$name is not running (pid file $pidfile: '${pid}')"
        rm -f "$pidfile"
        continue
    fi
    kill -TERM "$pid"
    for _ in $(seq 50); do alive "$name" "$pid" || break; sleep 0.2; done
    if alive "$name" "$pid"; then
        log "$name (pid $pid) did not stop within 10 s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
    fi
    if alive "$name" "$pid"; then
        log "error: $name (pid $pid) still runs"
        status=1
        continue
    fi
    rm -f "$pidfile"
    stopped+=("$name")
done < <(tac "$STARTED")

[ "$status" -eq 0 ] && rm -f "$STARTED"
echo "slurm down: stopped ${stopped[*]:-nothing}"
exit "$status"
