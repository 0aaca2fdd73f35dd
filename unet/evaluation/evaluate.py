"""unet-evaluate: per-case BraTS scores: volume-level (legacy) and lesion-wise (leaderboard) metrics.

    unet-evaluate --pred_dir P --ref_dir R [--labels brats|brats2023|msd] [--csv out.csv]
    mpirun -np 2 unet-evaluate --model LOGDIR --data data.h5 [--engine E] [--csv out.csv] [--pred_dir OUT]

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
"""
from __future__ import annotations

import argparse
import csv
import os
import sys

import numpy as np

from unet.data import labels as L
from unet.data.layouts import LayoutError, detect_layout, find_cases
from unet.cli import command
from unet.distributed.ranks import agree, inference_threads, world
from unet.inference.engines import add_flags as add_engine_flags
from unet.inference.engines import flag_error as engine_flag_error
from unet.inference.engines import int8_cost_line
from unet.evaluation.lesionwise import REGIONS as LW_REGIONS
from unet.evaluation.lesionwise import SUMMARY as LW_SUMMARY
from unet.evaluation.lesionwise import columns as lw_columns
from unet.evaluation.lesionwise import region_means, score_lesionwise
from unet.metrics import score_regions, summarise
from unet.inference.postprocess import add_flags, options_from_args
from unet.data.sources import validation_cases
from unet.errors import UsageError

GEOMETRY_TOL = 1e-3


class EvalError(UsageError):
    """Predictions or references that cannot be scored, or flags that do not go together (one line)."""


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
    cols = csv_columns(metrics)
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
        print(f"volume-level scores over {len(rows)} case(s):")
        if rows:
            s = summarise(rows, columns())
            print(f"{'metric':<10}{'mean':>10}{'std':>10}{'median':>10}{'p25':>10}{'p75':>10}")
            for c in columns():
                v = s[c]
                print(f"{c:<10}{v['mean']:>10.4f}{v['std']:>10.4f}{v['median']:>10.4f}{v['p25']:>10.4f}{v['p75']:>10.4f}")
    if metrics != "legacy":
        print(f"lesion-wise scores over {len(rows)} case(s) (brats-evaluation's definitions; mean over "
              f"cases, leaving out NaN: a region in neither volume):")
        if rows:
            print(f"{'metric':<22}" + "".join(f"{r:>10}" for r in LW_REGIONS))
            for m in LW_SUMMARY:
                print(f"{m:<22}" + "".join(f"{v:>10.4f}" for v in region_means(rows, m)))


def evaluate_folders(a) -> int:
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


def evaluate_model(a, post) -> int:
    """Predict the validation cases of --data with --model and score them (sharded over MPI ranks)."""
    from unet.inference.predictor import Predictor, reference_image, write_labels
    comm = world()
    rank, size = (comm.Get_rank(), comm.Get_size()) if comm else (0, 1)
    # each rank its own engine, with its share of the cores (collective: before anything can fail)
    threads = a.num_threads or inference_threads(comm)
    rows, error = [], None
    try:  # every rank gets here, so errors are agreed on below instead of leaving a rank waiting
        cases = validation_cases(a.data)
        pred = Predictor(a.model, engine=a.engine, threads=threads, int8=a.int8)
        sys.stdout.write(f"rank {rank} engine {pred.engine}{' int8' if a.int8 else ''} threads {threads} "
                         f"({pred.model_path})\n")
        if a.int8 and rank == 0:
            sys.stdout.write(f"{int8_cost_line(pred.meta)}\n")
        sys.stdout.flush()
        for case in cases[rank::size]:
            chans, seg, _ = pred.read(case)
            img = reference_image(case)
            masks = pred.regions_mask(chans, img.GetSpacing()[::-1], post)
            ref = L.regions_from_labels(seg, case.layout, pred.regions)
            rows.append(score_case(case.case_id, _full(masks, pred.regions), _full(ref, pred.regions),
                                   img.GetSpacing()[::-1], case.layout, a.metrics))
            if a.pred_dir:
                os.makedirs(a.pred_dir, exist_ok=True)
                write_labels(pred.label_map(masks, a.labels), img,
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
        _tensorboard(a.model, rows, a.metrics)
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
    ap.add_argument("--model", help="training logdir or model.keras: score it on --data's validation cases")
    ap.add_argument("--data", help="HDF5 file from unet-convert (its validation cases and source folder)")
    ap.add_argument("--csv", help="write one row per case here")
    add_engine_flags(ap)
    ap.add_argument("--metrics", choices=METRICS, default="all",
                    help="legacy: volume-level Dice/HD95/sensitivity/specificity (BraTS 2017-22); lesionwise: "
                         "the official brats-evaluation figures (lesion detection, lesion-wise and global "
                         "Dice/HD95/NSD; seconds per 240x240x155 case: 8.6 s with four tumours); all: both")
    add_flags(ap)
    a = ap.parse_args(argv)
    if a.model or a.data:
        if not (a.model and a.data):
            raise EvalError("--model and --data go together")
        post = options_from_args(a)     # every rank finds the same bad value; rank 0 says so
        if engine_flag_error(a):
            raise UsageError(engine_flag_error(a))
        return evaluate_model(a, post)
    if not (a.pred_dir and a.ref_dir):
        raise EvalError("give --pred_dir and --ref_dir, or --model and --data")
    return evaluate_folders(a)


if __name__ == "__main__":
    sys.exit(main())
