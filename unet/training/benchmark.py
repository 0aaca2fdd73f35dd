"""Benchmark mode (``train_hvd.py --benchmark``): timed training steps on a fixed in-memory batch.

Rank 0 prints one line:

    benchmark: ranks=R threads_per_rank=T global_batch=G img_per_sec=X p50_ms=.. p90_ms=.. p99_ms=..
               allreduce_ms=.. allreduce_alone_ms=.. mpi_allreduce_ms=.. grad_mb=..
               gflop_per_sec=.. peak_gflops=.. peak_share=.. isa=native|avx2 [precision=bf16]

* img_per_sec: global images per second over the timed steps (warm-up excluded);
* allreduce_ms: what the allreduce adds to a step, p50(step) - p50(same step without the allreduce);
* allreduce_alone_ms: p50 of Horovod's grouped allreduce of the gradients on its own;
* mpi_allreduce_ms: p50 of a raw MPI_Allreduce (mpi4py) of the same bytes, the floor to compare with;
* gflop_per_sec: img_per_sec x the training flops of one image, counted from the model's convolutions
  (``training_flops``);
* peak_gflops: the fp32 peak of the cores the ranks are bound to, measured by ``unet.perf.peak`` on
  every rank at once (its AVX2 kernel under ``ONEDNN_MAX_CPU_ISA=AVX2``, as isa= says), and
  peak_share = gflop_per_sec / peak_gflops (-1 and 0 when it could not be measured). The measurement
  runs as a child process of each rank: the training layer does not import ``unet.perf``;
* precision: last, and only when not the default fp32.
"""
from __future__ import annotations

import re
import subprocess
import sys
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


def training_flops(model) -> int:
    """Flops of one training image in the model's convolutions, from its built layers: the forward
    pass (2 per multiply-add; a transposed convolution over its input grid), the weight gradients
    (as much again) and the input gradients (again, except for the first convolution)."""
    forward, first = 0, None
    for layer in model.layers:
        kernel = getattr(layer, "kernel", None)
        if kernel is None or len(kernel.shape) != 4:
            continue
        kh, kw, a, b = kernel.shape
        transposed = "Transpose" in type(layer).__name__      # its kernel is (kh, kw, out, in)
        _, h, w, _ = (layer.input if transposed else layer.output).shape
        f = 2 * h * w * kh * kw * a * b
        forward += f
        first = f if first is None else first
    return 3 * forward - (first or 0)


def rank_peak(cores: int) -> tuple[float, str]:
    """(fp32 flop/s of this rank's cores, isa) from ``python -m unet.perf.peak`` run as a child (it
    inherits the rank's binding); (0, reason) when it could not be measured."""
    try:
        p = subprocess.run([sys.executable, "-m", "unet.perf.peak", "--cores", str(cores)], capture_output=True,
                           text=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as e:
        return 0.0, type(e).__name__
    m = re.search(r"gflops=([\d.]+) cores=\d+ isa=(\w+)", p.stdout)
    return (float(m.group(1)) * 1e9, m.group(2)) if m else (0.0, "none")


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
    hvd.allreduce(tf.constant(0.0))            # every rank measures its cores' peak at the same time
    mine, isa = rank_peak(setup.intra)
    peaks = hvd.allgather_object(mine)
    if hvd.rank() == 0:
        g = opts.batch_size * size
        ips = g * 1e3 / float(np.mean(step_ms))
        gflops, peak = ips * training_flops(model) / 1e9, sum(peaks) / 1e9 if all(peaks) else 0.0
        print(f"benchmark: ranks={size} threads_per_rank={setup.intra} global_batch={g} "
              f"img_per_sec={ips:.2f} p50_ms={p50:.1f} p90_ms={p90:.1f} "
              f"p99_ms={p99:.1f} allreduce_ms={ar:.1f} allreduce_alone_ms={percentiles(alone_ms)[0]:.1f} "
              f"mpi_allreduce_ms={percentiles(mpi_ms)[0]:.1f} grad_mb={nbytes / 1e6:.1f} "
              f"gflop_per_sec={gflops:.1f} peak_gflops={peak:.1f} "
              f"peak_share={gflops / peak if peak else -1:.3f} isa={isa}"
              + precision_field(opts.precision), flush=True)
    return 0
