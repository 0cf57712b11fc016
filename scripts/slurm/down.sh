#!/usr/bin/env bash
# Stop the local test cluster started by scripts/slurm/up.sh: cancel jobs, then stop slurmd,
# slurmctld, slurmdbd, mariadbd and munged by their pid files (never by process name).
#
#   bash scripts/slurm/down.sh            # keep the run folder (job state, accounting db, logs)
#   bash scripts/slurm/down.sh --purge    # also delete the run folder: next up.sh starts from scratch
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR
. "$HERE/common.sh"

purge=0
case "${1:-}" in
    "") ;;
    --purge) purge=1 ;;
    *) echo "usage: $0 [--purge]" >&2; exit 2 ;;
esac

# Cancel jobs first, while slurmctld and slurmd can still clean them up.
if pid_alive "$SLURMCTLD_PID" slurmctld && command -v squeue >/dev/null 2>&1; then
    jobs="$(timeout 10 squeue -h -o '%A' 2>/dev/null || true)"
    if [ -n "$jobs" ]; then
        log "cancelling jobs: $(echo "$jobs" | tr '\n' ' ')"
        # shellcheck disable=SC2086
        timeout 10 scancel $jobs 2>/dev/null || true
        for _ in $(seq 1 100); do
            left="$(timeout 5 squeue -h -t running,completing,configuring -o '%A' 2>/dev/null || true)"
            [ -z "$left" ] && break
            sleep 0.1
        done
    fi
fi

# Every slurmd by its pid file: those of NODES, and any left from an earlier layout (run/slurmd.pid).
for f in "$RUN_DIR"/slurmd.pid "$RUN_DIR"/slurmd-*.pid; do
    [ -e "$f" ] || continue
    stop_pidfile slurmd "$f"
done
stop_pidfile slurmctld "$SLURMCTLD_PID"
stop_pidfile slurmdbd "$SLURMDBD_PID"
stop_pidfile mariadbd "$MYSQL_PID" 60
stop_pidfile munged "$MUNGE_PID"

if [ "$purge" = 1 ]; then
    log "removing $SLURM_DIR"
    rm -rf "$SLURM_DIR"
    if [ "$(readlink /etc/slurm/slurm.conf 2>/dev/null || true)" = "$SLURM_CONF_FILE" ]; then
        rm -f /etc/slurm/slurm.conf
    fi
    # The node names up.sh added to /etc/hosts. Rewritten in place (not sed -i): /etc/hosts may be a bind mount.
    if grep -qF "$HOSTS_MARK" /etc/hosts 2>/dev/null; then
        log "removing the node names up.sh added to /etc/hosts"
        kept="$(grep -vF "$HOSTS_MARK" /etc/hosts || true)"
        printf '%s\n' "$kept" >/etc/hosts
    fi
fi
log "down"
