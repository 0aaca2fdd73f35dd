"""Inference engines: one exported network, run by OpenVINO, ONNX Runtime or TensorFlow.

Every engine takes a (N, H, W, C) float32 batch of preprocessed slices and returns the
(N, H, W, R) float32 sigmoid probabilities; what comes before (reading, z-score, in-plane
resize) and after (back to the case grid, post-processing, NIfTI) is ``unet.inference.predict``'s and
the same whatever the engine. The files each engine reads are those ``unet.inference.export`` wrote
and recorded in ``model.json`` (``exports``); the default engine is the fastest one there
that is installed, by the speeds measured at export time (``exports.benchmark``).

int8: ``unet-export --int8`` (``unet.inference.quantize``) writes ``model_int8.xml`` + ``.bin``, the OpenVINO IR
quantised by NNCF, recorded as ``exports.openvino_int8`` with the Dice it costs. It runs on the
OpenVINO engine and only when asked for (``--int8``); the default engine never picks it.

Threads: each engine gets ``threads`` intra-op threads, by default the physical cores this
process is bound to divided among the ranks that share them (``unet.distributed.ranks.inference_threads``),
as the trainer sizes its own thread pools.
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np

from unet.cli import add_threads_flag, threads_error
from unet.errors import UsageError
from unet.modelfolder import EXPORT_FORMATS, EXPORT_NEEDS, FILES, INT8, export_missing  # noqa: F401 (re-exported)

# fastest first, as measured on this project's machines (docs/PERFORMANCE.md); the order only
# decides between engines that have no speed recorded in model.json
ENGINES = ("openvino", "onnxruntime", "tensorflow")
FORMAT = {"openvino": "openvino", "onnxruntime": "onnx", "tensorflow": "keras"}   # engine -> file format
MODULE = {"openvino": "openvino", "onnxruntime": "onnxruntime", "tensorflow": "tensorflow"}
PACKAGE = {"openvino": "openvino", "onnxruntime": "onnxruntime", "tensorflow": "tensorflow-cpu"}


class EngineError(UsageError):
    """An engine cannot run: not installed, or its exported file is missing (one line, naming both)."""


def installed(engine: str) -> bool:
    """Is the engine's Python package importable (without importing it)?"""
    return importlib.util.find_spec(MODULE[engine]) is not None


def model_file(engine: str, folder: str, meta: dict, int8: bool = False) -> str:
    """The file ``engine`` reads: as recorded in model.json, else its default name in ``folder``."""
    fmt = INT8 if int8 else FORMAT[engine]
    rec = (meta.get("exports") or {}).get(fmt) or {}
    return os.path.join(folder, rec.get("file", FILES[fmt]))


def check(engine: str, folder: str, meta: dict, path: str | None = None, int8: bool = False) -> str:
    """The engine's file (``path``, else the one model.json names; with ``int8`` the quantised IR),
    or EngineError saying what is missing and how to make it."""
    if engine not in ENGINES:
        raise EngineError(f"--engine {engine}: unknown (known: {', '.join(ENGINES)})")
    if int8 and engine != "openvino":
        raise EngineError(f"--int8 runs the quantised OpenVINO IR on the openvino engine, not --engine {engine}")
    if not installed(engine):
        raise EngineError(f"--engine {engine}: the {PACKAGE[engine]} package is not installed "
                          f"(scripts/setup.sh installs it, pinned in scripts/constraints.txt)")
    path = path or model_file(engine, folder, meta, int8)
    if int8 and os.path.exists(path) and not (meta.get("exports") or {}).get(INT8):
        raise EngineError(f"--int8: {path}: model.json has no record of it (no measured Dice cost); make it "
                          f"again with: unet-export --model {folder} --int8")
    if not os.path.exists(path):
        how = ("train again: the trainer writes model.keras" if engine == "tensorflow" else
               f"make it with: unet-export --model {folder} --int8" if int8 else
               f"make it with: unet-export --model {folder} --format {FORMAT[engine]}")
        raise EngineError(f"{'--int8' if int8 else '--engine ' + engine}: {path}: no such file ({how})")
    return path


def recorded_speeds(meta: dict) -> dict:
    """slices/s per engine measured when the model was exported (empty if never measured)."""
    return dict(((meta.get("exports") or {}).get("benchmark") or {}).get("slices_per_s") or {})


def default_engine(folder: str, meta: dict) -> str:
    """The fastest engine that is installed and has its file: by the recorded speeds, engines
    without a record after those with one, in ENGINES order."""
    speeds = recorded_speeds(meta)
    usable = [e for e in ENGINES if installed(e) and os.path.exists(model_file(e, folder, meta))]
    if not usable:
        raise EngineError(f"--model {folder}: no engine can run it (installed: "
                          f"{', '.join(e for e in ENGINES if installed(e)) or 'none'}; exported files: none "
                          f"found; make them with: unet-export --model {folder})")
    return max(usable, key=lambda e: (e in speeds, speeds.get(e, 0.0), -ENGINES.index(e)))


