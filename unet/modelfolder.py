"""The model folder: ``model.keras``, ``model.json`` and the files exported beside them.

One module reads and writes it. ``model.json`` describes what the network was trained on (shape,
modalities, regions, the training data's preprocessing) and, under ``exports``, each file written
for an inference engine. Files are replaced whole (temporary name, fsync, rename), so a reader finds
the old file or the new one, never half of one. Imports nothing of the package but the errors, and
no TensorFlow at import time.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil

from unet.errors import UsageError

INT8 = "openvino_int8"                                                          # its key in model.json exports
EXPORT_FORMATS = ("openvino", "onnx", "saved_model")                           # what unet-export writes
EXPORT_NEEDS = {"openvino": ("openvino",), "onnx": ("tf2onnx", "onnx"), "saved_model": (),  # beyond TensorFlow
                INT8: ("openvino", "nncf")}
FILES = {"openvino": "model.xml", "onnx": "model.onnx", "keras": "model.keras", "saved_model": "saved_model",
         INT8: "model_int8.xml"}
META = "model.json"


class ModelError(UsageError):
    """The model or its metadata cannot be used (one-line message naming the file)."""


def export_missing(fmt: str) -> str | None:
    """Why Keras cannot export ``fmt`` here (packages not installed), or None."""
    missing = [m for m in EXPORT_NEEDS[fmt] if importlib.util.find_spec(m) is None]
    return (f"the {fmt} export needs the {' and '.join(missing)} package(s), not installed (scripts/setup.sh "
            f"installs them, pinned in scripts/constraints.txt)") if missing else None


def atomic_write(path: str, write) -> None:
    """``write(fh)`` into a temporary file beside ``path``, fsync, then rename it to ``path``."""
    d = os.path.dirname(path) or "."
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def locate(model: str, flag: str = "--model") -> tuple[str, str | None]:
    """(folder, file) for a ``--model`` argument: a folder, or a file inside one (file None for a folder).
    The folder must hold model.json and the named file must exist (ModelError otherwise)."""
    folder, path = (model, None) if os.path.isdir(model) else (os.path.dirname(model) or ".", model)
    for p in ([path] if path else []) + [os.path.join(folder, META)]:
        if not os.path.isfile(p):
            raise ModelError(f"{flag} {model}: {p}: no such file")
    return folder, path


def read_meta(folder: str) -> dict:
    """``folder/model.json`` with its ``data`` description checked (ModelError naming the file)."""
    path = os.path.join(folder, META)
    try:
        with open(path) as f:
            meta = json.load(f)
        d = meta["data"]
        int(d["height"]), int(d["width"]), int(d["channels"]), int(d["regions"])
        tuple(d["modalities"]), tuple(d["region_names"])
    except OSError as e:
        raise ModelError(f"{path}: cannot read ({e.strerror})") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ModelError(f"{path}: not a model description from train_hvd.py ({type(e).__name__}: {e})") from None
    return meta


def write_meta(folder: str, meta: dict) -> str:
    """``folder/model.json`` replaced whole (a reader never sees half of it); returns its path."""
    json_path = os.path.join(folder, META)
    atomic_write(json_path, lambda fh: fh.write(json.dumps(meta, indent=2).encode()))
    return json_path


def save_model(folder: str, model, meta: dict) -> tuple[str, str]:
    """``model.keras`` + ``model.json`` for unet-predict; the exports of an earlier model are removed."""
    os.makedirs(folder, exist_ok=True)
    keras_path = os.path.join(folder, FILES["keras"])
    tmp = os.path.join(folder, f".model.tmp-{os.getpid()}.keras")
    model.save(tmp)
    os.replace(tmp, keras_path)
    remove_exports(folder)
    return keras_path, write_meta(folder, meta)


def remove_exports(folder: str) -> None:
    """Remove the exported files of an earlier model.keras from ``folder`` (``FILES`` and the weights
    beside each .xml): an engine must never run another network than the one model.json describes."""
    names = [n for fmt, n in FILES.items() if fmt != "keras"]
    for name in names + [n[:-len(".xml")] + ".bin" for n in names if n.endswith(".xml")]:
        path = os.path.join(folder, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


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
