"""What unet-synth --anatomy mni152 makes, case by case: tumour volumes, brain volume, mass effect, contrast.

    .venv/bin/python scripts/synth_report.py [--seed 0] [--cases 8]

Per case (full size, 240x240x155): whole tumour, core and enhancing volumes (mL), foci, enhancing or
not, the brain's volume against the template's times the case's affine, and the mass effect: how far
the nearest ventricle voxel (CSF > 0.5, more than 10 mm inside the brain) is from the first core's
centre with and without the tumour pushing (the same case built with ``mass_effect=False``). Then per
contrast the mean of each tissue (voxels > 90 % of it, outside the tumour) and of each label, over all
cases, as ratios to white matter on that contrast.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from scipy import ndimage

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from unet.data import anatomy, mni152  # noqa: E402
from unet.data.contrast import MODALITIES  # noqa: E402


def nearest_ventricle(case, centre) -> float:
    t = case.tissue
    deep = ndimage.distance_transform_edt((t["gm"] + t["wm"] + t["csf"]) > 0.5) > 10
    idx = np.argwhere((t["csf"] > 0.5) & deep)
    return float(np.sqrt(((idx - centre) ** 2).sum(1)).min())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0, help="unet-synth --seed")
    p.add_argument("--cases", type=int, default=8, help="cases 0 .. N-1")
    a = p.parse_args(argv)
    tpl = anatomy.template()
    ref = float(((tpl.gm + tpl.wm + tpl.csf) > 0.5).sum()) / 1000
    print(f"template brain on the BraTS grid: {ref:.0f} mL")
    print("| case | WT mL | TC mL | ET mL | foci | enhancing | brain mL | template x affine mL "
          "| nearest ventricle, no push / pushed (mm) |")
    print("|---|---|---|---|---|---|---|---|---|")
    sums = {}
    for i in range(a.cases):
        c, flat = mni152.build(a.seed, i), mni152.build(a.seed, i, mass_effect=False)
        lab = c.labels
        centre = c.plan.foci[0].centre
        vol = [float(x.sum()) / 1000 for x in (lab > 0, np.isin(lab, (1, 4)), lab == 4)]
        brain = float((c.vols["T1"] > 0).sum()) / 1000
        print(f"| {i} | {vol[0]:.1f} | {vol[1]:.1f} | {vol[2]:.1f} | {len(c.plan.foci)} | "
              f"{'yes' if c.plan.enhancing else 'no'} | {brain:.0f} | {ref * c.volume_factor:.0f} | "
              f"{nearest_ventricle(flat, centre):.1f} / {nearest_ventricle(c, centre):.1f} |")
        where = {k: (lab == 0) & (c.tissue[k] > 0.9) for k in ("csf", "gm", "wm")}
        where.update({"oedema (2)": lab == 2, "necrosis / core (1)": lab == 1, "enhancing (4)": lab == 4})
        for k, m in where.items():
            if m.any():
                for mod in MODALITIES:
                    sums.setdefault(k, {}).setdefault(mod, []).append(float(c.vols[mod][m].mean()))
    wm = {mod: np.mean(sums["wm"][mod]) for mod in MODALITIES}
    print("\n| mean / white matter's | " + " | ".join(MODALITIES) + " |")
    print("|---|" + "---|" * len(MODALITIES))
    for k, per in sums.items():
        print(f"| {k} | " + " | ".join(f"{np.mean(per[mod]) / wm[mod]:.2f}" for mod in MODALITIES) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
