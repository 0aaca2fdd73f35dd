#!/usr/bin/env bash
# The main job on the embedded default, end to end on this machine:
#   set up what is missing -> write synthetic BraTS-format cases (unet-synth)
#   -> convert them to HDF5 (unet-convert) -> train the U-Net on 2 ranks with
#   mpirun -> score the validation cases (unet-evaluate, 2 ranks): volume-level and lesion-wise
#   -> print where the TensorBoard logs and the model are, then (last) the volume-level Dice / HD95
#   table and the lesion-wise one (lesion-wise Dice and HD95 rows first, as the leaderboard ranks).
# Options: --dry-run (print the commands), --out DIR (default runs/demo),
#          --cases N (default 8), --epochs N (default 4); anything else goes to train_hvd.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/runs/demo"; DRY=0; CASES=8; EPOCHS=4; EXTRA=()
while (($#)); do
  case "$1" in
    --help|-h) sed -n '2,9p' "$0"; exit 0 ;;
    --dry-run) DRY=1 ;;
    --out) OUT="$2"; shift ;;
    --cases) CASES="$2"; shift ;;
    --epochs) EPOCHS="$2"; shift ;;
    *) EXTRA+=("$1") ;;
  esac; shift
done
PY="$ROOT/.venv/bin/python"
SYNTH=("$PY" -m unet.data.synth --out "$OUT/cases" --cases "$CASES" --seed 0 --workers 2 --anatomy sphere)
# training slices: those with tumour plus a tenth of the others (validation keeps every slice), so the
# 4 epochs below see 1,312 images where 2 epochs of every brain slice saw 1,552 (docs/TRAINING.md)
CONVERT=("$PY" -m unet.data.convert --input "$OUT/cases" --output "$OUT/brats.h5" --size 128 --workers 2
         --slices tumour)
# batch 4 per rank (global 8): twice the updates of batch 8 for the same images; rate 0.0001 (the
# default loss collapsed to all-background with --learningrate 0.0002 at this batch; docs/TRAINING.md)
# each rank preloads tcmalloc (scripts/setup.sh installs it): 1.57x the img/s of glibc's malloc on the AVX2 machines
# (docs/PERFORMANCE.md); your own LD_PRELOAD, or UNET_MALLOC=system, is kept instead
MALLOC=()
[[ -z "${LD_PRELOAD:-}" && "${UNET_MALLOC:-tcmalloc}" != system ]] && MALLOC=(-x LD_PRELOAD=libtcmalloc_minimal.so.4)
TRAIN=(mpirun -np 2 --oversubscribe "${MALLOC[@]}" "$PY" "$ROOT/train_hvd.py" --data "$OUT/brats.h5" --batch_size 4 --learningrate 0.0001
       --epochs "$EPOCHS" --log_every 10 --logdir "$OUT/logs" "${EXTRA[@]}")
# --tta: mirrored slices too (4x the inference; TC Dice 0.61 -> 0.70 on the demo, docs/TRAINING.md);
# --metrics all: the BraTS 2017-22 volume-level figures and the lesion-wise ones of brats-evaluation
EVAL=(mpirun -np 2 --oversubscribe "$PY" -m unet.evaluation.evaluate --model "$OUT/logs" --data "$OUT/brats.h5"
      --csv "$OUT/scores.csv" --pred_dir "$OUT/predictions" --tta --metrics all)
if ((DRY)); then
  for c in SYNTH CONVERT TRAIN EVAL; do declare -n cmd=$c; printf '%q ' "${cmd[@]}"; echo; done
  exit 0
fi
"$ROOT/scripts/setup.sh" --no-checks
[[ $(id -u) -eq 0 ]] && export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"
t0=$(date +%s)
rm -rf "$OUT/cases" "$OUT/brats.h5" "$OUT/logs" "$OUT/predictions" "$OUT/scores.csv"
echo "==> synthetic cases";  "${SYNTH[@]}"
echo "==> conversion";       "${CONVERT[@]}"
# train_hvd.py with neither --data nor --synthetic reads data/brats.h5: point it at the demo's
# data unless something (a converted BraTS release) is there already
if [[ ! -e "$ROOT/data/brats.h5" ]]; then
  ln -sfn "$OUT/brats.h5" "$ROOT/data/brats.h5"
  echo "    data/brats.h5 -> $OUT/brats.h5 (train_hvd.py's default --data; replace it with a converted BraTS release)"
fi
echo "==> training, 2 ranks"; "${TRAIN[@]}"
echo "demo: trained in $(( $(date +%s) - t0 )) s: cases $OUT/cases, data $OUT/brats.h5, logs and model $OUT/logs;"
echo "      predictions go to $OUT/predictions, per-case scores to $OUT/scores.csv"
# last: the per-region summaries (unet-evaluate prints them last: volume-level, then lesion-wise)
echo "==> evaluation of the validation cases (volume-level and lesion-wise), 2 ranks"; "${EVAL[@]}"
