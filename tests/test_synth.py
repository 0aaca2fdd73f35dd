"""unet-synth: BraTS geometry on disk (both anatomies); the sphere phantom's MRI-like contrast, nested
regions, determinism, variety (the ICBM152 cases: tests/test_synth_mni152.py)."""
import gzip
import importlib.util
import os
import struct

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import IN_CI
from scipy import ndimage

from unet.data import labels as L
from unet.data import synth

SHAPE = (64, 96, 96)                 # small (z, y, x): about 0.1 s a case
# BraTS 2017-22 headers (NIfTI, RAS): 1 mm, x and y flipped, y origin 239 (the last row of 240)
BRATS_SROW = np.array([[-1, 0, 0, 0], [0, -1, 0, 239], [0, 0, 1, 0]], float)


def nifti_header(path):
    """(dim, pixdim, qform/sform codes, srow rows) read from the raw NIfTI-1 bytes."""
    with gzip.open(path, "rb") as fh:
        h = fh.read(348)
    assert struct.unpack("<i", h[:4])[0] == 348
    dim = struct.unpack("<8h", h[40:56])
    pixdim = struct.unpack("<8f", h[76:108])
    codes = struct.unpack("<2h", h[252:256])
    srow = np.array(struct.unpack("<12f", h[280:328])).reshape(3, 4)
    return dim[1:1 + dim[0]], pixdim[1:1 + dim[0]], codes, srow


def test_default_shape_has_the_brats_header(tmp_path):
    """A default-shape (240x240x155) volume through synth's geometry, header read back from disk."""
    assert synth.SHAPE == (155, 240, 240)
    path = str(tmp_path / "v.nii.gz")
    sitk.WriteImage(synth._image(np.zeros(synth.SHAPE, np.int16)), path, True)
    dim, pixdim, codes, srow = nifti_header(path)
    assert dim == (240, 240, 155) and pixdim == (1.0, 1.0, 1.0)
    assert min(codes) > 0 and np.array_equal(srow, BRATS_SROW)
    r = sitk.ImageFileReader()
    r.SetFileName(path)
    r.ReadImageInformation()
    assert r.GetSpacing() == (1.0, 1.0, 1.0) and r.GetOrigin() == (0.0, -239.0, 0.0)
    assert np.array_equal(np.reshape(r.GetDirection(), (3, 3)), np.eye(3))   # ITK's LPS: identity


# the ICBM152 template comes with nilearn: missing, it fails under CI=true and is skipped elsewhere
MNI152 = pytest.param("mni152", marks=pytest.mark.skipif(
    not IN_CI and importlib.util.find_spec("nilearn") is None, reason="nilearn is not installed"))


@pytest.mark.parametrize("anatomy", ["sphere", MNI152])
@pytest.mark.parametrize("layout", ["brats", "brats2023", "msd"])
def test_every_written_file_has_the_same_brats_geometry(tmp_path, layout, anatomy):
    assert synth.main(["--out", str(tmp_path), "--cases", "1", "--layout", layout, "--shape", "32,48,48",
                       "--anatomy", anatomy]) == 0
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs if f.endswith(".nii.gz"))
    assert len(files) == (2 if layout == "msd" else 5)
    for f in files:
        dim, pixdim, _, srow = nifti_header(f)
        assert dim[:3] == (48, 48, 32) and pixdim[:3] == (1.0, 1.0, 1.0), f
        assert np.array_equal(srow, BRATS_SROW), f
        if layout == "msd" and "imagesTr" in f:
            assert dim[3] == 4                                # FLAIR, T1w, T1gd, T2w


@pytest.fixture(scope="module")
def cases():
    return [synth.make_case(0, i, SHAPE) for i in range(10)]


def test_relative_contrast_follows_mri(cases):
    """Edema bright on FLAIR and T2, enhancing rim bright on T1ce, necrotic core dark on T1ce."""
    checked = 0
    for vols, lab in cases:
        normal = (vols["T1"] > 0) & (lab == 0)          # brain without tumour
        edema, core, rim = lab == 2, lab == 1, lab == 4
        mean = lambda m, where: float(vols[m][where].mean())  # noqa: E731
        for m in ("FLAIR", "T2"):
            assert mean(m, edema) > 1.3 * mean(m, normal), m
        if rim.any():
            checked += 1
            assert mean("T1ce", rim) > 1.3 * mean("T1ce", normal)
            assert mean("T1ce", core) < 0.5 * mean("T1ce", rim)
    assert checked >= 5


def test_regions_are_nested_and_the_core_is_enclosed(cases):
    """ET inside TC inside WT, each strictly smaller; edema wraps the core, the rim wraps necrosis."""
    with_et = 0
    for vols, lab in cases:
        brain = vols["T1"] > 0
        wt, tc, et = (L.regions_from_labels(lab, "brats")[..., k].astype(bool) for k in range(3))
        assert tc.sum() < wt.sum() and et.sum() < tc.sum() and tc.any()
        assert not (et & ~tc).any() and not (tc & ~wt).any()
        # around the core (inside the brain) there is only tumour: the core never touches normal brain
        assert not (ndimage.binary_dilation(tc) & brain & ~wt).any()
        if et.any():
            with_et += 1
            # the necrotic centre borders the rim, at most edema where a sub-voxel rim has gaps
            # at this small size, never normal brain
            necrosis = lab == 1
            border = lab[ndimage.binary_dilation(necrosis) & ~necrosis & brain]
            assert (border == 4).mean() > 0.6 and set(np.unique(border).tolist()) <= {2, 4}
        # each layout's labels give back the same regions through the converter's label tables
        for layout, to in synth.TO_LAYOUT.items():
            seg = np.zeros_like(lab)
            for src, dst in to.items():
                seg[lab == src] = dst
            assert np.array_equal(L.regions_from_labels(seg, layout), L.regions_from_labels(lab, "brats")), layout
    assert 0 < with_et < len(cases)                # some cases have no enhancing tumour


def test_size_and_position_vary_across_cases(cases):
    sizes = [int((lab > 0).sum()) for _, lab in cases]
    centres = np.array([ndimage.center_of_mass(lab > 0) for _, lab in cases])
    assert len(set(sizes)) == len(cases) and max(sizes) > 2 * min(sizes)
    assert (centres.std(axis=0) > 3).all()         # voxels, in each of z, y, x


def test_same_seed_same_cases_other_seed_other_cases(tmp_path):
    def arrays(seed, out):
        assert synth.main(["--out", str(out), "--cases", "2", "--seed", str(seed), "--shape", "32,48,48",
                           "--anatomy", "sphere"]) == 0
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs)
        return [sitk.GetArrayFromImage(sitk.ReadImage(f)) for f in files]
    a, b, c = arrays(5, tmp_path / "a"), arrays(5, tmp_path / "b"), arrays(6, tmp_path / "c")
    assert len(a) == len(b) == 10 and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not any(np.array_equal(x, z) for x, z in zip(a, c))
