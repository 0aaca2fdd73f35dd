"""unet-evaluate: per-case BraTS scores: volume-level (legacy) and lesion-wise (leaderboard) metrics.

    unet-evaluate --pred_dir P --ref_dir R [--labels brats|brats2023|msd] [--csv out.csv]
    mpirun -np 2 unet-evaluate --model LOGDIR --data data.h5 [--engine E] [--csv out.csv] [--pred_dir OUT]
    mpirun -np 2 unet-evaluate --model logs/fold_0 ... logs/fold_4 --data data.h5      # out-of-fold
    mpirun -np 2 unet-evaluate --model logs/fold_0 ... logs/fold_4 --ensemble --data data.h5 | --cases DIR

``--metrics legacy``: the BraTS 2017-22 figures, Dice / HD95 / sensitivity / specificity of WT,
TC and ET (``unet.metrics``); ``lesionwise``: the figures of the official brats-evaluation
package (lesion detection, lesion-wise and global Dice / HD95 / NSD of WT, TC, ET, NETC and
SNFH, ``unet.evaluation.lesionwise``); ``all`` (the default): both.

The first form scores any segmentations: ``<case>.nii.gz`` in P against
``<case>.nii.gz`` in R, or against the reference dataset root R in any layout
unet-convert reads. The second runs a trained model over the validation cases of
the HDF5 file (read back from their original NIfTI, geometry intact); under mpirun
the cases are shared among ranks, each rank runs its own inference engine (``unet.inference.engines``) with
its share of the cores, and rank 0 gathers, prints and writes.

Several models (``unet.evaluation.crossval``): models trained with ``train_hvd.py --fold k`` on a file
from ``unet-convert --folds K`` score out of fold, each training case by the model that held its
fold out (one model with a fold scores that fold's cases); ``--ensemble`` scores the file's
validation cases (those no fold holds), or every case under ``--cases``, with the mean of the
models' probabilities. The summary gives each metric's mean, standard deviation and 95 % bootstrap
interval of the mean over cases (``unet.evaluation.stats``), and out of fold the means per fold.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from dataclasses import dataclass

import numpy as np

from unet.cli import command
from unet.data import labels as L
from unet.data.layouts import LayoutError, detect_layout, find_cases
from unet.distributed.ranks import agree, inference_threads, world
from unet.errors import UsageError
from unet.evaluation.crossval import EvalError, model_fold, plan
from unet.evaluation.lesionwise import REGIONS as LW_REGIONS
from unet.evaluation.lesionwise import SUMMARY as LW_SUMMARY
from unet.evaluation.lesionwise import columns as lw_columns
from unet.evaluation.lesionwise import region_means, score_lesionwise
from unet.evaluation.stats import RESAMPLES, SEED, bootstrap_mean_ci, per_fold_means
from unet.inference.engines import add_flags as add_engine_flags
from unet.inference.engines import flag_error as engine_flag_error
from unet.inference.engines import int8_cost_line
from unet.inference.postprocess import PostOptions, add_flags, options_from_args
from unet.metrics import score_regions, summarise

GEOMETRY_TOL = 1e-3


METRICS = ("legacy", "lesionwise", "all")


def columns(regions=L.REGIONS) -> list[str]:
    """The legacy (volume-level) columns."""
    return [f"{m}_{r}" for m in ("dice", "hd95", "sens", "spec") for r in regions]


def csv_columns(metrics: str) -> list[str]:
    return (columns() if metrics != "lesionwise" else []) + (lw_columns() if metrics != "legacy" else [])


def score_case(case: str, pred_masks, ref_masks, spacing, layout: str, metrics: str) -> dict:
    """(..., 3) WT/TC/ET masks of one case, array axes in the order of ``spacing`` (mm); the
    lesion-wise metrics see them as label maps of convention ``layout``."""
    row = dict(case=case)
    if metrics != "lesionwise":
        row.update(score_regions(pred_masks, ref_masks, spacing, L.REGIONS))
    if metrics != "legacy":
        try:
            row.update(score_lesionwise(L.labels_from_regions(pred_masks, layout),
                                        L.labels_from_regions(ref_masks, layout), spacing, layout))
        except ValueError as e:   # panoptica's refusal of an input
            raise EvalError(f"case {case}: lesion-wise scoring failed: {e}") from None
    return row


def _read(path):
    import SimpleITK as sitk
    try:
        img = sitk.ReadImage(path)
    except RuntimeError:
        raise EvalError(f"{path}: cannot read") from None
    return img, sitk.GetArrayFromImage(img)


def same_geometry(a, b) -> str | None:
    if a.GetSize() != b.GetSize():
        return f"size {a.GetSize()} vs {b.GetSize()}"
    for name in ("GetSpacing", "GetOrigin", "GetDirection"):
        if not np.allclose(getattr(a, name)(), getattr(b, name)(), atol=GEOMETRY_TOL):
            return f"{name[3:].lower()} {getattr(a, name)()} vs {getattr(b, name)()}"
    return None


def score_files(case: str, pred_path: str, ref_path: str, pred_labels: str, ref_labels: str,
                metrics: str = "all") -> dict:
    pimg, parr = _read(pred_path)
    rimg, rarr = _read(ref_path)
    why = same_geometry(pimg, rimg)
    if why:
        raise EvalError(f"case {case}: {pred_path} and {ref_path} differ in {why}")
    for path, arr, labels, flag in ((pred_path, parr, pred_labels, "--labels"), (ref_path, rarr, ref_labels, None)):
        bad = L.unexpected_labels(arr, labels)
        if bad:
            what = f"{flag} {labels}" if flag else f"the {labels} convention"
            raise EvalError(f"case {case}: {path} has label values {bad} outside {what} "
                            f"({', '.join(map(str, L.VALID_LABELS[labels]))})")
    spacing = rimg.GetSpacing()[::-1]          # array axes are (z, y, x)
    return score_case(case, L.regions_from_labels(parr, pred_labels), L.regions_from_labels(rarr, ref_labels),
                      spacing, ref_labels, metrics)


def _nifti_by_case(folder: str) -> dict:
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.startswith("._"):
            continue
        for ext in (".nii.gz", ".nii"):
            if f.endswith(ext):
                out[f[: -len(ext)]] = os.path.join(folder, f)
    return out


def references(ref_dir: str, labels: str) -> tuple[dict, str]:
    """case -> reference path, and the label convention of the references."""
    try:
        layout = detect_layout(ref_dir)
        return {c.case_id: c.seg for c in find_cases(ref_dir, layout) if c.seg}, layout
    except LayoutError:
        return _nifti_by_case(ref_dir), labels


def _cell(v):
    return f"{v:.6f}" if isinstance(v, float) else v


def report(rows: list[dict], csv_path: str | None, only_pred=(), only_ref=(), metrics: str = "all") -> None:
    cols = (["fold"] if any(r.get("fold") is not None for r in rows) else []) + csv_columns(metrics)
    if csv_path:
        tmp = csv_path + ".tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["case"] + cols)
            w.writeheader()
            for r in rows:
                w.writerow({k: _cell(r[k]) for k in ["case"] + cols})
        os.replace(tmp, csv_path)
        print(f"per-case scores: {csv_path}")
    for name, missing in (("predictions only", only_pred), ("reference only", only_ref)):
        if missing:
            print(f"not scored, in {name}: {', '.join(sorted(missing))}")
    # the summaries come last, the lesion-wise one (the leaderboard's) at the very end
    if metrics != "lesionwise":
        volume_summary(rows)
    if metrics != "legacy":
        print(f"lesion-wise scores over {len(rows)} case(s) (brats-evaluation's definitions; mean over "
              f"cases, leaving out NaN: a region in neither volume):")
        if rows:
            print(f"{'metric':<22}" + "".join(f"{r:>10}" for r in LW_REGIONS))
            for m in LW_SUMMARY:
                print(f"{m:<22}" + "".join(f"{v:>10.4f}" for v in region_means(rows, m)))


def volume_summary(rows: list[dict]) -> None:
    """The volume-level table (mean, std, 95 % bootstrap interval of the mean, quartiles) and, when
    the rows carry folds, the means per fold."""
    print(f"volume-level scores over {len(rows)} case(s) (std over cases, ddof 0; ci95: percentile bootstrap "
          f"of the mean over cases, {RESAMPLES} resamples, seed {SEED}):")
    if not rows:
        return
    s = summarise(rows, columns())
    heads = ("mean", "std", "ci95_lo", "ci95_hi", "median", "p25", "p75")
    print(f"{'metric':<10}" + "".join(f"{h:>10}" for h in heads))
    for c in columns():
        v = s[c]
        v["ci95_lo"], v["ci95_hi"] = bootstrap_mean_ci([r[c] for r in rows])
        print(f"{c:<10}" + "".join(f"{v[h]:>10.4f}" for h in heads))
    folds = per_fold_means(rows, columns()[:6])
    if folds:
        print("per-fold means (each case scored by the model that did not train on it):")
        print(f"{'fold':<6}{'cases':>6}" + "".join(f"{c:>10}" for c in columns()[:6]))
        for k, v in folds.items():
            print(f"{k:<6}{v['n']:>6}" + "".join(f"{v[c]:>10.4f}" for c in columns()[:6]))


@dataclass(frozen=True)
class EvalOptions:
    """unet-evaluate's flags past the command line (``from_flags``); the post-processing ones are PostOptions."""
    model: tuple[str, ...] = ()       # training logdirs or model.keras files
    data: str | None = None           # the unet-convert file: its validation cases, folds and source folder
    cases: str | None = None          # a dataset root to score instead of --data's validation cases
    ensemble: bool = False
    pred_dir: str | None = None       # with models: where predictions go; without: the predictions to score
    ref_dir: str | None = None
    labels: str = "brats"
    csv: str | None = None
    metrics: str = "all"
    engine: str | None = None
    int8: bool = False
    num_threads: int = 0

    @classmethod
    def from_flags(cls, a) -> "EvalOptions":
        kw = {k: getattr(a, k) for k in cls.__dataclass_fields__}
        return cls(**dict(kw, model=tuple(a.model or ())))


