"""Lesion-wise BraTS metrics (unet/evaluation/lesionwise.py): hand-checked figures, empty regions, the label
conventions, equality with the official brats-evaluation tool and the legacy global figures, speed.

Every test uses real panoptica (and the real brats-evaluate / brats-parse-metrics for the
equality test); volumes are small except in the speed test.
"""
import csv
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import HANG

from unet.evaluation.lesionwise import MAX_HD95, columns, evaluator, score_lesionwise
from unet.metrics import hd95

pytestmark = pytest.mark.needs_stack   # panoptica and brats-evaluation (conftest's gate)

ET = 3   # BraTS 2023 labels: 1 NETC, 2 SNFH, 3 ET


def cubes(shape, corners, size=4, label=ET):
    a = np.zeros(shape, np.uint8)
    for z, y, x in corners:
        a[z:z + size, y:y + size, x:x + size] = label
    return a


def test_detection_and_lesion_wise_figures_by_hand():
    # reference: three 4x4x4 ET lesions; prediction: the first exact, the second one voxel off
    # along x, the third missed, and a spurious fourth
    shape = (20, 40, 40)
    ref = cubes(shape, [(2, 2, 2), (2, 20, 2), (12, 2, 20)])
    pred = cubes(shape, [(2, 2, 2), (2, 20, 3), (12, 30, 30)])
    s = score_lesionwise(pred, ref, (1.0, 1.0, 1.0), "brats2023")
    for r in ("wt", "tc", "et"):      # ET alone: WT and TC hold the same lesions
        assert (s[f"all_instance_tp_{r}"], s[f"all_instance_fp_{r}"], s[f"all_instance_fn_{r}"]) == (2, 1, 1)
        assert s[f"all_instance_prec_{r}"] == pytest.approx(2 / 3) == s[f"all_instance_rec_{r}"]
        assert s[f"all_instance_f1_{r}"] == pytest.approx(2 / (2 + (1 + 1) / 2))
        # matched pairs: Dice 1 and 2*48/(64+64) = 0.75; the miss and the spurious lesion count in F1 only
        assert s[f"lesionwise_dsc_mean_{r}"] == pytest.approx((1 + 0.75) / 2)
        shifted = hd95(pred[:, 18:26, :] > 0, ref[:, 18:26, :] > 0)          # the second pair alone
        assert shifted > 0 and s[f"lesionwise_hd95_mean_{r}"] == pytest.approx(shifted / 2)
        assert s[f"global_dsc_{r}"] == pytest.approx(2 * (64 + 48) / (3 * 64 + 3 * 64))
    for r in ("netc", "snfh"):        # in neither volume: no figure, not a perfect one
        assert (s[f"all_instance_tp_{r}"], s[f"all_instance_fp_{r}"], s[f"all_instance_fn_{r}"]) == (0, 0, 0)
        for m in ("all_instance_f1", "global_dsc", "global_hd95", "lesionwise_dsc_mean", "lesionwise_hd95_mean"):
            assert math.isnan(s[f"{m}_{r}"]), m
    assert set(s) == set(columns())


def test_a_region_missing_from_one_side_scores_as_the_official_tool_does():
    shape = (20, 40, 40)
    ref = cubes(shape, [(2, 2, 2), (10, 20, 20)])
    s = score_lesionwise(np.zeros(shape, np.uint8), ref, (1.0, 1.0, 1.0), "brats2023")
    assert (s["all_instance_tp_et"], s["all_instance_fn_et"], s["all_instance_f1_et"]) == (0, 2, 0.0)
    assert s["global_dsc_et"] == 0.0 and s["global_hd95_et"] == MAX_HD95 == 373.0
    assert s["lesionwise_dsc_mean_et"] == 0.0 and s["lesionwise_hd95_mean_et"] == math.inf
    s = score_lesionwise(ref, np.zeros(shape, np.uint8), (1.0, 1.0, 1.0), "brats2023")
    assert (s["all_instance_tp_et"], s["all_instance_fp_et"], s["global_hd95_et"]) == (0, 2, 373.0)


# the same tissues in each convention: (NETC, SNFH, ET) labels
TISSUES = {"brats2023": (1, 2, 3), "brats": (1, 2, 4), "msd": (2, 1, 3)}


def tumours(shape, centres, radius, drop=()):
    """Tumours of three nested balls: SNFH outside, NETC inside, ET at the centre (BraTS 2023 labels);
    ``drop``: tissues left out (their voxels become background)."""
    a = np.zeros(shape, np.uint8)
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    for c in centres:
        d2 = sum((g - k) ** 2 for g, k in zip(grid, c))
        for label, frac in ((2, 1.0), (1, 0.7), (3, 0.4)):
            a[d2 <= (radius * frac) ** 2] = 0 if label in drop else label
    return a


def in_convention(a, layout):
    out = np.zeros_like(a)
    for src, dst in zip(TISSUES["brats2023"], TISSUES[layout]):
        out[a == src] = dst
    return out


