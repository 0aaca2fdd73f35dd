#!/usr/bin/env python3
"""How fast a group-normalised network runs as Keras exports it, and with its normalisations in NCHW.

Exports the model.keras of ``--model`` (a training logdir of ``--norm group``) four ways into a temporary
folder: ONNX as Keras writes it (tf2onnx: each normalisation between two transposes) and the same graph
after ``unet.inference.onnx_groupnorm.fuse_group_norms``; the OpenVINO IR of Keras' own exporter and the
IR OpenVINO converts from the fused ONNX (what ``unet-export`` writes for such a network). Then it times
each on the same batch of random slices, all four interleaved (``unet.inference.timing.interleaved``),
and prints the median slices/s of each, the ratio fused / Keras per engine, and the largest difference
of the fused files' probabilities from Keras' own.

    .venv/bin/python scripts/norm_export_bench.py --model runs/demo/logs [--threads 1] [--batch 8] [--rounds 7]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import warnings

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="norm_export_bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="training logdir (model.keras) of a group-normalised network")
    p.add_argument("--threads", type=int, default=1, help="threads per engine")
    p.add_argument("--batch", type=int, default=8, help="slices per call")
    p.add_argument("--rounds", type=int, default=7, help="timed calls per file, interleaved")
    a = p.parse_args(argv)
    path = os.path.join(a.model, "model.keras") if os.path.isdir(a.model) else a.model
    if not os.path.isfile(path):
        p.error(f"--model {a.model}: no model.keras there")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import onnx
    import openvino as ov

    from unet.inference.engines import OnnxRuntimeEngine, OpenVINOEngine, set_tensorflow_threads
    from unet.inference.onnx_groupnorm import fuse_group_norms, group_norms_of
    from unet.inference.timing import interleaved
    set_tensorflow_threads(a.threads)
    model = keras.saving.load_model(path, compile=False)
    if not group_norms_of(model):
        p.error(f"--model {a.model}: the network has no group normalisation")
    x = np.random.default_rng(0).normal(size=(a.batch, *model.input_shape[1:])).astype(np.float32)
    want = np.asarray(model(x, training=False))
    with tempfile.TemporaryDirectory() as tmp:
        f = {k: os.path.join(tmp, k) for k in ("keras.onnx", "fused.onnx", "keras.xml", "fused.xml")}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model.export(f["keras.onnx"], format="onnx", verbose=False)
            model.export(f["keras.xml"], format="openvino", verbose=False)
        graph, fused = fuse_group_norms(onnx.load(f["keras.onnx"]), group_norms_of(model))
        onnx.save(graph, f["fused.onnx"])
        ov.save_model(ov.convert_model(f["fused.onnx"]), f["fused.xml"], compress_to_fp16=False)
        runs = {"onnxruntime keras": OnnxRuntimeEngine(f["keras.onnx"], a.threads),
                "onnxruntime fused": OnnxRuntimeEngine(f["fused.onnx"], a.threads),
                "openvino keras": OpenVINOEngine(f["keras.xml"], a.threads),
                "openvino fused": OpenVINOEngine(f["fused.xml"], a.threads)}
        for run in runs.values():
            run(x)                                   # warm-up: compilation, first allocations
        times = interleaved(runs, [x], a.rounds)
    rate = {n: a.batch / statistics.median(t for t, _ in calls) for n, calls in times.items()}
    print(f"{fused} group norms fused; {a.threads} thread(s), batch {a.batch}, median of {a.rounds} interleaved calls, "
          f"load average {os.getloadavg()[0]:.2f}")
    for engine in ("onnxruntime", "openvino"):
        k, g = rate[f"{engine} keras"], rate[f"{engine} fused"]
        diff = max(float(np.abs(out - want).max()) for _, out in times[f"{engine} fused"])
        print(f"{engine:12s} keras's export {k:6.2f} slices/s, fused {g:6.2f}: ratio {g / k:.3f}; "
              f"fused vs Keras max |dp| {diff:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
