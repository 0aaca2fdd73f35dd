import numpy as np
import pytest

from unet.data.labels import regions_from_labels
from unet.data.preprocess import (
    CROP_MARGIN,
    NetworkInput,
    apply_inplane,
    head_box,
    inplane_plan,
    network_input,
    select_slices,
    to_case_grid,
    undo_inplane,
    zscore,
)
from unet.data.synth import MODALITIES, make_case
from unet.metrics import dice


def test_zscore_over_brain_voxels_only():
    v = np.zeros((2, 4, 4), np.float32)
    v[0, :2, :2] = [[1, 2], [3, 4]]
    mask = v != 0
    z = zscore(v, mask)
    vals = np.array([1, 2, 3, 4.0])
    assert np.allclose(z[mask], (vals - vals.mean()) / vals.std())
    assert np.all(z[~mask] == 0)


def test_240_grid_is_left_untouched_and_resize_keeps_masks_binary():
    img = np.random.default_rng(0).random((240, 240, 2)).astype(np.float32)
    plan = inplane_plan((240, 240), 240, "resize")
    assert apply_inplane(img, plan, is_mask=False) is img
    m = np.zeros((240, 240, 3), np.uint8); m[100:140, 90:150] = 1
    plan = inplane_plan((240, 240), 128, "resize")
    r = apply_inplane(m, plan, is_mask=True)
    assert r.shape == (128, 128, 3) and set(np.unique(r)) == {0, 1}
    back = undo_inplane(r, plan, is_mask=True)
    assert back.shape == (240, 240, 3) and (back != m).mean() < 0.01


def test_centre_crop_round_trip():
    m = np.zeros((240, 240), np.uint8); m[50:190, 50:190] = 1
    plan = inplane_plan((240, 240), 128, "crop")
    c = apply_inplane(m, plan, is_mask=True)
    assert c.shape == (128, 128) and c.all()
    back = undo_inplane(c, plan, is_mask=True)
    assert back[56:184, 56:184].all() and back.sum() == 128 * 128


def test_slice_policies():
    brain = np.zeros((10, 4, 4), bool); brain[2:8] = True
    tum = np.zeros_like(brain); tum[4:6, 1, 1] = True
    rng = np.random.default_rng(0)
    assert select_slices(brain, tum, "all", rng).tolist() == list(range(10))
    assert select_slices(brain, tum, "brain", rng).tolist() == [2, 3, 4, 5, 6, 7]
    assert select_slices(brain, tum, "tumour", rng, background_fraction=0).tolist() == [4, 5]
    assert len(select_slices(brain, tum, "tumour", rng, background_fraction=0.5)) == 4


def test_mask_resize_is_nearest_neighbour_only():
    """Label values {0, 2, 4} next to each other: any blending (linear, area, cubic) makes new values."""
    rng = np.random.default_rng(1)
    labels = rng.choice(np.array([0, 2, 4], np.uint8), size=(240, 240))
    labels[60:180, 60:180] = 4
    labels[80:160, 80:160] = 2
    for size in (128, 64):
        plan = inplane_plan((240, 240), size, "resize")
        small = apply_inplane(labels, plan, is_mask=True)
        back = undo_inplane(small, plan, is_mask=True)
        assert set(np.unique(small).tolist()) == {0, 2, 4} and set(np.unique(back).tolist()) == {0, 2, 4}
        # nested region masks stay nested (no blended, partially-set region)
        nested = np.stack([labels > 0, labels == 2, (labels == 2) & (rng.random((240, 240)) < 0.5)], -1)
        r = apply_inplane(nested.astype(np.uint8), plan, is_mask=True)
        assert set(np.unique(r).tolist()) == {0, 1}
        wt, tc, et = (r[..., k].astype(bool) for k in range(3))
        assert not (tc & ~wt).any() and not (et & ~tc).any()


