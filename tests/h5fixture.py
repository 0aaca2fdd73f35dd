"""A small HDF5 file in unet-convert's format, for trainer tests."""
import json

import h5py
import numpy as np


def write_h5(path, n_train=24, n_val=8, size=32, channels=2, regions=3, seed=0, tumour_every=1):
    """Each slice a bright disc with nested regions; with ``tumour_every`` k > 1 only every k-th slice
    has them (the others: noise and empty masks)."""
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        f.attrs["modalities"] = json.dumps(["FLAIR", "T1ce"][:channels])
        f.attrs["regions"] = json.dumps(["WT", "TC", "ET"][:regions])
        f.attrs["size"] = size
        f.attrs["normalisation"] = "zscore-brain"
        f.attrs["layout"] = "test"
        for split, n in (("train", n_train), ("val", n_val)):
            g = f.create_group(split)
            yy, xx = np.mgrid[0:size, 0:size]
            imgs = rng.normal(0, 0.3, (n, size, size, channels)).astype(np.float32)
            msks = np.zeros((n, size, size, regions), np.uint8)
            for i in range(n):
                cy, cx = rng.integers(8, size - 8, 2)
                r2 = (yy - cy) ** 2 + (xx - cx) ** 2
                for k in range(regions):
                    msks[i, ..., k] = (r2 <= (6 - 2 * k) ** 2) & (i % tumour_every == 0)
                imgs[i, ..., 0] += 2.0 * msks[i, ..., 0]
            kw = dict(compression="gzip") if n else {}
            g.create_dataset("images", data=imgs, chunks=(1, size, size, channels) if n else None, **kw)
            g.create_dataset("masks", data=msks, chunks=(1, size, size, regions) if n else None, **kw)
            g.create_dataset("case_id", data=np.array([f"case{i // 4:03d}".encode() for i in range(n)]))
            g.create_dataset("slice_index", data=np.arange(n) % 4)
    return path
