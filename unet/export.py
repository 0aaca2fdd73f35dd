"""unet-export: the trained network in the formats inference engines read, by Keras' own exporters.

    unet-export --model LOGDIR_OR_MODEL.keras [--format openvino onnx saved_model] [--out DIR]

Writes, beside ``model.keras`` (or into ``--out`` with a copy of it), ``model.xml`` + ``model.bin``
(OpenVINO IR, ``model.export(format="openvino")``), ``model.onnx`` (``format="onnx"``, through
tf2onnx) and ``saved_model/`` (``format="tf_saved_model"``), then measures every engine that can
run the folder (``unet.engines``: a few batches of random slices of the model's input shape,
engines interleaved, median slices/s) and records in ``model.json`` under ``exports``: each file,
the exporter, the input the files expect (shape, layout, channels and the training data's
preprocessing) and the output, and the measured speeds that pick ``unet-predict``'s default engine.
The trainer calls ``add_exports`` on rank 0 at the end of training (``--export``).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
import warnings

import numpy as np

from unet import engines as E
from unet.checkpoint import write_model_json

KERAS_FORMAT = {"openvino": "openvino", "onnx": "onnx", "saved_model": "tf_saved_model"}


class ExportError(Exception):
    """A format cannot be written, or the model cannot be read (one line)."""


def check_formats(formats) -> None:
    for fmt in formats:
        if fmt not in E.EXPORT_FORMATS:
            raise ExportError(f"--format {fmt}: unknown (known: {', '.join(E.EXPORT_FORMATS)})")
        why = E.export_missing(fmt)
        if why:
            raise ExportError(f"--format {fmt}: {why}")


def float32_model(model):
    """The model itself when it computes in float32; else (a --precision bf16 model) the same network
    built in float32 with its weights (float32 already): Keras' ONNX export needs a float32 policy."""
    if all(layer.dtype_policy.name == "float32" for layer in model.layers):
        return model
    from unet.model import build_unet
    _, h, w, c = model.input_shape
    norms = [layer for layer in model.layers if type(layer).__name__ == "GroupNormalization"]
    norm = "none" if not norms else \
        "instance" if norms[0].groups == model.get_layer("conv1a").filters else "group"
    clone = build_unet(h, w, c, model.output_shape[-1], dropout=0.0, norm=norm,
                       use_upsampling=any(layer.name.startswith("up") for layer in model.layers))
    clone.set_weights(model.get_weights())
    return clone


