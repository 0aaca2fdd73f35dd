"""unet-synth -> unet-convert on every layout, patient split, npy output, bad input."""
import glob
import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import HANG, ROOT, run_mpi

from unet.data.convert import CONVERTER_VERSION

# The label tables, written out here independently of unet.data.labels.
EXPECTED = {"brats": ({1, 2, 4}, {1, 4}, {4}), "brats2023": ({1, 2, 3}, {1, 3}, {3}),
            "msd": ({1, 2, 3}, {2, 3}, {3})}
SMALL = ["--shape", "40,64,64"]


def synth(out, *args):
    from unet.data.synth import main
    assert main(["--out", str(out), "--anatomy", "sphere", *args]) == 0


def convert(*args):
    return subprocess.run([sys.executable, "-m", "unet.data.convert", "--no_progress", *map(str, args)],
                          capture_output=True, text=True, timeout=HANG, cwd=ROOT)


def rows(path):
    """(case_id, slice) -> (image, masks) for every slice of both splits."""
    out = {}
    with h5py.File(path) as f:
        for split in ("train", "val"):
            g = f[split]
            for i, (c, z) in enumerate(zip(g["case_id"].asstr()[:], g["slice_index"][:])):
                out[(c, int(z))] = (split, g["images"][i], g["masks"][i])
    return out


