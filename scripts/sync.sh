#!/usr/bin/env bash
# Push the code (and optionally the data file) to every host of a hostfile with
# rsync over ssh, so each node runs the same tree: the seed's Ansible sync, minus
# Ansible. Hosts need rsync and the same Python set-up (run scripts/setup.sh there,
# or share .venv over a shared file system; see README "Running on a cluster").
#
# Usage: scripts/sync.sh --hostfile F [--dest DIR] [--data FILE [--data_dest DIR]] [--rsh CMD] [--dry-run]
#   --dest       folder on each host (default: this repository's path)
#   --data       a data file to copy too, into --data_dest (default: same path as here)
#   --rsh        remote shell for rsync (default: ssh)
#   --dry-run    print the rsync commands, run nothing
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HOSTFILE=""; DEST="$ROOT"; DATA=""; DATA_DEST=""; RSH="ssh"; DRY=0
while (($#)); do
  case "$1" in
    --help|-h) sed -n '1d; /^#/!q; s/^# \{0,1\}//p' "$0"; exit 0 ;;
    --hostfile) HOSTFILE="$2"; shift ;;
    --dest) DEST="$2"; shift ;;
    --data) DATA="$2"; shift ;;
    --data_dest) DATA_DEST="$2"; shift ;;
    --rsh) RSH="$2"; shift ;;
    --dry-run) DRY=1 ;;
    *) echo "sync.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac; shift
done
[[ -n "$HOSTFILE" ]] || { echo "sync.sh: --hostfile is required" >&2; exit 2; }
if [[ -n "$DATA" && ! -f "$DATA" ]]; then echo "sync.sh: --data $DATA: no such file" >&2; exit 2; fi
PY="$ROOT/.venv/bin/python"; [[ -x "$PY" ]] || PY=python3
mapfile -t HOSTS < <(PYTHONPATH="$ROOT" "$PY" -m unet.launch.hostfile "$HOSTFILE") || exit 2
[[ ${#HOSTS[@]} -gt 0 ]] || exit 2
run() { if ((DRY)); then printf '%q ' "$@"; echo; else "$@"; fi; }
for h in "${HOSTS[@]}"; do
  run rsync -az --delete --exclude .venv --exclude .git --exclude runs/ --exclude __pycache__/ \
      -e "$RSH" "$ROOT/" "$h:$DEST/"
  if [[ -n "$DATA" ]]; then
    d="${DATA_DEST:-$(cd "$(dirname "$DATA")" && pwd)}"
    run rsync -az -e "$RSH" "$DATA" "$h:$d/"
  fi
  ((DRY)) || echo "sync.sh: $h done"
done
