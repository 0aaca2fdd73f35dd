"""MR signal of a synthetic brain: per-tissue intensities mixed by partial volume, then the scanner.

Each voxel's signal in each contrast is the sum over its compartments (grey and white matter, CSF,
oedema, necrosis, enhancing rim, non-enhancing core) of fraction x intensity, every intensity jittered
per case by up to 8 %; tumour compartments vary smoothly inside (10 %). Then, per contrast: a smooth
multiplicative bias field (up to about 15 %), a slight Gaussian blur (0.4-0.8 mm), Rician noise (1.5-3.5 %
of white matter on T1) and a global scale; outside the brain the volumes are zero (skull-stripped, as
BraTS's are).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from unet.data import anatomy
from unet.data.layouts import MODALITIES

# compartment -> intensity in (FLAIR, T1, T1ce, T2), relative to white matter on T1. CSF dark on T1 and
# FLAIR, bright on T2; white matter brighter than grey on T1, darker on T2 and FLAIR; oedema bright on
# T2 and FLAIR; the rim enhances on T1ce only; necrosis dark on T1 and T1ce.
INTENSITY = {
    "wm": (0.62, 1.00, 1.00, 0.55),
    "gm": (0.82, 0.72, 0.74, 0.80),
    "csf": (0.18, 0.25, 0.26, 1.60),
    "oedema": (1.50, 0.62, 0.64, 1.45),
    "necrosis": (1.00, 0.35, 0.32, 1.50),
    "enhancing": (1.05, 0.72, 1.70, 0.95),
    "core": (1.25, 0.55, 0.58, 1.40),
}
JITTER = 0.08
TUMOUR = ("oedema", "necrosis", "enhancing", "core")


def intensities(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """This case's intensities: each compartment x contrast scaled by 1 +/- JITTER."""
    names = sorted(INTENSITY)
    jit = rng.uniform(1 - JITTER, 1 + JITTER, (len(names), len(MODALITIES)))
    return {n: np.asarray(INTENSITY[n], np.float32) * jit[i].astype(np.float32) for i, n in enumerate(names)}


def bias_field(rng: np.random.Generator, region, shape) -> np.ndarray:
    """exp(a smooth quadratic in the normalised coordinates): 1 +/- ~0.15 across the head; computed every
    8 voxels and interpolated."""
    step = 8.0
    axes = [((np.arange(r.start, r.stop + step, step, dtype=np.float32) + 0.5) / s - 0.5) * 2
            for r, s in zip(region, shape)]
    lin, quad = rng.normal(0, 0.05, 3), rng.normal(0, 0.04, 3)
    cross = rng.normal(0, 0.03, 3)
    z, y, x = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
    log_b = (lin[0] * z + lin[1] * y + lin[2] * x + quad[0] * z ** 2 + quad[1] * y ** 2 + quad[2] * x ** 2
             + cross[0] * z * y + cross[1] * z * x + cross[2] * y * x)
    return anatomy.upsample(np.exp(log_b), step, tuple(slice(0, r.stop - r.start) for r in region))


def render(rng: np.random.Generator, fractions: dict[str, np.ndarray], brain: np.ndarray, region, shape,
           g: float) -> dict[str, np.ndarray]:
    """Modality -> float32 volume of ``shape`` from the compartment ``fractions`` over ``region``;
    ``brain`` (bool over the region) is where the skull-stripped volume is not zero."""
    table = intensities(rng)
    dims = tuple(r.stop - r.start for r in region)
    step = max(1.0, 6.0 * g)
    coarse = tuple(int(np.ceil((n - 1) / step)) + 1 for n in dims)
    rel = tuple(slice(0, n) for n in dims)
    tumour = sum(fractions[k] for k in TUMOUR if k in fractions)
    scale = rng.uniform(0.8, 1.25) * 500.0
    blur = rng.uniform(0.4, 0.8) * g
    noise_sd = rng.uniform(0.015, 0.035)
    names = sorted(fractions)
    stack = np.stack([fractions[n].ravel() for n in names])                  # (compartments, voxels)
    mixed = (np.stack([table[n] for n in names], axis=1) @ stack).reshape((len(MODALITIES),) + dims)
    del stack
    out = {}
    for m_i, m in enumerate(MODALITIES):
        v = mixed[m_i]
        v *= 1.0 + 0.10 * tumour * anatomy.upsample(anatomy.smooth_noise(rng, coarse, 1.0), step, rel)
        v *= bias_field(rng, region, shape)
        v = ndimage.gaussian_filter(v, blur, mode="nearest") if blur > 0.05 else v
        n1 = rng.standard_normal(dims, dtype=np.float32)
        n1 *= noise_sd
        v += n1
        np.square(v, out=v)
        n1 = rng.standard_normal(dims, dtype=np.float32)
        n1 *= noise_sd
        v += np.square(n1, out=n1)
        np.sqrt(v, out=v)
        v[~brain] = 0.0
        full = np.zeros(shape, np.float32)
        full[region] = v * scale
        out[m] = full
    return out
