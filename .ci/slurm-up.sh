#!/usr/bin/env bash
# Bring up a real one-node Slurm on this machine, from Debian's packages, without systemd.
#
# Run as root (CI does: `sudo .ci/slurm-up.sh` or as root directly). Idempotent: a second
# run leaves a healthy cluster alone, restarts a daemon that died, and resumes a drained node.
#
#   - installs munge, slurmctld, slurmd, slurm-client (apt, no recommends)
#   - writes /etc/slurm/slurm.conf for this host only: cgroup-free (proctrack/linuxproc,
#     task/none), no accounting, addresses on 127.0.0.1 (no DNS needed for the host name),
#     select/cons_tres with CR_CPU (memory is not a consumable,
#     so several array tasks share the node), node line taken from `slurmd -C`
#   - creates the munge key, starts munged, slurmctld and slurmd as root
#   - waits until `sinfo` shows the node idle (SLURM_UP_TIMEOUT seconds, default 90)
#   - writes the marker /etc/slurm/batchcap-test-cluster (cluster name, control address, node,
#     path and sha256 of slurm.conf): the Slurm tests submit jobs only when `scontrol show config`
#     answers with exactly this cluster, so they never queue work on a real cluster
#
# It refuses to replace a slurm.conf it did not write (a real cluster's), unless SLURM_UP_FORCE=1.
#
# Environment: SLURM_UP_TIMEOUT (90), SLURM_PARTITION (debug), SLURM_UP_FORCE (0).
set -euo pipefail

TIMEOUT="${SLURM_UP_TIMEOUT:-90}"
PARTITION="${SLURM_PARTITION:-debug}"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
MARKER="$CONF_DIR/batchcap-test-cluster"
HEADER="# Written by batchcap .ci/slurm-up.sh: a one-node cluster for tests. Edits are overwritten."
LOG_DIR=/var/log/slurm
SPOOL_CTL=/var/spool/slurmctld
SPOOL_D=/var/spool/slurmd
RUN_DIR=/run/slurm

log() { printf 'slurm-up: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (it installs packages and starts daemons)"

# --- packages ---------------------------------------------------------------------------
need=()
for bin in munged slurmctld slurmd sinfo; do
    command -v "$bin" >/dev/null 2>&1 || need+=("$bin")
done
if [ "${#need[@]}" -gt 0 ]; then
    log "installing packages (missing: ${need[*]})"
    export DEBIAN_FRONTEND=noninteractive
    # Keep package scripts from trying to start services through a (missing) init system;
    # we start the daemons ourselves below. Only add the policy if none exists.
    policy_added=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        policy_added=1
    fi
    trap '[ "$policy_added" = 1 ] && rm -f /usr/sbin/policy-rc.d' EXIT
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends munge slurmctld slurmd slurm-client >/dev/null
    if [ "$policy_added" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
    trap - EXIT
fi
PATH="/usr/sbin:/usr/bin:/sbin:/bin:$PATH"

# --- configuration ----------------------------------------------------------------------
if [ -s "$CONF" ] && [ "$(head -n1 "$CONF")" != "$HEADER" ] && [ "${SLURM_UP_FORCE:-0}" != 1 ]; then
    die "$CONF was not written by this script (a real cluster's?); refusing to replace it (SLURM_UP_FORCE=1 overrides)"
fi
host="$(hostname -s 2>/dev/null || uname -n)"; host="${host%%.*}"
mkdir -p "$CONF_DIR" "$LOG_DIR" "$SPOOL_CTL" "$SPOOL_D" "$RUN_DIR"

# `slurmd -C` prints the node line as slurmd itself will detect the hardware, so the
# controller and slurmd never disagree (a mismatch drains the node).
node_line="$(slurmd -C 2>/dev/null | grep '^NodeName=' | head -n1 || true)"
if [ -z "$node_line" ]; then
    mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 ))
    node_line="NodeName=$host CPUs=$(nproc) RealMemory=$mem_mb"
fi
node_line="$(printf '%s' "$node_line" | sed -E "s/^NodeName=[^ ]+/NodeName=$host/; s/ UpTime=.*//")"