@pytest.fixture(scope="module", params=["brats", "brats2023", "msd"])
def full_size_dataset(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    synth(root, "--cases", "2", "--layout", request.param, "--seed", "3")
    if request.param == "msd":   # the MSD tarball's macOS debris must be ignored
        (root / "imagesTr" / "._BRATS_001.nii.gz").write_bytes(b"\x00junk")
        (root / "labelsTr" / "._BRATS_001.nii.gz").write_bytes(b"\x00junk")
    return request.param, root


def seg_files(layout, root):
    pat = {"brats": "*/*_seg.nii.gz", "brats2023": "*/*-seg.nii.gz", "msd": "labelsTr/BRATS_*.nii.gz"}[layout]
    return sorted(glob.glob(os.path.join(root, pat)))


def test_size_240_masks_match_the_generated_labels_voxel_for_voxel(full_size_dataset, tmp_path):
    layout, root = full_size_dataset
    out = tmp_path / "d.h5"
    p = convert("--input", root, "--output", out, "--size", 240, "--slices", "all", "--val_fraction", 0.5)
    assert p.returncode == 0, p.stderr
    assert f"2 cases ({layout})" in p.stdout
    got = rows(out)
    with h5py.File(out) as f:
        assert json.loads(f.attrs["regions"]) == ["WT", "TC", "ET"]
        assert json.loads(f.attrs["modalities"]) == ["FLAIR", "T1", "T1ce", "T2"]   # channel order
        assert f.attrs["layout"] == layout and f.attrs["size"] == 240
        assert f.attrs["normalisation"] == "zscore over brain (non-zero) voxels per modality"
        assert f.attrs["converter_version"] == CONVERTER_VERSION and f.attrs["source"] == str(root)
        for split in ("train", "val"):
            images, masks = f[split]["images"], f[split]["masks"]
            assert images.dtype == np.float32 and masks.dtype == np.uint8
            assert images.chunks == (1, 240, 240, 4) and masks.chunks == (1, 240, 240, 3)   # one slice a chunk
            assert images.compression == masks.compression == "gzip" and images.shuffle
            assert f[split]["slice_index"].dtype == np.int32 and f[split]["case_id"].dtype.kind == "O"
    for path in seg_files(layout, root):
        seg = sitk.GetArrayFromImage(sitk.ReadImage(path))           # (z, y, x)
        case = os.path.basename(os.path.dirname(path)) if layout != "msd" else os.path.basename(path)[:-7]
        assert seg.shape == (155, 240, 240)
        for z in range(155):
            _, img, msk = got[(case, z)]
            for k, labels in enumerate(EXPECTED[layout]):
                assert np.array_equal(msk[..., k], np.isin(seg[z], list(labels))), (case, z, k)
        # every label of the layout occurs, so each region above was compared on real voxels
        assert set(np.unique(seg).tolist()) == {0} | EXPECTED[layout][0], (case, np.unique(seg))


def test_patient_split_is_disjoint_and_complete(tmp_path):
    synth(tmp_path / "in", "--cases", "5", *SMALL)
    p = convert("--input", tmp_path / "in", "--output", tmp_path / "d.h5", "--size", 64, "--val_fraction", 0.4)
    assert p.returncode == 0, p.stderr
    with h5py.File(tmp_path / "d.h5") as f:
        tr, va = set(f["train"]["case_id"].asstr()[:]), set(f["val"]["case_id"].asstr()[:])
        assert f["val"]["slice_index"].shape[0] == 2 * 40           # validation keeps every slice
    assert len(va) == 2 and len(tr) == 3 and not tr & va
    assert tr | va == {f"BraTS20_Training_{i:03d}" for i in range(1, 6)}


@pytest.mark.mpi
def test_workers_and_mpi_ranks_give_the_same_slices(tmp_path):
    synth(tmp_path / "in", "--cases", "4", *SMALL, "--grades")
    # seed 0: case 002 has no enhancing tumour (LGG), the others do (HGG)
    assert sorted(os.listdir(tmp_path / "in" / "LGG")) == ["BraTS20_Training_002"]
    assert len(os.listdir(tmp_path / "in" / "HGG")) == 3
    base = ["--input", tmp_path / "in", "--size", 64, "--slices", "tumour"]
    assert convert(*base, "--output", tmp_path / "a.h5").returncode == 0
    assert convert(*base, "--output", tmp_path / "b.h5", "--workers", 2).returncode == 0
    p = run_mpi(2, ["-m", "unet.data.convert", "--no_progress", *map(str, base), "--output", str(tmp_path / "c.h5")])
    assert p.returncode == 0, p.stderr[-2000:]
    a, b, c = rows(tmp_path / "a.h5"), rows(tmp_path / "b.h5"), rows(tmp_path / "c.h5")
    assert a.keys() == b.keys() == c.keys()
    assert {k[0] for k in a} == {f"BraTS20_Training_{i:03d}" for i in range(1, 5)}   # both grade folders read
    for k in a:
        assert a[k][0] == c[k][0] and np.array_equal(a[k][2], c[k][2]) and np.allclose(a[k][1], c[k][1])
    assert not glob.glob(str(tmp_path / "*.tmp*"))


@pytest.fixture(scope="module")
def small_h5(tmp_path_factory):
    """3 small synthetic cases and their HDF5 conversion (all four modalities, WT/TC/ET)."""
    root = tmp_path_factory.mktemp("small")
    synth(root / "in", "--cases", "3", *SMALL)
    p = convert("--input", root / "in", "--output", root / "d.h5", "--size", 64)
    assert p.returncode == 0, p.stderr
    return root / "in", root / "d.h5"


def h5_arrays(path, split="train"):
    with h5py.File(path) as f:
        return f[split]["images"][:], f[split]["masks"][:]


def test_npy_format_is_the_seeds_four_files(small_h5, tmp_path):
    cases, h5 = small_h5
    p = convert("--input", cases, "--output", tmp_path / "npy", "--size", 64, "--format", "npy")
    assert p.returncode == 0, p.stderr
    names = sorted(os.listdir(tmp_path / "npy"))
    assert names == ["imgs_test.npy", "imgs_train.npy", "msks_test.npy", "msks_train.npy", "unet-convert.json"]
    imgs, msks = np.load(tmp_path / "npy" / "imgs_train.npy"), np.load(tmp_path / "npy" / "msks_train.npy")
    assert imgs.shape[1:] == (64, 64, 1) and msks.shape == imgs.shape and imgs.dtype == np.float32
    # the seed's default: the one channel is FLAIR (channel 0 of the 4-channel file), the mask WT
    all_imgs, all_msks = h5_arrays(h5)
    assert np.allclose(imgs[..., 0], all_imgs[..., 0]) and not np.allclose(imgs[..., 0], all_imgs[..., 2])
    assert np.array_equal(msks[..., 0], all_msks[..., 0]) and not np.array_equal(msks[..., 0], all_msks[..., 1])
    with open(tmp_path / "npy" / "unet-convert.json") as fh:
        meta = json.load(fh)
    assert meta["modalities"] == ["FLAIR"] and meta["regions"] == ["WT"] and meta["complete"] is True


def test_trainer_source_reads_a_two_modality_three_region_npy_conversion(small_h5, tmp_path):
    from unet.data.sources import DataOptions, open_sources
    cases, h5 = small_h5
    p = convert("--input", cases, "--output", tmp_path / "npy", "--size", 64, "--format", "npy",
                "--modalities", "T1ce,FLAIR", "--regions", "WT,TC,ET")
    assert p.returncode == 0, p.stderr
    train, val, info = open_sources(DataOptions(data=str(tmp_path / "npy")))
    assert info.modalities == ["T1ce", "FLAIR"] and info.region_names == ["WT", "TC", "ET"]
    assert (info.height, info.width, info.channels, info.regions) == (64, 64, 2, 3)
    assert info.attrs["layout"] == "brats" and info.attrs["size"] == 64 and info.attrs["converter_version"]
    all_imgs, all_msks = h5_arrays(h5, "val")
    x, y = val.read(np.arange(len(val)))
    assert np.allclose(x, all_imgs[..., [2, 0]]) and np.array_equal(y, all_msks)   # channel order as asked


def test_files_are_found_by_suffix_and_appledouble_files_ignored(small_h5, tmp_path):
    """Any prefix, .nii or .nii.gz, any letter case, the '_Segm' seg of BraTS 2020 case 355; macOS
    '._*' files beside the real ones and in a zip's __MACOSX/ tree are not read."""
    import shutil
    cases, h5 = small_h5
    root = tmp_path / "in"
    shutil.copytree(cases, root)
    d = root / "BraTS20_Training_001"
    renames = {"flair": "Brats18_X_1_flair.nii", "t1ce": "BraTS20_Training_001_T1CE.NII.GZ",
               "seg": "BraTS20_Training_001_Segm.nii"}
    for suffix, name in renames.items():
        f = case_file(root, 1, suffix)
        tmp = d / ("tmp.nii.gz" if name.lower().endswith(".gz") else "tmp.nii")   # ITK writes lower case only
        sitk.WriteImage(sitk.ReadImage(str(f)), str(tmp), tmp.suffix == ".gz")
        os.unlink(f)
        os.rename(tmp, d / name)
    junk = b"\x00\x05\x16\x07\x00\x02\x00\x00" + bytes(200)        # AppleDouble header
    for f in os.listdir(d):
        (d / f"._{f}").write_bytes(junk)
    mac = root / "__MACOSX" / "BraTS20_Training_001"
    mac.mkdir(parents=True)
    for f in os.listdir(d):
        if not f.startswith("._"):
            (mac / f"._{f}").write_bytes(junk)
    p = convert("--input", root, "--output", tmp_path / "d.h5", "--size", 64)
    assert p.returncode == 0, p.stderr
    assert "3 cases (brats)" in p.stdout
    got, want = rows(tmp_path / "d.h5"), rows(h5)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k][0] == want[k][0]
        assert np.array_equal(got[k][1], want[k][1]) and np.array_equal(got[k][2], want[k][2])


