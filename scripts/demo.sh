#!/usr/bin/env bash
# The main job on the embedded default, end to end on this machine:
#   set up what is missing -> write synthetic BraTS-format cases on the ICBM152 brain (unet-synth):
#   training cases, and held-out test cases no step before the scoring sees -> convert the training
#   cases to HDF5 (unet-convert: 6 to train on, 2 to validate each epoch) -> train the U-Net on 2 ranks
#   with mpirun -> score the test cases (unet-evaluate, 2 ranks): volume-level and lesion-wise
#   -> print where the TensorBoard logs and the model are, then (last) the volume-level Dice / HD95
#   table and the lesion-wise one (lesion-wise Dice and HD95 rows first, as the leaderboard ranks),
#   and a line of the seconds each stage took.
# Options: --dry-run (print the commands), --out DIR (default runs/demo), --cases N (default 8),
#          --test_cases N (default 6), --epochs N (default 4), --anatomy mni152|sphere (default
#          mni152); anything else goes to train_hvd.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/runs/demo"; DRY=0; CASES=8; TEST=6; EPOCHS=4; ANATOMY=mni152; EXTRA=()
while (($#)); do
  case "$1" in
    --help|-h) sed -n '2,12p' "$0"; exit 0 ;;
    --dry-run) DRY=1 ;;
    --out) OUT="$2"; shift ;;
    --cases) CASES="$2"; shift ;;
    --epochs) EPOCHS="$2"; shift ;;
    --test_cases) TEST="$2"; shift ;;
    --anatomy) ANATOMY="$2"; shift ;;
    *) EXTRA+=("$1") ;;
  esac; shift
done
PY="$ROOT/.venv/bin/python"
# the training cases (seed 0) and the test cases (seed 1: other brains, other tumours); only the test
# cases are scored, and nothing before the scoring reads them (the 2 validation cases pick the epoch)
SYNTH=("$PY" -m unet.data.synth --out "$OUT/cases" --cases "$CASES" --seed 0 --workers 2 --anatomy "$ANATOMY")
SYNTH_TEST=("$PY" -m unet.data.synth --out "$OUT/test" --cases "$TEST" --seed 1 --workers 2 --anatomy "$ANATOMY")
# training slices: those with tumour plus a tenth of the others (validation keeps every slice): the
# 4 epochs below see 1,792 images on the ICBM152 cases (docs/TRAINING.md)
# --inplane crop_resize: each case's head cut square and resized to 128x128, so the head fills the input
# (ET Dice 0.898 -> 0.931 on 6 tuning cases; docs/TRAINING.md)
CONVERT=("$PY" -m unet.data.convert --input "$OUT/cases" --output "$OUT/brats.h5" --size 128 --workers 2
         --slices tumour --inplane crop_resize)
# batch 4 per rank (global 8), batch normalisation at rate 0.001 (0.002 after the 1-epoch warmup on 2 ranks),
# the bias-field augmentation (--aug_bias 0.1), 4 epochs: the recipe whose seeds agree and whose validation
# Dice does not fall between epochs (scripts/robustness.py, docs/TRAINING.md; its DEMO_FLAGS are the training
# flags given here besides batch, rate and epochs); batch rather than group normalisation: a slice's statistics
# made the network mark healthy tissue in the lowest slices of 4 of 12 tuning cases (docs/TRAINING.md)
# each rank preloads tcmalloc (scripts/setup.sh installs it): 1.57x the img/s of glibc's malloc on the AVX2 machines
# (docs/PERFORMANCE.md); your own LD_PRELOAD, or UNET_MALLOC=system, is kept instead
MALLOC=()
[[ -z "${LD_PRELOAD:-}" && "${UNET_MALLOC:-tcmalloc}" != system ]] && MALLOC=(-x LD_PRELOAD=libtcmalloc_minimal.so.4)
TRAIN=(mpirun -np 2 --oversubscribe "${MALLOC[@]}" "$PY" "$ROOT/train_hvd.py" --data "$OUT/brats.h5" --batch_size 4 --learningrate 0.001
       --norm batch --aug_bias 0.1 --num_inter_threads 1 --epochs "$EPOCHS" --log_every 10 --logdir "$OUT/logs" "${EXTRA[@]}")
# --tta lr: each slice and its left-right mirror (2x the inference; all four mirror images, --tta, scored
# 0.001-0.004 more Dice per region on 12 tuning cases for 1.6x the scoring time, docs/TRAINING.md);
# --metrics all: the BraTS 2017-22 volume-level figures and the lesion-wise ones of brats-evaluation
EVAL=(mpirun -np 2 --oversubscribe "$PY" -m unet.evaluation.evaluate --model "$OUT/logs" --cases "$OUT/test"
      --csv "$OUT/scores.csv" --pred_dir "$OUT/predictions" --tta lr --metrics all)
if ((DRY)); then
  for c in SYNTH SYNTH_TEST CONVERT TRAIN EVAL; do declare -n cmd=$c; printf '%q ' "${cmd[@]}"; echo; done
  exit 0
fi
"$ROOT/scripts/setup.sh" --no-checks
[[ $(id -u) -eq 0 ]] && export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"
t0=$(date +%s)
rm -rf "$OUT/cases" "$OUT/test" "$OUT/brats.h5" "$OUT/logs" "$OUT/predictions" "$OUT/scores.csv"
# where the time goes: seconds per stage, printed with the closing line
TIMES=(); lap=$t0
stage() { local now; now=$(date +%s); TIMES+=("$1 $((now - lap)) s"); lap=$now; }
echo "==> synthetic cases";  "${SYNTH[@]}"; "${SYNTH_TEST[@]}"; stage synthesis
echo "==> conversion";       "${CONVERT[@]}"; stage conversion
# train_hvd.py with neither --data nor --synthetic reads data/brats.h5: point it at the demo's
# data unless something (a converted BraTS release) is there already
if [[ ! -e "$ROOT/data/brats.h5" ]]; then
  ln -sfn "$OUT/brats.h5" "$ROOT/data/brats.h5"
  echo "    data/brats.h5 -> $OUT/brats.h5 (train_hvd.py's default --data; replace it with a converted BraTS release)"
fi
echo "==> training, 2 ranks"; "${TRAIN[@]}"; stage training
echo "demo: trained in $(( $(date +%s) - t0 )) s: cases $OUT/cases, data $OUT/brats.h5, logs and model $OUT/logs;"
echo "      test cases $OUT/test; predictions go to $OUT/predictions, per-case scores to $OUT/scores.csv"
# last: the per-region summaries (unet-evaluate prints them last: volume-level, then lesion-wise)
echo "==> evaluation of the $TEST test cases (volume-level and lesion-wise), 2 ranks"; "${EVAL[@]}"; stage evaluation
echo "demo: $(( $(date +%s) - t0 )) s from the synthesis on: $(IFS=,; echo "${TIMES[*]}" | sed 's/,/, /g')"
