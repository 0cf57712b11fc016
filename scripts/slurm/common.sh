# shellcheck shell=bash disable=SC2034
# Shared helpers for scripts/slurm/up.sh and down.sh. Sourced, not run.
# Everything lives under one run folder; only /etc/slurm/slurm.conf (a symlink, so that
# sbatch/sinfo/sacct find the config without SLURM_CONF), /etc/munge/munge.key and
# /run/munge (munge's socket, where clients look for it) live outside it.

SLURM_DIR="${SFT_EXP_SLURM_DIR:-/tmp/sft-exp-slurm}"
CLUSTER_NAME="sftexp"
DB_PORT="${SFT_EXP_SLURM_DB_PORT:-13306}"
DB_NAME="slurm_acct_db"
DB_USER="slurm"
DB_PASS="sft-exp-slurmdbd"

ETC_DIR="$SLURM_DIR/etc"
RUN_DIR="$SLURM_DIR/run"
LOG_DIR="$SLURM_DIR/log"
STATE_DIR="$SLURM_DIR/state"
SPOOL_DIR="$SLURM_DIR/spool"
MUNGE_DIR="$SLURM_DIR/munge"
MYSQL_DIR="$SLURM_DIR/mysql"

SLURM_CONF_FILE="$ETC_DIR/slurm.conf"
SLURMDBD_CONF_FILE="$ETC_DIR/slurmdbd.conf"
MY_CNF="$ETC_DIR/my.cnf"
MYSQL_SOCK="$MYSQL_DIR/mysqld.sock"

MUNGE_PID="$MUNGE_DIR/munged.pid"
MYSQL_PID="$MYSQL_DIR/mysqld.pid"
SLURMDBD_PID="$RUN_DIR/slurmdbd.pid"
SLURMCTLD_PID="$RUN_DIR/slurmctld.pid"

# Two Slurm nodes on this one machine, so that multi-node jobs run for real: one slurmd each (`slurmd -N NAME`),
# both at 127.0.0.1, each with its own port, spool folder, pid file and log (%n in slurm.conf). The first node keeps
# the machine's short hostname; the second is NAME-2 (up.sh makes it resolve to 127.0.0.1 if it does not).
NODE="$(hostname -s)"
NODES=("$NODE" "$NODE-2")
NODE_PORTS=(6818 6820)
MULTI_PARTITION="multi"
slurmd_pid() { echo "$RUN_DIR/slurmd-$1.pid"; }
slurmd_log() { echo "$LOG_DIR/slurmd-$1.log"; }
HOSTS_MARK="# sft-exp scripts/slurm/up.sh"

export SLURM_CONF="$SLURM_CONF_FILE"

log() { echo "[slurm] $*" >&2; }

# die MESSAGE [LOGFILE...]: print the message and the tail of each log, exit 1.
die() {
    local msg="$1"; shift
    echo "[slurm] ERROR: $msg" >&2
    local f
    for f in "$@"; do
        if [ -f "$f" ]; then
            echo "----- last lines of $f -----" >&2
            tail -n 25 "$f" >&2
            echo "-----" >&2
        fi
    done
    exit 1
}

# proc_alive PID [EXE]: true if PID is a live (non-zombie) process whose command is called EXE
# (when given: a stale pid file whose pid now belongs to something else is not ours).
# PID 1 here does not reap promptly, so a killed daemon can linger as a zombie for which
# kill -0 still succeeds: read the state letter in /proc/PID/stat instead.
proc_alive() {
    local pid="$1" exe="${2:-}" state
    [ -n "$pid" ] || return 1
    # field 3 of /proc/PID/stat, after the "(comm)" which may contain spaces
    state="$(sed -e 's/^.*) //' 2>/dev/null <"/proc/$pid/stat" | cut -d' ' -f1)" || return 1
    case "$state" in
        Z|X|x|"") return 1 ;;
    esac
    # /proc/PID/comm, not the exe link: Debian's /usr/sbin/slurmctld is a symlink to slurmctld-wlm.
    if [ -n "$exe" ]; then
        [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$exe" ] || return 1
    fi
    return 0
}

pid_of() { tr -dc '0-9' 2>/dev/null <"$1" || true; }

# pid_alive PIDFILE [EXE]: true if the pid file names a live daemon (see proc_alive).
pid_alive() {
    [ -s "$1" ] || return 1
    proc_alive "$(pid_of "$1")" "${2:-}"
}

# stop_pidfile EXE PIDFILE [TIMEOUT]: SIGTERM the process named in PIDFILE (if its binary is
# EXE), wait until it is gone or a zombie, SIGKILL after TIMEOUT seconds. Never looks
# processes up by name.
stop_pidfile() {
    local name="$1" pidfile="$2" timeout="${3:-15}" pid i
    pid="$(pid_of "$pidfile" 2>/dev/null)"
    if ! proc_alive "$pid" "$name"; then
        rm -f "$pidfile"
        return 0
    fi
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < timeout * 10; i++)); do
        proc_alive "$pid" "$name" || break
        sleep 0.1
    done
    if proc_alive "$pid" "$name"; then
        log "$name did not stop in ${timeout}s, sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            proc_alive "$pid" "$name" || break
            sleep 0.1
        done
    fi
    if proc_alive "$pid" "$name"; then die "$name (pid $pid) would not stop"; fi
    rm -f "$pidfile"
}

# wait_for SECONDS COMMAND...: retry COMMAND every 0.2 s until it succeeds.
wait_for() {
    local secs="$1"; shift
    local end=$((SECONDS + secs))
    while true; do
        if "$@" >/dev/null 2>&1; then return 0; fi
        [ "$SECONDS" -ge "$end" ] && return 1
        sleep 0.2
    done
}

# wait_daemon SECONDS EXE PIDFILE COMMAND...: like wait_for, but fail at once (after a 3 s grace
# for the pid file to appear) when the daemon has died, e.g. on "Address already in use".
wait_daemon() {
    local secs="$1" exe="$2" pidfile="$3"; shift 3
    local start=$SECONDS end=$((SECONDS + secs))
    while true; do
        if "$@" >/dev/null 2>&1; then return 0; fi
        if [ $((SECONDS - start)) -ge 3 ] && ! pid_alive "$pidfile" "$exe"; then return 1; fi
        [ "$SECONDS" -ge "$end" ] && return 1
        sleep 0.2
    done
}

conf_sum() { cat "$@" | md5sum | cut -d' ' -f1; }

# config_stale NAME PIDFILE CONFIG...: true if the daemon runs with other configs than these. NAME is the daemon's
# binary (EXE), or EXE-INSTANCE when several run (slurmd-NODE): the process is checked against EXE.
config_stale() {
    local name="$1" pidfile="$2"; shift 2
    pid_alive "$pidfile" "${name%%-*}" || return 1
    [ "$(cat "$RUN_DIR/$name.confsum" 2>/dev/null || true)" != "$(conf_sum "$@")" ]
}

# mark_started NAME CONFIG...: remember the configs the daemon was started with.
mark_started() {
    local name="$1"; shift
    conf_sum "$@" >"$RUN_DIR/$name.confsum"
}
