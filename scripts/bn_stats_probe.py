"""How much of a batch-normalised model's validation Dice, epoch to epoch, is its moving statistics.

For each checkpoint of a run (its ``checkpoints/ckpt-*.npz``, one per epoch end), the validation Dice of
the run's own file as the trainer computes it (threshold 0.5, pooled sums), twice: with the moving
statistics the checkpoint holds (the last ~10 batches at momentum 0.9), and with statistics recomputed
over the training split (every training slice once, unaugmented, in batches of ``--batch`` per forward
pass, each batch's mean and variance averaged with equal weight). One process, no Horovod.

    .venv/bin/python scripts/bn_stats_probe.py --logdir runs/rob_bn/b4_lr1e-3_seed2/logs [--batch 4] \
        [--batches 16,32,0 --draws 3] [--ranks 2]
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--logdir", required=True, help="a run's --logdir (model.json and checkpoints/)")
    ap.add_argument("--batch", type=int, default=4, help="slices per forward pass when recomputing (default 4)")
    ap.add_argument("--data", help="the file (default: model.json's)")
    ap.add_argument("--batches", default="0",
                    help="comma-separated numbers of batches to recompute from (0: every training slice once; "
                         "default 0); each number drawn --draws times from other random orders")
    ap.add_argument("--draws", type=int, default=1, help="random draws per number of batches (default 1)")
    ap.add_argument("--ranks", type=int, default=0,
                    help="draw as the trainer's --bn_batches does on this many ranks: --batches per rank, the "
                         "first of each rank in epoch 0, 1, ... (one per draw) of the run's seed (default 0: "
                         "--batches in all, from a random order)")
    a = ap.parse_args(argv)
    meta_path = os.path.join(a.logdir, "model.json")
    if not os.path.isfile(meta_path):
        sys.exit(f"bn_stats_probe.py: error: --logdir {a.logdir}: no model.json")
    meta = json.load(open(meta_path))
    ckpts = sorted(glob.glob(os.path.join(a.logdir, "checkpoints", "ckpt-*.npz")))
    if not ckpts:
        sys.exit(f"bn_stats_probe.py: error: --logdir {a.logdir}: no checkpoints/ckpt-*.npz")

    import tensorflow as tf

    from unet.data.sources import H5Source
    from unet.model import build_unet
    from unet.training.checkpoint import load_checkpoint
    from unet.training.losses import dice_from_sums
    from unet.training.validation import pooled_sums

    d, m = meta["data"], meta["model"]
    if m.get("norm") != "batch":
        sys.exit(f"bn_stats_probe.py: error: --logdir {a.logdir}: norm {m.get('norm')!r}, not batch")
    data = a.data or d["file"]
    train, val = H5Source(data, "train"), H5Source(data, "val")
    model = build_unet(d["height"], d["width"], d["channels"], d["regions"], use_upsampling=m["use_upsampling"],
                       dropout=m["dropout"], norm="batch", activation=m["activation"])
    bns = [layer for layer in model.layers if type(layer).__name__ == "BatchNormalization"]
    infer = tf.function(lambda x: model(x, training=False))

    def val_dice():
        batches = (val.read(range(s, min(s + 16, len(val)))) for s in range(0, len(val), 16))
        sums, _, _ = pooled_sums(infer, batches, regions=d["regions"])
        return np.asarray(dice_from_sums(sums))

    def recompute(batches: int, draw: int):
        if a.ranks:     # the trainer's: each rank's first ``batches`` of epoch ``draw``
            from unet.data.pipeline import rank_batches
            chosen = [b for r in range(a.ranks)
                      for b in rank_batches(len(train), a.batch, r, a.ranks, draw, meta["seed"], cap=batches)]
        else:
            order = np.random.default_rng(draw).permutation(len(train))
            if batches:
                order = order[:batches * a.batch]
            chosen = [order[s:s + a.batch] for s in range(0, len(order) - a.batch + 1, a.batch)]
        saved = [layer.momentum for layer in bns]
        for k, idx in enumerate(chosen):
            for layer in bns:           # moving = running mean of the batches' statistics
                layer.momentum = k / (k + 1)
            x, _ = train.read(sorted(idx))
            model(x, training=True)
        for layer, mom in zip(bns, saved):
            layer.momentum = mom

    print(f"{a.logdir}: {len(train)} training, {len(val)} validation slices; Dice WT/TC/ET")
    print(f"{'checkpoint':<22} {'stored statistics':<24} {'batches, draw':<14} {'recomputed':<24} "
          f"shift of the first moving mean")
    fmt = lambda v: " / ".join(f"{x:.3f}" for x in v)
    for path in ckpts:
        load_checkpoint(path, model=model, optimizer=None)
        stored = [v.numpy().copy() for layer in bns for v in (layer.moving_mean, layer.moving_variance)]
        before = val_dice()
        for batches in (int(b) for b in a.batches.split(",")):
            for draw in range(a.draws):
                recompute(batches, draw)
                after = val_dice()
                shift = float(np.abs(bns[0].moving_mean.numpy() - stored[0]).mean())
                used = f"{batches or len(train) // a.batch}, {draw}"
                print(f"{os.path.basename(path):<22} {fmt(before):<24} {used:<14} {fmt(after):<24} {shift:.4f}",
                      flush=True)
                for v, value in zip((v for layer in bns for v in (layer.moving_mean, layer.moving_variance)), stored):
                    v.assign(value)
    return 0


if __name__ == "__main__":
    sys.exit(main())
