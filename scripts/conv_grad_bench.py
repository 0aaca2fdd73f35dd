#!/usr/bin/env python
"""The gradients of the U-Net's 3x3 convolutions, several ways, one process, one thread.

TensorFlow's own op (``Conv2DBackpropFilter``: oneDNN's backward-weights kernel, ``jit:avx2`` when the ISA
is capped at AVX2), ``extract_patches`` + one GEMM (im2col), and nine GEMMs, one per kernel tap, each over
the shifted input (no patch matrix). Same arithmetic, other summation order: the relative difference to
the op is printed. Then both gradients (input and kernel) of each shape as the trainer computes them:
TensorFlow's gradient ops against ``--conv_grad forward`` (``unet/training/convgrad.py``: both as forward
convolutions). Run it pinned to one core, e.g.

    ONEDNN_MAX_CPU_ISA=AVX2 taskset -c 1 .venv/bin/python scripts/conv_grad_bench.py --repeats 7

and compare the times per layer shape (batch 4 per rank, the demo's 128x128 input; docs/PERFORMANCE.md).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# (height = width, input channels, output channels) of the network's 3x3 convolutions at a 128x128 input:
# one of each level, plus the decoder's first convolution after a concatenation at the top level
SHAPES = [(128, 32, 32), (64, 64, 64), (32, 128, 128), (16, 256, 256), (8, 512, 512), (128, 64, 32)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4, help="images per call (the demo's batch per rank)")
    p.add_argument("--repeats", type=int, default=7, help="timed calls per way and shape (the median is kept)")
    a = p.parse_args(argv)

    import numpy as np
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)

    @tf.function
    def op(x, dy, k):
        return tf.raw_ops.Conv2DBackpropFilter(input=x, filter_sizes=tf.shape(k), out_backprop=dy,
                                               strides=[1, 1, 1, 1], padding="SAME")

    @tf.function
    def im2col(x, dy, k):
        cin, cout = x.shape[-1], dy.shape[-1]
        patches = tf.image.extract_patches(tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]]), sizes=[1, 3, 3, 1],
                                           strides=[1, 1, 1, 1], rates=[1, 1, 1, 1], padding="VALID")
        g = tf.matmul(tf.reshape(patches, [-1, 9 * cin]), tf.reshape(dy, [-1, cout]), transpose_a=True)
        return tf.reshape(g, [3, 3, cin, cout])

    @tf.function
    def taps(x, dy, k):
        hw, cin, cout = x.shape[1], x.shape[-1], dy.shape[-1]
        xp = tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])
        d = tf.reshape(dy, [-1, cout])
        g = [tf.matmul(tf.reshape(xp[:, i:i + hw, j:j + hw, :], [-1, cin]), d, transpose_a=True)
             for i in range(3) for j in range(3)]
        return tf.reshape(tf.stack(g), [3, 3, cin, cout])

    ways = {"op": op, "im2col": im2col, "9 GEMMs": taps}
    total = dict.fromkeys(ways, 0.0)
    rng = np.random.default_rng(0)
    for hw, cin, cout in SHAPES:
        x = tf.constant(rng.standard_normal((a.batch, hw, hw, cin), np.float32))
        dy = tf.constant(rng.standard_normal((a.batch, hw, hw, cout), np.float32))
        k = tf.zeros([3, 3, cin, cout])
        ref = op(x, dy, k).numpy()
        gflop = 2 * a.batch * hw * hw * 9 * cin * cout / 1e9
        cells = []
        for name, f in ways.items():
            err = float(np.abs(f(x, dy, k).numpy() - ref).max() / np.abs(ref).max())
            ts = []
            for _ in range(a.repeats):
                t = time.perf_counter()
                f(x, dy, k).numpy()
                ts.append(time.perf_counter() - t)
            med = float(np.median(ts))
            total[name] += med
            cells.append(f"{name} {med * 1e3:6.1f} ms {gflop / med:5.1f} GFLOP/s (rel. diff {err:.0e})")
        print(f"{hw:3d}x{hw:<3d} {cin:3d}->{cout:<3d}: " + "; ".join(cells), flush=True)
    base = total["op"]
    print("weight gradient, sum over the shapes: " + "; ".join(f"{n} {t * 1e3:.1f} ms ({base / t:.2f}x the op)"
                                                               for n, t in total.items()), flush=True)
    both_ways(a, np, tf)
    return 0


def both_ways(a, np, tf) -> None:
    """Input and kernel gradient together, as the training step asks for them: TensorFlow's ops against
    the forward-convolution formulation the trainer's --conv_grad forward installs."""
    from unet.training.convgrad import conv_forward_grads

    def grads(fn):
        @tf.function
        def g(x, k, dy):
            with tf.GradientTape() as tape:
                tape.watch([x, k])
                y = fn(x, k)
            return tape.gradient(y, [x, k], output_gradients=dy)
        return g
    ways = {"tf": grads(lambda x, k: tf.nn.conv2d(x, k, 1, "SAME")), "forward": grads(conv_forward_grads)}
    total = dict.fromkeys(ways, 0.0)
    rng = np.random.default_rng(0)
    for hw, cin, cout in SHAPES:
        x = tf.constant(rng.standard_normal((a.batch, hw, hw, cin), np.float32))
        k = tf.constant(rng.standard_normal((3, 3, cin, cout), np.float32) * 0.1)
        dy = tf.constant(rng.standard_normal((a.batch, hw, hw, cout), np.float32))
        gflop = 2 * 2 * a.batch * hw * hw * 9 * cin * cout / 1e9
        cells = []
        for name, f in ways.items():
            f(x, k, dy)
            ts = []
            for _ in range(a.repeats):
                t = time.perf_counter()
                [v.numpy() for v in f(x, k, dy)]
                ts.append(time.perf_counter() - t)
            med = float(np.median(ts))
            total[name] += med
            cells.append(f"{name} {med * 1e3:6.1f} ms {gflop / med:5.1f} GFLOP/s")
        print(f"both gradients {hw:3d}x{hw:<3d} {cin:3d}->{cout:<3d}: " + "; ".join(cells), flush=True)
    print("both gradients, sum over the shapes: " + "; ".join(
        f"{n} {t * 1e3:.1f} ms ({total['tf'] / t:.2f}x tf)" for n, t in total.items()))


if __name__ == "__main__":
    raise SystemExit(main())
