import numpy as np
import pytest

from unet.metrics import EMPTY_HD95, dice, hd95, score_regions, sensitivity, specificity, summarise


def sphere(shape, centre, radius, spacing=(1, 1, 1)):
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    d2 = sum(((g - c) * sp) ** 2 for g, c, sp in zip(grid, centre, spacing))
    return d2 <= radius ** 2


def test_dice_hand_computation():
    a = np.zeros((4, 4), bool); a[:2, :2] = True          # 4 voxels
    b = np.zeros((4, 4), bool); b[:2, :3] = True          # 6 voxels, 4 shared
    assert dice(a, b) == pytest.approx(2 * 4 / 10)
    assert sensitivity(a, b) == pytest.approx(4 / 6)
    assert specificity(a, b) == pytest.approx(10 / 10)
    assert specificity(b, a) == pytest.approx(10 / 12)


def test_identical_masks():
    s = sphere((40, 40, 40), (20, 20, 20), 8)
    assert dice(s, s) == 1.0 and hd95(s, s) == 0.0


def test_disjoint_and_empty_masks_follow_brats():
    a = sphere((40, 40, 40), (10, 10, 10), 4)
    b = sphere((40, 40, 40), (30, 30, 30), 4)
    empty = np.zeros_like(a)
    assert dice(a, b) == 0.0 and hd95(a, b) > 20
    assert dice(empty, empty) == 1.0 and hd95(empty, empty) == 0.0
    assert dice(a, empty) == 0.0 and hd95(a, empty) == pytest.approx(373.13, abs=0.01) == EMPTY_HD95


def test_two_spheres_offset_by_a_known_distance():
    # equal spheres shifted by 6 voxels along x: every surface distance is <= 6, the far caps near 6
    a = sphere((60, 60, 60), (30, 30, 27), 10)
    b = sphere((60, 60, 60), (30, 30, 33), 10)
    h = hd95(a, b)
    assert 4.5 <= h <= 6.0


def test_anisotropic_spacing_scales_distances():
    # a shift of 3 voxels along z with 2 mm slices is a 6 mm shift; planes one voxel thick
    a = np.zeros((20, 10, 10), bool); a[5] = True
    b = np.zeros((20, 10, 10), bool); b[8] = True
    assert hd95(a, b, spacing=(2.0, 1.0, 1.0)) == pytest.approx(6.0)
    assert hd95(a, b, spacing=(1.0, 1.0, 1.0)) == pytest.approx(3.0)


def test_score_regions_and_summary():
    ref = np.zeros((10, 10, 10, 2), np.uint8); ref[2:5, 2:5, 2:5, 0] = 1
    pred = ref.copy(); pred[..., 1] = 0
    s = score_regions(pred, ref, (1, 1, 1), ["WT", "ET"])
    assert s["dice_WT"] == 1.0 and s["dice_ET"] == 1.0 and s["hd95_ET"] == 0.0
    summ = summarise([{"x": 1.0}, {"x": 2.0}, {"x": 3.0}, {"x": 4.0}], ["x"])["x"]
    assert summ["mean"] == 2.5 and summ["median"] == 2.5 and summ["p25"] == 1.75 and summ["p75"] == 3.25
