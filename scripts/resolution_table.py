#!/usr/bin/env python
"""The resolution bound of each in-plane mode and size: what the reference itself scores after the
trip to the network's grid and back, and what a training step at that size costs.

For every case of --cases (any layout unet-convert reads), every --modes in-plane mode and every
--sizes size, the case goes through ``network_input`` as unet-convert and unet-predict take it; its
reference regions (WT/TC/ET) are carried to the network grid as unet-convert carries masks (nearest
neighbour, pixel centres) and back to the case grid in two ways:

* nearest: back by nearest neighbour too (``undo_inplane(..., is_mask=True)``), the bound that
  docs/TRAINING.md's "the resolution bound" measured at 128 x 128 with ``resize``;
* predictor: the 0/1 masks taken as a perfect network's probabilities and returned as unet-predict
  returns probabilities (``to_case_grid``: bicubic, clipped), thresholded at 0.5.

Dice is per case (3-D), then averaged over the cases; the lowest case's ET is printed too.
The training flops per image (``unet.perf.flops``) give the cost of each size relative to the first. With
--speed, training images per second at each size too: ``train_hvd.py --benchmark`` on 1 rank (the
network's input shape is all that a step's cost depends on, so the figure is the same for both modes),
--rounds interleaved rounds (sizes in turn, the order reversed each round), median of the rounds, and
the CPUs other processes kept busy meanwhile (a shared machine's figures are only as good as that).

    .venv/bin/python scripts/resolution_table.py --cases runs/demo/cases [--speed] [--sizes 128,160,192,240]
"""
from __future__ import annotations

import argparse
import os
import re
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from unet.data import labels as L  # noqa: E402
from unet.data import preprocess as P  # noqa: E402
from unet.data.layouts import MODALITIES, LayoutError, find_cases  # noqa: E402
from unet.data.nifti import Options, read_case  # noqa: E402
from unet.metrics import dice  # noqa: E402
from unet.perf.flops import training_flops  # noqa: E402
from unet.perf.measure import run_child  # noqa: E402

WAYS = ("nearest", "predictor")


def round_trip(chans: np.ndarray, regions: np.ndarray, size: int, mode: str) -> dict[str, list[float]]:
    """(C,z,y,x) intensities and (z,y,x,3) reference regions -> {way: [Dice WT, TC, ET]} after the trip."""
    inp = P.network_input(chans, size, mode)
    small = np.stack([P.apply_inplane(r, inp.plan, is_mask=True) for r in regions])
    back = {"nearest": np.stack([P.undo_inplane(s, inp.plan, is_mask=True) for s in small]).astype(bool),
            "predictor": P.to_case_grid(small.astype(np.float32), inp) > 0.5}
    return {w: [dice(m[..., k], regions[..., k]) for k in range(regions.shape[-1])] for w, m in back.items()}


def bound_table(cases, sizes, modes) -> tuple[dict, list[int]]:
    """{(mode, size, way): (cases, 3) Dice array}, and each case's head box side (voxels)."""
    opts = Options(MODALITIES, L.REGIONS, 0, "resize", "all", 0.0, 0)
    scores, sides = {}, []
    for i, case in enumerate(cases):
        chans, seg, _ = read_case(case, opts)
        regions = L.regions_from_labels(seg, case.layout, L.REGIONS).astype(np.uint8)
        box = P.head_box(P.brain_mask(chans))
        sides.append(box[2] if box else 0)
        for mode in modes:
            for size in sizes:
                for way, d in round_trip(chans, regions, size, mode).items():
                    scores.setdefault((mode, size, way), []).append(d)
        print(f"  {case.case_id}: head box side {sides[-1]} ({i + 1}/{len(cases)})", file=sys.stderr, flush=True)
    return {k: np.array(v) for k, v in scores.items()}, sides


