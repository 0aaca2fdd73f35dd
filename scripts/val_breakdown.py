#!/usr/bin/env python3
"""Where a model's validation Dice comes from: slices with and without tumour, per case and region.

    .venv/bin/python scripts/val_breakdown.py --data runs/demo/brats.h5 --model runs/demo/logs [--model ...]

For each model (a training logdir or model.keras), on the validation split of ``--data`` at threshold
0.5 (the trainer's validation), per region: the pooled Dice the trainer prints; the same over the
slices whose reference holds the region only; the predicted pixels on slices where the reference has
none of it (false positives the tumour slices cannot show); and per validation case the pooled Dice
and predicted/reference pixels. One process, no MPI.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def dice(inter: float, total: float) -> float:
    return (2 * inter + 1) / (total + 1)


def breakdown(model_path: str, val, regions: list[str], case_of: np.ndarray, z_of: np.ndarray,
              batch: int = 16) -> None:
    import keras
    path = os.path.join(model_path, "model.keras") if os.path.isdir(model_path) else model_path
    model = keras.models.load_model(path, compile=False)
    n = len(val)
    preds, refs = [], []
    for s in range(0, n, batch):
        x, y = val.read(np.arange(s, min(n, s + batch)))
        preds.append(model.predict_on_batch(x) > 0.5)
        refs.append(y > 0.5)
    p, y = np.concatenate(preds), np.concatenate(refs)
    print(f"{model_path}: {n} validation slices")
    for r, name in enumerate(regions):
        pr, yr = p[..., r], y[..., r]
        inter = (pr & yr).sum(axis=(1, 2)).astype(float)
        ps, ys = pr.sum(axis=(1, 2)).astype(float), yr.sum(axis=(1, 2)).astype(float)
        has = ys > 0
        print(f"  {name}: pooled Dice {dice(inter.sum(), ps.sum() + ys.sum()):.4f}; on the {has.sum()} slices "
              f"with {name}: {dice(inter[has].sum(), ps[has].sum() + ys[has].sum()):.4f}; "
              f"{int(ps[~has].sum())} pixels predicted on the {(~has).sum()} slices without it "
              f"({int((ps[~has] > 0).sum())} slices), against {int(ys.sum())} reference pixels")
        for c in np.unique(case_of):
            m = case_of == c
            print(f"    case {c}: Dice {dice(inter[m].sum(), ps[m].sum() + ys[m].sum()):.4f}, predicted "
                  f"{int(ps[m].sum())} / reference {int(ys[m].sum())} pixels, "
                  f"{int(ps[m & ~has].sum())} on slices without {name}"
                  + span(z_of[m & has], z_of[m & ~has & (ps > 0)]))


def span(ref_z: np.ndarray, fp_z: np.ndarray) -> str:
    """Where the false positives sit against the reference's slices (slice numbers of the case)."""
    if not len(fp_z):
        return ""
    ref = f"{ref_z.min()}-{ref_z.max()}" if len(ref_z) else "none"
    return f" (reference on slices {ref}; false positives on {len(fp_z)} slices {fp_z.min()}-{fp_z.max()})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="val_breakdown.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="HDF5 file from unet-convert")
    ap.add_argument("--model", action="append", required=True, help="training logdir or model.keras (repeatable)")
    a = ap.parse_args(argv)
    import h5py

    from unet.data.sources import DataOptions, open_sources
    _, val, info = open_sources(DataOptions(data=a.data))
    with h5py.File(a.data, "r") as f:
        case_of = np.asarray(f["val/case_id"][:]).astype(str)
        z_of = np.asarray(f["val/slice_index"][:])
    for m in a.model:
        breakdown(m, val, info.region_names or [f"r{i}" for i in range(info.regions)], case_of, z_of)
    return 0


if __name__ == "__main__":
    sys.exit(main())
