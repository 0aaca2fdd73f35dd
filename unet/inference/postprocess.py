"""From per-region probabilities to a clean, nested segmentation (pure numpy/scipy).

Used alike by unet-predict and unet-evaluate --model, so what is scored is what is written:

1. head mask: voxels where every modality is zero (outside the skull-stripped head) are
   background (``--no_head_mask`` keeps the network's raw answer there);
2. threshold the probabilities (``--threshold``);
3. nesting: TC inside WT, ET inside TC (BraTS regions are nested by definition);
4. whole-tumour clean-up of the 3-D connected components of WT (26-connectivity),
   ``--wt_components``: keep the largest and every other of at least ``--min_component_mm3``
   (``volume``, the default: a second tumour focus stays, a stray speck goes, and a case's largest
   component is never dropped however small), keep the largest only, or keep all; the TC and ET
   voxels inside a dropped component go with it;
5. the BraTS enhancing-tumour rule: a predicted ET smaller than ``--et_min_mm3`` in all is
   relabelled necrosis (it stays in TC, leaves ET), since a few enhancing voxels are far more
   often a false positive than a real small enhancing tumour and an ET-free case scores
   Dice 0 for any of them.

Flip test-time augmentation (``--tta``, ``--tta lr``) acts before this, on the network's input and output
(``unet.inference.predict``). Volumes are in mm³ from the voxel spacing, so the same flag means the
same thing at any resolution.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from unet.errors import UsageError

# defaults chosen on tuning cases no demo model trains on or is scored on (docs/TRAINING.md, "Post-processing")
DEFAULT_THRESHOLD = 0.5
WT_COMPONENTS = ("largest", "volume", "all")
DEFAULT_WT_COMPONENTS = "volume"
DEFAULT_MIN_COMPONENT_MM3 = 2000.0
DEFAULT_ET_MIN_MM3 = 200.0


class PostError(UsageError, ValueError):
    """An impossible post-processing flag value (one line naming the flag)."""


@dataclass(frozen=True)
class PostOptions:
    head_mask: bool = True
    threshold: float = DEFAULT_THRESHOLD
    wt_components: str = DEFAULT_WT_COMPONENTS
    min_component_mm3: float = DEFAULT_MIN_COMPONENT_MM3
    et_min_mm3: float = DEFAULT_ET_MIN_MM3
    tta: str = ""      # "" (off), or a key of TTA_FLIPS


# --tta: the mirror images averaged, as axes of (z, y, x, C) to flip; "all" is what --tta alone gives
TTA_FLIPS = {"all": ((), (2,), (1,), (1, 2)), "lr": ((), (2,))}


def tta_flips(tta) -> tuple:
    """The flips of a --tta value ("" or False: none, True: "all"), the unflipped slice first."""
    if not tta:
        return ((),)
    return TTA_FLIPS["all" if tta is True else tta]


def add_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("post-processing (the same for unet-predict and unet-evaluate --model)")
    g.add_argument("--tta", nargs="?", const="all", default="", choices=sorted(TTA_FLIPS), metavar="{all,lr}",
                   help="flip test-time augmentation: the mean of the predictions of the slice and its mirror "
                        "images; --tta (all): left-right, up-down and both-way (4x the inference time); "
                        "--tta lr: left-right only (2x)")
    g.add_argument("--no_head_mask", action="store_true",
                   help="keep predictions where every modality is zero (outside the head)")
    g.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help="probability above which a voxel belongs to a region")
    g.add_argument("--wt_components", choices=WT_COMPONENTS, default=DEFAULT_WT_COMPONENTS,
                   help="whole-tumour connected components kept: volume: the largest and every other of at "
                        "least --min_component_mm3 (a second focus stays); largest: that one only; all")
    g.add_argument("--min_component_mm3", type=float, default=DEFAULT_MIN_COMPONENT_MM3,
                   help="--wt_components volume: drop whole-tumour components smaller than this (mm3), "
                        "except the largest")
    g.add_argument("--et_min_mm3", type=float, default=DEFAULT_ET_MIN_MM3,
                   help="a predicted enhancing tumour smaller than this in all (mm3) becomes necrosis "
                        "(stays tumour core); 0 = off")


def options_from_args(a: argparse.Namespace) -> PostOptions:
    """Flags -> PostOptions; PostError naming the flag for an impossible value."""
    if not 0 < a.threshold < 1:
        raise PostError(f"--threshold must be in (0, 1) (got {a.threshold})")
    for flag in ("min_component_mm3", "et_min_mm3"):
        if getattr(a, flag) < 0:
            raise PostError(f"--{flag} must be >= 0 (got {getattr(a, flag)})")
    return PostOptions(head_mask=not a.no_head_mask, threshold=a.threshold, wt_components=a.wt_components,
                       min_component_mm3=a.min_component_mm3, et_min_mm3=a.et_min_mm3, tta=a.tta)


def nest(masks: np.ndarray, regions) -> np.ndarray:
    """TC within WT, ET within TC, for whichever of them ``regions`` names."""
    out = masks.astype(bool)
    names = list(regions)
    for inner, outer in (("TC", "WT"), ("ET", "TC")):
        if inner in names and outer in names:
            out[..., names.index(inner)] &= out[..., names.index(outer)]
    return out


def components_to_keep(mask: np.ndarray, min_voxels: float, keep_largest: bool) -> np.ndarray:
    """The part of a 3-D boolean mask whose 26-connected components survive the clean-up: the largest
    one (``keep_largest``), or the largest and every other of at least ``min_voxels``."""
    if not mask.any() or (min_voxels <= 0 and not keep_largest):
        return mask
    lab, n = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, bool))
    sizes = np.bincount(lab.ravel())[1:]
    keep = np.zeros(n + 1, bool)
    if not keep_largest:
        keep[1:] = sizes >= min_voxels
    keep[1 + int(np.argmax(sizes))] = True    # a case's tumour is never removed whole
    return keep[lab]


def postprocess(probs: np.ndarray, brain: np.ndarray | None, regions, spacing,
                opts: PostOptions = PostOptions()) -> np.ndarray:
    """(z, y, x, R) probabilities -> (z, y, x, R) uint8 nested region masks.

    ``brain``: (z, y, x) voxels where any modality is non-zero (None: no head mask);
    ``spacing``: voxel size (mm) along the array axes, for the mm³ thresholds.
    """
    voxel_mm3 = float(np.prod(spacing))
    p = probs
    if opts.head_mask and brain is not None:
        p = probs * brain[..., None]
    masks = nest(p > opts.threshold, regions)
    names = list(regions)
    if "WT" in names and opts.wt_components != "all":
        w = names.index("WT")
        kept = components_to_keep(masks[..., w], opts.min_component_mm3 / voxel_mm3,
                                  opts.wt_components == "largest")
        masks &= kept[..., None]
    if "ET" in names and opts.et_min_mm3 > 0:
        e = names.index("ET")
        if 0 < masks[..., e].sum() * voxel_mm3 < opts.et_min_mm3:
            masks[..., e] = False          # its voxels stay in TC (and WT): necrosis
    return masks.astype(np.uint8)
