#!/usr/bin/env python3
"""One PNG of what TensorBoard's Images tab shows for a training run: the input (FLAIR), ground-truth and
prediction images rank 0 logged at its last image step, one row per slice, read from the event files
(``tensorboard``'s own event reader, no server).

    .venv/bin/python scripts/tensorboard_figure.py --logdir runs/demo/logs --out docs/tensorboard_images.png
"""
from __future__ import annotations

import argparse
import io
import os
import sys

import numpy as np

TAGS = ("input", "ground_truth", "prediction")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--logdir", required=True, help="the training run's --logdir")
    ap.add_argument("--out", required=True, help="PNG to write")
    a = ap.parse_args(argv)
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import TENSORS, EventAccumulator
    from tensorboard.util import tensor_util
    acc = EventAccumulator(os.path.join(a.logdir, "train"), size_guidance={TENSORS: 0})
    acc.Reload()
    tags = acc.Tags()["tensors"]
    missing = [t for t in TAGS if t not in tags]
    if missing:
        sys.exit(f"tensorboard_figure.py: error: {a.logdir}/train has no '{missing[0]}' images")
    step = min(max(e.step for e in acc.Tensors(t)) for t in TAGS)
    columns = []
    for tag in TAGS:   # a TF2 image summary: width, height, then one PNG per image
        ev = [e for e in acc.Tensors(tag) if e.step == step][0]
        pngs = tensor_util.make_ndarray(ev.tensor_proto)[2:]
        columns.append([np.asarray(Image.open(io.BytesIO(bytes(p))).convert("RGB")) for p in pngs])
    rows = [np.concatenate([np.pad(c[i], ((2, 2), (2, 2), (0, 0)), constant_values=255) for c in columns], 1)
            for i in range(min(map(len, columns)))]
    Image.fromarray(np.concatenate(rows, 0)).save(a.out)
    print(f"{a.out}: step {step}, {len(rows)} slice(s), columns {', '.join(TAGS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
