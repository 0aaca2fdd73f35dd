#!/usr/bin/env python
"""Does a model judge a voxel by its own intensities or by the rest of its slice? A probe of the false positives
a model makes far from any tumour.

For each case under ``--cases``: the model's whole-tumour answer on every slice (no TTA, the network's grid); the
slices more than ``--margin`` slices below the tumour's lowest where it marks more than ``--min_pixels`` pixels (all
of them false positives: the reference has nothing there); then the same slices changed in ways that leave the
false-positive pixels' own intensities alone, or move them by less than the spread between healthy tissue and
oedema:

* an oedema-like disc (FLAIR +4, T1 -0.5, T1ce +0.4, T2 +2, in the case's z-scores: about what the synthetic
  oedema has) in a corner of the image (the first of the four it fits in), outside the head, radius 6 and
  12 pixels;
* FLAIR -0.5 and +0.5 standard deviations on every head pixel of those slices.

It prints, per change, the mean whole-tumour probability on the pixels the unchanged slices mark (> 0.5) and how
many pixels are marked. A network that decides from a voxel's own intensities and its neighbourhood is not moved
by a disc 60 pixels away outside the head; one whose statistics are taken over the slice (group or instance
normalisation) can be.

    .venv/bin/python scripts/slice_context_probe.py --model runs/demo/logs --cases runs/tune3 \\
        [--case BraTS20_Training_009]
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from unet.data import labels as L  # noqa: E402
from unet.data import nifti  # noqa: E402
from unet.data.layouts import find_cases  # noqa: E402
from unet.inference.predictor import Predictor  # noqa: E402

OEDEMA_LIKE = np.array([4.0, -0.5, 0.4, 2.0], np.float32)   # FLAIR, T1, T1ce, T2 (case z-scores)


def changes(x: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """The changed copies of the (n, H, W, 4) slices ``x`` (channels FLAIR, T1, T1ce, T2)."""
    n, h, w, _ = x.shape
    yy, xx = np.mgrid[:h, :w]
    head = np.any(x != 0, -1)
    out = []
    for r in (6, 12):
        # a disc 6 px in from one of the four corners, the first whose disc misses the head in every slice
        for cy, cx, where in ((6 + r, 6 + r, "top left"), (6 + r, w - 7 - r, "top right"),
                              (h - 7 - r, 6 + r, "bottom left"), (h - 7 - r, w - 7 - r, "bottom right")):
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            if not head[:, disc].any():
                b = x.copy()
                b[:, disc] = OEDEMA_LIKE
                out.append((f"oedema-like disc, radius {r} px, {where}, outside the head", b))
                break
        else:
            out.append((f"oedema-like disc, radius {r} px: no corner outside the head", None))
    for d in (-0.5, 0.5):
        b = x.copy()
        b[..., 0][head] += d
        out.append((f"FLAIR {d:+.1f} SD on every head pixel", b))
    return out


def probe(pr: Predictor, case, min_pixels: int, margin: int) -> list[str]:
    chans, seg, _ = nifti.read_case(case, nifti.Options(pr.modalities, L.REGIONS, pr.size, pr.inplane, "all", 0.0, 0))
    inp = pr.network_input(chans)
    wt = pr.network_output(inp.slices)[..., 0] > 0.5
    ref = np.asarray(seg) > 0          # below the first tumour slice every marked pixel is a false positive
    first_tumour = int(np.flatnonzero(ref.any((1, 2)))[0])
    zs = [z for z in range(first_tumour - margin) if wt[z].sum() > min_pixels]
    if not zs:
        return [f"{case.case_id}: no slice below the tumour (z < {first_tumour} - {margin}) with > {min_pixels} "
                f"marked pixels"]
    x = inp.slices[zs]
    base = pr.network_output(x)[..., 0]
    marked = base > 0.5
    lines = [f"{case.case_id}: slices z {zs[0]}-{zs[-1]} below the tumour (first tumour slice {first_tumour}), "
             f"{int(marked.sum())} marked pixels, mean probability on them {base[marked].mean():.3f}"]
    for name, b in changes(x):
        if b is None:
            lines.append(f"  {name}")
            continue
        o = pr.network_output(b)[..., 0]
        lines.append(f"  {name:58s} mean probability on those pixels {o[marked].mean():.3f}; "
                     f"marked pixels in the head {int(((o > 0.5) & np.any(x != 0, -1)).sum())}")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="slice_context_probe.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a trained model's folder (model.json)")
    ap.add_argument("--cases", required=True, help="dataset root of cases with a reference segmentation")
    ap.add_argument("--case", action="append", default=[], help="only this case id (repeatable)")
    ap.add_argument("--min_pixels", type=int, default=20, help="marked pixels that make a slice a false-positive one")
    ap.add_argument("--margin", type=int, default=5,
                    help="slices left out just below the tumour's lowest (its edge, not a false positive far away)")
    ap.add_argument("--engine", default=None, help="inference engine (default: the model folder's fastest)")
    a = ap.parse_args(argv)
    pr = Predictor(a.model, engine=a.engine)
    if tuple(pr.modalities) != ("FLAIR", "T1", "T1ce", "T2") or pr.regions[0] != "WT":
        sys.exit(f"slice_context_probe.py: error: --model {a.model}: needs the FLAIR, T1, T1ce, T2 input and WT first")
    cases = [c for c in find_cases(a.cases) if not a.case or c.case_id in a.case]
    if not cases:
        sys.exit(f"slice_context_probe.py: error: --cases {a.cases}: no case" + (f" named {a.case}" if a.case else ""))
    for c in cases:
        print("\n".join(probe(pr, c, a.min_pixels, a.margin)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
