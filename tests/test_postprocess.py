"""Post-processing of predicted probabilities (pure numpy/scipy), and flip TTA."""
import argparse

import numpy as np
import pytest

from unet.data import labels as L
from unet.inference.postprocess import (
    PostError,
    PostOptions,
    add_flags,
    components_to_keep,
    options_from_args,
    postprocess,
)

REGIONS = ("WT", "TC", "ET")
OFF = PostOptions(wt_components="all", et_min_mm3=0)


def _probs(shape=(20, 40, 40)):
    return np.zeros(shape + (3,), np.float32)


def _cube(p, z, y, x, n, region_values):
    for k, v in enumerate(region_values):
        p[z:z + n, y:y + n, x:x + n, k] = v


def test_head_mask_sets_voxels_outside_every_modality_to_background():
    p = _probs()
    _cube(p, 2, 2, 2, 6, (0.9, 0.0, 0.0))
    brain = np.zeros(p.shape[:3], bool)
    brain[:, :, 5:] = True                      # the cube's x = 2..4 lie outside the head
    on = postprocess(p, brain, REGIONS, (1, 1, 1), OFF)
    off = postprocess(p, brain, REGIONS, (1, 1, 1), PostOptions(head_mask=False, wt_components="all", et_min_mm3=0))
    assert off[..., 0].sum() == 6 ** 3
    assert on[..., 0].sum() == 6 * 6 * 3       # x = 5..7 only
    assert not on[~brain].any()


def test_threshold_decides_membership():
    p = _probs()
    p[5, 5, 5, 0], p[5, 5, 6, 0] = 0.55, 0.45
    assert postprocess(p, None, REGIONS, (1, 1, 1), OFF)[..., 0].sum() == 1
    low = PostOptions(threshold=0.4, wt_components="all", et_min_mm3=0)
    assert postprocess(p, None, REGIONS, (1, 1, 1), low)[..., 0].sum() == 2


def test_regions_are_nested_et_in_tc_in_wt():
    p = _probs()
    _cube(p, 2, 2, 2, 8, (0.9, 0.0, 0.0))      # WT 8^3
    p[4:12, 4:12, 4:12, 1:] = 0.9              # TC and ET reach out of WT: cut back to it
    p[5, 5, 5, 1] = 0.0                        # a hole in TC: ET there leaves too
    m = postprocess(p, None, REGIONS, (1, 1, 1), OFF).astype(bool)
    wt, tc, et = m[..., 0], m[..., 1], m[..., 2]
    assert not (tc & ~wt).any() and not (et & ~tc).any()
    assert not et[5, 5, 5]
    assert tc.sum() == 6 ** 3 - 1              # the overlap 4..9 of both cubes, less the hole
    lab = L.labels_from_regions(m, "brats")
    assert np.array_equal(L.regions_from_labels(lab, "brats").astype(bool), m)


def test_small_whole_tumour_components_are_dropped_with_their_core():
    p = _probs()
    _cube(p, 2, 2, 2, 10, (0.9, 0.9, 0.9))     # 1000 voxels
    _cube(p, 15, 30, 30, 4, (0.9, 0.9, 0.0))   # 64 voxels, with core
    opts = PostOptions(wt_components="volume", min_component_mm3=100, et_min_mm3=0)
    m = postprocess(p, None, REGIONS, (1, 1, 1), opts)
    assert m[..., 0].sum() == 1000 and m[..., 1].sum() == 1000 and m[15:, 30:, 30:].sum() == 0
    # 2 mm slices: the small blob is 128 mm3 and stays; the 100 mm3 limit is 50 voxels there
    m2 = postprocess(p, None, REGIONS, (2, 1, 1), opts)
    assert m2[..., 0].sum() == 1064
    # diagonal neighbours are one component (26-connectivity)
    q = np.zeros((5, 5, 5), bool)
    q[1, 1, 1] = q[2, 2, 2] = True
    assert components_to_keep(q, 2, False).sum() == 2


def test_keep_largest_keeps_one_component():
    p = _probs()
    _cube(p, 2, 2, 2, 10, (0.9, 0.0, 0.0))
    _cube(p, 10, 25, 25, 9, (0.9, 0.0, 0.0))   # 729 voxels
    m = postprocess(p, None, REGIONS, (1, 1, 1), PostOptions(wt_components="largest", et_min_mm3=0))
    assert m[..., 0].sum() == 1000
    both = postprocess(p, None, REGIONS, (1, 1, 1),
                       PostOptions(wt_components="volume", min_component_mm3=500, et_min_mm3=0))
    assert both[..., 0].sum() == 1729


