#!/usr/bin/env bash
# Starts a real one-node SLURM cluster on this machine for the end-to-end tests.
#
#   bash tests/slurm/start_cluster.sh            # prints the slurm.conf path on its last line
#   export SLURM_CONF=/tmp/megatron_qwen_slurm/slurm.conf
#   sbatch --wait slurm/pretrain_tiny.sh
#
# Idempotent and fast on a second call: installs Debian's slurm-wlm and munge only when
# slurmctld is missing (needs root and apt), starts munged and the two SLURM daemons only
# when they are not answering. Everything SLURM writes lives under $SLURM_TEST_DIR; the
# config is not put in /etc/slurm, so a real SLURM installation on the host is untouched
# (clients find ours through SLURM_CONF).
set -euo pipefail

STATE="${SLURM_TEST_DIR:-/tmp/megatron_qwen_slurm}"
CONF="$STATE/slurm.conf"
NODE="$(hostname -s)"
# NOTE: not the default ports 6817/6818, so a host that already runs SLURM does not clash.
CTLD_PORT="${SLURM_TEST_CTLD_PORT:-16817}"
SLURMD_PORT="${SLURM_TEST_SLURMD_PORT:-16818}"
export SLURM_CONF="$CONF"

install_packages() {
  command -v slurmctld >/dev/null && command -v munged >/dev/null && return
  if [[ $EUID -ne 0 ]] || ! command -v apt-get >/dev/null; then
    echo "SLURM is not installed and this is not root on a Debian-like system" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

start_munge() {
  munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
  [[ -s /etc/munge/munge.key ]] || mungekey --create --keyfile /etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
  mkdir -p /run/munge && chown munge:munge /run/munge
  runuser -u munge -- /usr/sbin/munged
  munge -n | unmunge >/dev/null
}

write_conf() {
  mkdir -p "$STATE/state" "$STATE/spool"
  local tmp="$CONF.tmp"
  # CPUs=2 with config_overrides: the node always offers two task slots (one 2-rank job at
  # a time), whatever the host reports. cred_expire bounds how long a requeued job waits
  # before it may start again (default 120 s); sched_interval lets the main scheduler
  # pick it up within seconds instead of a minute.
  cat >"$tmp" <<EOF
ClusterName=megatron_qwen_test
SlurmctldHost=$NODE
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=2,bf_interval=2
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=10
MailProg=/bin/true
NodeName=$NODE CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
  if cmp -s "$tmp" "$CONF"; then
    rm "$tmp"
    return 1 # unchanged
  fi
  mv "$tmp" "$CONF"
}

alive() { [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_daemons() {
  local changed=$1
  if alive "$STATE/slurmctld.pid" && [[ $changed == yes ]]; then
    scontrol reconfigure
  fi
  alive "$STATE/slurmctld.pid" || slurmctld -f "$CONF"
  alive "$STATE/slurmd.pid" || slurmd -f "$CONF" -N "$NODE"
}

wait_for_node() {
  local state=""
  for _ in $(seq 60); do
    state="$(sinfo -h -n "$NODE" -o %T 2>/dev/null || true)"
    case "$state" in
      idle* | mixed* | allocated*) return ;;
      down* | drain*) scontrol update nodename="$NODE" state=resume 2>/dev/null || true ;;
    esac
    sleep 0.5
  done
  echo "node $NODE did not become idle (state: '${state}'); see $STATE/slurmctld.log and $STATE/slurmd.log" >&2
  exit 1
}

install_packages
start_munge
if write_conf; then changed=yes; else changed=no; fi
start_daemons "$changed"
wait_for_node
echo "$CONF"
