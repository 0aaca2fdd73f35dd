"""Finding cases on disk in the supported layouts (files matched by suffix).

* ``brats`` (2017-2022): ``<case>_{flair,t1,t1ce,t2,seg}.nii[.gz]``, one folder per case,
  optionally under ``HGG/`` and ``LGG/``.
* ``brats2023`` (GLI): ``BraTS-GLI-XXXXX-XXX-{t2f,t1n,t1c,t2w,seg}.nii.gz``.
* ``msd`` (Task01_BrainTumour): ``dataset.json``, 4-D ``imagesTr/BRATS_XXX.nii.gz``
  (FLAIR, T1w, T1gd, T2w) and ``labelsTr/BRATS_XXX.nii.gz``.

Names starting with ``._`` (macOS resource forks in the MSD tarball) are ignored.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from unet.errors import UsageError

MODALITIES = ("FLAIR", "T1", "T1ce", "T2")
SUFFIXES = {  # canonical modality -> file-name suffix (before .nii[.gz]), lower case
    "brats": {"FLAIR": "_flair", "T1": "_t1", "T1ce": "_t1ce", "T2": "_t2", "seg": "_seg"},
    "brats2023": {"FLAIR": "-t2f", "T1": "-t1n", "T1ce": "-t1c", "T2": "-t2w", "seg": "-seg"},
}
SEG_ALIASES = ("_seg", "_segm", "-seg")  # BraTS 2020 case 355 ships '..._Segm.nii'
MSD_CHANNELS = {"FLAIR": 0, "T1": 1, "T1ce": 2, "T2": 3}
# the seed's npy files (train and validation split) and the metadata unet-convert writes beside them
NPY_FILES = {"train": ("imgs_train.npy", "msks_train.npy"), "val": ("imgs_test.npy", "msks_test.npy")}
NPY_SIDECAR = "unet-convert.json"


class LayoutError(UsageError):
    """The input folder is not in a layout we read (one-line message)."""


@dataclass
class Case:
    case_id: str
    layout: str
    files: dict = field(default_factory=dict)  # modality or 'seg' -> path; msd: 'image' -> 4-D path
    seg: str | None = None


def _stem(name: str) -> str:
    low = name.lower()
    for ext in (".nii.gz", ".nii"):
        if low.endswith(ext):
            return low[: -len(ext)]
    return ""


def _nifti_files(root: str):
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if not x.startswith("._"))
        for f in sorted(files):
            if not f.startswith("._") and _stem(f):
                yield d, f


def detect_layout(root: str) -> str:
    if not os.path.isdir(root):
        raise LayoutError(f"{root}: not a folder")
    if os.path.isfile(os.path.join(root, "dataset.json")) and os.path.isdir(os.path.join(root, "imagesTr")):
        return "msd"
    for _, f in _nifti_files(root):
        s = _stem(f)
        if s.endswith("-t2f") or s.endswith("-t1c"):
            return "brats2023"
        if s.endswith("_flair"):
            return "brats"
    raise LayoutError(f"{root}: no BraTS (*_flair.nii.gz), BraTS 2023 (*-t2f.nii.gz) or "
                      f"MSD (dataset.json + imagesTr/) cases found")


def find_cases(root: str, layout: str | None = None) -> list[Case]:
    """All cases below ``root``, sorted by id. Missing files are left for the reader to report."""
    layout = layout or detect_layout(root)
    if layout == "msd":
        img_dir, lab_dir = os.path.join(root, "imagesTr"), os.path.join(root, "labelsTr")
        cases = []
        for f in sorted(os.listdir(img_dir)):
            if f.startswith("._") or not _stem(f):
                continue
            cid = f[: -len(".nii.gz")] if f.endswith(".nii.gz") else f[: -len(".nii")]
            lab = os.path.join(lab_dir, f)
            cases.append(Case(cid, layout, {"image": os.path.join(img_dir, f)},
                              lab if os.path.exists(lab) else None))
        return cases
    by_dir: dict[str, Case] = {}
    for d, f in _nifti_files(root):
        hit = _suffix(f, layout)
        if hit:
            case = by_dir.setdefault(d, Case(os.path.basename(d), layout))
            if hit[0] == "seg":
                case.seg = os.path.join(d, f)
            else:
                case.files[hit[0]] = os.path.join(d, f)
    return sorted(by_dir.values(), key=lambda c: c.case_id)


def _suffix(name: str, layout: str) -> tuple[str, str] | None:
    """(modality or 'seg', case id before the suffix) if the file name ends with one of the layout's suffixes."""
    s = _stem(name)
    for key, suf in SUFFIXES[layout].items():
        for alias in (SEG_ALIASES if key == "seg" else (suf,)):
            if s.endswith(alias):
                return key, os.path.basename(name)[: len(s) - len(alias)]
    return None


def case_from_files(paths: list[str]) -> Case:
    """One case from its files named one by one (its modalities, optionally its segmentation), in any
    layout whose files are told apart by suffix; the case id is the common name before the suffixes."""
    for layout in SUFFIXES:
        hits = [_suffix(os.path.basename(p), layout) for p in paths]
        if all(hits):
            break
    else:
        bad = next(p for p in paths if not any(_suffix(os.path.basename(p), l) for l in SUFFIXES))
        raise LayoutError(f"{bad}: not a modality or segmentation file of a known layout "
                          f"(*_flair/_t1/_t1ce/_t2/_seg.nii.gz or *-t2f/-t1n/-t1c/-t2w/-seg.nii.gz)")
    ids = sorted({cid for _, cid in hits})
    if len(ids) > 1:
        raise LayoutError(f"files of more than one case given: {', '.join(ids)}")
    case = Case(ids[0], layout)
    for p, (key, _) in zip(paths, hits):
        if key in case.files or (key == "seg" and case.seg):
            raise LayoutError(f"{p}: a second {key} file for case {ids[0]}")
        if key == "seg":
            case.seg = p
        else:
            case.files[key] = p
    return case