@pytest.mark.parametrize("mode", ["resize", "crop"])
def test_reference_round_trip_through_the_network_grid(mode):
    # a synthetic case on the BraTS 240x240 in-plane grid, brought to the default 128 x 128
    # the way unet-convert and unet-predict do, and back the way unet-predict undoes it
    vols, canon = make_case(0, 3, (24, 240, 240))
    chans = np.stack([vols[m] for m in MODALITIES])
    inp = network_input(chans, 128, mode)
    assert inp.slices.shape == (24, 128, 128, 4) and inp.slices.dtype == np.float32
    ref = regions_from_labels(canon, "brats")                 # (z, y, x, WT/TC/ET)
    # what a perfect network outputs: the reference carried to the network grid like the images
    out = np.stack([apply_inplane(r.astype(np.float32), inp.plan, is_mask=False) for r in ref])
    back = to_case_grid(out, inp) > 0.5
    assert back.shape == ref.shape == (24, 240, 240, 3)
    scores = [dice(back[..., k], ref[..., k]) for k in range(3)]
    if mode == "crop":                                         # the tumour lies inside the crop
        assert scores == [1.0, 1.0, 1.0]
    else:
        assert min(scores) > 0.95, scores


def test_resized_masks_stay_aligned_with_the_resized_images():
    """A mask resized as a mask must cover what the same region resized as an image covers:
    OpenCV's plain INTER_NEAREST samples off-centre (half a pixel), which costs small regions
    most (ET agreement 0.78 here); pixel-centre sampling keeps them aligned (0.95)."""
    vols, canon = make_case(0, 3, (24, 240, 240))
    ref = regions_from_labels(canon, "brats")
    plan = inplane_plan((240, 240), 128, "resize")
    as_mask = np.stack([apply_inplane(r, plan, is_mask=True) for r in ref]).astype(bool)
    as_image = np.stack([apply_inplane(r.astype(np.float32), plan, is_mask=False) for r in ref]) > 0.5
    agreement = [dice(as_mask[..., k], as_image[..., k]) for k in range(3)]
    print("mask/image agreement WT/TC/ET: " + "/".join(f"{a:.3f}" for a in agreement))
    assert min(agreement) > 0.93, agreement


def test_case_grid_keeps_a_one_pixel_rim_and_stays_a_probability():
    # a rim one network pixel wide (1.875 case pixels at 240 -> 128) at probability 0.7, beside a
    # saturated block whose edges bicubic interpolation overshoots
    plan = inplane_plan((240, 240), 128, "resize")
    out = np.zeros((1, 128, 128, 1), np.float32)
    out[0, :, 64] = 0.7
    out[0, :, 30:40] = 1.0
    grid = to_case_grid(out, NetworkInput(None, plan, None))[0, 100, :, 0]
    assert (grid[100:140] > 0.5).sum() == 2         # linear interpolation leaves 1 pixel of the 2
    assert grid.min() == 0.0 and grid.max() == 1.0  # clipped: the raw bicubic values leave [0, 1]
    raw = undo_inplane(out[0], plan, is_mask=False)
    assert raw.max() > 1.0 and raw.min() < 0.0


