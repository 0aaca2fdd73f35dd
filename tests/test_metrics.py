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
    # centres 20*sqrt(3) = 34.64 mm apart; 95th percentile of the 268 pooled surface distances
    # (checked against a brute-force nearest-neighbour search over the surface voxels)
    assert dice(a, b) == 0.0 and hd95(a, b) == pytest.approx(34.4424, abs=1e-4)
    assert dice(empty, empty) == 1.0 and hd95(empty, empty) == 0.0
    assert dice(a, empty) == 0.0 and hd95(a, empty) == pytest.approx(373.13, abs=0.01) == EMPTY_HD95


def test_two_spheres_offset_by_a_known_distance():
    # equal spheres shifted by 6 voxels along x: the far caps are 6 mm apart (the maximum), the
    # 95th percentile of the 1956 pooled surface distances is sqrt(5^2 + 2^2 + 2^2) = sqrt(33)
    # (checked against a brute-force nearest-neighbour search over the surface voxels)
    a = sphere((60, 60, 60), (30, 30, 27), 10)
    b = sphere((60, 60, 60), (30, 30, 33), 10)
    assert hd95(a, b) == pytest.approx(np.sqrt(33), abs=1e-9)
    assert hd95(b, a) == pytest.approx(np.sqrt(33), abs=1e-9)


def uneven_lines(shape=(30, 100)):
    """One-voxel-thick lines, so every voxel is a surface voxel.

    ref: row 0 plus 7 voxels of row 20 (columns 93-99); pred: row 0 plus 5 voxels of row 10
    (columns 0-4). Surface distances pred -> ref: 100 x 0 and 5 x 10 (row 10 to row 0);
    ref -> pred: 100 x 0 and 7 x 20 (row 20 to row 0; pred's row-10 voxels are 88+ columns away).
    """
    ref = np.zeros(shape, bool); pred = np.zeros(shape, bool)
    ref[..., 0, :] = True; ref[..., 20, 93:] = True
    pred[..., 0, :] = True; pred[..., 10, :5] = True
    return pred, ref


def test_hd95_pools_both_directions_and_takes_the_95th_percentile():
    # pooled, sorted: 200 x 0, 5 x 10, 7 x 20 (212 values). numpy's 95th percentile sits at
    # position 0.95 * 211 = 200.45, between the 201st and 202nd value: both 10 -> HD95 = 10.
    # Each other reading gives another number: the maximum is 20; pred -> ref alone (105 values,
    # position 98.8) is 0; ref -> pred alone (107 values, position 100.7) is 20; the 90th
    # percentile (position 189.9) is 0.
    pred, ref = uneven_lines()
    assert hd95(pred, ref, (1.0, 1.0)) == 10.0
    assert hd95(ref, pred, (1.0, 1.0)) == 10.0


def test_hd95_uneven_case_with_anisotropic_spacing():
    # the same lines in one plane of a 3-D volume; distances run along y, so 2 mm rows double
    # them (10 -> 20 mm) while 5 mm slices and 3 mm columns change nothing
    pred, ref = uneven_lines((3, 30, 100))
    pred[0] = pred[2] = ref[0] = ref[2] = False
    assert hd95(pred, ref, (1.0, 1.0, 1.0)) == 10.0
    assert hd95(pred, ref, (5.0, 2.0, 3.0)) == 20.0
    assert hd95(ref, pred, (5.0, 2.0, 3.0)) == 20.0


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
    assert summ["std"] == pytest.approx(np.sqrt(1.25))   # population std (ddof 0): sqrt(mean((x - 2.5)^2))
