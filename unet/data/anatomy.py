"""The ICBM152 2009 brain on the BraTS grid, and the deformations that make each case's brain.

nilearn's wheel carries the ICBM152 2009a (symmetric, 1 mm) T1 template and its grey- and white-matter
probability maps in ``nilearn/datasets/data/``; ``nilearn.datasets.load_mni152_template`` and the
``_gm_`` / ``_wm_`` loaders read exactly these files, without a network. They are read here with SimpleITK
(importing nilearn would cost seconds) and resampled once per process onto the case grid (240x240x155 at
1 mm by default): the brain scaled by ``BRAIN_SCALE`` and centred. The brain mask is nilearn's
(``load_mni152_brain_mask``: the T1 template above 0.2 of its maximum); CSF is the rest of the mask.

Deformations map output voxels back to template voxels (backward, as resampling needs). They are computed
on a coarse grid (every ``step`` voxels) and interpolated to 1 mm separably, which costs a few matrix
products instead of a per-voxel interpolation.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

BRATS_SHAPE = (155, 240, 240)        # (z, y, x)
TEMPLATE_FILES = {"t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
                  "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
                  "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"}
MASK_THRESHOLD = 0.2                 # nilearn's load_mni152_brain_mask default
# The template brain is 1.88 L and 155 mm tall (with the brainstem); scaled by 0.9 it is 1.37 L and fits
# BraTS's 155 slices with room for the per-case affine, as an adult brain does in the SRI24 grid.
BRAIN_SCALE = 0.9
TISSUES = ("gm", "wm", "csf")


class TemplateMissing(RuntimeError):
    """nilearn (which ships the template) is not installed, or its template files are not there."""


def template_paths() -> dict[str, str]:
    """tissue -> path of the packaged .nii.gz inside the installed nilearn (found without importing it)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise TemplateMissing("nilearn is not installed (it ships the ICBM152 template): "
                              "scripts/setup.sh installs it, or pip install nilearn==0.14.1")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data")
    paths = {k: os.path.join(folder, f) for k, f in TEMPLATE_FILES.items()}
    absent = [p for p in paths.values() if not os.path.isfile(p)]
    if absent:
        raise TemplateMissing(f"nilearn has no ICBM152 template file {absent[0]}")
    return paths


@dataclass(frozen=True)
class Template:
    """Tissue fractions on the case grid (float32, (z, y, x)); ``g`` = voxels of this grid per mm of BraTS's."""
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    g: float

    @property
    def brain_ml(self) -> float:
        """Brain volume in BraTS millilitres (the tissue fractions summed)."""
        return float((self.gm.sum(dtype=np.float64) + self.wm.sum(dtype=np.float64)
                      + self.csf.sum(dtype=np.float64)) / self.g ** 3 / 1000.0)


def template(shape=BRATS_SHAPE) -> Template:
    """The template's tissue fractions resampled onto a grid of ``shape`` (cached per process)."""
    return _template(tuple(int(s) for s in shape))


