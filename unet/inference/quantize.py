"""int8 post-training quantisation of the exported OpenVINO IR with NNCF, and what it costs.

    unet-export --model LOGDIR --int8 [--data TRAIN.h5] [--calibration_slices 300] [--max_dice_drop D]
                [post-processing flags of unet-evaluate, e.g. --tta]

1. Calibration: ``slices`` training slices of the unet-convert HDF5 file the model was trained on
   (``model.json`` ``data.file``, or ``--data``), evenly spaced over the training split.
2. ``nncf.quantize`` on ``model.xml`` (the fp32 IR from Keras' exporter): 8-bit weights and
   activations where OpenVINO's CPU plugin has int8 kernels, NNCF's defaults otherwise (symmetric
   "performance" preset, fast bias correction), activation ranges from histograms. With
   ``--max_dice_drop`` NNCF's accuracy control keeps in fp32 the layers that cost the most Dice on
   those training slices. Written as ``model_int8.xml`` + ``model_int8.bin``.
3. The cost, measured at once: every validation case of the same file is segmented by the fp32 and
   the int8 IR with the same pre- and post-processing as ``unet-evaluate --model`` (engines
   alternating case by case, so both see the same load), and scored by volume-level Dice per region;
   the forward passes are timed on the way (slices/s of each).
4. ``model.json`` ``exports.openvino_int8``: the file, the calibration, the Dice of both per case and
   on average, the change, and the two speeds. ``unet-predict --int8`` and ``unet-evaluate --int8``
   print that record (``unet.inference.engines.int8_cost_line``) whenever the int8 IR runs.
"""
from __future__ import annotations

import logging
import os
import time

import numpy as np

from unet.data import labels as L
from unet.data.sources import check_h5, validation_cases
from unet.errors import UsageError
from unet.inference import engines as E
from unet.inference.postprocess import PostOptions
from unet.inference.predictor import Predictor, reference_image
from unet.inference.timing import interleaved, segment_case, warm_up
from unet.metrics import dice
from unet.modelfolder import write_meta
from unet.perf import flops


class QuantizeError(UsageError):
    """The int8 IR cannot be made: no calibration data, no fp32 IR, nncf missing (one line)."""


def data_file(meta: dict, data: str | None) -> str:
    """The unet-convert HDF5 file to calibrate and measure on: ``data``, else the one model.json names;
    checked (``unet.data.sources.check_h5``) and fit for the model: slices of its input shape in both splits."""
    path = data or (meta.get("data") or {}).get("file")
    if not path:
        raise QuantizeError("--int8 needs --data: the unet-convert HDF5 file the model was trained on (its "
                            "training slices calibrate, its validation cases measure the Dice change)")
    named = f"--data {path}" if data else f"model.json data.file {path}"
    if not data and not os.path.exists(path):
        raise QuantizeError(f"{named}: no such file (give --data)")
    found = check_h5(path, named, converted=True)
    d = meta["data"]
    want = (d["height"], d["width"], d["channels"])
    for split, shape in found.images.items():
        if tuple(shape[1:]) != want:
            raise QuantizeError(f"{named}: {split} slices are {'x'.join(map(str, shape[1:]))}, the "
                                f"model takes {'x'.join(map(str, want))}")
        if shape[0] == 0:
            what = "training slices" if split == "train" else "validation cases"
            raise QuantizeError(f"{named}: no {what} (int8 calibrates on training slices and "
                                f"measures its Dice on validation cases)")
    return path