# -- bad input ---------------------------------------------------------------------------------------

@pytest.fixture
def small_cases(tmp_path):
    root = tmp_path / "in"
    synth(root, "--cases", "3", *SMALL)
    return root


def case_file(root, n, suffix):
    return root / f"BraTS20_Training_{n:03d}" / f"BraTS20_Training_{n:03d}_{suffix}.nii.gz"


def write_like(path, arr):
    img = sitk.GetImageFromArray(arr)
    sitk.WriteImage(img, str(path), True)


def bad(root, out):
    p = convert("--input", root, "--output", out, "--size", 64)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and not os.path.exists(out) and not glob.glob(f"{out}*")
    assert len(lines) == 1 and lines[0].startswith("unet-convert: error: case BraTS20_Training_002: "), p.stderr
    return lines[0]


def test_truncated_file(small_cases, tmp_path):
    f = case_file(small_cases, 2, "t1")
    f.write_bytes(f.read_bytes()[:2000])
    msg = bad(small_cases, tmp_path / "o.h5")
    assert str(f) in msg and "cannot read" in msg


def test_garbage_file(small_cases, tmp_path):
    f = case_file(small_cases, 2, "t1")
    f.write_bytes(np.random.default_rng(0).bytes(5000))          # neither gzip nor NIfTI
    msg = bad(small_cases, tmp_path / "o.h5")
    assert str(f) in msg and "cannot read" in msg


def test_garbage_uncompressed_file(small_cases, tmp_path):
    os.unlink(case_file(small_cases, 2, "t1"))
    f = case_file(small_cases, 2, "t1").with_suffix("")           # ..._t1.nii
    f.write_bytes(np.random.default_rng(1).bytes(5000))
    msg = bad(small_cases, tmp_path / "o.h5")
    assert msg.endswith(f"{f}: cannot read (not a NIfTI file)")


def test_missing_modality(small_cases, tmp_path):
    os.unlink(case_file(small_cases, 2, "t1ce"))
    msg = bad(small_cases, tmp_path / "o.h5")
    assert f"{small_cases / 'BraTS20_Training_002'}: missing T1ce file (*_t1ce.nii.gz)" in msg


