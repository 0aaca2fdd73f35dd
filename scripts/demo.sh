#!/usr/bin/env bash
# The main job on the embedded default: set up whatever is missing, then train
# the U-Net on 2 ranks with mpirun on synthetic in-memory BraTS-shaped slices
# (128x128, FLAIR -> whole tumour) for a short budget, and print where the
# TensorBoard logs and the model are, and the validation Dice.
# Options: --dry-run (print the command), --logdir DIR (default runs/demo),
# anything else is passed to train_hvd.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOGDIR="$ROOT/runs/demo"; DRY=0; EXTRA=()
while (($#)); do
  case "$1" in
    --help|-h) sed -n '2,7p' "$0"; exit 0 ;;
    --dry-run) DRY=1 ;;
    --logdir) LOGDIR="$2"; shift ;;
    *) EXTRA+=("$1") ;;
  esac; shift
done
CMD=(mpirun -np 2 --oversubscribe "$ROOT/.venv/bin/python" "$ROOT/train_hvd.py" --synthetic
     --synthetic_train 384 --synthetic_val 64 --batch_size 8 --epochs 4 --log_every 8
     --logdir "$LOGDIR" "${EXTRA[@]}")
if ((DRY)); then printf '%q ' "${CMD[@]}"; echo; exit 0; fi
"$ROOT/scripts/setup.sh" --no-checks
[[ $(id -u) -eq 0 ]] && export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"
rm -rf "$LOGDIR"
t0=$(date +%s)
"${CMD[@]}"
echo "demo: finished in $(( $(date +%s) - t0 )) s of training (2 ranks); logs in $LOGDIR"
