#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, for `make test-cluster` (tests/test_cluster.py).
#
# Idempotent. Installs slurm-wlm and munge with apt-get if slurmctld is missing, writes a munge key if
# there is none, writes /etc/slurm/slurm.conf for one node named after `hostname -s`, starts munged,
# slurmctld and slurmd (as root, no systemd) unless they already run, and waits until the node is idle.
# The daemons it starts are recorded in $RUN_DIR/started; tests/cluster/slurm_down.sh stops those only.
# Needs root and apt access. Prints one line when the cluster is up; on failure, the daemons' log tails.
set -euo pipefail

RUN_DIR=/var/run/ringbench-slurm        # pid files and the list of daemons this script started
STARTED=$RUN_DIR/started
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
LOG_DIR=/var/log/slurm
MUNGE_KEY=/etc/munge/munge.key
PARTITION=debug
MARKER="# written by ringbench tests/cluster/slurm_up.sh"
WAIT_S=${SLURM_UP_WAIT_S:-60}

log() { echo "slurm_up: $*" >&2; }
die() {
    log "error: $*"
    for f in "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" /var/log/munge/munged.log; do
        [ -f "$f" ] && { echo "---- tail $f" >&2; tail -n 25 "$f" >&2; }
    done
    exit 1
}

[ "$(id -u)" -eq 0 ] || { log "error: needs root (installs packages, starts daemons)"; exit 2; }

# 1. Packages.
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    log "installing slurm-wlm and munge with apt-get (about two minutes)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

mkdir -p "$RUN_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd /run/munge /var/log/munge /var/lib/munge \
    "$CONF_DIR"
touch "$STARTED"

# A daemon runs if its pid file names a live process of that name; a stale pid file is removed.
pid_alive() { # name pidfile
    local pid
    [ -s "$2" ] || return 1
    pid=$(cat "$2" 2>/dev/null) || return 1
    # (a killed daemon may linger a moment as a zombie: that counts as stopped)
    if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ] \
        && [ "$(ps -o stat= -p "$pid" 2>/dev/null | cut -c1)" != Z ]; then
        return 0
    fi
    log "removing stale pid file $2"
    rm -f "$2"
    return 1
}
running() { # name pidfile: ours (pid file) or someone else's (a live process of that exact name)
    pid_alive "$1" "$2" || pgrep -x -r R,S,D,T "$1" >/dev/null
}
record() { # name pidfile
    grep -qx "$1 $2" "$STARTED" || echo "$1 $2" >>"$STARTED"
}

# 2. Munge key (the package's postinst usually writes one; a fresh random one otherwise).
if [ ! -s "$MUNGE_KEY" ]; then
    log "writing a munge key to $MUNGE_KEY"
    mkdir -p "$(dirname "$MUNGE_KEY")"
    (umask 077 && dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none)
fi
chmod 400 "$MUNGE_KEY"

# 3. slurm.conf: one node, this machine, its CPUs and (a little less than) its memory.
HOST=$(hostname -s)
CPUS=$(nproc)
MEM_MB=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
NEW_CONF=$(cat <<CONF
$MARKER
ClusterName=ringbench
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire seconds before it starts again (default 120).
AuthInfo=cred_expire=10
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Look at pending jobs every few seconds (defaults: 60 and 30), so a requeued job restarts soon.
SchedulerParameters=sched_interval=5,bf_interval=5
ReturnToService=2
JobRequeue=1
SlurmctldTimeout=30
SlurmdTimeout=30
KillWait=5
InactiveLimit=0
MinJobAge=300
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
)
CONF_CHANGED=0
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$NEW_CONF" ]; then
    if [ -f "$CONF" ] && ! grep -qxF "$MARKER" "$CONF"; then
        log "keeping the existing $CONF as $CONF.ringbench-bak"
        cp -p "$CONF" "$CONF.ringbench-bak"
    fi
    printf '%s\n' "$NEW_CONF" >"$CONF"
    CONF_CHANGED=1
fi

# 4. Daemons: reuse the running ones, start the others (each daemonizes and writes its pid file).
MUNGE_PID=/run/munge/munged.pid
if running munged "$MUNGE_PID"; then
    log "munged already runs"
else
    rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    if id munge >/dev/null 2>&1; then # the package's user owns the key, the log and the socket folder
        chown munge:munge /run/munge /var/lib/munge "$MUNGE_KEY"
        chown -R munge:munge /var/log/munge
        runuser -u munge -- munged || die "munged did not start"
    else
        munged --force || die "munged did not start"
    fi
    record munged "$MUNGE_PID"
fi
for _ in $(seq 20); do munge -n >/dev/null 2>&1 && break; sleep 0.5; done
munge -n | unmunge >/dev/null || die "munge does not work (munge -n | unmunge)"

REUSED_CTLD=0
if running slurmctld "$RUN_DIR/slurmctld.pid"; then
    log "slurmctld already runs"
    REUSED_CTLD=1
else
    slurmctld || die "slurmctld did not start"
    record slurmctld "$RUN_DIR/slurmctld.pid"
fi
if running slurmd "$RUN_DIR/slurmd.pid"; then
    log "slurmd already runs"
else
    slurmd || die "slurmd did not start"
    record slurmd "$RUN_DIR/slurmd.pid"
fi
if [ "$CONF_CHANGED" = 1 ] && [ "$REUSED_CTLD" = 1 ]; then
    log "slurm.conf changed: scontrol reconfigure"
    scontrol reconfigure || true
fi

# 5. Wait (bounded) for the node to be idle; resume it if it is down or drained.
deadline=$((SECONDS + WAIT_S))
state=""
while [ $SECONDS -lt $deadline ]; do
    state=$(sinfo -h -N -n "$HOST" -o '%T' 2>/dev/null | head -n 1 || true)
    case "$state" in
        idle | mixed | allocated)
            echo "slurm up: node $HOST ($CPUS CPUs, ${MEM_MB} MB) $state in partition $PARTITION ($CONF)"
            exit 0
            ;;
        down* | drain* | fail*)
            log "node $HOST is $state: resuming it"
            scontrol update nodename="$HOST" state=resume || true
            ;;
    esac
    sleep 1
done
die "node $HOST not idle after ${WAIT_S}s (state: '${state:-no answer from slurmctld}')"
