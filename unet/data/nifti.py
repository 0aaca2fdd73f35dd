"""Reading one case's NIfTI files with SimpleITK, checked (shapes, spacing, labels, NaN/Inf, truncation)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from unet.data import labels as L
from unet.data.layouts import MSD_CHANNELS, SUFFIXES, Case
from unet.errors import UsageError

SPACING_TOL = 1e-3


class DataError(UsageError):
    def __init__(self, case: str, path: str, msg: str):
        super().__init__(f"case {case}: {path}: {msg}")
        self.case = case


@dataclass
class Options:
    modalities: tuple
    regions: tuple
    size: int
    inplane: str
    slices: str
    background_fraction: float
    seed: int


def nifti_problem(path: str) -> str | None:
    """Why a NIfTI-1 file cannot be trusted, or None.

    ITK fills a truncated .nii.gz with zeros and turns NaN/Inf voxels into 0
    without complaint, so both are checked on the raw bytes here.
    """
    import gzip
    import struct
    opener = gzip.open if path.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            hdr = fh.read(348)
            if len(hdr) < 348:
                return "cannot read (truncated header)"
            endian = "<" if struct.unpack("<i", hdr[:4])[0] == 348 else ">"
            if struct.unpack(endian + "i", hdr[:4])[0] != 348:
                return None  # not NIfTI-1 (NIfTI-2, Analyze...): left to the reader
            dim = struct.unpack(endian + "8h", hdr[40:56])
            datatype, bitpix = struct.unpack(endian + "2h", hdr[70:74])
            offset = int(struct.unpack(endian + "f", hdr[108:112])[0])
            count = int(np.prod([max(d, 1) for d in dim[1:1 + max(min(dim[0], 7), 0)]]))
            fh.read(max(offset - 348, 0))
            floating = {16: np.dtype(endian + "f4"), 64: np.dtype(endian + "f8")}.get(datatype)
            have, bad = 0, False
            while chunk := fh.read((1 << 22) * (bitpix // 8 or 1)):
                if floating is not None:
                    usable = len(chunk) - len(chunk) % floating.itemsize
                    bad = bad or not np.isfinite(np.frombuffer(chunk[:usable], floating)).all()
                have += len(chunk)
    except (OSError, EOFError) as e:
        return f"cannot read (truncated or corrupt: {e})"
    if have < count * bitpix // 8:
        return f"cannot read (truncated: {have} of {count * bitpix // 8} data bytes)"
    return "contains NaN or Inf" if bad else None


def _read(case: Case, path: str):
    import SimpleITK as sitk
    why = nifti_problem(path)
    if why:
        raise DataError(case.case_id, path, why)
    try:
        img = sitk.ReadImage(path)
    except RuntimeError as e:
        raise DataError(case.case_id, path, f"cannot read ({_itk_reason(str(e), path)})") from None
    return img, sitk.GetArrayFromImage(img)


def _itk_reason(text: str, path: str) -> str:
    """The informative part of an ITK exception: its 'ERROR:' line without the path
    (the first line is only ITK's own source location)."""
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    msg = next((l.split("ERROR:", 1)[1].strip() for l in lines if "ERROR:" in l), lines[0] if lines else "")
    if "Unable to determine ImageIO reader" in msg:
        return "not a NIfTI file"
    msg = msg.replace(f'"{path}"', "").replace(path, "").strip(" :")
    return msg[:160] or "unreadable"


def _geometry(img) -> dict:
    d = img.GetDimension()
    keep = 3
    return {"size": list(img.GetSize())[:keep], "spacing": list(img.GetSpacing())[:keep],
            "origin": list(img.GetOrigin())[:keep],
            "direction": [img.GetDirection()[r * d + c] for r in range(keep) for c in range(keep)]}


def read_case(case: Case, opts: Options, need_seg: bool = True):
    """-> (channels (C,z,y,x) float32, seg (z,y,x) int or None, geometry of the first file)."""
    folder = os.path.dirname(next(iter(case.files.values()), case.seg or case.case_id))
    if case.seg is None and need_seg:
        seg = SUFFIXES.get(case.layout, {}).get('seg', '_seg')
        suf = {"msd": "labelsTr/<case>.nii.gz"}.get(case.layout, f"*{seg}.nii.gz")
        raise DataError(case.case_id, folder, f"missing segmentation ({suf})")
    vols, ref, ref_path = [], None, None
    if case.layout == "msd":
        img, arr = _read(case, case.files["image"])
        if arr.ndim != 4 or arr.shape[0] < 4:
            raise DataError(case.case_id, case.files["image"],
                            f"expected a 4-D image with 4 channels, got array {arr.shape}")
        vols = [arr[MSD_CHANNELS[m]] for m in opts.modalities]
        ref, ref_path, geom = img, case.files["image"], _geometry(img)
        ref_shape, ref_spacing = arr.shape[1:], img.GetSpacing()[:3]
        paths = [case.files["image"]] * len(vols)
    else:
        paths = []
        for m in opts.modalities:
            if m not in case.files:
                raise DataError(case.case_id, folder, f"missing {m} file (*{SUFFIXES[case.layout][m]}.nii.gz)")
            img, arr = _read(case, case.files[m])
            if ref is None:
                ref, ref_path, geom = img, case.files[m], _geometry(img)
                ref_shape, ref_spacing = arr.shape, img.GetSpacing()
            elif arr.shape != ref_shape:
                raise DataError(case.case_id, case.files[m], f"shape {arr.shape[::-1]} differs from "
                                f"{os.path.basename(ref_path)} {ref_shape[::-1]}")
            elif not np.allclose(img.GetSpacing(), ref_spacing, atol=SPACING_TOL):
                raise DataError(case.case_id, case.files[m], f"spacing {img.GetSpacing()} differs from "
                                f"{os.path.basename(ref_path)} {ref_spacing}")
            vols.append(arr)
            paths.append(case.files[m])
    for v, p in zip(vols, paths):
        if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all():
            raise DataError(case.case_id, p, "contains NaN or Inf")
    if case.seg is None:
        return np.stack(vols).astype(np.float32), None, geom
    seg_img, seg = _read(case, case.seg)
    if seg.shape != tuple(ref_shape):
        raise DataError(case.case_id, case.seg, f"shape {seg.shape[::-1]} differs from "
                        f"{os.path.basename(ref_path)} {tuple(ref_shape)[::-1]}")
    if not np.allclose(seg_img.GetSpacing()[:3], ref_spacing[:3], atol=SPACING_TOL):
        raise DataError(case.case_id, case.seg, f"spacing {seg_img.GetSpacing()} differs from "
                        f"{os.path.basename(ref_path)} {tuple(ref_spacing)}")
    if np.issubdtype(seg.dtype, np.floating):
        if not np.isfinite(seg).all() or not np.array_equal(seg, np.round(seg)):
            raise DataError(case.case_id, case.seg, "segmentation has non-integer, NaN or Inf values")
    bad = L.unexpected_labels(seg, case.layout)
    if bad:
        raise DataError(case.case_id, case.seg, f"unexpected label values {bad} for layout {case.layout} "
                        f"(expected {', '.join(map(str, L.VALID_LABELS[case.layout]))})")
    return np.stack(vols).astype(np.float32), seg.astype(np.int16), geom