@functools.lru_cache(maxsize=2)
def _template(shape: tuple[int, int, int]) -> Template:
    import SimpleITK as sitk
    paths = template_paths()
    t1 = sitk.ReadImage(paths["t1"], sitk.sitkFloat32)
    arrays = {k: sitk.GetArrayFromImage(sitk.ReadImage(paths[k], sitk.sitkFloat32)) / 255.0 for k in ("gm", "wm")}
    t1_arr = sitk.GetArrayFromImage(t1)
    mask_arr = (t1_arr > MASK_THRESHOLD * t1_arr.max()).astype(np.float32)
    arrays["csf"] = np.clip(mask_arr - arrays["gm"] - arrays["wm"], 0.0, 1.0)
    # the brain's bounding-box centre (physical, template space) goes to the grid's centre
    idx = np.argwhere(mask_arr > 0)                       # (z, y, x)
    centre_idx = ((idx.min(0) + idx.max(0)) / 2.0)[::-1]  # (x, y, z) continuous index
    centre_tpl = np.array(t1.TransformContinuousIndexToPhysicalPoint(centre_idx.tolist()))
    g = min(s / b for s, b in zip(shape, BRATS_SHAPE))
    ref = sitk.Image([int(s) for s in shape[::-1]], sitk.sitkFloat32)     # identity geometry, 1 voxel = 1 unit
    centre_out = (np.array(shape[::-1], float) - 1) / 2.0
    tf = sitk.AffineTransform(3)
    tf.SetMatrix((np.eye(3) / (BRAIN_SCALE * g)).ravel().tolist())
    tf.SetCenter(centre_out.tolist())
    tf.SetTranslation((centre_tpl - centre_out).tolist())
    out = {}
    for name, arr in arrays.items():
        img = sitk.GetImageFromArray(arr.astype(np.float32))
        img.CopyInformation(t1)
        r = sitk.Resample(img, ref, tf, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        out[name] = np.ascontiguousarray(np.clip(sitk.GetArrayFromImage(r), 0.0, 1.0), dtype=np.float32)
    return Template(out["gm"], out["wm"], out["csf"], g)


# ---- coarse grids and separable interpolation ---------------------------------------------------------

@dataclass(frozen=True)
class Grid:
    """Coarse points every ``step`` voxels of a ``shape`` volume, from voxel 0 past the last one."""
    shape: tuple[int, int, int]
    step: int

    @property
    def dims(self) -> tuple[int, int, int]:
        return tuple(int(np.ceil((s - 1) / self.step)) + 1 for s in self.shape)

    def points(self) -> np.ndarray:
        """(3, nz, ny, nx) voxel coordinates (z, y, x) of the coarse points, float32."""
        axes = [np.arange(n, dtype=np.float32) * self.step for n in self.dims]
        return np.stack(np.meshgrid(*axes, indexing="ij"))


def interp_matrix(n: int, step: float, positions: np.ndarray) -> np.ndarray:
    """(len(positions), n) linear-interpolation weights from n samples every ``step`` to ``positions``."""
    u = np.clip(np.asarray(positions, np.float64) / step, 0, n - 1)
    i0 = np.minimum(np.floor(u).astype(int), max(n - 2, 0))
    f = (u - i0).astype(np.float32)
    w = np.zeros((len(u), n), np.float32)
    rows = np.arange(len(u))
    w[rows, i0] = 1.0 - f
    if n > 1:
        w[rows, i0 + 1] += f
    return w


def upsample(coarse: np.ndarray, step: float, box: tuple[slice, slice, slice]) -> np.ndarray:
    """Values sampled every ``step`` voxels (the last three axes of ``coarse``), linearly interpolated
    to every voxel of ``box`` (slices of the fine grid, in voxels)."""
    out = np.asarray(coarse, np.float32)
    lead = out.ndim - 3
    for k, sl in enumerate(box):
        ax = lead + k
        w = interp_matrix(out.shape[ax], step, np.arange(sl.start, sl.stop))
        out = np.moveaxis(np.tensordot(out, w, axes=([ax], [1])), -1, ax)
    return np.ascontiguousarray(out)


def smooth_noise(rng: np.random.Generator, dims, sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise of ``dims`` (sigma in samples), unit standard deviation, float32."""
    n = ndimage.gaussian_filter(rng.standard_normal(dims).astype(np.float32), sigma, mode="reflect")
    return (n - n.mean()) / max(float(n.std()), 1e-6)


# ---- per-case deformation ------------------------------------------------------------------------------

def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Rotation in (z, y, x) coordinates: yaw in the axial (y, x) plane, pitch in (z, y), roll in (z, x)."""
    c, s = np.cos(yaw), np.sin(yaw)
    rz = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    c, s = np.cos(pitch), np.sin(pitch)
    rx = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    c, s = np.cos(roll), np.sin(roll)
    ry = np.array([[c, 0, -s], [0, 1, 0], [s, 0, c]])
    return rz @ rx @ ry


@dataclass(frozen=True)
class Affine:
    """Backward affine about the grid centre: template voxel = centre + matrix (p - centre) + shift."""
    matrix: np.ndarray
    shift: np.ndarray
    centre: np.ndarray

    @property
    def volume_factor(self) -> float:
        """Output brain volume / template brain volume."""
        return float(1.0 / abs(np.linalg.det(self.matrix)))


def random_affine(rng: np.random.Generator, shape, g: float) -> Affine:
    """Rotation up to 10 degrees in the axial plane and 4 out of it, per-axis scale 0.93-1.07, shift up
    to 6 mm."""
    yaw = np.deg2rad(rng.uniform(-10, 10))
    pitch, roll = np.deg2rad(rng.uniform(-4, 4, 2))
    scale = rng.uniform(0.93, 1.07, 3)
    shift = rng.uniform(-6, 6, 3) * g
    m = _rotation(yaw, pitch, roll) @ np.diag(1.0 / scale)
    return Affine(m.astype(np.float32), shift.astype(np.float32), ((np.array(shape) - 1) / 2.0).astype(np.float32))


def random_elastic(rng: np.random.Generator, grid: Grid, g: float) -> np.ndarray:
    """(3, *grid.dims) smooth displacement in voxels: Gaussian-smoothed noise (sigma 30 mm), rms 1-3 mm.
    Its local volume change (the divergence, sd ~0.05-0.1) biases the brain's volume upwards by about its
    variance (the output volume integrates 1 / det of the Jacobian): 1 % at most, where sigma 20 mm and
    3.5 mm gave 3.5 %."""
    sigma = 30.0 * g / grid.step
    amp = rng.uniform(1.0, 3.0) * g
    return np.stack([smooth_noise(rng, grid.dims, sigma) * amp for _ in range(3)])


def pull(points: np.ndarray, affine: Affine, elastic: np.ndarray, step: int) -> np.ndarray:
    """Template voxel coordinates of output ``points`` (3, ...): elastic displacement, then the affine."""
    flat = points.reshape(3, -1)
    e = np.stack([ndimage.map_coordinates(elastic[k], flat / step, order=1, mode="nearest") for k in range(3)])
    x = flat + e - affine.centre[:, None]
    q = affine.matrix @ x + (affine.centre + affine.shift)[:, None]
    return q.astype(np.float32).reshape(points.shape)


def push_out(points: np.ndarray, centre: np.ndarray, radius: float, taper: np.ndarray) -> np.ndarray:
    """Backward displacement of a mass of ``radius`` voxels at ``centre``: tissue at distance s from it
    moves to r = (s^3 + radius^3)^(1/3) (the volume it displaces, as an incompressible medium would),
    scaled by ``taper`` (0 at the brain's edge, where the skull stops it). ``points`` (3, ...)."""
    d = points - centre.reshape((3,) + (1,) * (points.ndim - 1))
    r = np.sqrt((d ** 2).sum(0))
    s = np.cbrt(np.maximum(r ** 3 - radius ** 3, 0.0))
    shrink = np.where(r > 1e-6, s / np.maximum(r, 1e-6), 0.0)
    return (-d * (1.0 - shrink) * taper).astype(np.float32)


def warp(tpl: Template, coords: np.ndarray) -> dict[str, np.ndarray]:
    """Tissue fractions at template voxel ``coords`` (3, ...) by trilinear interpolation, float32."""
    return {k: ndimage.map_coordinates(getattr(tpl, k), coords, order=1, mode="constant", cval=0.0,
                                       output=np.float32) for k in TISSUES}


def bounding_box(mask: np.ndarray, step: int, shape, margin: int = 1) -> tuple[slice, slice, slice]:
    """The fine-grid box (slices) covering the coarse ``mask``'s true points plus ``margin`` coarse cells."""
    idx = np.argwhere(mask)
    lo = np.maximum((idx.min(0) - margin) * step, 0)
    hi = np.minimum((idx.max(0) + margin) * step + 1, shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
