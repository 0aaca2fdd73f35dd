"""Per-case preprocessing (pure numpy/OpenCV): normalisation, in-plane geometry, slice choice.

Arrays are SimpleITK's (z, y, x); axial slices are ``volume[z]``. ``network_input`` is the
whole path from a case's raw intensities to the network's input slices: unet-convert writes
its output into the training file, unet-predict feeds it to the model.
"""
from __future__ import annotations

from typing import NamedTuple

import cv2
import numpy as np

# the only normalisation implemented; unet-convert stores this text in the file's attributes
# and unet-predict refuses a model whose metadata names another
NORMALISATION = "zscore over brain (non-zero) voxels per modality"
INPLANE_MODES = ("resize", "crop", "crop_resize")
# crop_resize: voxels of background kept on each side of the head's box (unet-convert records it in the
# file's attribute ``crop_margin``; unet-predict reads it from there)
CROP_MARGIN = 2


def brain_mask(channels: np.ndarray) -> np.ndarray:
    """Voxels where any modality is non-zero; channels is (C, z, y, x)."""
    return np.any(channels != 0, axis=0)


def zscore(volume: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(v - mean) / std over ``mask`` voxels; voxels outside the mask become 0."""
    v = volume.astype(np.float32)
    vals = v[mask]
    out = np.zeros_like(v)
    if vals.size:
        std = float(vals.std())
        out[mask] = (vals - float(vals.mean())) / (std if std > 0 else 1.0)
    return out


def head_box(brain: np.ndarray, margin: int = CROP_MARGIN) -> tuple[int, int, int] | None:
    """(y0, x0, side) of the square around the head: the bounding box of ``brain`` ((z, y, x) or (y, x)
    booleans) over all slices, its short side widened to the long one (the box centred in it) and
    ``margin`` voxels added on every side. It may reach beyond the grid (that part reads as zeros).
    None for a case without a non-zero voxel."""
    footprint = brain.reshape((-1,) + brain.shape[-2:]).any(0)
    ys, xs = np.flatnonzero(footprint.any(1)), np.flatnonzero(footprint.any(0))
    if not ys.size:
        return None
    h, w = int(ys[-1] - ys[0] + 1), int(xs[-1] - xs[0] + 1)
    side = max(h, w) + 2 * margin
    return int(ys[0]) - (side - h) // 2, int(xs[0]) - (side - w) // 2, side


def inplane_plan(shape_yx: tuple[int, int], size: int, mode: str, box: tuple[int, int, int] | None = None) -> dict:
    """How a (y, x) slice becomes size x size, in a form that can be undone.

    ``resize``: scale the whole slice; ``crop``: centre crop (padding if smaller); a slice already
    size x size is left untouched by either. ``crop_resize``: cut the square ``box`` = (y0, x0, side)
    (``head_box``; the whole grid, squared, when None), then scale it to size x size (no scaling when
    side == size).
    """
    h, w = shape_yx
    if mode == "crop_resize":
        y0, x0, side = box if box is not None else (0, 0, max(h, w))
        return {"mode": "crop_resize", "shape": [h, w], "size": size, "y0": int(y0), "x0": int(x0), "side": int(side)}
    if (h, w) == (size, size):
        return {"mode": "none", "shape": [h, w], "size": size}
    if mode == "resize":
        return {"mode": "resize", "shape": [h, w], "size": size}
    if mode == "crop":
        return {"mode": "crop", "shape": [h, w], "size": size, "y0": (h - size) // 2, "x0": (w - size) // 2}
    raise ValueError(f"unknown in-plane mode {mode!r}")


def _crop_or_pad(img: np.ndarray, y0: int, x0: int, size: int) -> np.ndarray:
    out = np.zeros((size, size) + img.shape[2:], img.dtype)
    h, w = img.shape[:2]
    sy, sx = max(y0, 0), max(x0, 0)
    ey, ex = min(y0 + size, h), min(x0 + size, w)
    out[sy - y0:ey - y0, sx - x0:ex - x0] = img[sy:ey, sx:ex]
    return out


def apply_inplane(img: np.ndarray, plan: dict, *, is_mask: bool) -> np.ndarray:
    """(y, x[, k]) slice -> (size, size[, k]); masks use nearest neighbour only, sampled at pixel
    centres (INTER_NEAREST_EXACT) so they stay aligned with the resampled images."""
    if plan["mode"] == "none":
        return img
    s = plan["size"]
    if plan["mode"] == "crop":
        return _crop_or_pad(img, plan["y0"], plan["x0"], s)
    if plan["mode"] == "crop_resize":
        img = _crop_or_pad(img, plan["y0"], plan["x0"], plan["side"])
        if plan["side"] == s:
            return img
    interp = cv2.INTER_NEAREST_EXACT if is_mask else cv2.INTER_AREA
    out = cv2.resize(img, (s, s), interpolation=interp)
    return out.reshape((s, s) + img.shape[2:])


def undo_inplane(img: np.ndarray, plan: dict, *, is_mask: bool) -> np.ndarray:
    """Inverse of apply_inplane back to the original (y, x) grid (cropped-away border = 0, and so is
    everything outside a crop_resize box); images are resized by bicubic interpolation, which keeps
    the peak of a structure one or two pixels wide that linear interpolation flattens (values may
    overshoot their range)."""
    if plan["mode"] == "none":
        return img
    h, w = plan["shape"]
    interp = cv2.INTER_NEAREST_EXACT if is_mask else cv2.INTER_CUBIC
    if plan["mode"] == "crop_resize":
        side = plan["side"]
        if side != plan["size"]:
            img = cv2.resize(img, (side, side), interpolation=interp).reshape((side, side) + img.shape[2:])
    if plan["mode"] in ("crop", "crop_resize"):
        return _crop_or_pad(img, -plan["y0"], -plan["x0"], max(h, w))[:h, :w]
    out = cv2.resize(img, (w, h), interpolation=interp)
    return out.reshape((h, w) + img.shape[2:])


def select_slices(brain: np.ndarray, tumour: np.ndarray, policy: str, rng: np.random.Generator,
                  background_fraction: float = 0.1) -> np.ndarray:
    """Axial slice indices to keep. brain, tumour: (z, y, x) booleans.

    ``all``: every slice; ``brain``: slices with any brain voxel; ``tumour``: slices
    with tumour plus ``background_fraction`` of the other brain slices.
    """
    z = brain.shape[0]
    if policy == "all":
        return np.arange(z)
    has_brain = brain.reshape(z, -1).any(1)
    if policy == "brain":
        return np.flatnonzero(has_brain)
    if policy == "tumour":
        has_t = tumour.reshape(z, -1).any(1)
        rest = np.flatnonzero(has_brain & ~has_t)
        k = int(round(background_fraction * len(rest)))
        extra = rng.choice(rest, size=k, replace=False) if k else np.array([], int)
        return np.sort(np.concatenate([np.flatnonzero(has_t), extra]).astype(int))
    raise ValueError(f"unknown slice policy {policy!r}")


class NetworkInput(NamedTuple):
    brain: np.ndarray    # (z, y, x) bool, voxels where any modality is non-zero
    plan: dict           # the in-plane step, for undo_inplane
    slices: np.ndarray   # (z, size, size, C) float32, every axial slice


def network_input(channels: np.ndarray, size: int, inplane: str,
                  normalisation: str = NORMALISATION, crop_margin: int = CROP_MARGIN) -> NetworkInput:
    """(C, z, y, x) raw intensities -> brain mask, in-plane plan and the network's input slices:
    z-score per modality over brain voxels, then every axial slice brought to size x size (for
    ``crop_resize`` through the one square box of the case's head, ``head_box`` with ``crop_margin``)."""
    if normalisation != NORMALISATION:
        raise ValueError(f"unknown normalisation {normalisation!r}")
    if inplane not in INPLANE_MODES:
        raise ValueError(f"unknown in-plane mode {inplane!r}")
    brain = brain_mask(channels)
    norm = np.stack([zscore(v, brain) for v in channels])
    box = head_box(brain, crop_margin) if inplane == "crop_resize" else None
    plan = inplane_plan(norm.shape[2:], size, inplane, box)
    slices = np.zeros((norm.shape[1], size, size, len(norm)), np.float32)
    for z in range(norm.shape[1]):
        slices[z] = apply_inplane(np.moveaxis(norm[:, z], 0, -1), plan, is_mask=False)
    return NetworkInput(brain, plan, slices)


def to_case_grid(out: np.ndarray, inp: NetworkInput) -> np.ndarray:
    """(z, size, size, R) network output -> (z, y, x, R) probabilities on the case's grid: the in-plane
    step undone by bicubic interpolation, clipped to [0, 1]. Against linear interpolation it raised
    the volume-level ET Dice of the demo's model by 0.013-0.019 (the enhancing rim is 1-3 pixels
    wide at 128 x 128; docs/TRAINING.md). The head mask is post-processing's (``unet.inference.postprocess``)."""
    grid = np.stack([undo_inplane(o, inp.plan, is_mask=False) for o in out]).astype(np.float32)
    return np.clip(grid, 0.0, 1.0, out=grid)
