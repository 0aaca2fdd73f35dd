#!/usr/bin/env python
"""Time the evaluation metrics on one synthetic 240x240x155 case (1 mm, BraTS 2023 labels).

Prints the median of --repeats runs of: the lesion-wise scoring of the 5 regions (panoptica, as
unet-evaluate runs it); the hand-written global Dice + HD95 of WT, TC, ET (unet/metrics.py,
the legacy columns); panoptica's own Dice + HD95 functions on the same masks. The figures
decide whether the hand-written global metrics stay (they do while they are faster and equal;
tests/test_lesionwise.py checks the equality).

    .venv/bin/python scripts/metric_timings.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from unet.data.labels import REGION_LABELS  # noqa: E402
from unet.evaluation.lesionwise import evaluator, score_lesionwise  # noqa: E402
from unet.metrics import dice, hd95  # noqa: E402


def tumours(shape, centres, radius):
    """Nested balls per tumour: SNFH (2) outside, NETC (1) inside, ET (3) at the centre."""
    a = np.zeros(shape, np.uint8)
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    for c in centres:
        d2 = sum((g - k) ** 2 for g, k in zip(grid, c))
        for label, frac in ((2, 1.0), (1, 0.7), (3, 0.4)):
            a[d2 <= (radius * frac) ** 2] = label
    return a


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="runs per figure (median; default 3)")
    a = ap.parse_args(argv)
    from panoptica import Metric
    shape = (155, 240, 240)
    centres = [(60, 80, 80), (70, 160, 90), (90, 100, 170), (110, 180, 170)]
    ref = tumours(shape, centres, 18)
    pred = tumours(shape, [(c[0] + 2, c[1] - 2, c[2] + 1) for c in centres[:3]] + [(40, 40, 200)], 17)
    masks = {r: (np.isin(pred, labels), np.isin(ref, labels)) for r, labels in REGION_LABELS["brats2023"].items()}
    evaluator("brats2023")

    def hand():
        for p, r in masks.values():
            dice(p, r), hd95(p, r)

    def panoptica_fns():
        for p, r in masks.values():
            p8, r8 = p.astype(np.uint8), r.astype(np.uint8)
            Metric.DSC(r8, p8), Metric.HD95(r8, p8)

    print(f"one {'x'.join(map(str, shape[::-1]))} case, median of {a.repeats}:")
    seconds = median_seconds(lambda: score_lesionwise(pred, ref, (1.0, 1.0, 1.0), 'brats2023'), a.repeats)
    print(f"  lesion-wise scoring, 5 regions (panoptica):     {seconds:6.2f} s")
    print(f"  global Dice + HD95, WT/TC/ET, hand-written:      {median_seconds(hand, a.repeats):6.2f} s")
    print(f"  global Dice + HD95, WT/TC/ET, panoptica's funcs: {median_seconds(panoptica_fns, a.repeats):6.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