@pytest.mark.parametrize("layout", ["brats", "msd"])
def test_each_label_convention_groups_the_same_tissues(layout):
    shape = (30, 48, 48)
    ref = tumours(shape, [(10, 12, 12), (18, 34, 30)], 7)
    pred = tumours(shape, [(11, 12, 13), (25, 10, 36)], 6)
    want = score_lesionwise(pred, ref, (1.0, 1.0, 1.0), "brats2023")
    got = score_lesionwise(in_convention(pred, layout), in_convention(ref, layout), (1.0, 1.0, 1.0), layout)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == want[k] or (math.isnan(got[k]) and math.isnan(want[k])), k


def test_evaluator_carries_the_official_gli_settings(tmp_path):
    # brats-evaluation's own gli configuration, less its resection-cavity group (label 4 of BraTS 2024
    # post-treatment data, which no convention here has), saved the way panoptica saves ours
    import brats_evaluation
    from panoptica import Panoptica_Evaluator
    official = Panoptica_Evaluator.load_from_config(str(brats_evaluation.config_path("gli")))
    official.save_to_config(str(tmp_path / "official.yaml"))
    evaluator("brats2023").save_to_config(str(tmp_path / "ours.yaml"))
    lines = (tmp_path / "official.yaml").read_text().splitlines()
    rc = lines.index("    rc: !LabelGroup")
    assert lines[rc + 1:rc + 3] == ["      single_instance: false", "      value_labels: [4]"]
    assert (tmp_path / "ours.yaml").read_text().splitlines() == lines[:rc] + lines[rc + 3:]


# -- equality with the official tool -------------------------------------------------------------

SHAPE = (40, 64, 64)
CENTRES = [(10, 14, 14), (12, 46, 18), (28, 20, 46)]


def official_cases():
    """BraTS-2023-named (reference, prediction) pairs covering what the leaderboard must handle."""
    ref = tumours(SHAPE, CENTRES, 8)
    return {
        # three lesions per region; the second predicted 2 voxels off, the third missed, a spurious fourth
        "BraTS-GLI-00001-000": (ref, tumours(SHAPE, [CENTRES[0], (12, 48, 18), (30, 50, 50)], 8)),
        # no ET in the reference nor the prediction (an empty region), NETC predicted nowhere
        "BraTS-GLI-00002-000": (tumours(SHAPE, CENTRES[:2], 8, drop=(3,)),
                                tumours(SHAPE, [(11, 15, 14), CENTRES[1]], 7, drop=(1, 3))),
        # nothing predicted at all
        "BraTS-GLI-00003-000": (tumours(SHAPE, CENTRES[1:], 6), np.zeros(SHAPE, np.uint8)),
        # a spurious tumour where the reference has none
        "BraTS-GLI-00004-000": (np.zeros(SHAPE, np.uint8), tumours(SHAPE, CENTRES[:1], 5)),
    }


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def number(text):
    return math.nan if text in ("", "nan") else float(text)


def test_unet_evaluate_equals_the_official_brats_evaluate_and_parse_metrics(tmp_path):
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref_dir.mkdir(); pred_dir.mkdir()
    for case, (ref, pred) in official_cases().items():
        for folder, arr in ((ref_dir, ref), (pred_dir, pred)):
            sitk.WriteImage(sitk.GetImageFromArray(arr), str(folder / f"{case}.nii.gz"), True)
    bin_dir = os.path.dirname(sys.executable)
    run = dict(capture_output=True, text=True, timeout=HANG, cwd=tmp_path)
    p = subprocess.run([os.path.join(bin_dir, "brats-evaluate"), "--config", "gli", "--ref_path", ref_dir,
                        "--pred_path", pred_dir, "--summary_json", tmp_path / "official.json"], **run)
    assert p.returncode == 0 and "Error" not in p.stdout, p.stdout + p.stderr
    p = subprocess.run([os.path.join(bin_dir, "brats-parse-metrics"), "seg", "--json_path", tmp_path / "official.json",
                        "--output_csv_path", tmp_path / "official.csv"], **run)
    assert p.returncode == 0, p.stdout + p.stderr
    theirs = {r["subject_id"][:-len(".nii.gz")]: r for r in read_csv(tmp_path / "official.csv")
              if r["subject_id"].endswith(".nii.gz")}
    p = subprocess.run([sys.executable, "-m", "unet.evaluation.evaluate", "--pred_dir", pred_dir, "--ref_dir", ref_dir,
                        "--labels", "brats2023", "--csv", tmp_path / "ours.csv"], **run)
    assert p.returncode == 0, p.stderr
    ours = {r["case"]: r for r in read_csv(tmp_path / "ours.csv")}
    assert sorted(ours) == sorted(theirs) == sorted(official_cases())

    shared = [c for c in ours[next(iter(ours))] if c in theirs[next(iter(theirs))]]
    assert shared == columns()            # every lesion-wise column, WT/TC/ET/NETC/SNFH x 15
    worst = {"hd95": 0.0, "other": 0.0}
    seen = set()
    for case in ours:
        for c in shared:
            a, b = number(ours[case][c]), number(theirs[case][c])
            seen.add("nan" if math.isnan(b) else "inf" if math.isinf(b) else "value")
            if math.isnan(a) or math.isnan(b) or math.isinf(a) or math.isinf(b):
                assert (math.isnan(a) and math.isnan(b)) or a == b, (case, c, a, b)
                continue
            kind = "hd95" if "hd95" in c else "other"
            worst[kind] = max(worst[kind], abs(a - b))
            assert abs(a - b) <= (1e-3 if kind == "hd95" else 1e-6), (case, c, a, b)
    assert seen == {"nan", "inf", "value"}   # the empty-region conventions were exercised
    # the cases hold what they promise: a miss, a spurious lesion, an empty region
    one, two = theirs["BraTS-GLI-00001-000"], theirs["BraTS-GLI-00002-000"]
    assert [number(one[f"all_instance_{k}_wt"]) for k in ("tp", "fp", "fn")] == [2, 1, 1]
    assert math.isnan(number(two["global_dsc_et"])) and number(two["all_instance_fn_netc"]) == 2
    print(f"max |ours - official| over {len(ours)} cases x {len(shared)} columns: "
          f"HD95 {worst['hd95']:.2e} mm, others {worst['other']:.2e}")


