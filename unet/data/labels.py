"""Label maps of each dataset layout to the BraTS evaluation regions (pure functions).

| layout     | labels                                   | WT      | TC    | ET  |
|------------|------------------------------------------|---------|-------|-----|
| brats      | 1 necrotic/non-enh. core, 2 edema, 4 enh. | 1,2,4   | 1,4   | 4   |
| brats2023  | 1 NETC, 2 SNFH (edema), 3 ET              | 1,2,3   | 1,3   | 3   |
| msd        | 1 edema, 2 non-enhancing, 3 enhancing     | 1,2,3   | 2,3   | 3   |

BraTS 2023 also scores two sub-regions on their own, which every layout here labels too:
NETC (necrosis / non-enhancing tumour core: brats 1, brats2023 1, msd 2) and SNFH (the
surrounding FLAIR hyperintensity, edema: brats 2, brats2023 2, msd 1).
"""
from __future__ import annotations

import numpy as np

REGIONS = ("WT", "TC", "ET")
REGION_LABELS = {
    "brats": {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)},
    "brats2023": {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)},
    "msd": {"WT": (1, 2, 3), "TC": (2, 3), "ET": (3,)},
}
VALID_LABELS = {"brats": (0, 1, 2, 4), "brats2023": (0, 1, 2, 3), "msd": (0, 1, 2, 3)}
# (core, edema, enhancing) label of each layout: NETC, SNFH and ET in BraTS 2023 words
TISSUE_LABELS = {"brats": (1, 2, 4), "brats2023": (1, 2, 3), "msd": (2, 1, 3)}
SUBREGIONS = ("NETC", "SNFH")
SUBREGION_LABELS = {layout: {"NETC": (core,), "SNFH": (edema,)}
                    for layout, (core, edema, _) in TISSUE_LABELS.items()}


def region_mask(seg: np.ndarray, layout: str, region: str) -> np.ndarray:
    """Boolean mask of one region for a label volume of the given layout."""
    return np.isin(seg, REGION_LABELS[layout][region])


def regions_from_labels(seg: np.ndarray, layout: str, regions=REGIONS) -> np.ndarray:
    """uint8 array seg.shape + (R,), one channel per requested region."""
    return np.stack([region_mask(seg, layout, r) for r in regions], axis=-1).astype(np.uint8)


def labels_from_regions(masks: np.ndarray, layout: str) -> np.ndarray:
    """Inverse for nested WT/TC/ET masks (..., 3): the layout's label map.

    ET wins over TC wins over WT; TC without ET is the core label, WT without TC edema.
    """
    wt, tc, et = (masks[..., i].astype(bool) for i in range(3))
    tc, et = tc & wt, et & tc & wt
    core, edema, enh = TISSUE_LABELS[layout]
    out = np.zeros(masks.shape[:-1], np.uint8)
    out[wt] = edema
    out[tc] = core
    out[et] = enh
    return out


def unexpected_labels(seg: np.ndarray, layout: str) -> list[int]:
    return sorted(set(np.unique(seg).tolist()) - set(VALID_LABELS[layout]))

