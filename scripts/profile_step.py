#!/usr/bin/env python3
"""Where a training step's time goes, per rank, from TensorFlow's profiler.

    mpirun -np 2 --oversubscribe .venv/bin/python scripts/profile_step.py --data runs/ab/brats.h5 \
        [--batch_size 4] [--warmup 5] [--steps 10] [--out runs/profile] [--inter N]

Each rank runs the trainer's step (``unet/training/train.py``: the same model, loss, Adam, one
grouped allreduce of the gradients with the loss and Dice sums, the same input pipeline with
augmentation, the rank's threads from ``prepare_rank``), ``--warmup`` steps untimed, then
``--steps`` steps under ``tf.profiler.experimental`` (a trace per rank in OUT/rank<R>/). It then
reads the trace back (XSpace protobuf) and adds up the time of the TensorFlow ops the executor ran,
by kind:

* conv forward / backward-filter / backward-input (the transposed convolutions apart), by op type;
* optimizer (Adam's update ops), loss, the allreduce op (Horovod's wait for its peer included),
  other element-wise work (ReLU and its gradient, pooling, concatenation, bias gradients);
* the input pipeline (the generator's reads and augmentation on tf.data's thread: on one core per
  rank this runs on the core the step needs);
* the wall time of a step that no op covers (Python of the loop, dispatch, waits).

Rank 0 prints one table per rank: ms per step and share of the step's wall time. With one
intra-op thread the op times of one thread add up; with more, ops overlap and shares exceed 100 %.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from unet.distributed.ranks import init_horovod, prepare_rank  # noqa: E402

MODEL_SCOPE = "unet"          # build_unet's model name: its ops run under "unet_1/<layer>_1/..."
OP_EVENT = re.compile(r"[^\s:]+:[A-Za-z_][A-Za-z0-9_]*")   # an executed op: "scope/name:Type"
ELEMENTWISE_GRAD = ("ReluGrad", "BiasAddGrad", "MaxPoolGrad", "Slice", "AddN")


def kind(name: str, op_type: str) -> str:
    """Bucket of one executed op from its name scope and type (TensorFlow 2.21 / Keras 3 names). Pure."""
    t = op_type.lstrip("_").replace("MklNative", "").replace("Mkl", "")
    parts = name.split("/")
    while parts and re.fullmatch(r"(Stateful)?PartitionedCall(_\d+)?", parts[0]):   # inside a nested function
        parts = parts[1:]
    grad = parts[0] == "gradient_tape"
    in_model = (parts[1] if grad and len(parts) > 1 else parts[0]).startswith(MODEL_SCOPE)
    layer = (parts[2] if grad else parts[1]) if in_model and len(parts) > (2 if grad else 1) else ""
    trans = " (transposed)" if layer.startswith("transConv") else ""
    if "horovod" in t.lower():
        return "allreduce (Horovod op)"
    if t.startswith("Xla"):
        return f"XLA-compiled part ({t})"
    if parts[0] == "adam" or t.startswith("ResourceApply"):
        return "optimizer (Adam update)"
    if t == "PyFunc":
        return "input pipeline (generator: read + augment)"
    if not in_model:
        return "loss and Dice sums, and their gradients"
    if "Conv2D" in t:
        if "BackpropFilter" in t:
            return f"conv backward-filter{trans}"
        if trans:     # a transposed convolution's forward is a Conv2DBackpropInput, its input gradient a Conv2D
            return "conv forward (transposed)" if not grad else "conv backward-input (transposed)"
        return "conv backward-input" if "BackpropInput" in t else "conv forward"
    if grad:
        return "backward element-wise (" + ", ".join(g for g in ELEMENTWISE_GRAD if g in t) + ")" \
            if any(g in t for g in ELEMENTWISE_GRAD) else f"backward other: {t}"
    return f"forward other: {t}"


def read_xspace(path: str):
    from tensorflow.tsl.profiler.protobuf import xplane_pb2
    space = xplane_pb2.XSpace()
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        space.ParseFromString(f.read())
    return space


def op_times(space) -> tuple[collections.Counter, collections.Counter, dict]:
    """(ms by kind, ms by op type, thread name -> busy ms) of the ops in a host trace."""
    by_kind, by_type, threads = collections.Counter(), collections.Counter(), collections.Counter()
    for plane in space.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        names = {i: m.name for i, m in plane.event_metadata.items()}
        for line in plane.lines:
            for ev in line.events:
                name = names.get(ev.metadata_id, "")
                ms = ev.duration_ps / 1e9
                if OP_EVENT.fullmatch(name):
                    scope, _, op_type = name.rpartition(":")
                    by_kind[kind(scope, op_type)] += ms
                    by_type[op_type] += ms
                    threads[line.name.split("/")[0]] += ms
                elif name == "EagerLocalExecute: IteratorGetNext":        # the loop waiting for its batch
                    by_kind["input: the loop's IteratorGetNext (wait for a batch)"] += ms
                elif name == "train":                                     # the step's TraceMe
                    by_kind["step wall (TraceMe)"] += ms
    return by_kind, by_type, dict(threads)


def build(args, info):
    import keras

    from unet.model import build_unet
    from unet.training.losses import get_loss
    model = build_unet(info[0], info[1], info[2], info[3], use_upsampling=args.use_upsampling, dropout=0.0)
    if args.conv_grad == "forward":
        from unet.training import convgrad
        convgrad.install(model)
    optimizer = keras.optimizers.Adam(learning_rate=1e-4)
    optimizer.build(model.trainable_variables)
    return model, optimizer, get_loss("region_dice_bce")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="profile_step.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=os.path.join(ROOT, "runs", "ab", "brats.h5"), help="converted HDF5 file")
    ap.add_argument("--batch_size", type=int, default=4, help="images per rank per step (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=10, help="profiled steps (default: %(default)s)")
    ap.add_argument("--inter", type=int, default=2, help="inter-op threads, as --num_inter_threads (default: 2)")
    ap.add_argument("--use_upsampling", action="store_true", help="the model's --use_upsampling")
    ap.add_argument("--jit", choices=("none", "grad", "adam"), default="none",
                    help="compile with XLA: grad = forward, loss and backward; adam = the optimizer's update "
                         "(default: none, as the trainer)")
    ap.add_argument("--conv_grad", choices=("tf", "forward"), default="tf",
                    help="the trainer's --conv_grad: TensorFlow's gradient ops, or forward convolutions")
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "profile"), help="trace folder (default: %(default)s)")
    args = ap.parse_args(argv)
    setup = prepare_rank(0, args.inter, 0)
    print(setup.line(), flush=True)
    hvd = init_horovod(setup)
    import tensorflow as tf

    from unet.data import pipeline
    from unet.data.sources import H5Source
    from unet.training.losses import dice_from_sums, dice_sums
    src = H5Source(args.data, "train")
    model, optimizer, loss_fn = build(args, src.shape)
    hvd.broadcast_variables([v.value for v in model.variables] + [v.value for v in optimizer.variables], 0)

    @tf.function(jit_compile=args.jit == "grad")
    def gradients(x, y):
        with tf.GradientTape() as tape:
            pred = model(x, training=True)
            loss = loss_fn(y, pred)
        return tape.gradient(loss, model.trainable_variables), loss, dice_sums(y, pred)

    @tf.function(jit_compile=args.jit == "adam")
    def update(grads):
        optimizer.apply_gradients(zip(grads, model.trainable_variables))

    @tf.function
    def train_step(x, y):   # unet/training/train.py's step (--jit: parts of it compiled by XLA)
        grads, loss, sums = gradients(x, y)
        reduced = hvd.grouped_allreduce(grads + [loss, sums], op=hvd.Average)
        update(reduced[:-2])
        return reduced[-2], dice_from_sums(reduced[-1])

    ds, _ = pipeline.train_dataset(src, batch_size=args.batch_size, rank=hvd.rank(), size=hvd.size(), epoch=0,
                                   seed=816, cap=args.warmup + args.steps)
    it = iter(ds)
    for _ in range(args.warmup):
        x, y = next(it)
        float(train_step(x, y)[0])
    out = os.path.join(args.out, f"rank{hvd.rank()}")
    hvd.allreduce(tf.constant(0.0))
    tf.profiler.experimental.start(out, options=tf.profiler.experimental.ProfilerOptions(host_tracer_level=3))
    t0 = time.perf_counter()
    for i in range(args.steps):
        with tf.profiler.experimental.Trace("train", step_num=i, _r=1):
            x, y = next(it)
            loss, dice = train_step(x, y)
            float(loss), dice.numpy()          # the trainer's reporter reads both every step
    wall_ms = (time.perf_counter() - t0) * 1e3 / args.steps
    tf.profiler.experimental.stop()
    path = max(glob.glob(os.path.join(out, "plugins", "profile", "*", "*.xplane.pb")), key=os.path.getmtime)
    by_kind, by_type, threads = op_times(read_xspace(path))
    mine = {"rank": hvd.rank(), "wall_ms": wall_ms, "jit": args.jit, "kind": dict(by_kind), "type": dict(by_type),
            "threads": threads, "steps": args.steps}
    every = hvd.allgather_object(mine)
    if hvd.rank() == 0:
        for r in every:
            print(table(r), flush=True)
        with open(os.path.join(args.out, "profile.json"), "w") as f:
            json.dump(every, f, indent=1)
    return 0


def table(r: dict) -> str:
    n, wall = r["steps"], r["wall_ms"]
    ops = sum(v for k, v in r["kind"].items() if not k.startswith(("input", "step wall"))) / n
    rows = [f"rank {r['rank']} (--jit {r['jit']}): {wall:.0f} ms per step (wall, {n} steps); ops {ops:.0f} ms; "
            f"not in any op "
            f"{max(wall - ops, 0):.0f} ms ({max(wall - ops, 0) / wall:.0%})",
            "| kind | ms/step | share of step |", "|---|---|---|"]
    for k, v in sorted(r["kind"].items(), key=lambda kv: -kv[1]):
        if v / n >= 0.5:
            rows.append(f"| {k} | {v / n:.1f} | {v / n / wall:.1%} |")
    rows.append("top op types: " + ", ".join(f"{t} {v / n:.0f}" for t, v in
                                               sorted(r["type"].items(), key=lambda kv: -kv[1])[:12]))
    rows.append("threads (op ms/step): " + ", ".join(f"{t} {v / n:.0f}" for t, v in sorted(r["threads"].items())))
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