def evaluate_folders(a: EvalOptions) -> int:
    if not os.path.isdir(a.pred_dir):
        raise EvalError(f"--pred_dir {a.pred_dir}: not a folder")
    if not os.path.isdir(a.ref_dir):
        raise EvalError(f"--ref_dir {a.ref_dir}: not a folder")
    preds = _nifti_by_case(a.pred_dir)
    refs, ref_labels = references(a.ref_dir, a.labels)
    both = sorted(set(preds) & set(refs))
    rows = [score_files(c, preds[c], refs[c], a.labels, ref_labels, a.metrics) for c in both]
    report(rows, a.csv, set(preds) - set(refs), set(refs) - set(preds), a.metrics)
    return 0


def plan_line(a: EvalOptions, work: list[tuple]) -> str:
    """What is scored with what, in one line."""
    folds = sorted({f for _, _, f in work if f is not None})
    where = f"--cases {a.cases}" if a.cases else f"the validation cases of {a.data}"
    if folds:
        return (f"out of fold: {len(work)} training case(s) of {a.data}, each scored by the model of its fold "
                f"(folds {','.join(map(str, folds))})")
    if len(a.model) > 1:
        return f"ensemble: the mean of {len(a.model)} models' probabilities on {len(work)} case(s), {where}"
    return f"{len(work)} case(s): {where}"


