#!/usr/bin/env python
"""Tumour slices in the file (``unet-convert --slices tumour``) against every brain slice in the file and
tumour oversampled in each batch (``train_hvd.py --foreground_fraction F``), at the same image budget.

Each run trains as scripts/demo.sh does (2 ranks, batch 4 per rank, rate 0.001, 4 epochs, the demo's other training
flags: ``--flags``, by default scripts/robustness.py's ``DEMO_FLAGS``) and is scored as the demo scores it
(``unet-evaluate --model --tta lr``, default post-processing, volume-level): on the file's validation cases, or with
``--score_cases DIR`` on the cases of a tuning set (not the demo's test cases). The ``--slices tumour`` run's epoch
length (ceil(training slices / 8) steps) caps the epochs of the ``--foreground_fraction`` runs
(``--steps_per_epoch``), so they train the same number of images with the same warmup, decay and validation
points; a ``--background_fractions`` run's epoch is its tumour slices and that share of the others, a new draw
each epoch (``train_hvd.py --background_fraction``), uncapped. oneDNN runs at ONEDNN_MAX_CPU_ISA (default AVX2,
the project's target machine; another instruction set rounds differently and sends training down another path).
Also printed: how many of the images trained on held tumour and enhancing tumour (counted from the file's masks
and the trainer's own sample order, ``unet.data.pipeline.rank_batches`` and ``epoch_members``).

    .venv/bin/python scripts/sampling_runs.py --cases runs/demo/cases --out runs/sampling [--fractions 0,0.33,0.5] \
        [--background_fractions 0.1,0.3] [--score_cases runs/tune3]

The figures of the recipe before (docs/TRAINING.md, 2026-12-01) came from ``--learningrate 0.0004 --epochs 3
--flags '' --tta all``.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import re
import shlex
import subprocess
import sys
import time

import h5py
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from robustness import DEMO_FLAGS  # noqa: E402  (scripts/ is this script's folder, first on sys.path)

from unet.data.pipeline import epoch_members, foreground_per_batch, rank_batches  # noqa: E402

PY = sys.executable
RANKS, BATCH = 2, 4


ISA = os.environ.get("ONEDNN_MAX_CPU_ISA", "AVX2")   # the project's 2-core AVX2 target, imitated


def run(cmd: list[str], log: str) -> str:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    if ISA:
        env["ONEDNN_MAX_CPU_ISA"] = ISA
    with open(log, "w") as fh:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=fh, text=True, env=env, cwd=ROOT)
        fh.write(p.stdout)
    if p.returncode:
        sys.exit(f"sampling_runs.py: error: {' '.join(cmd[:6])} ... failed (exit {p.returncode}); see {log}")
    return p.stdout


def convert(cases: str, out: str, slices: str, size: int, inplane: str) -> str:
    if not os.path.exists(out):
        run([PY, "-m", "unet.data.convert", "--input", cases, "--output", out, "--size", str(size), "--inplane",
             inplane, "--workers", "2", "--slices", slices, "--no_progress"], out + ".log")
    return out


def images_seen(h5: str, epochs: int, cap: int | None, fraction: float, seed: int = 816,
                background: float = 1.0) -> tuple[int, int, int]:
    """(images, with tumour, with ET) over the run, in the trainer's sample order."""
    with h5py.File(h5) as f:
        m = f["train"]["masks"][:]
    tumour, et = m.reshape(len(m), -1, m.shape[-1]).any(1)[:, [0, -1]].T
    k = foreground_per_batch(fraction, BATCH)
    fg = np.flatnonzero(tumour)
    idx = np.concatenate([
        np.concatenate(rank_batches(len(m), BATCH, r, RANKS, e, seed, cap or 0, foreground=fg if k else None, k=k,
                                    members=epoch_members(len(m), fg, background, e, seed) if background < 1 else None))
        for e in range(epochs) for r in range(RANKS)])
    return len(idx), int(tumour[idx].sum()), int(et[idx].sum())


