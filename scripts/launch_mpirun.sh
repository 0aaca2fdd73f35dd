#!/usr/bin/env bash
# Launch train_hvd.py with mpirun from a hostfile and a hardware profile.
# --help lists the options; --dry-run prints the exact command; arguments after -- go to train_hvd.py.
# Example: scripts/launch_mpirun.sh --hostfile hostfiles/skylake-4node --np 8 --profile skylake -- --data brats.h5
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
exec "$ROOT/.venv/bin/python" -m unet.launch.commands mpirun "$@"
