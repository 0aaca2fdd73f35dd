"""unet-predict: segment cases with a trained model and write label maps as NIfTI.

    unet-predict --model LOGDIR_OR_MODEL.keras --case CASE_DIR --out seg.nii.gz
    unet-predict --model LOGDIR --case DATASET_ROOT --out OUT_DIR      # every case found

The preprocessing (modalities and their order, z-score over brain voxels,
in-plane size and crop/resize) is read from the model's ``model.json``, written
at training time from the data file's metadata; nothing is re-typed. Every axial
slice is predicted, the in-plane step undone, probabilities thresholded at 0.5,
and the regions turned into the dataset's labels (BraTS 1/2/4 by default) on the
input's grid, spacing, origin and direction.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from unet.data import labels as L
from unet.data import preprocess as P
from unet.data.nifti import DataError, Options, read_case
from unet.data.layouts import Case, LayoutError, find_cases

LABEL_SETS = ("brats", "brats2023", "msd")


class Predictor:
    def __init__(self, model_path: str, batch_size: int = 16):
        if os.path.isdir(model_path):
            model_path = os.path.join(model_path, "model.keras")
        meta_path = os.path.join(os.path.dirname(model_path), "model.json")
        for p in (model_path, meta_path):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"--model: {p}: no such file")
        with open(meta_path) as f:
            self.meta = json.load(f)
        d = self.meta["data"]
        self.modalities = tuple(d["modalities"])
        self.regions = tuple(d["region_names"])
        self.size = int(d["height"])
        self.inplane = d.get("attrs", {}).get("inplane", "resize")
        import keras
        self.model = keras.saving.load_model(model_path, compile=False)
        self.batch_size = batch_size

    def probabilities(self, chans: np.ndarray) -> np.ndarray:
        """(C,z,y,x) raw intensities -> (z,y,x,R) probabilities on the input grid."""
        brain = P.brain_mask(chans)
        norm = np.stack([P.zscore(v, brain) for v in chans])
        plan = P.inplane_plan(norm.shape[2:], self.size, self.inplane)
        slices = np.stack([P.apply_inplane(np.moveaxis(norm[:, z], 0, -1), plan, is_mask=False)
                           for z in range(norm.shape[1])]).astype(np.float32)
        out = np.concatenate([np.asarray(self.model(slices[i:i + self.batch_size], training=False))
                              for i in range(0, len(slices), self.batch_size)])
        probs = np.stack([P.undo_inplane(out[z], plan, is_mask=False) for z in range(len(out))])
        probs[~brain] = 0.0
        return probs

    def regions_mask(self, chans: np.ndarray) -> np.ndarray:
        return (self.probabilities(chans) > 0.5).astype(np.uint8)

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


def _cases(path: str) -> list[Case]:
    """A case folder, a 4-D MSD image file, or a dataset root."""
    if os.path.isfile(path):
        cid = os.path.basename(path).split(".nii")[0]
        return [Case(cid, "msd", {"image": path}, None)]
    return find_cases(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="unet-predict", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", required=True, help="training logdir or its model.keras (model.json beside it)")
    ap.add_argument("--case", required=True, help="a case folder, an MSD 4-D image, or a dataset root (batch mode)")
    ap.add_argument("--out", required=True, help="output .nii.gz for one case, or a folder for several")
    ap.add_argument("--labels", choices=LABEL_SETS, default="brats",
                    help="label convention written: brats 1/2/4, brats2023 1/2/3, msd 2/1/3 (core/edema/enh.)")
    ap.add_argument("--png", default=None, help="folder for one overview picture per case")
    a = ap.parse_args(argv)
    try:
        cases = _cases(a.case)
        if not cases:
            raise LayoutError(f"--case {a.case}: no case found")
        pred = Predictor(a.model)
    except (LayoutError, FileNotFoundError, KeyError, json.JSONDecodeError) as e:
        print(f"unet-predict: error: {e}", file=sys.stderr)
        return 2
    many = len(cases) > 1 or os.path.isdir(a.out) or not a.out.endswith((".nii", ".nii.gz"))
    if many:
        os.makedirs(a.out, exist_ok=True)
    if a.png:
        os.makedirs(a.png, exist_ok=True)
    for case in cases:
        try:
            chans, seg, _ = pred.read(case)
        except DataError as e:
            print(f"unet-predict: error: {e}", file=sys.stderr)
            return 1
        masks = pred.regions_mask(chans)
        out = os.path.join(a.out, f"{case.case_id}.nii.gz") if many else a.out
        write_labels(pred.label_map(masks, a.labels), reference_image(case), out)
        if a.png:
            ref = L.regions_from_labels(seg, case.layout, pred.regions) if seg is not None else None
            write_png(os.path.join(a.png, f"{case.case_id}.png"), chans[0], masks, ref)
        print(f"unet-predict: {case.case_id} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