# -- the legacy volume-level figures against panoptica's global ones ------------------------------

def test_hand_written_global_dice_and_hd95_equal_panoptica_where_both_define_them():
    # 1 mm voxels, both masks present and overlapping: the figures must agree (elsewhere the two
    # follow different conventions on purpose, see README: empty regions, no overlap, spacing)
    from unet.data.labels import REGIONS as VOLUME_REGIONS
    from unet.data.labels import regions_from_labels
    from unet.metrics import score_regions
    compared = 0
    for ref, pred in list(official_cases().values())[:2]:
        legacy = score_regions(regions_from_labels(pred, "brats2023"), regions_from_labels(ref, "brats2023"),
                               (1.0, 1.0, 1.0), VOLUME_REGIONS)
        lw = score_lesionwise(pred, ref, (1.0, 1.0, 1.0), "brats2023")
        for r in VOLUME_REGIONS:
            if math.isnan(lw[f"global_dsc_{r.lower()}"]) or lw[f"global_dsc_{r.lower()}"] == 0:
                continue
            assert legacy[f"dice_{r}"] == pytest.approx(lw[f"global_dsc_{r.lower()}"], abs=1e-12)
            assert legacy[f"hd95_{r}"] == pytest.approx(lw[f"global_hd95_{r.lower()}"], abs=1e-9)
            compared += 1
    assert compared == 4      # WT, TC, ET of the first case; WT of the second (no TC predicted there)


# -- speed ------------------------------------------------------------------------------------------

def test_one_full_size_case_scores_in_seconds():
    shape = (155, 240, 240)
    centres = [(60, 80, 80), (70, 160, 90), (90, 100, 170), (110, 180, 170)]
    ref = tumours(shape, centres, 18)
    pred = tumours(shape, [(c[0] + 2, c[1] - 2, c[2] + 1) for c in centres[:3]] + [(40, 40, 200)], 17)
    evaluator("brats2023")                # built once per process, as unet-evaluate does
    t0 = time.perf_counter()
    s = score_lesionwise(pred, ref, (1.0, 1.0, 1.0), "brats2023")
    seconds = time.perf_counter() - t0
    assert (s["all_instance_tp_wt"], s["all_instance_fp_wt"], s["all_instance_fn_wt"]) == (3, 1, 1)
    print(f"lesion-wise scoring of one 240x240x155 case (5 regions, 4+4 lesions): {seconds:.1f} s")
    assert seconds < 60, f"{seconds:.1f} s: minutes, not seconds"


# -- bad input ------------------------------------------------------------------------------------

def test_bad_input_under_lesionwise_is_one_line_naming_the_case_and_writes_nothing(tmp_path, capsys):
    from unet.evaluation.evaluate import main as evaluate
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref_dir.mkdir(); pred_dir.mkdir()
    good = cubes((20, 40, 40), [(2, 2, 2)])
    for case in ("A", "B"):
        sitk.WriteImage(sitk.GetImageFromArray(good), str(ref_dir / f"{case}.nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray(good), str(pred_dir / f"{case}.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(good * 2), str(pred_dir / "B.nii.gz"))     # label 6
    out = tmp_path / "s.csv"
    assert evaluate(["--pred_dir", str(pred_dir), "--ref_dir", str(ref_dir), "--labels", "brats2023",
                     "--metrics", "lesionwise", "--csv", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("unet-evaluate: error: case B: ") and "label values [6]" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists() and not os.path.exists(f"{out}.tmp")