def test_the_default_keeps_a_second_focus_of_2_ml_and_drops_a_smaller_one():
    p = _probs((30, 40, 40))
    _cube(p, 0, 0, 0, 14, (0.9, 0.0, 0.0))     # 2744 mm3 at 1 mm: the largest
    _cube(p, 16, 0, 0, 13, (0.9, 0.0, 0.0))    # 2197 mm3: a second focus over 2000 mm3, kept
    _cube(p, 16, 26, 26, 12, (0.9, 0.0, 0.0))  # 1728 mm3: under it, dropped
    assert PostOptions().wt_components == "volume" and PostOptions().min_component_mm3 == 2000.0
    m = postprocess(p, None, REGIONS, (1, 1, 1), PostOptions(et_min_mm3=0))
    assert m[..., 0].sum() == 2744 + 2197


def test_volume_rule_never_drops_the_largest_component():
    p = _probs()
    _cube(p, 2, 2, 2, 5, (0.9, 0.9, 0.0))      # 125 mm3, the whole predicted tumour
    _cube(p, 15, 30, 30, 2, (0.9, 0.0, 0.0))   # 8 mm3
    m = postprocess(p, None, REGIONS, (1, 1, 1), PostOptions(wt_components="volume", et_min_mm3=0))
    assert m[..., 0].sum() == 125 and m[..., 1].sum() == 125


def test_small_enhancing_tumour_becomes_necrosis():
    p = _probs()
    _cube(p, 2, 2, 2, 10, (0.9, 0.9, 0.0))
    _cube(p, 4, 4, 4, 5, (0.9, 0.9, 0.9))      # ET 125 voxels
    small = postprocess(p, None, REGIONS, (1, 1, 1), PostOptions(wt_components="all", et_min_mm3=200))
    assert small[..., 2].sum() == 0 and small[..., 1].sum() == 1000
    lab = L.labels_from_regions(small, "brats")
    assert (lab == 4).sum() == 0 and (lab == 1).sum() == 1000
    kept = postprocess(p, None, REGIONS, (1, 1, 1), PostOptions(wt_components="all", et_min_mm3=100))
    assert kept[..., 2].sum() == 125
    # the rule counts mm3: 125 voxels of 2 mm3 are 250 mm3, over the 200 mm3 limit
    assert postprocess(p, None, REGIONS, (2, 1, 1), PostOptions(wt_components="all"))[..., 2].sum() == 125


def test_single_region_model_gets_the_component_clean_up_only():
    p = np.zeros((10, 20, 20, 1), np.float32)
    p[1:9, 1:9, 1:9] = 0.9
    p[9, 18, 18] = 0.9
    m = postprocess(p, None, ("WT",), (1, 1, 1), PostOptions(wt_components="volume", min_component_mm3=10))
    assert m.shape == p.shape and m.sum() == 512


def _ns(**kw):
    ap = argparse.ArgumentParser()
    add_flags(ap)
    return ap.parse_args([f"--{k}={v}" for k, v in kw.items()])


def test_flags_map_to_options_and_bad_values_name_the_flag():
    o = options_from_args(_ns())
    assert o == PostOptions()
    assert options_from_args(_ns(threshold=0.3)).threshold == 0.3
    assert options_from_args(_ns(wt_components="volume")).wt_components == "volume"
    for flag, value in (("threshold", 1.5), ("min_component_mm3", -1), ("et_min_mm3", -2)):
        with pytest.raises(PostError, match=f"--{flag}"):
            options_from_args(_ns(**{flag: value}))


class _Ramp:
    """A model that is not flip-equivariant: output = sigmoid(first channel) * a left-to-right ramp."""
    def __call__(self, x, training=False):
        ramp = np.linspace(0.0, 1.0, x.shape[2], dtype=np.float32)[None, None, :, None]
        return 1 / (1 + np.exp(-x[..., :1])) * ramp


