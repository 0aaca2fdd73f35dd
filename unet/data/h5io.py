"""Writing converted slices: the HDF5 layout (append, merge per-rank parts) and the seed's npy files."""
from __future__ import annotations

import json
import os

import numpy as np


class H5Writer:
    """Appends slices to resizable, per-slice-chunked, compressed datasets."""

    def __init__(self, path: str, size: int, channels: int, regions: int):
        import h5py
        self.f = h5py.File(path, "w")
        self.cases = self.f.create_group("cases")
        for split in ("train", "val"):
            g = self.f.create_group(split)
            g.create_dataset("images", (0, size, size, channels), np.float32, maxshape=(None, size, size, channels),
                             chunks=(1, size, size, channels), compression="gzip", compression_opts=1, shuffle=True)
            g.create_dataset("masks", (0, size, size, regions), np.uint8, maxshape=(None, size, size, regions),
                             chunks=(1, size, size, regions), compression="gzip", compression_opts=1)
            g.create_dataset("case_id", (0,), h5py.string_dtype(), maxshape=(None,), chunks=(1024,))
            g.create_dataset("slice_index", (0,), np.int32, maxshape=(None,), chunks=(1024,))

    def append(self, r: dict) -> None:
        g, n = self.f[r["split"]], len(r["slice_index"])
        start = g["images"].shape[0]
        for name, data in (("images", r["images"]), ("masks", r["masks"]),
                           ("case_id", np.array([r["case_id"]] * n, dtype=object)),
                           ("slice_index", r["slice_index"])):
            g[name].resize(start + n, axis=0)
            if n:
                g[name][start:] = data
        self.cases.attrs[r["case_id"]] = json.dumps(dict(r["geometry"], split=r["split"]))

    def close(self, attrs: dict) -> None:
        for k, v in attrs.items():
            self.f.attrs[k] = v
        self.f.close()


def merge_parts(parts: list[str], out: str, opts) -> None:
    """Concatenate per-rank part files (same options) into ``out``."""
    import h5py
    w = H5Writer(out, opts.size, len(opts.modalities), len(opts.regions))
    try:
        for p in parts:
            with h5py.File(p, "r") as f:
                for split in ("train", "val"):
                    g = f[split]
                    n, start = g["images"].shape[0], w.f[split]["images"].shape[0]
                    for name in ("images", "masks", "case_id", "slice_index"):
                        w.f[split][name].resize(start + n, axis=0)
                        for s in range(0, n, 256):  # bounded memory
                            w.f[split][name][start + s:start + min(s + 256, n)] = g[name][s:s + 256]
                for k, v in f["cases"].attrs.items():
                    w.cases.attrs[k] = v
    finally:
        w.close({})


def write_npy(h5_path: str, folder: str) -> list[str]:
    """The seed's four files from a finished HDF5 file (copied in bounded chunks)."""
    import h5py
    os.makedirs(folder, exist_ok=True)
    names = {("train", "images"): "imgs_train.npy", ("train", "masks"): "msks_train.npy",
             ("val", "images"): "imgs_test.npy", ("val", "masks"): "msks_test.npy"}
    written = []
    with h5py.File(h5_path, "r") as f:
        for (split, key), name in names.items():
            src = f[split][key]
            final = os.path.join(folder, name)
            tmp = final + f".tmp-{os.getpid()}.npy"
            mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32 if key == "images" else np.uint8,
                                           shape=src.shape)
            for s in range(0, src.shape[0], 256):
                mm[s:s + 256] = src[s:s + 256]
            mm.flush()
            del mm
            os.replace(tmp, final)
            written.append(final)
    return written
