#!/usr/bin/env python
"""Post-processing ablation: one trained model, several post-processing settings, volume-level Dice and HD95.

The network runs once per case and TTA setting (``Predictor.probabilities``); every setting is then applied
to the same probabilities by ``unet.inference.postprocess`` and scored by ``unet-evaluate``'s own
``score_case``, so each row is what ``unet-evaluate --model MODEL --cases DIR [flags]`` prints for it (to the
last digit), at a fraction of the time. Choose a default on cases that are then not the ones reported:
the demo's test cases are ``unet-synth --seed 1``; tune on another seed's.

    .venv/bin/python scripts/postprocess_ablation.py --model runs/demo/logs --cases runs/tune [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from unet.data import labels as L  # noqa: E402
from unet.data.layouts import find_cases  # noqa: E402
from unet.evaluation.evaluate import _full, score_case  # noqa: E402
from unet.inference.postprocess import PostOptions, postprocess  # noqa: E402
from unet.inference.predictor import Predictor, reference_image  # noqa: E402

RAW = dict(head_mask=False, wt_components="all", et_min_mm3=0.0)
SETTINGS = {   # name -> PostOptions fields (TTA is a separate column)
    "raw": RAW,
    "default": {},
    "wt largest component only": dict(wt_components="largest"),
    "wt all components": dict(wt_components="all"),
    "wt components >= 500 mm3": dict(wt_components="volume", min_component_mm3=500.0),
    "wt components >= 1000 mm3": dict(wt_components="volume", min_component_mm3=1000.0),
    "wt components >= 2000 mm3": dict(wt_components="volume", min_component_mm3=2000.0),
    "wt components >= 4000 mm3": dict(wt_components="volume", min_component_mm3=4000.0),
    "wt components >= 500 mm3, no ET rule": dict(wt_components="volume", min_component_mm3=500.0, et_min_mm3=0.0),
    "wt components >= 500 mm3, threshold 0.4": dict(wt_components="volume", min_component_mm3=500.0,
                                                    threshold=0.4),
    "default, threshold 0.4": dict(threshold=0.4),
}
COLUMNS = ("dice_WT", "dice_TC", "dice_ET", "hd95_WT", "hd95_TC", "hd95_ET")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="training logdir or model.keras")
    ap.add_argument("--cases", required=True, help="dataset root of the cases to score (with segmentations)")
    ap.add_argument("--threads", type=int, default=0, help="engine threads (0: the engine's default)")
    ap.add_argument("--engine", default=None, help="inference engine (default: the model's fastest)")
    a = ap.parse_args(argv)
    pred = Predictor(a.model, engine=a.engine, threads=a.threads)
    cases = [c for c in find_cases(a.cases) if c.seg]
    rows: dict[tuple[str, bool], list[dict]] = {}
    for case in cases:
        chans, seg, _ = pred.read(case)
        img = reference_image(case)
        spacing = img.GetSpacing()[::-1]
        ref = _full(L.regions_from_labels(seg, case.layout, pred.regions), pred.regions)
        for tta in (False, True):
            probs, brain = pred.probabilities(chans, tta)
            for name, kw in SETTINGS.items():
                masks = postprocess(probs, brain, pred.regions, spacing, PostOptions(tta=tta, **kw))
                rows.setdefault((name, tta), []).append(
                    score_case(case.case_id, _full(masks, pred.regions), ref, spacing, case.layout, "legacy"))
        print(f"  {case.case_id} done", file=sys.stderr, flush=True)
    print(f"model {a.model}, {len(cases)} case(s) of {a.cases}: mean over cases (min over cases in brackets)")
    print("| post-processing | TTA | Dice WT | TC | ET | HD95 WT (mm) | TC | ET |")
    print("|---|---|---|---|---|---|---|---|")
    for (name, tta), rs in rows.items():
        cells = []
        for c in COLUMNS:
            v = np.array([r[c] for r in rs], float)
            cells.append(f"{np.mean(v):.4f} ({np.min(v):.3f})" if c.startswith("dice") else f"{np.mean(v):.2f}")
        print(f"| {name} | {'yes' if tta else '-'} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
