"""Picture of one unet-synth --anatomy mni152 case: FLAIR, T1, T1ce, T2 and the labels on one axial slice.

    .venv/bin/python scripts/synth_figure.py [--seed 0] [--index 6] [--out docs/synth_mni152.png]

The slice is the one with the most tumour core, cropped to the brain. Each modality is shown from 0
to its 99.5th percentile over the brain; the labels are drawn over the T1 slice: necrosis or the
non-enhancing core (1) red, oedema (2) green, enhancing tumour (4) yellow. Prints the case's volumes.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from unet.data import mni152  # noqa: E402
from unet.data.contrast import MODALITIES  # noqa: E402

COLOURS = {1: (230, 40, 40), 2: (40, 200, 60), 4: (250, 230, 40)}


def grey(vol: np.ndarray, z: int, box) -> np.ndarray:
    hi = float(np.percentile(vol[vol > 0], 99.5))
    return np.clip(vol[z][box] / hi * 255.0, 0, 255).astype(np.uint8)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0, help="unet-synth --seed")
    p.add_argument("--index", type=int, default=6, help="case index (0 = the first case)")
    p.add_argument("--out", default="docs/synth_mni152.png", help="PNG to write")
    a = p.parse_args(argv)
    c = mni152.build(a.seed, a.index)
    lab = c.labels
    z = int(np.argmax(np.isin(lab, (1, 4)).sum(axis=(1, 2))))
    yx = np.argwhere(c.vols["T1"].any(axis=0))
    box = tuple(slice(max(int(lo) - 6, 0), int(hi) + 7) for lo, hi in zip(yx.min(0), yx.max(0)))
    panels = [np.stack([grey(c.vols[m], z, box)] * 3, -1) for m in MODALITIES]
    over = panels[1].astype(np.float32) * 0.7
    for k, rgb in COLOURS.items():
        over[lab[z][box] == k] = rgb
    panels.append(over.astype(np.uint8))
    strip = np.concatenate(panels, axis=1)
    img = Image.new("RGB", (strip.shape[1], strip.shape[0] + 18), (0, 0, 0))
    img.paste(Image.fromarray(strip), (0, 18))
    draw = ImageDraw.Draw(img)
    w = panels[0].shape[1]
    for i, title in enumerate(list(MODALITIES) + ["labels 1 red 2 green 4 yellow"]):
        draw.text((i * w + 4, 3), title, fill=(255, 255, 255))
    draw.text((4, strip.shape[0] + 4), f"seed {a.seed} case {a.index}, axial slice {z}", fill=(200, 200, 200))
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    img.save(a.out)
    wt, tc, et = (lab > 0).sum(), np.isin(lab, (1, 4)).sum(), (lab == 4).sum()
    print(f"synth_figure: wrote {a.out} (slice {z}); WT {wt / 1000:.1f} mL, TC {tc / 1000:.1f} mL, "
          f"ET {et / 1000:.1f} mL, {len(c.plan.foci)} focus/foci, enhancing {c.plan.enhancing}, "
          f"brain {(c.vols['T1'] > 0).sum() / 1000:.0f} mL")
    return 0


if __name__ == "__main__":
    sys.exit(main())
