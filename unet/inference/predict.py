"""unet-predict: segment cases with a trained model and write label maps as NIfTI.

    unet-predict --model LOGDIR_OR_MODEL.keras --case CASE_DIR --out seg.nii.gz
    unet-predict --model LOGDIR --case X_flair.nii.gz X_t1.nii.gz X_t1ce.nii.gz X_t2.nii.gz --out seg.nii.gz
    unet-predict --model LOGDIR --case DATASET_ROOT --out OUT_DIR      # every case found
    unet-predict --model LOGDIR --engine openvino|onnxruntime|tensorflow --case ... --out ...
    unet-predict --model LOGDIR --int8 --case ... --out ...            # the NNCF-quantised OpenVINO IR
    unet-predict --model LOGDIR --case DATASET_ROOT --benchmark        # every engine, timed

The preprocessing (modalities and their order, z-score over brain voxels,
in-plane size and crop/resize/crop_resize with its margin) is read from the model's ``model.json``, written
at training time from the data file's metadata; nothing is re-typed. Every axial
slice is predicted (with ``--tta``, mirrored too), the in-plane step undone, and the
probabilities post-processed (``unet.inference.postprocess``: head mask, threshold, nesting,
whole-tumour clean-up, the small-ET rule) into regions, then the dataset's labels
(BraTS 1/2/4 by default) on the input's grid, spacing, origin and direction. The network
runs in one of the inference engines (``unet.inference.engines``); all the rest is the same for each.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from unet.cli import command
from unet.data import labels as L
from unet.data.layouts import Case, LayoutError, case_from_files, find_cases
from unet.errors import UsageError
from unet.inference import engines as E
from unet.inference.benchmark import run as benchmark
from unet.inference.postprocess import add_flags, options_from_args
from unet.inference.predictor import Predictor, reference_image, write_labels

LABEL_SETS = ("brats", "brats2023", "msd")


def write_png(path: str, flair: np.ndarray, pred: np.ndarray, ref: np.ndarray | None, k: int = 3) -> None:
    """Slices with the most tumour: FLAIR | prediction overlay | reference overlay (if any)."""
    import cv2
    source = ref if ref is not None else pred
    order = np.argsort(source[..., 0].reshape(len(source), -1).sum(1))[::-1][:k]
    colours = np.array([[0, 200, 0], [0, 200, 255], [0, 0, 255]], np.float32)  # BGR: WT green, TC yellow, ET red
    rows = []
    for z in sorted(order):
        f = flair[z].astype(np.float32)
        f = (255 * (f - f.min()) / max(float(np.ptp(f)), 1e-6)).astype(np.uint8)
        gray = cv2.cvtColor(f, cv2.COLOR_GRAY2BGR).astype(np.float32)
        tiles = [gray]
        for m in ([pred] + ([ref] if ref is not None else [])):
            t = gray.copy()
            for r in range(min(m.shape[-1], 3)):
                sel = m[z, ..., r].astype(bool)
                t[sel] = 0.45 * t[sel] + 0.55 * colours[r]
            tiles.append(t)
        rows.append(np.concatenate(tiles, 1))
    cv2.imwrite(path, np.concatenate(rows, 0).astype(np.uint8))


def _cases(paths: list[str]) -> list[Case]:
    """A case folder, a dataset root, an MSD 4-D image, or the files of one case (matched by suffix)."""
    if len(paths) == 1 and os.path.isdir(paths[0]):
        return find_cases(paths[0])
    for p in paths:
        if os.path.isdir(p):
            raise LayoutError(f"--case {p}: a folder among several paths (one folder, or the files of one case)")
        if not os.path.isfile(p):
            raise LayoutError(f"--case {p}: no such file or folder")
    if len(paths) == 1:
        try:
            return [case_from_files(paths)]
        except LayoutError:                       # not a per-modality file: an MSD 4-D image
            cid = os.path.basename(paths[0]).split(".nii")[0]
            return [Case(cid, "msd", {"image": paths[0]}, None)]
    return [case_from_files(paths)]


@command("unet-predict")
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="unet-predict", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", required=True, help="training logdir or its model.keras (model.json beside it)")
    ap.add_argument("--case", required=True, nargs="+",
                    help="a case folder, the modality files of one case (any layout, told apart by suffix; "
                         "a segmentation among them is drawn in --png), an MSD 4-D image, or a dataset root "
                         "(batch mode)")
    ap.add_argument("--out", help="output .nii.gz for one case, or a folder for several (not with --benchmark)")
    ap.add_argument("--labels", choices=LABEL_SETS, default="brats",
                    help="label convention written: brats 1/2/4, brats2023 1/2/3, msd 2/1/3 (core/edema/enh.)")
    ap.add_argument("--png", default=None, help="folder for one overview picture per case")
    E.add_flags(ap)
    ap.add_argument("--benchmark", action="store_true",
                    help="write nothing: run every engine that can run the model on the cases, interleaved, and "
                         "print slices/s, per-case latency p50/p90, the ratio to TensorFlow and the share of "
                         "the CPU's fp32 peak for each (with --int8 the int8 IR as one more row)")
    ap.add_argument("--repeats", type=int, default=3, help="--benchmark: rounds over the cases")
    ap.add_argument("--eager", action="store_true",
                    help="--benchmark: add a row tf-eager, the Keras model called eagerly (no tf.function)")
    add_flags(ap)
    a = ap.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    post = options_from_args(a)
    bad = E.flag_error(a) or (None if a.benchmark or a.out else "--out is required (or --benchmark)") \
        or (f"--repeats must be >= 1 (got {a.repeats})" if a.repeats < 1 else None)
    if bad:
        raise UsageError(bad)
    cases = _cases(a.case)
    if not cases:
        raise LayoutError(f"--case {' '.join(a.case)}: no case found")
    if a.benchmark:
        return benchmark(a.model, cases, post, threads=a.num_threads, repeats=a.repeats,
                         engines=[a.engine] if a.engine else None, eager=a.eager, int8=a.int8)
    pred = Predictor(a.model, engine=a.engine, threads=a.num_threads, int8=a.int8)
    print(f"unet-predict: engine {pred.engine}{' int8' if pred.int8 else ''} ({pred.model_path})", flush=True)
    if pred.int8:
        print(f"unet-predict: {E.int8_cost_line(pred.meta)}", flush=True)
    many = len(cases) > 1 or os.path.isdir(a.out) or not a.out.endswith((".nii", ".nii.gz"))
    os.makedirs(a.out if many else os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    if a.png:
        os.makedirs(a.png, exist_ok=True)
    for case in cases:
        chans, seg, _ = pred.read(case)
        ref_img = reference_image(case)
        masks = pred.regions_mask(chans, ref_img.GetSpacing()[::-1], post)
        labels = pred.label_map(masks, a.labels)
        out = os.path.join(a.out, f"{case.case_id}.nii.gz") if many else a.out
        write_labels(labels, ref_img, out)
        if a.png:  # the picture shows what was written: regions read back from the label map
            shown = L.regions_from_labels(labels, a.labels) if pred.regions == L.REGIONS else masks
            ref = L.regions_from_labels(seg, case.layout, pred.regions) if seg is not None else None
            write_png(os.path.join(a.png, f"{case.case_id}.png"), chans[0], shown, ref)
        print(f"unet-predict: {case.case_id} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
