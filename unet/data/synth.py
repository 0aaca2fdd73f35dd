"""unet-synth: synthetic brain-tumour cases written in the real on-disk layouts.

    unet-synth --out DIR --cases 8 [--layout brats|brats2023|msd] [--seed 0] [--anatomy mni152|sphere]

Each case is 240x240x155 at 1 mm with the BraTS geometry, four modalities
(FLAIR, T1, T1ce, T2) and a segmentation (ET inside TC inside WT).

--anatomy mni152 (the default) builds each case on the ICBM152 2009 brain that
nilearn ships: a random affine and elastic deformation of its tissue maps, a
tumour grown in white matter (irregular core, necrosis inside an enhancing rim,
a quarter of the cases without enhancement, a fifth with two foci; oedema along
the white matter, stopped by the ventricles and the brain's edge) that pushes
the tissue around it outwards, and MRI contrast with partial volume, bias field,
blur and Rician noise (unet/data/mni152.py and the modules it names).

--anatomy sphere is the fast geometric phantom (for tests): an ellipsoid brain
with white matter, a grey-matter shell and two ventricles; the tumour an
irregular blob: edema around a core whose outer rim enhances and whose centre
is necrotic, of varying size, shape and position; a fifth of the cases have no
enhancing tumour. Contrast follows MRI: edema bright on FLAIR and T2, the
enhancing rim bright on T1ce, the necrotic core dark on T1ce, CSF dark on FLAIR.

Deterministic by --seed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from unet.cli import command
from unet.data import anatomy, mni152
from unet.data.layouts import MODALITIES, SUFFIXES
from unet.errors import UsageError

SHAPE = (155, 240, 240)            # (z, y, x) as SimpleITK arrays
ORIGIN = (0.0, -239.0, 0.0)        # the BraTS header in ITK's LPS convention
# tissue -> intensity per modality (FLAIR, T1, T1ce, T2), arbitrary units x 500 on disk
TISSUE = {
    "wm": (0.60, 1.00, 1.00, 0.55),
    "gm": (0.75, 0.70, 0.72, 0.80),
    "csf": (0.20, 0.25, 0.25, 1.50),
    "edema": (1.40, 0.60, 0.62, 1.30),
    "necrosis": (1.10, 0.35, 0.30, 1.50),
    "enhancing": (1.05, 0.75, 1.70, 0.95),
}
# canonical labels (BraTS 2017-22): 1 necrotic/non-enhancing core, 2 edema, 4 enhancing
TO_LAYOUT = {"brats": {1: 1, 2: 2, 4: 4}, "brats2023": {1: 1, 2: 2, 4: 3}, "msd": {1: 2, 2: 1, 4: 3}}


def _smooth_noise(rng, shape, cells=6):
    from scipy.ndimage import zoom
    coarse = rng.normal(0, 1, (cells, cells, cells))
    f = [s / cells for s in shape]
    out = zoom(coarse, f, order=1)
    return out[: shape[0], : shape[1], : shape[2]]


def make_case(seed: int, index: int, shape=SHAPE):
    """-> (dict modality -> float32 (z,y,x), canonical labels uint8 (z,y,x))."""
    rng = np.random.default_rng([seed, index])
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    c = np.array(shape) / 2.0
    radii = np.array(shape) * np.array([0.42, 0.40, 0.33]) * rng.uniform(0.93, 1.05, 3)
    d_brain = ((z - c[0]) / radii[0]) ** 2 + ((y - c[1]) / radii[1]) ** 2 + ((x - c[2]) / radii[2]) ** 2
    brain = d_brain <= 1.0
    tissue = np.zeros(shape, np.uint8)          # 0 background, 1 wm, 2 gm, 3 csf
    tissue[brain] = 2
    tissue[d_brain <= 0.72] = 1
    for side in (-1, 1):
        vc = c + np.array([0.05, -0.05, side * 0.12]) * np.array(shape)
        vr = np.array(shape) * np.array([0.10, 0.14, 0.045])
        vent = ((z - vc[0]) / vr[0]) ** 2 + ((y - vc[1]) / vr[1]) ** 2 + ((x - vc[2]) / vr[2]) ** 2 <= 1
        tissue[vent] = 3

    # tumour: a noisy ellipsoidal distance field in a box around its centre
    r_wt = rng.uniform(0.06, 0.14) * min(shape[1:]) * rng.uniform(0.8, 1.2, 3)
    r_wt[0] = min(r_wt[0], 0.3 * shape[0])
    offset = rng.uniform(-0.45, 0.45, 3) * radii
    tc_frac, rim = rng.uniform(0.35, 0.65), rng.uniform(0.08, 0.16)
    has_et = rng.random() >= 0.2
    t = c + offset
    lo = np.maximum(np.floor(t - 1.4 * r_wt).astype(int), 0)
    hi = np.minimum(np.ceil(t + 1.4 * r_wt).astype(int), shape)
    bz, by, bx = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    d = np.sqrt(((bz - t[0]) / r_wt[0]) ** 2 + ((by - t[1]) / r_wt[1]) ** 2 + ((bx - t[2]) / r_wt[2]) ** 2)
    d = d + 0.12 * _smooth_noise(rng, d.shape)
    box = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
    lab_box = np.zeros(d.shape, np.uint8)
    lab_box[d <= 1.0] = 2
    lab_box[d <= tc_frac] = 4 if has_et else 1
    lab_box[d <= tc_frac - rim] = 1
    labels = np.zeros(shape, np.uint8)
    labels[box] = lab_box
    labels[~brain] = 0

    vols = {}
    bias = 1.0 + 0.08 * _smooth_noise(rng, shape, cells=4)
    names = ("wm", "gm", "csf")
    for m_i, m in enumerate(MODALITIES):
        v = np.zeros(shape, np.float32)
        for k, name in enumerate(names, start=1):
            v[tissue == k] = TISSUE[name][m_i]
        v[labels == 2] = TISSUE["edema"][m_i]
        v[labels == 1] = TISSUE["necrosis"][m_i]
        v[labels == 4] = TISSUE["enhancing"][m_i]
        v = v * bias + rng.normal(0, 0.04, shape).astype(np.float32)
        v[~brain] = 0.0                                    # skull-stripped, like BraTS
        vols[m] = np.clip(v * 500.0, 0, None).astype(np.float32)
    return vols, labels


def _image(arr):
    import SimpleITK as sitk
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.0, 1.0, 1.0))
    img.SetOrigin(ORIGIN)
    img.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, 1))
    return img


ANATOMIES = {"mni152": mni152.make_case, "sphere": make_case}


def write_case(root: str, layout: str, seed: int, index: int, shape=SHAPE, grades: bool = False,
               anatomy_name: str = "sphere") -> str:
    import SimpleITK as sitk
    vols, canon = ANATOMIES[anatomy_name](seed, index, shape)
    seg = np.zeros_like(canon)
    for src, dst in TO_LAYOUT[layout].items():
        seg[canon == src] = dst
    as_int = {m: np.round(v).astype(np.int16) for m, v in vols.items()}
    if layout in ("brats", "brats2023"):
        if layout == "brats":
            cid = f"BraTS20_Training_{index + 1:03d}"
            grade = ("HGG" if (canon == 4).any() else "LGG") if grades else ""
        else:
            cid, grade = f"BraTS-GLI-{index + 1:05d}-000", ""
        d = os.path.join(root, grade, cid)
        os.makedirs(d, exist_ok=True)
        suffix = SUFFIXES[layout]                 # the same table the converter reads with
        for m in MODALITIES:
            sitk.WriteImage(_image(as_int[m]), os.path.join(d, f"{cid}{suffix[m]}.nii.gz"), True)
        sitk.WriteImage(_image(seg), os.path.join(d, f"{cid}{suffix['seg']}.nii.gz"), True)
    elif layout == "msd":
        cid = f"BRATS_{index + 1:03d}"
        for sub in ("imagesTr", "labelsTr"):
            os.makedirs(os.path.join(root, sub), exist_ok=True)
        img4 = sitk.JoinSeries([_image(vols[m]) for m in MODALITIES])   # channels FLAIR, T1w, T1gd, T2w
        sitk.WriteImage(img4, os.path.join(root, "imagesTr", f"{cid}.nii.gz"), True)
        sitk.WriteImage(_image(seg), os.path.join(root, "labelsTr", f"{cid}.nii.gz"), True)
    else:
        raise ValueError(f"unknown layout {layout!r}")
    return cid


def write_msd_json(root: str, ids: list[str]) -> None:
    meta = {"name": "BRATS", "description": "synthetic cases written by unet-synth", "tensorImageSize": "4D",
            "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
            "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
            "numTraining": len(ids), "numTest": 0,
            "training": [{"image": f"./imagesTr/{i}.nii.gz", "label": f"./labelsTr/{i}.nii.gz"} for i in ids],
            "test": []}
    with open(os.path.join(root, "dataset.json"), "w") as f:
        json.dump(meta, f, indent=2)


def _one(job):
    return write_case(*job)


@command("unet-synth")
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="unet-synth", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="folder to write the dataset into")
    p.add_argument("--cases", type=int, default=8, help="number of cases")
    p.add_argument("--layout", choices=("brats", "brats2023", "msd"), default="brats", help="on-disk layout")
    p.add_argument("--seed", type=int, default=0, help="seed; same seed, same cases")
    p.add_argument("--shape", default="155,240,240", help="volume shape z,y,x in voxels (1 mm)")
    p.add_argument("--grades", action="store_true", help="brats: sort cases into HGG/ and LGG/ folders")
    p.add_argument("--workers", type=int, default=1, help="processes writing cases in parallel")
    p.add_argument("--anatomy", choices=tuple(ANATOMIES), default="mni152",
                   help="mni152: cases on the ICBM152 brain nilearn ships (about 3 s of one core a "
                        "240x240x155 case, 1 s more once to read the template); sphere: the geometric "
                        "phantom (about 2 s; the tests' fast cases at small --shape)")
    a = p.parse_args(argv)
    try:
        shape = tuple(int(s) for s in a.shape.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 16:
        raise UsageError(f"--shape must be three integers >= 16, got {a.shape!r}")
    if a.cases < 1:
        raise UsageError(f"--cases must be >= 1 (got {a.cases})")
    if a.workers < 1:
        raise UsageError(f"--workers must be >= 1 (got {a.workers})")
    if a.anatomy == "mni152":
        try:       # read and resampled once here: forked workers share it
            anatomy.template(shape)
        except anatomy.TemplateMissing as e:
            raise UsageError(f"--anatomy mni152: {e}") from None
    os.makedirs(a.out, exist_ok=True)
    jobs = [(a.out, a.layout, a.seed, i, shape, a.grades, a.anatomy) for i in range(a.cases)]
    if a.workers > 1:
        import multiprocessing as mp
        with mp.get_context("fork").Pool(a.workers) as pool:
            ids = pool.map(_one, jobs)
    else:
        ids = [_one(j) for j in jobs]
    if a.layout == "msd":
        write_msd_json(a.out, ids)
    print(f"unet-synth: wrote {len(ids)} {a.layout} cases to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