def test_shape_mismatch(small_cases, tmp_path):
    write_like(case_file(small_cases, 2, "t2"), np.zeros((40, 64, 60), np.int16))
    msg = bad(small_cases, tmp_path / "o.h5")
    assert "_t2.nii.gz" in msg and "shape (60, 64, 40) differs" in msg


def test_seg_shape_mismatch(small_cases, tmp_path):
    f = case_file(small_cases, 2, "seg")
    write_like(f, np.zeros((40, 64, 60), np.uint8))
    msg = bad(small_cases, tmp_path / "o.h5")
    assert f"{f}: shape (60, 64, 40) differs from BraTS20_Training_002_flair.nii.gz (64, 64, 40)" in msg


def test_spacing_mismatch(small_cases, tmp_path):
    f = case_file(small_cases, 2, "seg")
    img = sitk.ReadImage(str(f)); img.SetSpacing((1.0, 1.0, 2.5)); sitk.WriteImage(img, str(f), True)
    assert "_seg.nii.gz: spacing" in bad(small_cases, tmp_path / "o.h5")


def test_unexpected_labels(small_cases, tmp_path):
    f = case_file(small_cases, 2, "seg")
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(f))); seg[0, 0, 0] = 3
    write_like(f, seg)
    assert f"{f}: unexpected label values [3] for layout brats" in bad(small_cases, tmp_path / "o.h5")


@pytest.mark.parametrize("kind,voxel,value", [("flair", (5, 5, 5), np.nan), ("t2", (20, 30, 30), np.inf),
                                              ("seg", (0, 0, 0), np.nan)],
                         ids=["nan_in_image", "inf_in_image", "nan_in_seg"])
def test_non_finite_values(small_cases, tmp_path, kind, voxel, value):
    f = case_file(small_cases, 2, kind)
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(f))).astype(np.float32); arr[voxel] = value
    write_like(f, arr)
    assert f"{f}: contains NaN or Inf" in bad(small_cases, tmp_path / "o.h5")


def test_skip_bad_carries_on_and_lists_the_skipped(small_cases, tmp_path):
    import re
    os.unlink(case_file(small_cases, 2, "t1ce"))
    out = tmp_path / "o.h5"
    p = convert("--input", small_cases, "--output", out, "--size", 64, "--skip_bad", "--val_fraction", 0.3)
    assert p.returncode == 0, p.stderr
    assert "skipped 1 bad case(s)" in p.stderr and "BraTS20_Training_002" in p.stderr
    got = rows(out)
    assert {k[0] for k in got} == {"BraTS20_Training_001", "BraTS20_Training_003"}
    # the summary counts only what was written: slices and cases per split, skipped case excluded
    m = re.search(r"^unet-convert: 2 cases \(brats\) .*: train (\d+) slices from (\d+) cases, "
                  r"val (\d+) slices from (\d+) cases", p.stdout, re.M)
    assert m, p.stdout
    for split, slices, n_cases in (("train", m[1], m[2]), ("val", m[3], m[4])):
        in_split = [k for k, v in got.items() if v[0] == split]
        assert int(slices) == len(in_split) and int(n_cases) == len({k[0] for k in in_split}), split
    assert int(m[2]) + int(m[4]) == 2


def test_help_states_each_default_once():
    import re

    from unet.data.convert import build_parser
    text = build_parser().format_help()
    options = re.split(r"\n  (?=-)", text)
    assert len(options) > 15
    for block in options:
        assert block.count("default") <= 1, block
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "(default: 128)" in text and "(default: all four for h5, FLAIR for npy)" in " ".join(text.split())


@pytest.mark.mpi
def test_trainer_reads_converted_h5_and_npy(tmp_path):
    synth(tmp_path / "in", "--cases", "3", *SMALL)
    assert convert("--input", tmp_path / "in", "--output", tmp_path / "d.h5", "--size", 64).returncode == 0
    assert convert("--input", tmp_path / "in", "--output", tmp_path / "npy", "--size", 64,
                   "--format", "npy").returncode == 0
    for data, shape in ((tmp_path / "d.h5", "64x64x4 (FLAIR,T1,T1ce,T2) regions WT,TC,ET"),
                        (tmp_path / "npy", "64x64x1 (FLAIR) regions WT")):
        p = run_mpi(2, [os.path.join(ROOT, "train_hvd.py"), "--data", str(data), "--logdir", str(tmp_path / data.stem),
                        "--batch_size", "4", "--epochs", "1", "--steps_per_epoch", "2", "--export", "none"])
        assert p.returncode == 0, p.stderr[-2000:]
        assert shape in p.stdout