def evaluate_model(a: EvalOptions, post: PostOptions) -> int:
    """Predict the cases the models score and score them (sharded over MPI ranks)."""
    from unet.inference.predictor import Predictor, reference_image, write_labels
    comm = world()
    rank, size = (comm.Get_rank(), comm.Get_size()) if comm else (0, 1)
    # each rank its own engine, with its share of the cores (collective: before anything can fail)
    threads = a.num_threads or inference_threads(comm)
    rows, error = [], None
    try:  # every rank gets here, so errors are agreed on below instead of leaving a rank waiting
        preds = [Predictor(m, engine=a.engine, threads=threads, int8=a.int8) for m in a.model]
        work = plan(a, preds)
        if rank == 0:
            sys.stdout.write(plan_line(a, work) + "\n")
        for pred in preds:
            sys.stdout.write(f"rank {rank} engine {pred.engine}{' int8' if a.int8 else ''} threads {threads} "
                             f"({pred.model_path})\n")
        if a.int8 and rank == 0:
            sys.stdout.write("".join(f"{int8_cost_line(p.meta)}\n" for p in preds))
        sys.stdout.flush()
        for case, runner, fold in work[rank::size]:
            chans, seg, _ = runner.read(case)
            if seg is None:
                raise EvalError(f"case {case.case_id}: no segmentation to score against")
            img = reference_image(case)
            masks = runner.regions_mask(chans, img.GetSpacing()[::-1], post)
            ref = L.regions_from_labels(seg, case.layout, runner.regions)
            rows.append(dict(score_case(case.case_id, _full(masks, runner.regions), _full(ref, runner.regions),
                                        img.GetSpacing()[::-1], case.layout, a.metrics),
                             **({} if fold is None else {"fold": fold})))
            if a.pred_dir:
                os.makedirs(a.pred_dir, exist_ok=True)
                write_labels(runner.label_map(masks, a.labels), img,
                             os.path.join(a.pred_dir, f"{case.case_id}.nii.gz"))
    except UsageError as e:
        error = str(e)
    error = agree(comm, error)   # the first error any rank found, on every rank: all exit together
    if error:
        raise UsageError(error)
    # one write per line: print() writes the text and its newline separately, and mpirun may put
    # another rank's output between the two
    sys.stdout.write(f"rank {rank} scored {len(rows)} case(s): {', '.join(r['case'] for r in rows)}\n")
    sys.stdout.flush()
    if comm:
        rows = sum(comm.gather(rows, root=0) or [], [])
    if rank == 0:
        rows.sort(key=lambda r: r["case"])
        report(rows, a.csv, metrics=a.metrics)
        if not a.ensemble:   # each model's logdir: the scores of the cases it scored
            for m, p in zip(a.model, preds):
                fold = model_fold(p.meta)[1]
                _tensorboard(m, [r for r in rows if r.get("fold") == fold], a.metrics)
    return 0


