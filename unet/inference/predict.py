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
import json
import os
import sys

import numpy as np

from unet.inference import engines as E
from unet.data import labels as L
from unet.data import preprocess as P
from unet.data.nifti import DataError, Options, read_case
from unet.data.layouts import Case, LayoutError, case_from_files, find_cases
from unet.inference.postprocess import PostError, PostOptions, add_flags, options_from_args, postprocess

LABEL_SETS = ("brats", "brats2023", "msd")
FILE_ENGINE = {".keras": "tensorflow", ".xml": "openvino", ".onnx": "onnxruntime"}


class ModelError(Exception):
    """The model or its metadata cannot be used (one-line message naming the file)."""


class Predictor:
    """A trained network behind one inference engine (``unet.inference.engines``), with the preprocessing its
    model.json records and the same pre- and post-processing whatever the engine."""

    def __init__(self, model_path: str, batch_size: int = 16, engine: str | None = None, threads: int = 0,
                 int8: bool = False):
        folder = model_path if os.path.isdir(model_path) else os.path.dirname(model_path) or "."
        # a file names its engine (model.xml -> openvino, ...) unless --engine says otherwise
        named = None if os.path.isdir(model_path) else FILE_ENGINE.get(os.path.splitext(model_path)[1])
        meta_path = os.path.join(folder, "model.json")
        for p in ([] if os.path.isdir(model_path) else [model_path]) + [meta_path]:
            if not os.path.isfile(p):
                raise ModelError(f"--model: {p}: no such file")
        try:
            with open(meta_path) as f:
                self.meta = json.load(f)
            d = self.meta["data"]
            self.modalities = tuple(d["modalities"])
            self.regions = tuple(d["region_names"])
            self.size = int(d["height"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ModelError(f"{meta_path}: not a model description from train_hvd.py ({type(e).__name__}: {e})") \
                from None
        # the preprocessing the training file was made with, never a default
        attrs = d.get("attrs") or {}
        for key, known in (("normalisation", (P.NORMALISATION,)), ("inplane", P.INPLANE_MODES)):
            if key not in attrs:
                raise ModelError(f"{meta_path}: data.attrs.{key} missing (the training data's preprocessing "
                                 f"is unknown; unet-predict needs a model trained on a unet-convert HDF5 file)")
            if attrs[key] not in known:
                raise ModelError(f"{meta_path}: data.attrs.{key} {attrs[key]!r} is not implemented "
                                 f"(known: {', '.join(map(repr, known))})")
        self.normalisation, self.inplane = attrs["normalisation"], attrs["inplane"]
        self.crop_margin = P.CROP_MARGIN
        if self.inplane == "crop_resize":   # the head box's margin, as the file was converted
            margin = attrs.get("crop_margin")
            if not isinstance(margin, int) or isinstance(margin, bool) or margin < 0:
                raise ModelError(f"{meta_path}: data.attrs.crop_margin {margin!r}: crop_resize needs the head "
                                 f"box's margin in voxels, an integer >= 0 (unet-convert records it)")
            self.crop_margin = margin
        # --model naming the int8 IR itself is --int8
        int8 = int8 or (named == "openvino" and os.path.abspath(model_path) ==
                        os.path.abspath(E.model_file("openvino", folder, self.meta, int8=True)))
        # the int8 IR (the folder's, whatever file --model names) only when asked for: it runs on OpenVINO
        self.engine = engine or ("openvino" if int8 else named or E.default_engine(folder, self.meta))
        # what is missing is said now, before any case is read
        given = model_path if named == self.engine and not int8 else None
        self.model_path = E.check(self.engine, folder, self.meta, given, int8=int8)
        self.int8 = int8
        self.folder, self.batch_size, self.threads, self._model = folder, batch_size, threads, None

    @property
    def model(self):
        """The engine instance: called on a batch of slices, returns their probabilities."""
        if self._model is None:
            from unet.distributed.ranks import inference_threads
            self._model = E.CLASSES[self.engine](self.model_path, self.threads or inference_threads())
        return self._model

    def network_input(self, chans: np.ndarray) -> P.NetworkInput:
        """(C,z,y,x) raw intensities -> what the model sees: the training file's preprocessing."""
        return P.network_input(chans, self.size, self.inplane, self.normalisation, self.crop_margin)

    def _forward(self, slices: np.ndarray) -> np.ndarray:
        return np.concatenate([np.asarray(self.model(slices[i:i + self.batch_size], training=False))
                               for i in range(0, len(slices), self.batch_size)])

    def network_output(self, slices: np.ndarray, tta: bool = False) -> np.ndarray:
        """(z, size, size, C) input slices -> (z, size, size, R) probabilities; with ``tta`` the mean
        over the slices and their mirror images (left-right, up-down, both), each flipped back."""
        if not tta:
            return self._forward(slices)
        flips = ((), (2,), (1,), (1, 2))     # axes of (z, y, x, C) to mirror
        total = np.zeros(slices.shape[:3] + (len(self.regions),), np.float32)
        for axes in flips:
            x = np.flip(slices, axes) if axes else slices
            out = self._forward(np.ascontiguousarray(x))
            total += np.flip(out, axes) if axes else out
        return total / len(flips)

    def probabilities(self, chans: np.ndarray, tta: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(C,z,y,x) raw intensities -> ((z,y,x,R) probabilities on the input grid, (z,y,x) head mask)."""
        inp = self.network_input(chans)
        return P.to_case_grid(self.network_output(inp.slices, tta), inp), inp.brain

    def regions_mask(self, chans: np.ndarray, spacing, post: PostOptions = PostOptions()) -> np.ndarray:
        """(C,z,y,x) raw intensities -> (z,y,x,R) nested uint8 region masks after post-processing;
        ``spacing`` is the voxel size (mm) along (z, y, x)."""
        probs, brain = self.probabilities(chans, post.tta)
        return postprocess(probs, brain, self.regions, spacing, post)

    def label_map(self, masks: np.ndarray, labels: str) -> np.ndarray:
        if self.regions == L.REGIONS:
            return L.labels_from_regions(masks, labels)
        return masks[..., 0].astype(np.uint8)   # single-region model: 1 = that region

    def read(self, case: Case):
        opts = Options(self.modalities, L.REGIONS, self.size, self.inplane, "all", 0.0, 0)
        return read_case(case, opts, need_seg=False)


def reference_image(case: Case):
    """A 3-D SimpleITK image carrying the case's geometry (for writing predictions)."""
    import SimpleITK as sitk
    path = case.files.get("image") or next(iter(case.files.values()))
    img = sitk.ReadImage(path)
    if img.GetDimension() == 4:
        size = list(img.GetSize())
        img = sitk.Extract(img, size[:3] + [0], [0, 0, 0, 0])
    return img


def write_labels(labels: np.ndarray, ref, path: str) -> None:
    import SimpleITK as sitk
    img = sitk.GetImageFromArray(labels.astype(np.uint8))
    img.CopyInformation(ref)
    tmp = path + ".tmp.nii.gz"
    sitk.WriteImage(img, tmp, True)
    os.replace(tmp, path)


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
    try:
        post = options_from_args(a)
        bad = E.flag_error(a) or (None if a.benchmark or a.out else "--out is required (or --benchmark)") \
            or (f"--repeats must be >= 1 (got {a.repeats})" if a.repeats < 1 else None)
        if bad:
            raise PostError(bad)
    except PostError as e:
        print(f"unet-predict: error: {e}", file=sys.stderr)
        return 2
    try:
        cases = _cases(a.case)
        if not cases:
            raise LayoutError(f"--case {' '.join(a.case)}: no case found")
        if a.benchmark:
            from unet.inference.benchmark import run as benchmark
            return benchmark(a.model, cases, post, threads=a.num_threads, repeats=a.repeats,
                             engines=[a.engine] if a.engine else None, eager=a.eager, int8=a.int8)
        pred = Predictor(a.model, engine=a.engine, threads=a.num_threads, int8=a.int8)
    except (LayoutError, ModelError, E.EngineError, DataError) as e:
        print(f"unet-predict: error: {e}", file=sys.stderr)
        return 2
    print(f"unet-predict: engine {pred.engine}{' int8' if pred.int8 else ''} ({pred.model_path})", flush=True)
    if pred.int8:
        print(f"unet-predict: {E.int8_cost_line(pred.meta)}", flush=True)
    many = len(cases) > 1 or os.path.isdir(a.out) or not a.out.endswith((".nii", ".nii.gz"))
    os.makedirs(a.out if many else os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    if a.png:
        os.makedirs(a.png, exist_ok=True)
    for case in cases:
        try:
            chans, seg, _ = pred.read(case)
        except DataError as e:
            print(f"unet-predict: error: {e}", file=sys.stderr)
            return 1
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
