#!/usr/bin/env python3
"""What a collapsed network looks like inside: for each checkpoint of a training run, on training slices with tumour,
the sigmoid head's bias per region, the mean predicted probability inside and outside each region, and the share of
the 3x3 convolutions' channels that are dead (activation <= 0 at every pixel of every slice probed: no gradient
reaches them) for the last decoder level (conv9b, the head's only input) and over all levels.

  .venv/bin/python scripts/collapse_probe.py --logdir LOGDIR --data runs/demo/brats.h5
(train with --checkpoint_every 10 --keep_checkpoints 100 for a checkpoint every 10 steps).
"""
from __future__ import annotations

import argparse
import glob
import json
import os

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="collapse_probe.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--logdir", required=True, help="the run's --logdir (its checkpoints/ are probed)")
    p.add_argument("--data", required=True, help="the HDF5 file it trained on")
    p.add_argument("--slices", type=int, default=32, help="training slices with tumour to probe")
    a = p.parse_args(argv)
    import keras

    from unet.data.sources import H5Source
    from unet.model import build_unet
    from unet.training.checkpoint import load_checkpoint
    src = H5Source(a.data, "train")
    _, msks_all = src.read(range(len(src)))
    with_tumour = np.flatnonzero(msks_all[..., -1].reshape(len(src), -1).max(1) > 0)
    idx = with_tumour[np.linspace(0, len(with_tumour) - 1, min(a.slices, len(with_tumour))).astype(int)]
    x, y = src.read(idx)
    paths = sorted(glob.glob(os.path.join(a.logdir, "checkpoints", "ckpt-*.npz")))
    with np.load(paths[0], allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
    m = meta.get("model", {})
    h, w, c, r = src.shape
    model = build_unet(h, w, c, r, use_upsampling=m.get("use_upsampling", False), dropout=m.get("dropout", 0.0),
                       norm=m.get("norm", "none"), activation=m.get("activation", "relu"))
    # the activation output of every 3x3 convolution: its relu layer, or the conv itself (ReLU fused, the seed's)
    layer_names = {l.name for l in model.layers}
    outs = {l.name[4:]: model.get_layer("relu" + l.name[4:] if "relu" + l.name[4:] in layer_names else l.name).output
            for l in model.layers if type(l).__name__ == "Conv2D" and l.kernel_size == (3, 3)}
    probe = keras.Model(model.input, [model.output] + [outs[k] for k in sorted(outs)])
    names = sorted(outs)
    print("step | head bias WT/TC/ET | mean p inside WT/TC/ET | mean p outside | median logit WT/TC/ET | dead conv9b | "
          "dead all")
    for path in paths:
        load_checkpoint(path, model=model, optimizer=None)
        step = int(os.path.basename(path)[5:13])
        res = probe(x, training=False)
        pred, acts = np.asarray(res[0]), [np.asarray(t) for t in res[1:]]
        bias = model.get_layer("mask").bias.numpy()
        inside = [(pred[..., k] * y[..., k]).sum() / max(y[..., k].sum(), 1) for k in range(r)]
        outside = [(pred[..., k] * (1 - y[..., k])).sum() / max((1 - y[..., k]).sum(), 1) for k in range(r)]
        head = model.get_layer("mask")
        last = acts[names.index("9b")]
        logit = np.median((last @ head.kernel.numpy()[0, 0] + head.bias.numpy()).reshape(-1, r), axis=0)
        dead = {n: float(np.mean(a.reshape(-1, a.shape[-1]).max(0) <= 0)) for n, a in zip(names, acts)}
        total = sum(dead[n] * a.shape[-1] for n, a in zip(names, acts)) / sum(a.shape[-1] for a in acts)
        print(f"{step} | " + "/".join(f"{b:.2f}" for b in bias) + " | " + "/".join(f"{v:.3f}" for v in inside)
              + " | " + "/".join(f"{v:.4f}" for v in outside) + " | " + "/".join(f"{v:.1f}" for v in logit)
              + f" | {dead.get('9b', float('nan')):.2f} | {total:.2f}",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
