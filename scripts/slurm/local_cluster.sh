#!/usr/bin/env bash
# A single-node Slurm on this machine, from Debian's slurm-wlm and munge, for tests
# and for trying the sbatch wrapper without a cluster. Everything lives in DIR.
#   scripts/slurm/local_cluster.sh start DIR   # writes DIR/slurm.conf, starts munged, slurmctld, slurmd
#   scripts/slurm/local_cluster.sh stop DIR    # stops the daemons by their pid files
# Then: SLURM_CONF=DIR/slurm.conf sbatch ...   (needs root: daemons run as root)
set -euo pipefail
usage() { sed -n '1d; /^#/!q; s/^# \{0,1\}//p' "$0"; }
[[ $# -eq 2 ]] || { usage; [[ "${1:-}" == --help || "${1:-}" == -h ]] && exit 0; exit 2; }
CMD="$1"; DIR="$(mkdir -p "$2" && cd "$2" && pwd)"
NODE="$(hostname -s)"
case "$CMD" in
  start)
    for b in munged slurmctld slurmd sinfo; do
      command -v "$b" >/dev/null || { echo "local_cluster.sh: $b not found (apt-get install slurm-wlm munge)" >&2; exit 1; }
    done
    mkdir -p "$DIR/state" "$DIR/spool"
    CPUS=$(nproc)
    cat > "$DIR/slurm.conf" <<CONF
ClusterName=unethvd
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AuthType=auth/munge
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
MinJobAge=600
NodeName=$NODE CPUs=$CPUS Sockets=1 CoresPerSocket=$CPUS ThreadsPerCore=1 State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
CONF
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    if ! pgrep -x munged >/dev/null; then
      runuser -u munge -- /usr/sbin/munged
    fi
    slurmctld -f "$DIR/slurm.conf"
    slurmd -f "$DIR/slurm.conf"
    for _ in $(seq 1 60); do
      if SLURM_CONF="$DIR/slurm.conf" sinfo -h -o %t 2>/dev/null | grep -qx idle; then
        echo "local_cluster.sh: node $NODE idle; export SLURM_CONF=$DIR/slurm.conf"; exit 0
      fi
      sleep 0.5
    done
    echo "local_cluster.sh: node did not become idle; see $DIR/slurmctld.log and $DIR/slurmd.log" >&2
    exit 1 ;;
  stop)
    for p in slurmd slurmctld; do
      [[ -f "$DIR/$p.pid" ]] && kill "$(cat "$DIR/$p.pid")" 2>/dev/null || true
    done
    for _ in $(seq 1 20); do
      pgrep -f "slurm(ctld|d) -f $DIR/slurm.conf" >/dev/null || exit 0
      sleep 0.5
    done
    pkill -9 -f "slurm(ctld|d) -f $DIR/slurm.conf" || true ;;
  *) usage; exit 2 ;;
esac
