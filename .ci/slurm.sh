#!/usr/bin/env bash
# A single-node SLURM cluster on this (Debian) machine, for the tests that run the workflow
# through the SLURM profile (tests/test_slurm.py starts and stops it; .ci/run needs nothing else).
#
#   .ci/slurm.sh install   apt-get install slurm-wlm munge when they are absent (root only)
#   .ci/slurm.sh start     install, write /etc/slurm/{slurm,gres}.conf, start munged (unless one
#                          answers), slurmctld and slurmd, wait for the node to be idle
#   .ci/slurm.sh stop      stop the daemons this script started (by the PIDs it wrote), remove the config
#   .ci/slurm.sh status    print the PIDs and `sinfo`
#
# Exit status 3 means "cannot here" (not root, no apt-get, a SLURM configuration that is not
# ours, install failed); the message on stderr says why, and the tests skip with it.
#
# The node declares what the machine has: CPUs from nproc, RealMemory 80 % of MemTotal, and one
# fake GPU (gres.conf `File=/dev/null`: SLURM allocates it and sets CUDA_VISIBLE_DEVICES, torch
# sees no CUDA and trains on the CPU). There is no slurmdbd: `sacct` has no data, so the test
# profile polls job status with squeue (MinJobAge below keeps finished jobs visible to it).
# slurm.conf must be /etc/slurm/slurm.conf: the executor plugin strips SLURM_* variables before
# its nested srun, so SLURM_CONF alone is not seen there.
set -euo pipefail

STATE=${PRECIP_CVAE_SLURM_STATE:-/var/tmp/precip-cvae-slurm}  # spool, state, logs, PID files
CONF=/etc/slurm/slurm.conf
GRES=/etc/slurm/gres.conf
MARK="# precip-cvae test cluster (.ci/slurm.sh)"

cannot() { echo "slurm.sh: cannot start SLURM here: $*" >&2; exit 3; }

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        return 0
    fi
    [ "$(id -u)" = 0 ] || cannot "slurm-wlm and munge are not installed and this is not root"
    command -v apt-get >/dev/null || cannot "slurm-wlm and munge are not installed and there is no apt-get"
    echo "slurm.sh: installing slurm-wlm munge (apt-get)" >&2
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurm-wlm munge; } \
        >"${TMPDIR:-/tmp}/precip-cvae-slurm-apt.log" 2>&1 \
        || cannot "apt-get install slurm-wlm munge failed (see ${TMPDIR:-/tmp}/precip-cvae-slurm-apt.log)"
}

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop() {
    local name pid
    # cancel what is left on our cluster (its only partition) before its daemons go
    if alive "$STATE/slurmctld.pid" && [ -f "$CONF" ] && head -1 "$CONF" | grep -qF "$MARK"; then
        scancel --partition=debug 2>/dev/null || true
        for _ in $(seq 50); do [ -z "$(squeue -h -t R,CG -o %i 2>/dev/null)" ] && break; sleep 0.2; done
    fi
    for name in slurmd slurmctld munged; do
        if alive "$STATE/$name.pid"; then
            pid=$(cat "$STATE/$name.pid")
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
        fi
        rm -f "$STATE/$name.pid"
    done
    for f in "$CONF" "$GRES"; do
        if [ -f "$f" ] && head -1 "$f" | grep -qF "$MARK"; then rm -f "$f"; fi
    done
}

write_conf() {
    local host cpus mem
    host=$(hostname -s)
    cpus=$(nproc)
    mem=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.8}' /proc/meminfo)
    mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d"
    cat >"$CONF" <<EOF
$MARK: removed by \`.ci/slurm.sh stop\`
ClusterName=precipcvae
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
# no cgroups in a container: plain process tracking, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
# finished jobs stay visible to squeue for an hour (the profile's status command; the tests read their end
# states after the rest of the suite)
MinJobAge=3600
KillWait=10
GresTypes=gpu
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    cat >"$GRES" <<EOF
$MARK: removed by \`.ci/slurm.sh stop\`
# a fake GPU: without File= the node goes INVAL; /dev/null makes SLURM set CUDA_VISIBLE_DEVICES
Name=gpu File=/dev/null
EOF
}

start() {
    install
    [ "$(id -u)" = 0 ] || cannot "starting slurmctld/slurmd needs root"
    if [ -f "$CONF" ] && ! head -1 "$CONF" | grep -qF "$MARK"; then
        cannot "$CONF exists and was not written by .ci/slurm.sh (a real cluster?): not touching it"
    fi
    stop  # leftovers of an earlier run of ours (by PID)
    rm -rf "$STATE" && mkdir -p "$STATE"
    write_conf

    # munged runs as user munge with its socket directory owned by munge; reuse one that answers
    if ! munge -n </dev/null >/dev/null 2>&1; then
        mkdir -p /run/munge && chown munge:munge /run/munge && chmod 0755 /run/munge
        [ -s /etc/munge/munge.key ] || cannot "/etc/munge/munge.key is missing"
        runuser -u munge -- munged --force --pid-file=/run/munge/precip-cvae-munged.pid \
            || cannot "munged did not start"
        cp /run/munge/precip-cvae-munged.pid "$STATE/munged.pid"
        for _ in $(seq 50); do munge -n </dev/null >/dev/null 2>&1 && break; sleep 0.1; done
    fi
    munge -n </dev/null >/dev/null 2>&1 || cannot "munge does not answer"

    slurmctld || cannot "slurmctld did not start (see $STATE/slurmctld.log)"
    slurmd || cannot "slurmd did not start (see $STATE/slurmd.log)"
    local node_state=""
    for _ in $(seq 120); do
        node_state=$(sinfo -h -o %T 2>/dev/null | head -1)
        case "$node_state" in idle) break ;; esac
        sleep 0.25
    done
    [ "$node_state" = idle ] || { stop; cannot "the node is '${node_state:-not answering}', not idle (see $STATE/*.log)"; }
    echo "slurm.sh: single-node SLURM up ($(hostname -s), $(nproc) CPUs, gpu:1 fake; state in $STATE)" >&2
}

status() {
    local name
    for name in munged slurmctld slurmd; do
        if alive "$STATE/$name.pid"; then echo "$name $(cat "$STATE/$name.pid")"; else echo "$name -"; fi
    done
    sinfo 2>&1 || true
}

case "${1:-}" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
