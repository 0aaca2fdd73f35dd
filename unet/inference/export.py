"""unet-export: the trained network in the formats inference engines read, by Keras' own exporters.

    unet-export --model LOGDIR_OR_MODEL.keras [--format openvino onnx saved_model] [--out DIR]
    unet-export --model LOGDIR --int8 [--data TRAIN.h5] [--calibration_slices N]

Writes, beside ``model.keras`` (or into ``--out`` with a copy of it), ``model.xml`` + ``model.bin``
(OpenVINO IR, ``model.export(format="openvino")``), ``model.onnx`` (``format="onnx"``, through
tf2onnx) and ``saved_model/`` (``format="tf_saved_model"``). A network with group normalisation
(``--norm group|instance``) gets its ONNX graph's normalisations put in the convolutions' layout
(``unet.inference.onnx_groupnorm``), and its IR converted from that graph by OpenVINO. Then it
measures every engine that can run the folder (``unet.inference.engines``: a few batches of random
slices of the model's input shape, engines interleaved, median slices/s) and records in
``model.json`` under ``exports``: each file, the exporter, the input the files expect (shape,
layout, channels and the training data's preprocessing) and the output, and the measured speeds
that pick ``unet-predict``'s default engine. The trainer calls ``add_exports`` on rank 0 at the end of
training (``--export``).

``--int8`` adds ``model_int8.xml`` + ``.bin``: the OpenVINO IR quantised by NNCF on training slices,
with the volume Dice it costs on the validation cases measured and recorded (``unet.inference.quantize``).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
import warnings

import numpy as np

from unet.cli import add_threads_flag, command, threads_error
from unet.distributed.ranks import inference_threads
from unet.errors import UsageError
from unet.inference import engines as E
from unet.inference.postprocess import add_flags as add_post_flags
from unet.inference.postprocess import options_from_args
from unet.inference.quantize import add_int8, data_file
from unet.inference.timing import interleaved
from unet.modelfolder import io_record, locate, read_meta, write_meta

KERAS_FORMAT = {"openvino": "openvino", "onnx": "onnx", "saved_model": "tf_saved_model"}


class ExportError(UsageError):
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
    leaky = any(type(layer).__name__ == "LeakyReLU" for layer in model.layers)
    clone = build_unet(h, w, c, model.output_shape[-1], dropout=0.0, norm=norm_of(model),
                       activation="leaky_relu" if leaky else "relu",
                       use_upsampling=any(layer.name.startswith("up") for layer in model.layers))
    clone.set_weights(model.get_weights())
    return clone


def norm_of(model) -> str:
    """The ``--norm`` a network was built with: "batch", "group", "instance" (a group per channel) or "none"."""
    kinds = [type(layer).__name__ for layer in model.layers]
    if "BatchNormalization" in kinds:
        return "batch"
    if "GroupNormalization" not in kinds:
        return "none"
    first = model.layers[kinds.index("GroupNormalization")]   # the first block's: instance has a group per channel
    return "instance" if first.groups == model.get_layer("conv1a").filters else "group"


def fused_onnx(model, path: str) -> int:
    """A normalised network's ONNX at ``path``: Keras' export, its group normalisations then put in the
    convolutions' layout; returns how many were."""
    import onnx

    from unet.inference.onnx_groupnorm import fuse_group_norms, group_norms_of
    with warnings.catch_warnings():   # Keras' own patch of tf2onnx for numpy 2 trips a FutureWarning
        warnings.simplefilter("ignore", FutureWarning)
        model.export(path, format="onnx", verbose=False)
    graph, fused = fuse_group_norms(onnx.load(path), group_norms_of(model))
    if fused:
        onnx.checker.check_model(graph)
        onnx.save(graph, path)
    return fused


