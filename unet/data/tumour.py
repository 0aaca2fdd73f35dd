"""A glioma grown in the white matter of a synthetic brain: where, how big, its regions and labels.

``plan`` draws a case's tumour: whole-tumour volume log-uniform in 20-150 mL (BraTS's usual range), a
core of 22-45 % of it, a quarter of the cases without enhancement (low-grade-like: a non-enhancing core,
no label 4), a fifth with a second focus, centres in white matter of the cerebrum away from its edge.
``core_fields`` makes each core irregular (a noisy, anisotropic distance field) with a necrotic centre
inside an enhancing rim of 2-5 mm. ``grow_oedema`` spreads the oedema from the core as a minimum-cost
front (Dijkstra on a 2 mm grid): five times cheaper through white than grey matter, impassable through
CSF (ventricles, sulci) and outside the brain, so it follows the white matter and stops at the
ventricles and the brain's edge; the front stops where the whole tumour reaches its planned volume.
Lengths are in voxels of the case grid; ``g`` = voxels per mm of the BraTS grid.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from unet.data import anatomy

WT_ML = (20.0, 150.0)           # whole tumour, mL, log-uniform
TC_SHARE = (0.22, 0.45)         # tumour core / whole tumour
NO_ENHANCEMENT = 0.25           # share of low-grade-like cases (no enhancing tumour)
TWO_FOCI = 0.2                  # share of cases with a second focus
RIM_MM = (2.0, 5.0)             # enhancing rim thickness
GREY_COST = 5.0                 # oedema: cost of grey matter per mm, white matter = 1
COST_NOISE = 0.6                # oedema: log-normal spread of the cost (fingers along the white matter)


@dataclass(frozen=True)
class Focus:
    centre: np.ndarray          # (z, y, x) voxels
    radius: float               # core radius, voxels
    stretch: np.ndarray         # per-axis elongation (geometric mean 1)


@dataclass(frozen=True)
class Plan:
    foci: tuple[Focus, ...]
    wt_voxels: float            # planned whole-tumour volume
    enhancing: bool
    rim: float                  # enhancing rim, voxels
    push: float                 # share of each core's radius that displaces tissue (mass effect)


def _unit(x: np.ndarray) -> np.ndarray:
    """x clipped to [0, 1] in place (float32)."""
    np.maximum(x, 0.0, out=x)
    return np.minimum(x, 1.0, out=x)


def _ball_radius(voxels: float) -> float:
    return float(np.cbrt(3.0 * voxels / (4.0 * np.pi)))


def _pick(rng, cands: np.ndarray, step: int) -> np.ndarray | None:
    if not len(cands):
        return None
    return (cands[rng.integers(len(cands))] * step + rng.uniform(-0.5, 0.5, 3) * step).astype(np.float32)


def plan(rng: np.random.Generator, wm: np.ndarray, edge: np.ndarray, grid: anatomy.Grid, g: float) -> Plan:
    """A tumour for a brain whose white matter ``wm`` and distance to the brain's edge ``edge`` (voxels)
    are given on the coarse ``grid``."""
    wt = np.exp(rng.uniform(*np.log(WT_ML))) * 1000.0 * g ** 3
    tc = wt * rng.uniform(*TC_SHARE)
    enhancing = bool(rng.random() >= NO_ENHANCEMENT)
    two = bool(rng.random() < TWO_FOCI)
    rim = rng.uniform(*RIM_MM) * g
    push = rng.uniform(0.75, 1.0)
    stretch = [np.exp(rng.normal(0, 0.15, 3)) for _ in range(2)]
    stretch = [s / np.cbrt(s.prod()) for s in stretch]
    shares = (0.65, 0.35) if two else (1.0,)
    radii = [_ball_radius(tc * s) for s in shares]
    # the cerebrum: above the lowest 35 % of the brain's height (brainstem, cerebellum)
    zs = np.nonzero((edge > 0).any(axis=(1, 2)))[0]
    z_lo = zs[0] + 0.35 * (zs[-1] - zs[0]) if len(zs) else 0
    pts = np.argwhere(np.ones(edge.shape, bool))
    z_ok = pts[:, 0] >= z_lo
    flat_wm, flat_edge = wm.ravel(), edge.ravel()
    c1 = None
    for wm_min, margin in ((0.6, 1.0), (0.4, 0.5), (0.0, 0.0)):
        ok = z_ok & (flat_wm >= wm_min) & (flat_edge >= margin * (0.8 * radii[0] + 8 * g))
        c1 = _pick(rng, pts[ok & (flat_edge > 0)], grid.step)
        if c1 is not None:
            break
    if c1 is None:
        raise ValueError("the brain has no voxel for a tumour (grid too small?)")
    foci = [Focus(c1, radii[0], stretch[0])]
    if two:
        d = np.sqrt((((pts * grid.step) - c1) ** 2).sum(1))
        gap = radii[0] + radii[1]
        ok = (z_ok & (flat_wm >= 0.5) & (flat_edge >= 0.8 * radii[1] + 6 * g)
              & (d >= gap + 4 * g) & (d <= gap + 25 * g))
        c2 = _pick(rng, pts[ok], grid.step)
        if c2 is None:                                # no room for a second focus: one core, all of it
            foci = [Focus(c1, _ball_radius(tc), stretch[0])]
        else:
            foci.append(Focus(c2, radii[1], stretch[1]))
    return Plan(tuple(foci), float(wt), enhancing, float(rim), float(push))


def _box(centre, half, region) -> tuple[slice, slice, slice]:
    """Slices (absolute voxels) of a box around ``centre`` clipped to ``region`` (slices)."""
    return tuple(slice(int(max(r.start, np.floor(c - half))), int(min(r.stop, np.ceil(c + half) + 1)))
                 for c, r in zip(centre, region))


def _rel(box, region):
    return tuple(slice(b.start - r.start, b.stop - r.start) for b, r in zip(box, region))


def _noise(rng, box, scale: float) -> np.ndarray:
    """Smooth unit noise over ``box`` with features ~``scale`` voxels (drawn coarse, interpolated)."""
    step = max(1.0, scale / 2.0)
    dims = tuple(int(np.ceil((b.stop - b.start - 1) / step)) + 1 for b in box)
    n = anatomy.smooth_noise(rng, dims, 1.0)
    return anatomy.upsample(n, step, tuple(slice(0, b.stop - b.start) for b in box))


def core_fields(rng, p: Plan, region) -> tuple[np.ndarray, np.ndarray]:
    """(core depth, necrosis depth) over ``region``, in voxels inside their boundaries (negative
    outside): the core of each focus is an anisotropic ball with lobes (smooth noise on its radial
    field), the necrosis the core less a rim of ``p.rim`` +/- 35 % (enhancing cases only)."""
    dims = tuple(r.stop - r.start for r in region)
    depth = np.full(dims, -1e3, np.float32)
    nec = np.full(dims, -1e3, np.float32)
    for f in p.foci:
        box = _box(f.centre, 1.6 * f.radius * f.stretch.max() + 2, region)
        rel = _rel(box, region)
        axes = [(np.arange(b.start, b.stop, dtype=np.float32) - c) / (f.radius * s)
                for b, c, s in zip(box, f.centre, f.stretch)]
        r = np.sqrt(axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[2][None, None, :] ** 2)
        lobes = 0.25 * _noise(rng, box, f.radius * 0.9) + 0.1 * _noise(rng, box, f.radius * 0.35)
        d = (1.0 - r - lobes) * np.float32(f.radius)
        depth[rel] = np.maximum(depth[rel], d)
        if p.enhancing:
            rim = np.clip(p.rim * (1.0 + 0.35 * _noise(rng, box, f.radius * 0.5)), 0.5 * p.rim, 0.8 * f.radius)
            nec[rel] = np.maximum(nec[rel], d - rim)
    return depth, nec


def grow_oedema(rng, p: Plan, core: np.ndarray, wm: np.ndarray, gm: np.ndarray, csf: np.ndarray,
                region, g: float) -> tuple[np.ndarray, np.ndarray]:
    """(oedema fraction, oedema strength) over ``region``, float32: the minimum-cost front from the
    ``core`` (bool) through the tissue fractions, stopped at the planned whole-tumour volume, soft over
    ~2 mm; its strength (how much of the oedema's signal a voxel has) falls from 1 at the core to 0.6 at
    the front."""
    st = max(1, int(round(2 * g)))
    half = 2.2 * _ball_radius(p.wt_voxels) + 10 * g
    centre = np.mean([f.centre for f in p.foci], axis=0)
    box = _box(centre, half + max(np.linalg.norm(f.centre - centre) for f in p.foci), region)
    rel = _rel(box, region)
    sub = tuple(slice(s.start, s.stop, st) for s in rel)
    w, gr, c, k = wm[sub], gm[sub], csf[sub], core[sub]
    cost = 1.0 / (w + gr / GREY_COST + 1e-3)
    cost = cost * np.exp(COST_NOISE * _noise(rng, tuple(slice(0, n) for n in w.shape), 8.0 * g / st))
    cost[(c > 0.5) | (w + gr + c < 0.5)] = np.inf
    cost[k] = 1.0
    frac, strength = np.zeros(core.shape, np.float32), np.ones(core.shape, np.float32)
    if not k.any():
        return frac, strength
    from skimage.graph import MCP_Geometric
    dist, _ = MCP_Geometric(cost, fully_connected=True).find_costs(np.argwhere(k))
    reach = np.isfinite(dist) & ~k
    need = int(round(max(p.wt_voxels - core.sum(), 0.0) / st ** 3))
    vals = dist[reach]
    if need <= 0 or not len(vals):
        return frac, strength
    thr = float(np.partition(vals, min(need, len(vals) - 1))[min(need, len(vals) - 1)])
    dist = np.where(np.isfinite(dist), dist, 4 * thr + 100).astype(np.float32)
    fine = anatomy.upsample(dist, st, tuple(slice(0, b.stop - b.start) for b in box))
    frac[rel] = _unit(np.float32(0.5 + thr) - fine)
    strength[rel] = 1.0 - 0.4 * _unit(fine / np.float32(max(thr, 1e-3)))
    return frac, strength


def compose(p: Plan, depth, nec, oedema, strength, tissue: dict[str, np.ndarray]):
    """-> (fractions: tissue and tumour compartment -> float32 over the region, canonical labels uint8).

    The tumour takes the place of the tissue: the core of any tissue, the oedema of parenchyma only;
    what is left of grey, white matter and CSF scales down; where the oedema is weak (``strength`` < 1)
    the tissue keeps that share of its signal. Labels from the halfway fractions:
    1 necrosis (or the whole non-enhancing core), 4 the enhancing rim, 2 oedema, nested as BraTS's."""
    gm, wm, csf = tissue["gm"], tissue["wm"], tissue["csf"]
    b = gm + wm + csf
    core_soft = _unit(depth + np.float32(0.5))                  # one voxel of partial volume
    nec_soft = _unit(nec + np.float32(0.5))
    f_core = core_soft * b
    f_wt = np.maximum(oedema * (gm + wm), f_core)
    f_oed = (f_wt - f_core) * strength                        # the signal's share of oedema
    keep = np.where(b > 1e-6, (b - f_core - f_oed) / np.maximum(b, 1e-6), 0.0).astype(np.float32)
    fr = {"gm": gm * keep, "wm": wm * keep, "csf": csf * keep, "oedema": f_oed}
    if p.enhancing:
        fr["necrosis"] = nec_soft * f_core
        fr["enhancing"] = f_core - fr["necrosis"]
    else:
        fr["core"] = f_core
    brain = b > 0.5
    lab = np.zeros(depth.shape, np.uint8)
    lab[brain & (f_wt > 0.5 * b)] = 2
    tc = brain & (core_soft > 0.5)
    lab[tc] = 4 if p.enhancing else 1
    lab[tc & (nec_soft > 0.5)] = 1
    return fr, lab