def set_tensorflow_threads(threads: int) -> int:
    """Size TensorFlow's pools (intra ``threads``, inter 1) if its runtime has not started yet;
    returns the intra-op threads it will use."""
    import tensorflow as tf
    try:   # only possible before the runtime starts; afterwards its pools stay as they are
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        pass
    return tf.config.threading.get_intra_op_parallelism_threads() or threads


class TensorFlowEngine:
    """model.keras through Keras, the forward pass traced once as a tf.function (no Python per layer);
    ``traced=False`` calls the Keras model eagerly, layer by layer, as unet-predict did before the
    engines (kept as a reference row of the benchmark)."""
    name = "tensorflow"

    def __init__(self, path: str, threads: int, traced: bool = True):
        self.threads = set_tensorflow_threads(threads)
        import keras
        import tensorflow as tf
        self.model = keras.saving.load_model(path, compile=False)
        spec = tf.TensorSpec((None,) + tuple(self.model.input_shape[1:]), tf.float32)
        self._fn = tf.function(lambda x: self.model(x, training=False), input_signature=[spec]) if traced \
            else (lambda x: self.model(x, training=False))

    def __call__(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        return self._fn(np.asarray(x, np.float32)).numpy()


class OpenVINOEngine:
    """The OpenVINO IR (model.xml + model.bin) on OpenVINO Runtime's CPU plugin, in fp32: without
    the precision hint it would run bf16 on CPUs that have it, which changes the probabilities.
    One stream of ``threads`` threads, not pinned to cores: on a 2-core machine shared with other
    jobs (load average 12) pinned threads ran 8.4 slices/s, unpinned 10.8, TensorFlow 7.0 (128x128x4,
    batch 16, interleaved medians); two streams of one thread (THROUGHPUT hint) 9.8. Under mpirun the
    rank's binding already keeps its threads on its cores."""
    name = "openvino"

    def __init__(self, path: str, threads: int):
        import openvino as ov
        self.threads = threads
        self._model = ov.Core().compile_model(path, "CPU", {
            "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
            "ENABLE_CPU_PINNING": False})

    def __call__(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        return np.asarray(self._model(np.ascontiguousarray(x, np.float32))[0])


class OnnxRuntimeEngine:
    """The ONNX file on ONNX Runtime's CPU execution provider, all graph optimisations on."""
    name = "onnxruntime"

    def __init__(self, path: str, threads: int):
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.threads = threads
        self._session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name

    def __call__(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        return self._session.run(None, {self._input: np.ascontiguousarray(x, np.float32)})[0]


CLASSES = {"openvino": OpenVINOEngine, "onnxruntime": OnnxRuntimeEngine, "tensorflow": TensorFlowEngine}


def open_engine(engine: str, folder: str, meta: dict, threads: int, int8: bool = False):
    """A ready engine instance (callable on a batch); EngineError if it cannot run."""
    return CLASSES[engine](check(engine, folder, meta, int8=int8), threads)


def int8_cost_line(meta: dict) -> str:
    """What the int8 IR costs and gains, as unet-export --int8 measured it (one line)."""
    rec = (meta.get("exports") or {}).get(INT8) or {}
    val, speed = rec.get("validation"), rec.get("benchmark")
    if not val:
        return "int8: Dice cost not measured (unet-export --int8 measures it on the validation cases)"
    try:
        return _cost_line(rec, val, speed)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return "int8: the Dice cost recorded in model.json is unreadable (unet-export --int8 measures it again)"


def _cost_line(rec: dict, val: dict, speed: dict | None) -> str:
    each = ", ".join(f"{r} {val['dice_fp32'][r]:.4f} -> {val['dice_int8'][r]:.4f} ({val['change'][r]:+.4f})"
                     for r in val["dice_fp32"])
    fast = (f"; speed {speed['slices_per_s']['int8']:.1f} vs {speed['slices_per_s']['fp32']:.1f} slices/s "
            f"({speed['slices_per_s']['int8'] / speed['slices_per_s']['fp32']:.2f}x fp32)") if speed else ""
    tta = " (flip TTA)" if (val.get("post") or {}).get("tta") else ""
    return (f"int8: volume Dice fp32 -> int8 on {len(val['cases'])} validation case(s){tta}: {each}{fast} "
            f"(unet-export --int8, {rec.get('measured', '?')})")


def add_flags(ap) -> None:
    """--engine and --num_threads, as unet-predict and unet-evaluate --model take them."""
    ap.add_argument("--engine", choices=ENGINES, default=None,
                    help="inference engine; default: the fastest one that is installed and whose file is "
                         "exported, by the speeds measured at export and recorded in model.json")
    ap.add_argument("--int8", action="store_true",
                    help="run the int8 OpenVINO IR (unet-export --int8 makes it, and records the Dice it costs "
                         "on the validation cases, printed when it runs); never the default")
    add_threads_flag(ap, "threads of the engine (per rank under mpirun)")


def flag_error(a) -> str | None:
    if threads_error(a.num_threads):
        return threads_error(a.num_threads)
    if a.int8 and a.engine not in (None, "openvino"):
        return f"--int8 runs the quantised OpenVINO IR on the openvino engine, not --engine {a.engine}"
    return None
