"""The outside baseline for the scaling report: the same model and step under
tf.distribute.MultiWorkerMirroredStrategy, one plain process per worker.

    python -m unet.perf.mwms --workers 2 --batch_size 8 [--steps 20 --warmup 5]

The parent starts the workers on localhost ports (TF_CONFIG), each pinned to its
own CPU with one intra-op thread, and prints one line like train_hvd.py --benchmark:
``benchmark: mwms workers=W threads_per_rank=1 global_batch=G img_per_sec=X p50_ms=..``.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def worker(index: int, workers: int, batch_size: int, size: int, steps: int, warmup: int) -> int:
    """Worker ``index`` of ``workers``: ``warmup`` untimed and ``steps`` timed steps of ``batch_size`` images."""
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[index % len(cpus)]})
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import numpy as np
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import keras

    from unet.data.sources import SyntheticSource
    from unet.model import build_unet
    from unet.training.losses import dice_loss
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        model = build_unet(size, size, 1, 1)
        opt = keras.optimizers.Adam(0.0005)
    x, y = SyntheticSource(batch_size * workers, size, 1, 1, 0, "train").read(
        np.arange(batch_size) + index * batch_size)
    dist = strategy.experimental_distribute_values_from_function(lambda ctx: (tf.constant(x), tf.constant(y)))

    @tf.function
    def step(batch):
        def fn(xy):
            xx, yy = xy
            with tf.GradientTape() as tape:
                loss = dice_loss(yy, model(xx, training=True))
            grads = tape.gradient(loss, model.trainable_variables)
            grads = tf.distribute.get_replica_context().all_reduce("mean", grads)
            opt.apply_gradients(zip(grads, model.trainable_variables))
            return loss
        return strategy.run(fn, args=(batch,))

    for _ in range(warmup):
        strategy.experimental_local_results(step(dist))[0].numpy()
    ms = []
    for _ in range(steps):
        t = time.perf_counter()
        strategy.experimental_local_results(step(dist))[0].numpy()
        ms.append((time.perf_counter() - t) * 1e3)
    if index == 0:
        g = batch_size * workers
        p = np.percentile(ms, [50, 90, 99])
        print(f"benchmark: mwms workers={workers} threads_per_rank=1 global_batch={g} "
              f"img_per_sec={g * 1e3 / np.mean(ms):.2f} p50_ms={p[0]:.1f} p90_ms={p[1]:.1f} p99_ms={p[2]:.1f}",
              flush=True)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench_mwms", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch_size", type=int, default=8, help="images per worker per step")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--index", type=int, default=-1, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.index >= 0:
        return worker(a.index, a.workers, a.batch_size, a.size, a.steps, a.warmup)
    ports = _free_ports(a.workers)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for i in range(a.workers):
        env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}))
        procs.append(subprocess.Popen([sys.executable, "-m", "unet.perf.mwms", *map(str, (
            "--workers", a.workers, "--batch_size", a.batch_size, "--size", a.size, "--steps", a.steps,
            "--warmup", a.warmup, "--index", i))], env=env))
    codes = [p.wait() for p in procs]
    return max(codes)


if __name__ == "__main__":
    sys.exit(main())
