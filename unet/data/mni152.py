"""A synthetic BraTS case on the ICBM152 brain (``unet-synth --anatomy mni152``).

Per case, deterministic in (seed, index): the template's tissue maps (``anatomy.template``) under a
random affine and a smooth elastic deformation; a tumour planned in its white matter (``tumour.plan``)
whose cores push the tissue around them outwards (mass effect: ventricles and sulci move, the brain's
edge stays); the deformed maps at 1 mm; the cores, necrosis, rim and oedema grown in them
(``tumour``); the four contrasts (``contrast.render``). The heavy work runs on the brain's bounding box;
the deformations on a 4 mm grid.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from unet.data import anatomy, contrast, tumour

TAPER_MM = 12.0                 # the mass effect fades to nothing over this distance from the brain's edge


@dataclass
class Case:
    vols: dict[str, np.ndarray]          # modality -> float32 (z, y, x)
    labels: np.ndarray                   # canonical labels 1, 2, 4, uint8 (z, y, x)
    tissue: dict[str, np.ndarray]        # gm, wm, csf fractions before the tumour took its place
    plan: tumour.Plan
    volume_factor: float                 # the affine's brain volume / the template's


@dataclass(frozen=True)
class Brain:
    """A case's brain before its tumour, on the coarse grid: where each coarse point comes from in the
    template (``q0``), its white matter, and its distance to the brain's edge (voxels)."""
    grid: anatomy.Grid
    affine: anatomy.Affine
    elastic: np.ndarray
    q0: np.ndarray
    wm: np.ndarray
    inside: np.ndarray
    edge: np.ndarray


def brain(rng: np.random.Generator, tpl: anatomy.Template, shape) -> Brain:
    """The template under a random affine and elastic deformation (draws from ``rng``)."""
    grid = anatomy.Grid(shape, max(1, int(round(4 * tpl.g))))
    aff = anatomy.random_affine(rng, shape, tpl.g)
    ela = anatomy.random_elastic(rng, grid, tpl.g)
    q0 = anatomy.pull(grid.points(), aff, ela, grid.step)
    pre = anatomy.warp(tpl, q0)
    inside = (pre["gm"] + pre["wm"] + pre["csf"]) > 0.5
    edge = ndimage.distance_transform_edt(inside).astype(np.float32) * grid.step
    return Brain(grid, aff, ela, q0, pre["wm"], inside, edge)


def build(seed: int, index: int, shape=anatomy.BRATS_SHAPE, mass_effect: bool = True) -> Case:
    """One case. ``mass_effect=False`` gives the same case (same draws) with the tissue left where it was."""
    shape = tuple(int(s) for s in shape)
    rng = np.random.default_rng([seed, index])
    tpl = anatomy.template(shape)
    b0 = brain(rng, tpl, shape)
    p = tumour.plan(rng, b0.wm, b0.edge, b0.grid, tpl.g)
    q = b0.q0
    if mass_effect:
        pts = b0.grid.points()
        taper = np.clip(b0.edge / (TAPER_MM * tpl.g), 0.0, 1.0)
        disp = sum(anatomy.push_out(pts, f.centre, f.radius * p.push, taper) for f in p.foci)
        q = anatomy.pull(pts + disp, b0.affine, b0.elastic, b0.grid.step)
    region = anatomy.bounding_box(b0.inside, b0.grid.step, shape, margin=2)   # the mass effect keeps the edge
    tissue = anatomy.warp(tpl, anatomy.upsample(q, b0.grid.step, region))
    depth, nec = tumour.core_fields(rng, p, region)
    inside = (tissue["gm"] + tissue["wm"] + tissue["csf"]) > 0.5
    oedema, strength = tumour.grow_oedema(rng, p, (depth > 0) & inside, tissue["wm"], tissue["gm"],
                                          tissue["csf"], region, tpl.g)
    fractions, lab = tumour.compose(p, depth, nec, oedema, strength, tissue)
    vols = contrast.render(rng, fractions, inside, region, shape, tpl.g)
    labels = np.zeros(shape, np.uint8)
    labels[region] = lab
    full = {}
    for k, v in tissue.items():
        full[k] = np.zeros(shape, np.float32)
        full[k][region] = v
    return Case(vols, labels, full, p, b0.affine.volume_factor)


def make_case(seed: int, index: int, shape=anatomy.BRATS_SHAPE):
    """-> (dict modality -> float32 (z, y, x), canonical labels uint8 (z, y, x)), as synth.make_case."""
    c = build(seed, index, shape)
    return c.vols, c.labels
