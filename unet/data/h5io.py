"""Writing converted slices: the HDF5 layout (append, merge per-rank parts, folds) and the seed's npy files.

The HDF5 file: groups ``train`` (the training cases' slices that ``--slices`` keeps) and ``val``
(every slice of the validation cases), each with ``images``, ``masks``, ``case_id`` and
``slice_index`` per slice; ``cases`` holds one JSON attribute per case (geometry, split). A file
converted with ``--folds K`` has a root attribute ``folds`` = K, each training case's ``fold`` in
its JSON, and a group ``rest`` with the training cases' slices ``--slices`` left out: a fold's
validation takes every slice of its cases from ``train`` and ``rest``, so no slice is stored twice
and a reader that knows nothing of folds sees the file's usual train/val split.
"""
from __future__ import annotations

import json
import os

import numpy as np

from unet.data.layouts import NPY_FILES, NPY_SIDECAR

SPLITS = ("train", "val")
REST = "rest"            # files with folds: the training cases' slices --slices left out
FIELDS = ("images", "masks", "case_id", "slice_index")


class H5Writer:
    """Appends slices to resizable, per-slice-chunked, compressed datasets; ``rest``: with the
    group of the slices training leaves out (files with folds)."""

    def __init__(self, path: str, size: int, channels: int, regions: int, rest: bool = False):
        import h5py
        self.f = h5py.File(path, "w")
        self.cases = self.f.create_group("cases")
        self.groups = SPLITS + ((REST,) if rest else ())
        for split in self.groups:
            g = self.f.create_group(split)
            g.create_dataset("images", (0, size, size, channels), np.float32, maxshape=(None, size, size, channels),
                             chunks=(1, size, size, channels), compression="gzip", compression_opts=1, shuffle=True)
            g.create_dataset("masks", (0, size, size, regions), np.uint8, maxshape=(None, size, size, regions),
                             chunks=(1, size, size, regions), compression="gzip", compression_opts=1)
            g.create_dataset("case_id", (0,), h5py.string_dtype(), maxshape=(None,), chunks=(1024,))
            g.create_dataset("slice_index", (0,), np.int32, maxshape=(None,), chunks=(1024,))

    def append(self, r: dict) -> None:
        self._add(self.f[r["split"]], r["case_id"], r["images"], r["masks"], r["slice_index"])
        if "rest" in r:
            if REST not in self.groups:
                raise ValueError("a case with left-out slices written to a file without folds")
            rest = r["rest"]
            self._add(self.f[REST], r["case_id"], rest["images"], rest["masks"], rest["slice_index"])
        self.cases.attrs[r["case_id"]] = json.dumps(dict(r["geometry"], split=r["split"]))

    @staticmethod
    def _add(g, case_id: str, images, masks, slice_index) -> None:
        n, start = len(slice_index), g["images"].shape[0]
        for name, data in (("images", images), ("masks", masks),
                           ("case_id", np.array([case_id] * n, dtype=object)), ("slice_index", slice_index)):
            g[name].resize(start + n, axis=0)
            if n:
                g[name][start:] = data

    def close(self, attrs: dict) -> None:
        for k, v in attrs.items():
            self.f.attrs[k] = v
        self.f.close()


def merge_parts(parts: list[str], out: str, opts, rest: bool = False) -> None:
    """Concatenate per-rank part files (same options) into ``out``."""
    import h5py
    w = H5Writer(out, opts.size, len(opts.modalities), len(opts.regions), rest=rest)
    try:
        for p in parts:
            with h5py.File(p, "r") as f:
                for split in w.groups:
                    g = f[split]
                    n, start = g["images"].shape[0], w.f[split]["images"].shape[0]
                    for name in FIELDS:
                        w.f[split][name].resize(start + n, axis=0)
                        for s in range(0, n, 256):  # bounded memory
                            w.f[split][name][start + s:start + min(s + 256, n)] = g[name][s:s + 256]
                for k, v in f["cases"].attrs.items():
                    w.cases.attrs[k] = v
    finally:
        w.close({})


def write_folds(f, k: int, folds: dict[str, int], volumes: dict[str, float]) -> None:
    """Record the folds in an open file: root ``folds`` = k, each case's ``fold`` and tumour volume."""
    f.attrs["folds"] = k
    for case, raw in f["cases"].attrs.items():
        d = json.loads(raw)
        if case in volumes:
            d["wt_ml"] = round(float(volumes[case]), 4)
        if case in folds:
            d["fold"] = folds[case]
        f["cases"].attrs[case] = json.dumps(d)


def _attr_value(v):
    """An HDF5 root attribute as plain JSON (lists stored as JSON text come back as lists)."""
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, str) and v.startswith("["):
        try:
            return json.loads(v)
        except ValueError:
            return v
    return v.item() if hasattr(v, "item") else v


def write_npy(h5_path: str, folder: str) -> list[str]:
    """The seed's four files from a finished HDF5 file (copied in bounded chunks), plus
    ``unet-convert.json``: the file's root attributes (modalities in channel order, regions,
    size, normalisation, layout, converter version) and each file's shape.

    Every file is first written under a temporary name. Before the first rename the sidecar
    is replaced by one that says ``"complete": false``; the real sidecar is renamed in last.
    So at any moment the folder holds the previous set, a set the reader refuses as
    unfinished, or the new set: never a mix that looks complete.
    """
    import h5py
    os.makedirs(folder, exist_ok=True)
    names = {("train", "images"): NPY_FILES["train"][0], ("train", "masks"): NPY_FILES["train"][1],
             ("val", "images"): NPY_FILES["val"][0], ("val", "masks"): NPY_FILES["val"][1]}
    tag = f".tmp-{os.getpid()}"
    staged: list[tuple[str, str]] = []    # (temporary, final)
    try:
        with h5py.File(h5_path, "r") as f:
            meta = {k: _attr_value(v) for k, v in f.attrs.items()}
            shapes = {}
            for (split, key), name in names.items():
                src = f[split][key]
                final = os.path.join(folder, name)
                tmp = os.path.join(folder, f".{name}{tag}.npy")
                mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32 if key == "images" else np.uint8,
                                               shape=src.shape)
                staged.append((tmp, final))
                for s in range(0, src.shape[0], 256):
                    mm[s:s + 256] = src[s:s + 256]
                mm.flush()
                del mm
                shapes[name] = list(src.shape)
        sidecar = os.path.join(folder, NPY_SIDECAR)
        _write_json(sidecar + tag, dict(meta, complete=True, shapes=shapes))
        staged.append((sidecar + tag, sidecar))
        _write_json(sidecar + ".incomplete" + tag, {"complete": False})
        os.replace(sidecar + ".incomplete" + tag, sidecar)   # from here on the folder reads as unfinished
        for tmp, final in staged:                             # the sidecar last
            os.replace(tmp, final)
    finally:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return [final for _, final in staged]


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
