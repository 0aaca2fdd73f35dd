"""Volume-level segmentation metrics the way BraTS reports them (pure numpy/scipy).

Per case and region: Dice, 95 % Hausdorff distance in millimetres (from the voxel
spacing), sensitivity and specificity. Empty-mask conventions follow BraTS:
both empty -> Dice 1, HD95 0; exactly one empty -> Dice 0, HD95 = EMPTY_HD95,
the diagonal of the 240x240x155 mm BraTS grid.

HD95 is the 95th percentile of the surface distances taken both ways (pred
surface -> reference surface and back, pooled), as medpy's ``hd95`` does.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

EMPTY_HD95 = float(np.sqrt(240 ** 2 + 240 ** 2 + 155 ** 2))  # 373.13 mm


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    p, r = pred.astype(bool), ref.astype(bool)
    ps, rs = int(p.sum()), int(r.sum())
    if ps == 0 and rs == 0:
        return 1.0
    return 2.0 * int((p & r).sum()) / (ps + rs)


def sensitivity(pred: np.ndarray, ref: np.ndarray) -> float:
    p, r = pred.astype(bool), ref.astype(bool)
    rs = int(r.sum())
    return 1.0 if rs == 0 else int((p & r).sum()) / rs


def specificity(pred: np.ndarray, ref: np.ndarray) -> float:
    p, r = pred.astype(bool), ref.astype(bool)
    neg = int((~r).sum())
    return 1.0 if neg == 0 else int((~p & ~r).sum()) / neg


def _surface(mask: np.ndarray) -> np.ndarray:
    eroded = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1),
                                    border_value=0)
    return mask & ~eroded


def surface_distances(a: np.ndarray, b: np.ndarray, spacing) -> np.ndarray:
    """Distances (mm) from each surface voxel of ``a`` to the nearest surface voxel of ``b``."""
    sa, sb = _surface(a), _surface(b)
    dt = ndimage.distance_transform_edt(~sb, sampling=spacing)
    return dt[sa]


def hd95(pred: np.ndarray, ref: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> float:
    p, r = pred.astype(bool), ref.astype(bool)
    if not p.any() and not r.any():
        return 0.0
    if not p.any() or not r.any():
        return EMPTY_HD95
    # distances only involve voxels inside the bounding box of both masks: crop to it (+1)
    idx = np.argwhere(p | r)
    box = tuple(slice(max(lo - 1, 0), hi + 2) for lo, hi in zip(idx.min(0), idx.max(0)))
    p, r = p[box], r[box]
    d = np.concatenate([surface_distances(p, r, spacing), surface_distances(r, p, spacing)])
    return float(np.percentile(d, 95))


def score_regions(pred: np.ndarray, ref: np.ndarray, spacing, names) -> dict:
    """pred, ref: (..., R) region masks. -> {'dice_WT': .., 'hd95_WT': .., 'sens_WT': .., 'spec_WT': ..}."""
    out = {}
    for k, name in enumerate(names):
        p, r = pred[..., k], ref[..., k]
        out[f"dice_{name}"] = dice(p, r)
        out[f"hd95_{name}"] = hd95(p, r, spacing)
        out[f"sens_{name}"] = sensitivity(p, r)
        out[f"spec_{name}"] = specificity(p, r)
    return out


def summarise(rows: list[dict], columns: list[str]) -> dict:
    """Per column: mean, std (population, ddof 0), median, 25th and 75th percentile over cases."""
    out = {}
    for c in columns:
        v = np.array([r[c] for r in rows], float)
        out[c] = {"mean": float(v.mean()), "std": float(v.std()), "median": float(np.median(v)),
                  "p25": float(np.percentile(v, 25)), "p75": float(np.percentile(v, 75))}
    return out