def calibration_slices(path: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` slices of the training split of ``path`` (a checked file; all of them if it has fewer),
    evenly spaced, and their region masks."""
    import h5py
    with h5py.File(path, "r") as f:
        images, masks = f["train"]["images"], f["train"]["masks"]
        idx = np.unique(np.linspace(0, len(images) - 1, min(n, len(images))).round().astype(int))
        return np.asarray(images[idx], np.float32), np.asarray(masks[idx], np.float32)


def mean_dice(probs: np.ndarray, masks: np.ndarray) -> float:
    """Slice-pooled Dice at threshold 0.5, averaged over the regions (a region absent from both counts 1)."""
    p, y = probs > 0.5, masks > 0.5
    axes = tuple(range(p.ndim - 1))
    inter, total = (p & y).sum(axes), p.sum(axes) + y.sum(axes)
    return float(np.mean(np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0)))


def quantize_ir(src: str, dst: str, slices: np.ndarray, masks: np.ndarray, max_drop: float | None = None,
                names=None) -> dict:
    """NNCF post-training quantisation of the IR ``src`` calibrated on ``slices`` (one per sample),
    activation ranges from histograms (on the demo's model the best of NNCF's estimators: slice Dice
    ET 0.665 against 0.626 with its default, fp32 0.731; docs/PERFORMANCE.md). With ``max_drop``
    NNCF's accuracy control puts layers back to fp32 until the mean Dice of those training slices
    lies within ``max_drop`` of the fp32 IR's. Written to ``dst`` (.xml + .bin) under temporary
    names, then renamed weights first. Returns how it was made, for model.json, with the
    convolutions left in fp32 (by ``names``, the Keras layers in graph order)."""
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet
    nncf.set_log_level(logging.WARNING)
    model = ov.Core().read_model(src)
    calibration = nncf.Dataset([s[None] for s in slices])
    advanced = AdvancedQuantizationParameters(activations_range_estimator_params=RangeEstimatorParametersSet.HISTOGRAM)
    how = {"preset": "performance (symmetric)", "activation_ranges": "histogram", "target_device": "CPU"}
    if max_drop is None:
        quantised = nncf.quantize(model, calibration, subset_size=len(slices), target_device=nncf.TargetDevice.CPU,
                                  advanced_parameters=advanced)
    else:
        batch = 16
        validation = nncf.Dataset([(slices[i:i + batch], masks[i:i + batch]) for i in range(0, len(slices), batch)],
                                  lambda item: item[0])

        def score(compiled, items) -> float:
            probs, refs = zip(*((np.asarray(compiled(x)[0]), y) for x, y in items))
            return mean_dice(np.concatenate(probs), np.concatenate(refs))

        quantised = nncf.quantize_with_accuracy_control(
            model, calibration, validation, score, max_drop=max_drop, drop_type=nncf.DropType.ABSOLUTE,
            subset_size=len(slices), target_device=nncf.TargetDevice.CPU, advanced_quantization_parameters=advanced)
        how["accuracy_control"] = {"max_drop": max_drop, "metric": "mean over regions of slice-pooled Dice on "
                                   "the calibration slices"}
    how["kept_fp32"] = fp32_convolutions(quantised, names)
    stem = dst[:-len(".xml")]
    tmp = f"{os.path.dirname(dst)}/.{os.path.basename(stem)}.tmp-{os.getpid()}"
    try:
        ov.save_model(quantised, tmp + ".xml", compress_to_fp16=False)
        os.replace(tmp + ".bin", stem + ".bin")
        os.replace(tmp + ".xml", dst)
    finally:
        for leftover in (tmp + ".xml", tmp + ".bin"):
            if os.path.exists(leftover):
                os.remove(leftover)
    return how


def fp32_convolutions(model, names=None) -> list[str]:
    """The convolutions of an OpenVINO model whose weights are plain fp32 constants (not quantised),
    by ``names`` (the Keras layers, in graph order) when there is one per convolution."""
    convs = [op for op in model.get_ordered_ops() if op.get_type_name() in ("Convolution", "ConvolutionBackpropData")]
    names = names if names and len(names) == len(convs) else [op.get_friendly_name() for op in convs]
    return [n for n, op in zip(names, convs)
            if op.input_value(1).get_node().get_type_name() == "Constant"
            and op.input_value(1).get_element_type().get_type_name() == "f32"]


def measure_cost(folder: str, meta: dict, data: str, threads: int, post=None) -> tuple[dict, dict]:
    """Volume-level Dice per region of the fp32 and the int8 IR on the validation cases of ``data``
    (post-processing ``post``, by default unet-evaluate's), and the slices/s of both over those
    cases' forward passes (``unet.inference.timing``: engines alternating case by case)."""
    from dataclasses import asdict
    cases = validation_cases(data)
    preds = {"fp32": Predictor(folder, engine="openvino", threads=threads),
             "int8": Predictor(folder, engine="openvino", threads=threads, int8=True)}
    regions, post = preds["fp32"].regions, post or PostOptions()
    load0 = os.getloadavg()[0]
    for pred in preds.values():
        warm_up(pred)

    def read(case):                   # one case in memory at a time
        chans, seg, _ = preds["fp32"].read(case)
        return chans, reference_image(case).GetSpacing()[::-1], L.regions_from_labels(seg, case.layout, regions)

    def call(name):
        def segment(item):
            chans, spacing, ref = item
            fwd, n, _, masks = segment_case(preds[name], chans, spacing, post)
            return fwd, n, {r: round(dice(masks[..., k], ref[..., k]), 6) for k, r in enumerate(regions)}
        return segment

    timed = interleaved({name: call(name) for name in preds}, map(read, cases))
    per_case = {k: {c.case_id: d for c, (_, (_, _, d)) in zip(cases, v)} for k, v in timed.items()}
    seconds = {k: sum(fwd for _, (fwd, _, _) in v) for k, v in timed.items()}
    slices = {k: sum(n for _, (_, n, _) in v) for k, v in timed.items()}
    mean = {k: {r: round(float(np.mean([d[r] for d in v.values()])), 6) for r in regions}
            for k, v in per_case.items()}
    validation = {"cases": [c.case_id for c in cases], "dice_fp32": mean["fp32"], "dice_int8": mean["int8"],
                  "change": {r: round(mean["int8"][r] - mean["fp32"][r], 6) for r in regions},
                  "per_case": per_case, "metric": "volume-level Dice", "post": asdict(post)}
    benchmark = {"slices_per_s": {k: round(slices[k] / seconds[k], 3) for k in preds},
                 "threads": preds["fp32"].model.threads, "batch": preds["fp32"].batch_size,
                 "slices": slices["fp32"], "load_average_1min": [round(load0, 2), round(os.getloadavg()[0], 2)]}
    return validation, benchmark


def add_int8(folder: str, meta: dict, *, data: str | None, slices: int, threads: int,
             max_drop: float | None = None, post=None) -> dict:
    """Quantise ``folder``'s model.xml, measure what it costs, record it in model.json; the new metadata."""
    why = E.export_missing(E.INT8)
    if why:
        raise QuantizeError(f"--int8: {why}")
    src = E.model_file("openvino", folder, meta)
    if not os.path.isfile(src):
        raise QuantizeError(f"--int8: {src}: no such file (the fp32 IR is quantised: unet-export --format openvino)")
    path = data_file(meta, data)
    validation_cases(path)   # the cases the cost is measured on must be there before anything is written
    calib, masks = calibration_slices(path, slices)
    t = time.perf_counter()
    dst = os.path.join(folder, E.FILES[E.INT8])
    d = meta["data"]
    layers = [n for n, _ in flops.unet_convs(d["height"], d["width"], d["channels"], d["regions"],
                                              use_upsampling=bool((meta.get("model") or {}).get("use_upsampling")))]
    how = quantize_ir(src, dst, calib, masks, max_drop, layers)
    from importlib.metadata import version
    record = {"file": E.FILES[E.INT8], "weights": E.FILES[E.INT8][:-len(".xml")] + ".bin",
              "from": os.path.basename(src), "quantiser": dict(how, tool=f"nncf {version('nncf')}"),
              "versions": {"nncf": version("nncf"), "openvino": version("openvino")},
              "calibration": {"file": os.path.abspath(path), "split": "train", "slices": len(calib),
                              "chosen": "evenly spaced over the split"},
              "seconds": round(time.perf_counter() - t, 1)}
    before = {k: v for k, v in (meta.get("exports") or {}).items() if k != E.INT8}
    meta = dict(meta, exports=dict(before, **{E.INT8: record}))
    write_meta(folder, meta)       # the engine runs only a recorded int8 IR
    try:
        record["validation"], record["benchmark"] = measure_cost(folder, meta, path, threads, post)
    except BaseException:     # no int8 IR without its measured cost
        for name in (record["file"], record["weights"]):
            os.remove(os.path.join(folder, name))
        write_meta(folder, dict(meta, exports=before))
        raise
    record["measured"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_meta(folder, meta)
    return meta