def benchmark(size: int, batch: int, steps: int, isa: str) -> tuple[float, float]:
    """(img/s of train_hvd.py --benchmark at size x size, 4 channels -> 3 regions, 1 rank; the CPUs
    other processes kept busy meanwhile)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    if isa:
        env["ONEDNN_MAX_CPU_ISA"] = isa
    cmd = [sys.executable, os.path.join(ROOT, "train_hvd.py"), "--benchmark", "--synthetic_size", str(size),
           "--synthetic_channels", "4", "--synthetic_regions", "3", "--batch_size", str(batch),
           "--bench_steps", str(steps), "--warmup_steps", "3", "--dropout", "0", "--logdir", os.devnull]
    p = run_child(cmd, env=env, cwd=ROOT)
    m = re.search(r"img_per_sec=([0-9.]+)", p.stdout)
    if p.returncode or not m:
        sys.exit(f"resolution_table.py: error: train_hvd.py --benchmark at {size}: {(p.stderr or p.stdout)[-400:]}")
    return float(m.group(1)), p.others_cores


def speeds(sizes, rounds: int, batch: int, steps: int, isa: str) -> dict[int, list[tuple[float, float]]]:
    out: dict[int, list[tuple[float, float]]] = {s: [] for s in sizes}
    for r in range(rounds):
        for s in (sizes if r % 2 == 0 else sizes[::-1]):
            out[s].append(benchmark(s, batch, steps, isa))
            print(f"  round {r + 1}: {s}x{s} {out[s][-1][0]:.2f} img/s, other processes busy on "
                  f"{out[s][-1][1]:.1f} CPUs", file=sys.stderr, flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="resolution_table.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", required=True, help="dataset root of NIfTI cases (any layout unet-convert reads)")
    ap.add_argument("--sizes", default="128,160,192,240", help="in-plane sizes, pixels, comma-separated")
    ap.add_argument("--modes", default="resize,crop_resize", help="in-plane modes, comma-separated")
    ap.add_argument("--speed", action="store_true", help="also time training steps at each size (1 rank)")
    ap.add_argument("--rounds", type=int, default=2, help="--speed: interleaved rounds over the sizes")
    ap.add_argument("--batch_size", type=int, default=4, help="--speed: images per step (the demo's per rank)")
    ap.add_argument("--bench_steps", type=int, default=10, help="--speed: timed steps per run")
    ap.add_argument("--isa", default="AVX2", help="--speed: ONEDNN_MAX_CPU_ISA ('' = the CPU's own)")
    a = ap.parse_args(argv)
    try:
        sizes = [int(s) for s in a.sizes.split(",") if s]
        modes = [m for m in a.modes.split(",") if m]
    except ValueError:
        ap.error(f"--sizes {a.sizes}: comma-separated integers")
    bad = [m for m in modes if m not in P.INPLANE_MODES]
    if bad or not sizes or min(sizes) < 16:
        ap.error(f"--modes: unknown {bad}" if bad else "--sizes: give sizes of at least 16 pixels")
    try:
        cases = find_cases(a.cases)
    except LayoutError as e:
        ap.error(f"--cases: {e}")
    if not cases:
        ap.error(f"--cases {a.cases}: no cases found")
    scores, sides = bound_table(cases, sizes, modes)
    fps = speeds(sizes, a.rounds, a.batch_size, a.bench_steps, a.isa) if a.speed else {}
    print(f"{len(cases)} cases from {os.path.abspath(a.cases)}; head box side {min(sides)}-{max(sides)} voxels "
          f"(margin {P.CROP_MARGIN}); Dice mean over the cases (WT / TC / ET), lowest case's ET in brackets")
    head = "| mode | size | nearest back: WT / TC / ET (min ET) | predictor back: WT / TC / ET (min ET) |"
    print(head + " training flops per image (x 128) |" + (" train img/s, 1 rank (others' CPUs) |" if fps else ""))
    print("|---" * (5 + bool(fps)) + "|")
    base = training_flops(sizes[0], sizes[0], len(MODALITIES), len(L.REGIONS))
    for mode in modes:
        for size in sizes:
            cells = []
            for way in WAYS:
                d = scores[(mode, size, way)]
                m = d.mean(0)
                cells.append(f"{m[0]:.3f} / {m[1]:.3f} / {m[2]:.3f} ({d[:, 2].min():.3f})")
            flops = training_flops(size, size, len(MODALITIES), len(L.REGIONS))
            cells.append(f"{flops / 1e9:.1f} G ({flops / base:.2f})")
            if fps:
                rates, busy = zip(*fps[size])
                cells.append(f"{np.median(rates):.2f} ({np.mean(busy):.1f})")
            print(f"| {mode} | {size} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
