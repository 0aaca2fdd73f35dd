"""Data files the trainer is given: shape from metadata, one-line errors naming the file."""
import os

import h5py
import numpy as np
import pytest
from h5fixture import write_h5

from unet.data.sources import DataOptions, open_sources
from unet.training.config import UsageError


def args(path):
    return DataOptions(data=str(path))


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


def seed_folder(folder, channels=1, regions=1):
    for split, n in (("train", 6), ("test", 2)):
        np.save(folder / f"imgs_{split}.npy", np.zeros((n, 16, 16, channels), np.float32))
        np.save(folder / f"msks_{split}.npy", np.zeros((n, 16, 16, regions), np.uint8))
    return folder


def test_npy_folder_without_metadata_is_the_seeds_flair_to_wt(tmp_path):
    _, _, info = open_sources(args(seed_folder(tmp_path)))
    assert info.modalities == ["FLAIR"] and info.region_names == ["WT"] and info.attrs["layout"] == "seed-npy"


def test_npy_folder_of_several_channels_needs_its_metadata(tmp_path):
    seed_folder(tmp_path, channels=2, regions=3)
    with pytest.raises(UsageError, match="2 channel.*3 region.*no unet-convert.json") as e:
        open_sources(args(tmp_path))
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)


def test_npy_write_interrupted_between_renames_is_refused(tmp_path, monkeypatch):
    """A crash after the first of the five renames leaves a folder the trainer will not read."""
    from unet.data import h5io
    h5 = write_h5(str(tmp_path / "d.h5"), size=32, channels=2, regions=3)
    out = tmp_path / "npy"
    h5io.write_npy(h5, str(out))                                   # a complete previous set
    assert open_sources(args(out))[2].channels == 2
    real, calls = os.replace, []

    def crash_after_two(src, dst):
        calls.append(dst)
        if len(calls) > 2:            # the 'incomplete' marker and imgs_train.npy are in place
            raise OSError("simulated crash")
        real(src, dst)

    monkeypatch.setattr(h5io.os, "replace", crash_after_two)
    with pytest.raises(OSError, match="simulated crash"):
        h5io.write_npy(write_h5(str(tmp_path / "e.h5"), size=32, channels=2, regions=3, seed=1), str(out))
    monkeypatch.undo()
    with pytest.raises(UsageError, match="did not finish") as e:
        open_sources(args(out))
    assert str(out) in str(e.value)
    assert sorted(os.listdir(out)) == ["imgs_test.npy", "imgs_train.npy", "msks_test.npy", "msks_train.npy",
                                       "unet-convert.json"]                # no temporary files left


def test_npy_files_replaced_by_hand_do_not_match_their_metadata(tmp_path):
    from unet.data.h5io import write_npy
    write_npy(write_h5(str(tmp_path / "d.h5"), size=32, channels=2, regions=3), str(tmp_path / "npy"))
    np.save(tmp_path / "npy" / "imgs_test.npy", np.zeros((3, 32, 32, 2), np.float32))
    with pytest.raises(UsageError, match="imgs_test.npy has shape .*: files from different conversions"):
        open_sources(args(tmp_path / "npy"))


def test_foreground_share_is_each_regions_mean_over_the_training_masks(tmp_path):
    from unet.data.sources import foreground_share
    path = write_h5(str(tmp_path / "d.h5"), n_train=24, size=32, regions=3)
    train, _, _ = open_sources(args(path))
    with h5py.File(path, "r") as f:
        masks = f["train"]["masks"][:].astype(np.float64)
    exact = masks.mean(axis=(0, 1, 2))
    assert exact[0] > exact[1] > exact[2] > 0       # discs of radius 6, 4, 2 pixels: nested regions
    np.testing.assert_allclose(foreground_share(train, chunk=5), exact, rtol=1e-12)
    # a cap reads evenly strided slices only: slices 0, 23 and the two between (rounded)
    four = np.unique(np.linspace(0, 23, 4).round().astype(int))
    np.testing.assert_allclose(foreground_share(train, max_slices=4), masks[four].mean(axis=(0, 1, 2)), rtol=1e-12)


def test_foreground_fraction_needs_a_training_slice_with_tumour(tmp_path):
    path = write_h5(str(tmp_path / "d.h5"))
    with h5py.File(path, "a") as f:
        f["train"]["masks"][...] = 0
    a = DataOptions(data=path, foreground_fraction=0.5)
    with pytest.raises(UsageError, match=r"^--foreground_fraction 0.5: no training slice of .*d.h5 holds tumour"):
        open_sources(a)
    assert open_sources(DataOptions(data=path))[0]
    # --background_fraction 0 keeps only the tumour slices in an epoch: none, so the epoch would be empty
    with pytest.raises(UsageError, match=r"^--background_fraction 0.0: an epoch of .*d.h5 would be empty"):
        open_sources(DataOptions(data=path, background_fraction=0.0))
    assert len(open_sources(DataOptions(data=path, background_fraction=0.5))[0]) == 24     # 12 of 24 an epoch
