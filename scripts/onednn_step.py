#!/usr/bin/env python3
"""Training steps of the demo's model in one process, one intra- and one inter-op thread, for oneDNN's
primitive log (each step prints ``STEP_MS <ms>``; scripts/onednn_summary.py sums the last one):

    ONEDNN_MAX_CPU_ISA=AVX2 ONEDNN_VERBOSE=1 LD_PRELOAD=libtcmalloc_minimal.so.4 taskset -c 1 \
        .venv/bin/python scripts/onednn_step.py 3 > onednn.log
    .venv/bin/python scripts/onednn_summary.py onednn.log

The step is the trainer's without the allreduce: the demo's network (128x128x4 -> 3 regions), batch 4,
region_dice_bce, Adam; random inputs (the kernels oneDNN picks depend on the shapes only).
"""
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)

import keras  # noqa: E402

from unet.model import build_unet  # noqa: E402
from unet.training.losses import get_loss  # noqa: E402


def main(steps: int) -> int:
    model = build_unet(128, 128, 4, 3, dropout=0.0)
    opt = keras.optimizers.Adam(1e-4)
    opt.build(model.trainable_variables)
    loss_fn = get_loss("region_dice_bce")
    x = tf.constant(np.random.default_rng(0).random((4, 128, 128, 4), np.float32))
    y = tf.constant((np.random.default_rng(1).random((4, 128, 128, 3)) > 0.7).astype(np.float32))

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        return loss

    for _ in range(steps):
        t0 = time.perf_counter()
        float(step(x, y))
        print("STEP_MS", (time.perf_counter() - t0) * 1e3, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 3))