def test_flip_tta_is_the_mean_of_the_four_mirrored_predictions():
    from unet.inference.predictor import Predictor
    pred = Predictor.__new__(Predictor)
    pred._model, pred.batch_size, pred.regions = _Ramp(), 3, ("WT",)
    x = np.random.default_rng(0).normal(size=(5, 8, 8, 2)).astype(np.float32)
    s = 1 / (1 + np.exp(-x[..., :1]))
    ramp = np.linspace(0.0, 1.0, 8, dtype=np.float32)[None, None, :, None]
    # mirrored left-right, predicted and mirrored back, the ramp runs the other way: mean 0.5;
    # up-down flips leave a left-right ramp as it is
    want = (s * ramp + s * ramp[:, :, ::-1]) / 2
    assert np.allclose(pred.network_output(x, tta=True), want, atol=1e-6)
    assert np.allclose(pred.network_output(x, tta=False), s * ramp, atol=1e-6)
    assert np.allclose(pred.network_output(x, tta="all"), want, atol=1e-6)
    # left-right only: the slice and its left-right mirror, so the same mean here (the ramp is left-right)
    assert np.allclose(pred.network_output(x, tta="lr"), want, atol=1e-6)


def test_tta_flag_values():
    assert options_from_args(_ns()).tta == ""
    ap = argparse.ArgumentParser()
    add_flags(ap)
    assert options_from_args(ap.parse_args(["--tta"])).tta == "all"
    assert options_from_args(ap.parse_args(["--tta", "lr"])).tta == "lr"
    with pytest.raises(SystemExit):
        ap.parse_args(["--tta", "ud"])


@pytest.mark.parametrize("tool", ["unet.evaluation.evaluate", "unet.inference.predict"])
def test_a_bad_post_processing_flag_is_one_line_before_any_work(tool, tmp_path, capsys):
    import importlib
    main = importlib.import_module(tool).main
    argv = (["--model", str(tmp_path / "none"), "--data", str(tmp_path / "none.h5")]
            if tool == "unet.evaluation.evaluate"
            else ["--model", str(tmp_path / "none"), "--case", str(tmp_path), "--out", str(tmp_path / "o")])
    assert main(argv + ["--et_min_mm3", "-5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    prog = "unet-" + tool.rsplit(".", 1)[1]
    assert err == [f"{prog}: error: --et_min_mm3 must be >= 0 (got -5.0)"]
    assert not (tmp_path / "o").exists()


class _Counting:
    """A model that answers 'tumour' (probability sigmoid(2 + x)) everywhere, even on an empty slice,
    and counts the slices it is given."""
    def __init__(self):
        self.seen = 0

    def __call__(self, x, training=False):
        self.seen += len(x)
        return np.repeat(1 / (1 + np.exp(-(2.0 + x[..., :1]))), 3, axis=-1)


@pytest.mark.parametrize("tta", [False, True])
def test_slices_without_a_head_voxel_are_not_run_and_the_masks_are_those_of_every_slice_run(tta):
    from unet.data import preprocess as P
    from unet.inference.predictor import Predictor
    pred = Predictor.__new__(Predictor)
    pred._model, pred.batch_size, pred.regions = _Counting(), 4, L.REGIONS
    pred.size, pred.inplane, pred.normalisation, pred.crop_margin = 8, "crop_resize", P.NORMALISATION, 1
    chans = np.zeros((2, 7, 12, 12), np.float32)
    chans[:, 2:5, 3:9, 4:10] = np.random.default_rng(0).uniform(1, 5, size=(2, 3, 6, 6))   # slices 2-4 hold the head
    flips = 4 if tta else 1
    full, brain = pred.probabilities(chans, tta)
    assert pred._model.seen == 7 * flips and full[0].max() > 0.5    # the model answers on an empty slice too
    pred._model.seen = 0
    part, _ = pred.probabilities(chans, tta, head_only=True)
    assert pred._model.seen == 3 * flips
    assert np.array_equal(part[2:5], full[2:5]) and not part[:2].any() and not part[5:].any()
    pred._model.seen = 0
    post = PostOptions(tta=tta, min_component_mm3=0)
    masks = pred.regions_mask(chans, (1.0, 1.0, 1.0), post)
    assert pred._model.seen == 3 * flips
    assert np.array_equal(masks, postprocess(full, brain, L.REGIONS, (1.0, 1.0, 1.0), post))
    assert masks[..., 0].sum() > 0
    pred._model.seen = 0      # without the head mask the network's answer everywhere is kept: every slice runs
    raw = pred.regions_mask(chans, (1.0, 1.0, 1.0), PostOptions(tta=tta, head_mask=False, min_component_mm3=0))
    assert pred._model.seen == 7 * flips and raw[0, ..., 0].any()