def train_and_score(name: str, h5: str, out: str, epochs: int, cap: int | None, fraction: float, seed: int,
                    rate: float, score_cases: str | None, flags: str = DEMO_FLAGS, tta: str = "lr",
                    background: float = 1.0) -> dict:
    logs = os.path.join(out, f"logs-{name}")
    t0 = time.time()
    run(["mpirun", "-np", str(RANKS), "--oversubscribe", PY, os.path.join(ROOT, "train_hvd.py"), "--data", h5,
         "--batch_size", str(BATCH), "--learningrate", repr(rate), "--epochs", str(epochs),
         *(["--steps_per_epoch", str(cap)] if cap else []), "--foreground_fraction", str(fraction),
         "--background_fraction", str(background), "--seed", str(seed), *shlex.split(flags), "--log_every", "10",
         "--logdir", logs, "--fresh"], os.path.join(out, f"train-{name}.log"))
    seconds = time.time() - t0
    with open(os.path.join(logs, "training.log")) as fh:
        val = [tuple(float(x) for x in re.findall(r"dice_\w+ ([0-9.]+)", l)) for l in fh if l.startswith("validation")]
    scores = os.path.join(out, f"scores-{name}.csv")
    run(["mpirun", "-np", str(RANKS), "--oversubscribe", PY, "-m", "unet.evaluation.evaluate", "--model", logs,
         *(["--cases", score_cases] if score_cases else ["--data", h5]), "--csv", scores,
         *(["--tta", tta] if tta else []), "--metrics", "legacy"], os.path.join(out, f"eval-{name}.log"))
    with open(scores) as fh:
        rows = list(csv.DictReader(fh))
    volume = {c: float(np.mean([float(r[c]) for r in rows])) for c in rows[0] if c != "case"}
    per_case_et = [float(r["dice_ET"]) for r in rows]
    return dict(name=name, val=val, volume=volume, per_case_et=per_case_et, seconds=seconds,
                seen=images_seen(h5, epochs, cap, fraction, seed, background))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="sampling_runs.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", required=True, help="dataset root of NIfTI cases (the demo's: unet-synth --seed 0)")
    ap.add_argument("--out", required=True, help="folder for the files, logs and scores")
    ap.add_argument("--fractions", default="0,0.33,0.5", help="--foreground_fraction values on every brain slice")
    ap.add_argument("--no_tumour_run", action="store_true", help="skip the --slices tumour run (the baseline)")
    ap.add_argument("--background_fractions", default="",
                    help="--background_fraction values on every brain slice (each epoch: the tumour slices and that "
                         "share of the others, uncapped)")
    ap.add_argument("--epochs", type=int, default=4, help="epochs of every run (the demo's 4)")
    ap.add_argument("--learningrate", type=float, default=0.001, help="train_hvd.py --learningrate (the demo's)")
    ap.add_argument("--flags", default=DEMO_FLAGS,
                    help=f"the other training flags of every run (default: the demo's, {DEMO_FLAGS!r})")
    ap.add_argument("--tta", default="lr", choices=("", "lr", "all"),
                    help="unet-evaluate's --tta for the scoring (the demo's: lr; '': none)")
    ap.add_argument("--score_cases", default=None,
                    help="dataset root to score instead of the file's validation cases (a tuning set)")
    ap.add_argument("--size", type=int, default=128, help="in-plane size (pixels)")
    ap.add_argument("--inplane", default="crop_resize", help="in-plane mode of the conversion (the demo's)")
    ap.add_argument("--seed", type=int, default=816, help="train_hvd.py --seed (weights, sample order, augmentation)")
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    tag = f"{a.inplane}{a.size}" + (f"-seed{a.seed}" if a.seed != 816 else "")
    files = f"{a.inplane}{a.size}"
    tumour_h5 = convert(a.cases, os.path.join(a.out, f"tumour-{files}.h5"), "tumour", a.size, a.inplane)
    brain_h5 = convert(a.cases, os.path.join(a.out, f"brain-{files}.h5"), "brain", a.size, a.inplane)
    with h5py.File(tumour_h5) as f:
        cap = math.ceil(len(f["train"]["images"]) / (RANKS * BATCH))
    runs = [] if a.no_tumour_run else [("tumour-slices", tumour_h5, 0.0, 1.0)]
    runs += [(f"brain-F{f}", brain_h5, float(f), 1.0) for f in a.fractions.split(",") if f]
    runs += [(f"brain-B{b}", brain_h5, 0.0, float(b)) for b in a.background_fractions.split(",") if b]
    results = []
    for name, h5, fraction, background in runs:
        steps = cap if background >= 1 else None
        print(f"  {name}: training {a.epochs} epochs" + (f" x {steps} steps" if steps else ""), file=sys.stderr,
              flush=True)
        results.append(train_and_score(f"{name}-{tag}", h5, a.out, a.epochs, steps, fraction, a.seed,
                                       a.learningrate, a.score_cases, a.flags, a.tta, background))
    print(f"{a.epochs} epochs of {RANKS * BATCH} images a step ({cap} steps where capped); validation Dice (slices, "
          f"WT / TC / ET) after each epoch; volume Dice with --tta {a.tta or 'off'}, mean over "
          f"{a.score_cases or 'the validation cases'}")
    print("| run | images: with tumour / with ET | validation Dice per epoch | volume Dice WT / TC / ET "
          "(ET per case) | HD95 WT (mm) | training s |")
    print("|---|---|---|---|---|---|")
    for r in results:
        n, t, e = r["seen"]
        val = " → ".join("/".join(f"{d:.3f}" for d in v) for v in r["val"])
        v = r["volume"]
        et = ", ".join(f"{d:.3f}" for d in r["per_case_et"])
        print(f"| {r['name']} | {n}: {t} / {e} | {val} | {v['dice_WT']:.4f} / {v['dice_TC']:.4f} / "
              f"{v['dice_ET']:.4f} ({et}) | {v['hd95_WT']:.2f} | {r['seconds']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