def test_head_box_is_one_square_around_the_head_of_every_slice():
    brain = np.zeros((3, 100, 120), bool)
    brain[0, 20:61, 30:50] = True          # rows 20-60 in one slice,
    brain[2, 30:41, 10:91] = True          # columns 10-90 in another: the box is 41 x 81
    y0, x0, side = head_box(brain, margin=2)
    assert side == 81 + 4 and x0 == 10 - 2 and y0 == 20 - (85 - 41) // 2
    assert head_box(brain[0], margin=0) == (20, 30 - (41 - 20) // 2, 41)   # (y, x) works too
    assert head_box(np.zeros((2, 8, 8), bool)) is None
    plan = inplane_plan((100, 120), 64, "crop_resize", None)           # no head: the whole grid, squared
    assert (plan["y0"], plan["x0"], plan["side"]) == (0, 0, 120)


def synthetic_case(shape=(24, 240, 240)):
    vols, canon = make_case(0, 3, shape)
    return np.stack([vols[m] for m in MODALITIES]), regions_from_labels(canon, "brats")


def round_trip(chans, ref, size, mode):
    """Dice WT/TC/ET of the reference carried to the network grid as unet-convert carries masks and
    returned as unet-predict returns probabilities (to_case_grid, threshold 0.5)."""
    inp = network_input(chans, size, mode)
    small = np.stack([apply_inplane(r, inp.plan, is_mask=True) for r in ref]).astype(np.float32)
    back = to_case_grid(small, inp) > 0.5
    return [dice(back[..., k], ref[..., k]) for k in range(3)], inp


def test_crop_resize_round_trip_is_exact_at_the_box_size_and_beats_resize_below_it():
    chans, ref = synthetic_case()
    y0, x0, side = head_box(np.any(chans != 0, axis=0))
    assert 150 < side < 240                           # the head fills only part of the 240 x 240 grid
    exact, inp = round_trip(chans, ref, side, "crop_resize")
    assert exact == [1.0, 1.0, 1.0] and inp.slices.shape == (24, side, side, 4)
    # the network sees the head: the box's first and last rows/columns hold it, the margin does not
    head = np.any(inp.slices != 0, axis=(0, 3))
    rows, cols = np.flatnonzero(head.any(1)), np.flatnonzero(head.any(0))
    assert min(rows[0], cols[0]) == CROP_MARGIN and max(rows[-1], cols[-1]) == side - 1 - CROP_MARGIN
    for size in (128, 160):
        cropped, _ = round_trip(chans, ref, size, "crop_resize")
        resized, _ = round_trip(chans, ref, size, "resize")
        print(f"{size}: crop_resize {np.round(cropped, 3)} resize {np.round(resized, 3)}")
        # the head spans ~196 of the 240 pixels: ~20 % finer sampling, the thin enhancing rim gains most
        assert all(c >= r - 0.002 for c, r in zip(cropped, resized)), (size, cropped, resized)
        assert cropped[2] > resized[2] and min(cropped) > 0.88


def test_crop_resize_undo_puts_the_prediction_back_in_the_box_and_background_elsewhere():
    chans, _ = synthetic_case((8, 200, 240))
    chans = np.ascontiguousarray(chans[:, :, 25:150])   # a head cut by both edges of a 125 x 240 grid:
    inp = network_input(chans, 96, "crop_resize")       # its square box reaches beyond them
    y0, x0, side = (inp.plan[k] for k in ("y0", "x0", "side"))
    ys, xs = np.flatnonzero(inp.brain.any((0, 2))), np.flatnonzero(inp.brain.any((0, 1)))
    assert (ys[0], ys[-1]) == (0, 124) and xs[-1] - xs[0] + 1 > 125
    assert side == xs[-1] - xs[0] + 1 + 2 * CROP_MARGIN and y0 < 0 and y0 + side > 125
    grid = to_case_grid(np.ones((8, 96, 96, 1), np.float32), inp)[..., 0]
    inside = np.zeros((125, 240), bool)
    inside[max(y0, 0):y0 + side, max(x0, 0):x0 + side] = True
    assert np.allclose(grid[:, inside], 1.0, rtol=0, atol=1e-6) and (grid[:, ~inside] == 0.0).all()
    # a mask through the box and back lands where it was, by nearest neighbour at any size
    m = np.zeros((125, 240), np.uint8)
    m[115:125, 95:105] = 1
    for size in (side, 96, 256):
        plan = inplane_plan((125, 240), size, "crop_resize", (y0, x0, side))
        small = apply_inplane(m, plan, is_mask=True)
        assert small.shape == (size, size) and (undo_inplane(small, plan, is_mask=True) != m).sum() <= (
            0 if size == side else 40)
