#!/usr/bin/env bash
# K-fold cross-validation on a file from `unet-convert --folds K`, end to end:
#   for each fold k: mpirun train_hvd.py --fold k --logdir LOGDIR/fold_k (one run after another;
#   a fold whose logdir holds model.json is done and skipped, an interrupted one resumes from its
#   latest checkpoint: run the same command again) -> unet-evaluate scores every training case with
#   the model that did not see it (out of fold; LOGDIR/out_of_fold.csv and .txt) -> if the file has
#   validation cases (--val_fraction at conversion), the ensemble of the K models scores them
#   (LOGDIR/ensemble.csv and .txt).
# Options: --data FILE (default data/brats.h5), --logdir DIR (default runs/crossval), --np N ranks
#          (default 2), --metrics legacy|lesionwise|all (unet-evaluate's, default all), --tta [all|lr]
#          (score with flip TTA as unet-evaluate does: --tta alone is all four mirrors), --dry-run
#          (print the commands, run nothing), --help; anything else goes to every train_hvd.py run.
#          To train a finished fold further (say more --epochs), remove its model.json first.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA="$ROOT/data/brats.h5"; LOGDIR="$ROOT/runs/crossval"; NP=2; METRICS=all; DRY=0; EXTRA=(); SCORE=()
die() { echo "crossval.sh: error: $*" >&2; exit 2; }
while (($#)); do
  case "$1" in
    --help|-h) sed -n '2,13p' "$0"; exit 0 ;;
    --dry-run) DRY=1 ;;
    --tta) SCORE+=(--tta)
      if [[ "${2:-}" == all || "${2:-}" == lr ]]; then SCORE+=("$2"); shift; fi ;;
    --data|--logdir|--np|--metrics) [[ $# -ge 2 ]] || die "$1 needs a value"
      case "$1" in --data) DATA="$2" ;; --logdir) LOGDIR="$2" ;; --np) NP="$2" ;; --metrics) METRICS="$2" ;; esac
      shift ;;
    --fold|--logdir=*|--data=*) die "$1: crossval.sh sets --fold, --logdir and --data of each run itself" ;;
    *) EXTRA+=("$1") ;;
  esac; shift
done
PY="${PY:-$ROOT/.venv/bin/python}"
[[ "$NP" =~ ^[1-9][0-9]*$ ]] || die "--np must be a whole number >= 1 (got $NP)"
[[ "$METRICS" =~ ^(legacy|lesionwise|all)$ ]] || die "--metrics must be legacy, lesionwise or all (got $METRICS)"
[[ -f "$DATA" ]] || die "--data $DATA: no such file (convert with: unet-convert --input DIR --output $DATA --folds 5)"
# the file's folds and whether it has validation cases (those no fold holds)
read -r K NVAL < <("$PY" - "$DATA" <<'EOF'
import sys, h5py
try:
    with h5py.File(sys.argv[1], "r") as f:
        print(int(f.attrs.get("folds", 0)), f["val"]["case_id"].shape[0] if "val" in f else 0)
except (OSError, KeyError) as e:
    print(f"crossval.sh: error: --data {sys.argv[1]}: cannot read ({e})", file=sys.stderr)
    print("-1 0")
EOF
)
((K >= 0)) || exit 2
((K >= 2)) || die "--data $DATA: the file has no folds (convert it with unet-convert --folds K)"

MPI=(mpirun -np "$NP" --oversubscribe)
MODELS=()
for ((k = 0; k < K; k++)); do MODELS+=("$LOGDIR/fold_$k"); done
train_cmd() {
  TRAIN=("${MPI[@]}" "$PY" "$ROOT/train_hvd.py" --data "$DATA" --fold "$1" --logdir "$LOGDIR/fold_$1" "${EXTRA[@]}")
}
OOF=("${MPI[@]}" "$PY" -m unet.evaluation.evaluate --model "${MODELS[@]}" --data "$DATA" --metrics "$METRICS"
     "${SCORE[@]}" --csv "$LOGDIR/out_of_fold.csv")
ENS=("${MPI[@]}" "$PY" -m unet.evaluation.evaluate --model "${MODELS[@]}" --ensemble --data "$DATA"
     --metrics "$METRICS" "${SCORE[@]}" --csv "$LOGDIR/ensemble.csv")
if ((DRY)); then
  for ((k = 0; k < K; k++)); do train_cmd "$k"; printf '%q ' "${TRAIN[@]}"; echo; done
  printf '%q ' "${OOF[@]}"; echo "| tee $(printf '%q' "$LOGDIR/out_of_fold.txt")"
  if ((NVAL > 0)); then printf '%q ' "${ENS[@]}"; echo "| tee $(printf '%q' "$LOGDIR/ensemble.txt")"; fi
  exit 0
fi
[[ $(id -u) -eq 0 ]] && export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"
mkdir -p "$LOGDIR"
t0=$(date +%s)
for ((k = 0; k < K; k++)); do
  if [[ -f "$LOGDIR/fold_$k/model.json" ]]; then
    # done, if it is this fold of this file
    "$PY" - "$LOGDIR/fold_$k/model.json" "$k" "$DATA" <<'EOF' || exit 2
import json, os, sys
path, k, data = sys.argv[1], int(sys.argv[2]), os.path.abspath(sys.argv[3])
d = json.load(open(path)).get("data", {})
if (d.get("fold"), d.get("file")) != (k, data):
    sys.exit(f"crossval.sh: error: {path}: trained on fold {d.get('fold')} of {d.get('file')}, not fold {k} "
             f"of {data}: give another --logdir")
EOF
    echo "==> fold $k of $K: done ($LOGDIR/fold_$k/model.json; remove it to train the fold further)"
    continue
  fi
  echo "==> fold $k of $K: training on the other folds, validating on fold $k, $NP ranks"
  train_cmd "$k"; "${TRAIN[@]}"
done
echo "crossval: $K folds trained in $(( $(date +%s) - t0 )) s, models in $LOGDIR/fold_0 .. fold_$((K - 1))"
echo "==> out of fold: every training case scored by the model that did not train on it"
"${OOF[@]}" | tee "$LOGDIR/out_of_fold.txt"
if ((NVAL > 0)); then
  echo "==> ensemble of the $K models on the validation cases (no fold holds them)"
  "${ENS[@]}" | tee "$LOGDIR/ensemble.txt"
fi