new_conf="$(mktemp)"
cat > "$new_conf" <<CONF
$HEADER
ClusterName=batchcap
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire (default 120 s) before it may start again: the tests requeue
# often, so 10 s. Forcing an earlier start (scontrol update StartTime=now) gets the new run
# killed as "Job credential revoked".
AuthInfo=cred_expire=10
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# Backfill every 5 s (default 30) starts a requeued job soon after its cred_expire wait.
SchedulerParameters=bf_interval=5
ReturnToService=2
StateSaveLocation=$SPOOL_CTL
SlurmdSpoolDir=$SPOOL_D
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
MinJobAge=600
MaxArraySize=10001
$node_line NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

conf_changed=0
if ! cmp -s "$new_conf" "$CONF"; then
    install -m 644 "$new_conf" "$CONF"
    conf_changed=1
    log "wrote $CONF"
fi
rm -f "$new_conf"

# --- munge ------------------------------------------------------------------------------
key=/etc/munge/munge.key
mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
if [ ! -s "$key" ]; then
    log "creating munge key"
    if command -v mungekey >/dev/null 2>&1; then
        mungekey --create --keyfile="$key" --force
    else
        dd if=/dev/urandom bs=1 count=1024 of="$key" status=none
    fi
fi
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 0700 /etc/munge
chmod 0400 "$key"
chmod 0755 /run/munge

alive() { # alive PIDFILE: the daemon named in PIDFILE is running
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
    for _ in $(seq 20); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.5
    done
    munge -n | unmunge >/dev/null || die "munged does not answer (see /var/log/munge/munged.log)"
fi

# --- slurm daemons ----------------------------------------------------------------------
if alive "$RUN_DIR/slurmctld.pid" && [ "$conf_changed" = 1 ]; then
    log "configuration changed: restarting the daemons"
    kill "$(cat "$RUN_DIR/slurmd.pid" 2>/dev/null)" 2>/dev/null || true
    kill "$(cat "$RUN_DIR/slurmctld.pid")" 2>/dev/null || true
    for _ in $(seq 40); do
        alive "$RUN_DIR/slurmctld.pid" || alive "$RUN_DIR/slurmd.pid" || break
        sleep 0.25
    done
fi
if ! alive "$RUN_DIR/slurmctld.pid"; then
    log "starting slurmctld"
    /usr/sbin/slurmctld
fi
for _ in $(seq 40); do
    scontrol ping 2>/dev/null | grep -q 'is UP' && break
    sleep 0.5
done
scontrol ping | grep -q 'is UP' || die "slurmctld is not up (see $LOG_DIR/slurmctld.log)"
if ! alive "$RUN_DIR/slurmd.pid"; then
    log "starting slurmd"
    /usr/sbin/slurmd
fi

# --- wait for the node ------------------------------------------------------------------
deadline=$(( $(date +%s) + TIMEOUT ))
resumed=0
while :; do
    state="$(sinfo -h -n "$host" -o '%T' 2>/dev/null | head -n1 || true)"
    case "$state" in
        idle|mixed|allocated|completing) break ;;
        drain*|down*|fail*)
            if [ "$resumed" = 0 ]; then
                log "node is $state: resuming it"
                scontrol update NodeName="$host" State=RESUME 2>/dev/null || true
                resumed=1
            fi ;;
    esac
    if [ "$(date +%s)" -ge "$deadline" ]; then
        sinfo -N -l >&2 || true
        tail -n 20 "$LOG_DIR/slurmd.log" "$LOG_DIR/slurmctld.log" >&2 || true
        die "node $host not idle after ${TIMEOUT}s (state: ${state:-unknown})"
    fi
    sleep 1
done
# --- marker for the tests ----------------------------------------------------------------
# Written last, once the node is up: it names the cluster this script runs, so that the tests can
# check that the Slurm their commands reach is this one (see tests/scenarios/test_slurm.py).
marker_tmp="$(mktemp "$CONF_DIR/.batchcap-test-cluster.XXXXXX")"
cat > "$marker_tmp" <<MARKER
# Written by batchcap .ci/slurm-up.sh: the Slurm described here is batchcap's one-node test cluster.
cluster=batchcap
controller=127.0.0.1
node=$host
conf=$CONF
conf_sha256=$(sha256sum "$CONF" | cut -d' ' -f1)
MARKER
chmod 644 "$marker_tmp"
mv -f "$marker_tmp" "$MARKER"

log "up: node $host is $state in partition $PARTITION"
sinfo