def write_format(model, folder: str, fmt: str) -> dict:
    """One format through ``model.export``, under a temporary name then renamed: a reader finds the
    previous file or the new one, never half of one. Returns its record for model.json."""
    import keras
    name, pid = E.FILES[fmt], os.getpid()
    final = os.path.join(folder, name)
    stem, ext = os.path.splitext(name)
    tmp = os.path.join(folder, f".{stem}.tmp-{pid}{ext}")
    with warnings.catch_warnings():   # Keras' own patch of tf2onnx for numpy 2 trips a FutureWarning
        warnings.simplefilter("ignore", FutureWarning)
        model.export(tmp, format=KERAS_FORMAT[fmt], verbose=False)
    record = {"file": name, "exporter": f"keras {keras.__version__} model.export(format={KERAS_FORMAT[fmt]!r})"}
    if fmt == "openvino":      # the IR is two files: the weights first, so the graph never names absent ones
        os.replace(tmp[:-len(ext)] + ".bin", os.path.join(folder, stem + ".bin"))
        record["weights"] = stem + ".bin"
    if fmt == "saved_model" and os.path.isdir(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    runtime = [E.PACKAGE[e] for e, f in E.FORMAT.items() if f == fmt]     # the engine that reads it
    record["versions"] = {p: _version(p) for p in (*E.EXPORT_NEEDS[fmt], *runtime)}
    return record


def _version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "?"


def io_record(meta: dict) -> dict:
    """What every exported file takes and gives: the preprocessing is the training data's."""
    d = meta["data"]
    attrs = d.get("attrs") or {}
    return {
        "input": {"shape": [None, d["height"], d["width"], d["channels"]], "dtype": "float32", "layout": "NHWC",
                  "channels": list(d["modalities"]),
                  "preprocessing": {"normalisation": attrs.get("normalisation"), "inplane": attrs.get("inplane"),
                                    "size": d["height"], "slices": "axial, every slice of the case"}},
        "output": {"shape": [None, d["height"], d["width"], d["regions"]], "dtype": "float32",
                   "regions": list(d["region_names"]), "activation": "sigmoid (probability per region)"},
    }


def measure_speeds(folder: str, meta: dict, threads: int, *, batch: int = 8, rounds: int = 5) -> dict:
    """slices/s of every engine that can run ``folder`` on one batch of random slices: one warm-up
    call each, then ``rounds`` rounds with the engines interleaved (a change of load on a shared
    machine hits all alike); the median round per engine."""
    d = meta["data"]
    x = np.random.default_rng(0).normal(size=(batch, d["height"], d["width"], d["channels"])).astype(np.float32)
    runs = {}
    for name in E.ENGINES:
        try:
            runs[name] = E.open_engine(name, folder, meta, threads)
        except E.EngineError:
            continue
        runs[name](x)
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            t = time.perf_counter()
            run(x)
            times[name].append(time.perf_counter() - t)
    return {"slices_per_s": {n: round(batch / statistics.median(t), 3) for n, t in times.items()},
            "threads": threads, "batch": batch, "rounds": rounds,
            "load_average_1min": round(os.getloadavg()[0], 2),
            "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def add_exports(folder: str, model, meta: dict, formats, *, threads: int, measure: bool = True) -> dict:
    """Write ``formats`` of ``model`` into ``folder`` (which holds model.keras), measure the engines
    and rewrite model.json with the ``exports`` record; returns the new metadata."""
    check_formats(formats)
    net = float32_model(model) if formats else model
    exports = dict(meta.get("exports") or {})
    if os.path.isfile(os.path.join(folder, E.FILES["keras"])):
        exports["keras"] = {"file": E.FILES["keras"]}
    for fmt in formats:
        exports[fmt] = write_format(net, folder, fmt)
    exports.update(io_record(meta))
    exports.pop("benchmark", None)        # speeds of other files are no guide to these
    meta = dict(meta, exports=exports)
    if measure:
        exports["benchmark"] = measure_speeds(folder, meta, threads)
    write_model_json(folder, meta)
    return meta


def speeds_line(meta: dict) -> str:
    b = (meta.get("exports") or {}).get("benchmark")
    if not b:
        return "engine speeds not measured"
    each = ", ".join(f"{n} {v:.1f}" for n, v in sorted(b["slices_per_s"].items(), key=lambda kv: -kv[1]))
    return (f"slices/s ({b['threads']} thread(s), batch {b['batch']}, median of {b['rounds']}, "
            f"load average {b['load_average_1min']}): {each}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="unet-export", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", required=True, help="training logdir or its model.keras (model.json beside it)")
    ap.add_argument("--format", nargs="+", default=["openvino", "onnx"], choices=E.EXPORT_FORMATS,
                    help="formats to write")
    ap.add_argument("--out", default=None,
                    help="folder to write into (default: the model's own); another folder gets a copy of "
                         "model.keras and its own model.json, so it can be deployed alone")
    ap.add_argument("--num_threads", type=int, default=0,
                    help="threads per engine for the speed measurement; 0 = the physical cores this process "
                         "is bound to")
    ap.add_argument("--no_measure", action="store_true",
                    help="do not time the engines (unet-predict then picks by a fixed order)")
    a = ap.parse_args(argv)
    try:
        folder, keras_path = (a.model, os.path.join(a.model, E.FILES["keras"])) if os.path.isdir(a.model) \
            else (os.path.dirname(a.model) or ".", a.model)
        meta_path = os.path.join(folder, "model.json")
        for p in (keras_path, meta_path):
            if not os.path.isfile(p):
                raise ExportError(f"--model {a.model}: {p}: no such file")
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            io_record(meta)
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ExportError(f"{meta_path}: not a model description from train_hvd.py "
                              f"({type(e).__name__}: {e})") from None
        check_formats(a.format)
    except ExportError as e:
        print(f"unet-export: error: {e}", file=sys.stderr)
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from unet.distributed import inference_threads
    threads = a.num_threads or inference_threads()
    E.set_tensorflow_threads(threads)
    import keras
    model = keras.saving.load_model(keras_path, compile=False)
    out = a.out or folder
    os.makedirs(out, exist_ok=True)
    if os.path.abspath(out) != os.path.abspath(folder):
        shutil.copy2(keras_path, os.path.join(out, E.FILES["keras"]))
    meta = add_exports(out, model, meta, a.format, threads=threads, measure=not a.no_measure)
    for fmt in a.format:
        print(f"unet-export: {fmt} -> {os.path.join(out, E.FILES[fmt])}")
    print(f"unet-export: {speeds_line(meta)}; default engine: {E.default_engine(out, meta)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
