"""Benchmark mode (``train_hvd.py --benchmark``): timed training steps on a fixed in-memory batch.

Rank 0 prints one line:

    benchmark: ranks=R threads_per_rank=T global_batch=G img_per_sec=X p50_ms=.. p90_ms=.. p99_ms=..
               allreduce_ms=.. allreduce_alone_ms=.. mpi_allreduce_ms=.. grad_mb=.. [precision=bf16]

* img_per_sec: global images per second over the timed steps (warm-up excluded);
* allreduce_ms: what the allreduce adds to a step, p50(step) - p50(same step without the allreduce);
* allreduce_alone_ms: p50 of Horovod's grouped allreduce of the gradients on its own;
* mpi_allreduce_ms: p50 of a raw MPI_Allreduce (mpi4py) of the same bytes, the floor to compare with;
* precision: last, and only when not the default fp32 (an fp32 line is unchanged).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BenchOptions:
    """What --benchmark times (from the trainer's flags)."""
    batch_size: int            # images per rank per step
    warmup_steps: int = 5      # untimed steps first
    bench_steps: int = 20      # timed steps
    precision: str = "fp32"    # named on the line when not fp32


def percentiles(ms: list[float]) -> tuple[float, float, float]:
    a = np.asarray(ms, float)
    return tuple(float(np.percentile(a, q)) for q in (50, 90, 99))


def precision_field(precision: str) -> str:
    """The benchmark line's last field: empty for fp32, else `` precision=<name>``."""
    return "" if precision == "fp32" else f" precision={precision}"


def _timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def run(opts: BenchOptions, setup, hvd, model, optimizer, train_step, loss_fn, source) -> int:
    import tensorflow as tf
    x, y = source.read(np.arange(opts.batch_size) + hvd.rank() * opts.batch_size)
    x, y = tf.constant(x), tf.constant(y)
    size = hvd.size()
    for _ in range(opts.warmup_steps):
        train_step(x, y)[0].numpy()
    step_ms = _timed(lambda: train_step(x, y)[0].numpy(), opts.bench_steps)

    @tf.function
    def local_step(x, y):  # the same step without the allreduce
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    grads = [tf.zeros_like(v.value) for v in model.trainable_variables]

    @tf.function
    def allreduce_alone(tensors):
        return hvd.grouped_allreduce(list(tensors), op=hvd.Average)[0]

    for _ in range(2):
        local_step(x, y).numpy()
        allreduce_alone(grads).numpy()
    hvd.allreduce(tf.constant(0.0))            # line the ranks up before each timed phase
    local_ms = _timed(lambda: local_step(x, y).numpy(), max(opts.bench_steps // 2, 3))
    hvd.allreduce(tf.constant(0.0))
    alone_ms = _timed(lambda: allreduce_alone(grads).numpy(), opts.bench_steps)
    nbytes = sum(int(np.prod(v.shape)) * 4 for v in model.trainable_variables)
    mpi_ms = [0.0]
    if setup.comm is not None and size > 1:
        from mpi4py import MPI
        send = np.ones(nbytes // 4, np.float32)
        recv = np.empty_like(send)
        setup.comm.Barrier()
        mpi_ms = _timed(lambda: setup.comm.Allreduce(send, recv, op=MPI.SUM), opts.bench_steps)
    p50, p90, p99 = percentiles(step_ms)
    ar = max(p50 - percentiles(local_ms)[0], 0.0) if size > 1 else 0.0
    if hvd.rank() == 0:
        g = opts.batch_size * size
        print(f"benchmark: ranks={size} threads_per_rank={setup.intra} global_batch={g} "
              f"img_per_sec={g * 1e3 / float(np.mean(step_ms)):.2f} p50_ms={p50:.1f} p90_ms={p90:.1f} "
              f"p99_ms={p99:.1f} allreduce_ms={ar:.1f} allreduce_alone_ms={percentiles(alone_ms)[0]:.1f} "
              f"mpi_allreduce_ms={percentiles(mpi_ms)[0]:.1f} grad_mb={nbytes / 1e6:.1f}"
              + precision_field(opts.precision), flush=True)
    return 0
