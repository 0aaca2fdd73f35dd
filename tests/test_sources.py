"""Data files the trainer is given: shape from metadata, one-line errors naming the file."""
import argparse

import h5py
import numpy as np
import pytest

from h5fixture import write_h5
from unet.config import UsageError
from unet.data.sources import open_sources


def args(path):
    return argparse.Namespace(synthetic=False, data=str(path), seed=0)


def test_h5_shape_and_names_come_from_the_file(tmp_path):
    train, val, info = open_sources(args(write_h5(str(tmp_path / "d.h5"), size=32, channels=2, regions=3)))
    assert (info.height, info.channels, info.regions) == (32, 2, 3)
    assert info.modalities == ["FLAIR", "T1ce"] and info.region_names == ["WT", "TC", "ET"]
    x, y = train.read([3, 1, 3])
    assert x.shape == (3, 32, 32, 2) and y.shape == (3, 32, 32, 3) and np.array_equal(x[0], x[2])


@pytest.mark.parametrize("make,msg", [
    (lambda p: p.write_bytes(b"not hdf5 at all"), "not an HDF5 file"),
    (lambda p: write_h5(str(p), size=40), "40x40 is not a multiple of 16"),
    (lambda p: write_h5(str(p), n_train=0), "the train split is empty"),
    (lambda p: h5py.File(p, "w").close(), "missing group 'train'"),
])
def test_bad_files_are_one_line_errors(tmp_path, make, msg):
    path = tmp_path / "d.h5"
    make(path)
    with pytest.raises(UsageError, match=msg) as e:
        open_sources(args(path))
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_mismatched_metadata(tmp_path):
    path = write_h5(str(tmp_path / "d.h5"), channels=2)
    with h5py.File(path, "a") as f:
        f.attrs["modalities"] = '["FLAIR", "T1", "T2"]'
    with pytest.raises(UsageError, match="names 3 channels, images have 2"):
        open_sources(args(path))


def test_npy_folder_missing_a_file(tmp_path):
    np.save(tmp_path / "imgs_train.npy", np.zeros((2, 16, 16, 1), np.float32))
    with pytest.raises(UsageError, match="lacks msks_train.npy"):
        open_sources(args(tmp_path))