def write_format(model, folder: str, fmt: str, onnx_written: str | None = None) -> dict:
    """One format through ``model.export``, under a temporary name then renamed: a reader finds the
    previous file or the new one, never half of one. Returns its record for model.json. A network with
    group normalisation goes to ONNX and OpenVINO through ``fused_onnx`` when the ONNX exporter is here
    (``onnx_written``: that file, written by this export already, for the IR to be converted from)."""
    import keras
    name, pid = E.FILES[fmt], os.getpid()
    final = os.path.join(folder, name)
    stem, ext = os.path.splitext(name)
    tmp = os.path.join(folder, f".{stem}.tmp-{pid}{ext}")
    exporter = f"keras {keras.__version__} model.export(format={KERAS_FORMAT[fmt]!r})"
    if fmt in ("onnx", "openvino") and has_group_norm(model) and not E.export_missing("onnx"):
        onnx_path = tmp if fmt == "onnx" else os.path.join(folder, f".{stem}.tmp-{pid}.onnx")
        if onnx_written:
            shutil.copy2(onnx_written, onnx_path)
            fused = len(group_norms_in(onnx_path))
        else:
            fused = fused_onnx(model, onnx_path)
        exporter = f"keras {keras.__version__} model.export(format='onnx'), {fused} group norms in NCHW " \
                   f"(unet.inference.onnx_groupnorm)"
        if fmt == "openvino":
            import openvino as ov
            ov.save_model(ov.convert_model(onnx_path), tmp, compress_to_fp16=False)
            os.remove(onnx_path)
            exporter += f", openvino {ov.__version__} convert_model"
    else:
        with warnings.catch_warnings():   # Keras' own patch of tf2onnx for numpy 2 trips a FutureWarning
            warnings.simplefilter("ignore", FutureWarning)
            model.export(tmp, format=KERAS_FORMAT[fmt], verbose=False)
    record = {"file": name, "exporter": exporter}
    if fmt == "openvino":      # the IR is two files: the weights first, so the graph never names absent ones
        os.replace(tmp[:-len(ext)] + ".bin", os.path.join(folder, stem + ".bin"))
        record["weights"] = stem + ".bin"
    if fmt == "saved_model" and os.path.isdir(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    runtime = [E.PACKAGE[e] for e, f in E.FORMAT.items() if f == fmt]     # the engine that reads it
    record["versions"] = {p: _version(p) for p in (*E.EXPORT_NEEDS[fmt], *runtime)}
    return record


def group_norms_in(onnx_path: str) -> list[str]:
    """The group normalisations ``fuse_group_norms`` put in NCHW in an ONNX file (by their nodes' names)."""
    import onnx
    return [n.name for n in onnx.load(onnx_path).graph.node if n.op_type == "InstanceNormalization"]


def has_group_norm(model) -> bool:
    return any(type(layer).__name__ == "GroupNormalization" for layer in model.layers)


def _version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "?"


def measure_speeds(folder: str, meta: dict, threads: int, *, batch: int = 8, rounds: int = 5) -> dict:
    """slices/s of every engine that can run ``folder`` on one batch of random slices: one warm-up
    call each, then ``rounds`` rounds with the engines interleaved (``unet.inference.timing``: a change
    of load on a shared machine hits all alike); the median round per engine."""
    d = meta["data"]
    x = np.random.default_rng(0).normal(size=(batch, d["height"], d["width"], d["channels"])).astype(np.float32)
    runs = {}
    for name in E.ENGINES:
        try:
            runs[name] = E.open_engine(name, folder, meta, threads)
        except E.EngineError:
            continue
        runs[name](x)
    times = interleaved(runs, [x], rounds)
    return {"slices_per_s": {n: round(batch / statistics.median(t for t, _ in calls), 3)
                             for n, calls in times.items()},
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
    if formats:       # Keras' ONNX exporter refuses a model never called (its OpenVINO exporter calls it)
        net(np.zeros((1, *net.input_shape[1:]), np.float32), training=False)
    written = None
    for fmt in sorted(formats, key=lambda f: f != "onnx"):     # ONNX first: a normalised IR is made from it
        exports[fmt] = write_format(net, folder, fmt, written if has_group_norm(net) else None)
        written = os.path.join(folder, E.FILES["onnx"]) if fmt == "onnx" else written
        if fmt == "openvino":          # an int8 IR of the previous fp32 one would no longer match it
            drop_int8(folder, exports)
    exports.update(io_record(meta))
    exports.pop("benchmark", None)        # speeds of other files are no guide to these
    meta = dict(meta, exports=exports)
    if measure:
        exports["benchmark"] = measure_speeds(folder, meta, threads)
    write_meta(folder, meta)
    return meta


def export_after_training(folder: str, model, meta: dict, formats) -> dict:
    """What the trainer runs at its end: ``formats`` of the trained ``model`` beside its model.keras, the
    engines timed; prints where each file went and the default engine. Returns the new metadata."""
    meta = add_exports(folder, model, meta, formats, threads=inference_threads())
    for fmt in formats:
        print(f"exported {fmt}: {os.path.join(folder, E.FILES[fmt])}", flush=True)
    print(f"engines: {speeds_line(meta)}; default engine: {E.default_engine(folder, meta)}", flush=True)
    return meta


def drop_int8(folder: str, exports: dict) -> None:
    """Remove the int8 IR (both files) and its record."""
    rec = exports.pop(E.INT8, None) or {}
    for name in (rec.get("file", E.FILES[E.INT8]), rec.get("weights", "model_int8.bin")):
        try:
            os.remove(os.path.join(folder, name))
        except FileNotFoundError:
            pass


def speeds_line(meta: dict) -> str:
    b = (meta.get("exports") or {}).get("benchmark")
    if not b:
        return "engine speeds not measured"
    each = ", ".join(f"{n} {v:.1f}" for n, v in sorted(b["slices_per_s"].items(), key=lambda kv: -kv[1]))
    return (f"slices/s ({b['threads']} thread(s), batch {b['batch']}, median of {b['rounds']}, "
            f"load average {b['load_average_1min']}): {each}")


@command("unet-export")
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="unet-export", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", required=True, help="training logdir or its model.keras (model.json beside it)")
    ap.add_argument("--format", nargs="+", default=None, choices=E.EXPORT_FORMATS,
                    help="formats to write (default: openvino onnx; with --int8 only what it needs: "
                         "openvino if model.xml is missing)")
    ap.add_argument("--int8", action="store_true",
                    help="also write model_int8.xml/.bin: the OpenVINO IR quantised by NNCF on training slices "
                         "of --data, and measure (and record in model.json) its volume Dice against fp32 on "
                         "--data's validation cases, and the speed of both")
    ap.add_argument("--data", default=None,
                    help="--int8: the unet-convert HDF5 file the model was trained on (default: the one "
                         "model.json names)")
    ap.add_argument("--calibration_slices", type=int, default=300,
                    help="--int8: training slices NNCF calibrates the activation ranges on")
    ap.add_argument("--max_dice_drop", type=float, default=None,
                    help="--int8: NNCF's accuracy control: convolutions go back to fp32, the most costly first, "
                         "until the mean Dice of the calibration slices is within this of the fp32 model's "
                         "(slower to make, minutes; slower to run)")
    add_post_flags(ap)
    ap.add_argument("--out", default=None,
                    help="folder to write into (default: the model's own); another folder gets a copy of "
                         "model.keras and its own model.json, so it can be deployed alone")
    add_threads_flag(ap, "threads per engine for the speed measurement")
    ap.add_argument("--no_measure", action="store_true",
                    help="do not time the engines (unet-predict then picks by a fixed order)")
    a = ap.parse_args(argv)
    if threads_error(a.num_threads):
        raise ExportError(threads_error(a.num_threads))
    if a.calibration_slices < 1:
        raise ExportError(f"--calibration_slices must be >= 1 (got {a.calibration_slices})")
    if a.max_dice_drop is not None and not 0 < a.max_dice_drop < 1:
        raise ExportError(f"--max_dice_drop must be in (0, 1) (got {a.max_dice_drop})")
    if not a.int8 and (a.max_dice_drop is not None or a.data):
        raise ExportError(f"{'--max_dice_drop' if a.max_dice_drop is not None else '--data'} goes with --int8")
    post = options_from_args(a)
    folder, named = locate(a.model)
    keras_path = named or os.path.join(folder, E.FILES["keras"])
    if not os.path.isfile(keras_path):
        raise ExportError(f"--model {a.model}: {keras_path}: no such file")
    meta = read_meta(folder)
    if a.format is None:   # --int8 alone: the fp32 IR it quantises, unless the model's folder has it
        has_ir = not a.out and "openvino" in (meta.get("exports") or {}) and \
            os.path.isfile(E.model_file("openvino", folder, meta))
        a.format = ([] if has_ir else ["openvino"]) if a.int8 else ["openvino", "onnx"]
    check_formats(a.format)
    if a.int8:
        why = E.export_missing(E.INT8)
        if why:
            raise ExportError(f"--int8: {why}")
        data_file(meta, a.data)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    threads = a.num_threads or inference_threads()
    out = a.out or folder
    os.makedirs(out, exist_ok=True)
    if os.path.abspath(out) != os.path.abspath(folder):
        shutil.copy2(keras_path, os.path.join(out, E.FILES["keras"]))
        # records of files that stay behind in the model's folder are not the new folder's
        meta = dict(meta, exports={k: v for k, v in (meta.get("exports") or {}).items()
                                   if not isinstance(v, dict) or "file" not in v or k == "keras"})
    if a.format:
        E.set_tensorflow_threads(threads)
        import keras
        model = keras.saving.load_model(keras_path, compile=False)
        meta = add_exports(out, model, meta, a.format, threads=threads, measure=not a.no_measure)
    for fmt in a.format:
        print(f"unet-export: {fmt} -> {os.path.join(out, E.FILES[fmt])}")
    print(f"unet-export: {speeds_line(meta)}; default engine: {E.default_engine(out, meta)}")
    if a.int8:     # nothing is left of the int8 IR when this fails
        meta = add_int8(out, meta, data=a.data, slices=a.calibration_slices, threads=threads,
                        max_drop=a.max_dice_drop, post=post)
        print(f"unet-export: int8 -> {os.path.join(out, E.FILES[E.INT8])}")
        print(f"unet-export: {E.int8_cost_line(meta)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