def _full(masks: np.ndarray, regions) -> np.ndarray:
    """(..., R) masks for the named regions -> (..., 3) WT/TC/ET (absent ones empty)."""
    out = np.zeros(masks.shape[:-1] + (3,), np.uint8)
    for k, r in enumerate(regions):
        if r in L.REGIONS:
            out[..., L.REGIONS.index(r)] = masks[..., k]
    return out


def _tensorboard(model: str, rows: list[dict], metrics: str = "all") -> None:
    logdir = model if os.path.isdir(model) else os.path.dirname(model)
    import tensorflow as tf
    with tf.summary.create_file_writer(os.path.join(logdir, "evaluation")).as_default(step=0):
        if metrics != "lesionwise":
            for c in columns():
                tf.summary.scalar(f"volume_{c}", float(np.mean([r[c] for r in rows])) if rows else 0.0)
        if metrics != "legacy" and rows:
            for m in LW_SUMMARY:
                for region, v in zip(LW_REGIONS, region_means(rows, m)):
                    if not np.isnan(v):     # a region no case has: nothing to plot
                        tf.summary.scalar(f"{m}_{region.lower()}", v)


@command("unet-evaluate")
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="unet-evaluate", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--pred_dir", help="predicted <case>.nii.gz files (with --model: where to write them)")
    ap.add_argument("--ref_dir", help="reference <case>.nii.gz files, or a dataset root in any layout")
    ap.add_argument("--labels", choices=("brats", "brats2023", "msd"), default="brats",
                    help="label convention of the predictions (and of flat reference folders)")
    ap.add_argument("--model", nargs="+",
                    help="training logdir(s) or model.keras: one model scores --data's validation cases (a model "
                         "trained with --fold k: fold k's cases); several, trained with --fold, score out of fold")
    ap.add_argument("--data", help="HDF5 file from unet-convert (its validation cases, folds and source folder)")
    ap.add_argument("--ensemble", action="store_true",
                    help="score with the mean of the --model models' probabilities (then post-processing as for one "
                         "model): --data's validation cases (those no fold holds), or --cases")
    ap.add_argument("--cases", help="with --model: score every case (with a segmentation) under this dataset root "
                                    "instead of --data's validation cases (not out of fold)")
    ap.add_argument("--csv", help="write one row per case here")
    add_engine_flags(ap)
    ap.add_argument("--metrics", choices=METRICS, default="all",
                    help="legacy: volume-level Dice/HD95/sensitivity/specificity (BraTS 2017-22); lesionwise: "
                         "the official brats-evaluation figures (lesion detection, lesion-wise and global "
                         "Dice/HD95/NSD; seconds per 240x240x155 case: 8.6 s with four tumours); all: both")
    add_flags(ap)
    a = ap.parse_args(argv)
    if a.model or a.data or a.ensemble or a.cases:
        if not a.model:
            raise EvalError("--data, --ensemble and --cases score trained models: give --model")
        if not (a.data or a.cases):
            raise EvalError("--model needs --data (the unet-convert file) or --cases (a dataset root)")
        post = options_from_args(a)     # every rank finds the same bad value; rank 0 says so
        if engine_flag_error(a):
            raise UsageError(engine_flag_error(a))
        return evaluate_model(EvalOptions.from_flags(a), post)
    if not (a.pred_dir and a.ref_dir):
        raise EvalError("give --pred_dir and --ref_dir, or --model and --data")
    return evaluate_folders(EvalOptions.from_flags(a))


if __name__ == "__main__":
    sys.exit(main())
