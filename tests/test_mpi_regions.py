"""A short 2-rank training on synthetic BraTS-format cases learns all three regions.

The seed's region-pooled Dice lets the whole tumour dominate: trained like this it leaves the
tumour core and the enhancing tumour near zero (docs/TRAINING.md). The default loss must not.
And the demo's recipe trains at a smaller batch and a higher rate than the setting that made the earlier
recipe collapse to all-background.
"""
import os
import re

import pytest
from conftest import HANG, ROOT, run_mpi

pytestmark = pytest.mark.mpi

# Measured on this data (docs/TRAINING.md, "The regions test"): the default loss's exported epoch
# reached WT 0.835, TC 0.384, ET 0.279; 43-72 % of that is required (TC 0.416 at the epoch before), a margin for other
# CPUs' rounding taking training down another path. The seed's region-pooled Dice + BCE reached
# TC 0.0010, ET 0.0018 on the same run.
MIN_DICE = {"WT": 0.60, "TC": 0.20, "ET": 0.12}


@pytest.fixture(scope="module")
def small_cases(tmp_path_factory):
    from unet.data.convert import main as convert
    from unet.data.synth import main as synth
    root = tmp_path_factory.mktemp("regions")
    # 192x192 slices brought to 96x96: the enhancing rim is 0.5-2.6 pixels thick, as at the demo's
    # 240 -> 128; few axial slices, and for training only those with tumour, as the demo does
    # (95 instead of 128 slices with the brain: 12 steps an epoch, not 16)
    assert synth(["--out", str(root / "cases"), "--cases", "6", "--shape", "40,192,192", "--seed", "3",
                  "--workers", "2", "--anatomy", "sphere"]) == 0
    assert convert(["--input", str(root / "cases"), "--output", str(root / "d.h5"), "--size", "96",
                    "--val_fraction", "0.3", "--slices", "tumour", "--no_progress"]) == 0
    return root


def exported_dice(stdout: str) -> dict:
    m = re.search(r"validation Dice of the exported model .*: WT=([\d.]+) TC=([\d.]+) ET=([\d.]+)", stdout)
    assert m, stdout[-2000:]
    return dict(zip(("WT", "TC", "ET"), map(float, m.groups())))


def test_two_rank_training_learns_tumour_core_and_enhancing_tumour(small_cases):
    logdir = small_cases / "logs"
    p = run_mpi(2, [os.path.join(ROOT, "train_hvd.py"), "--data", str(small_cases / "d.h5"), "--logdir", str(logdir),
                    "--batch_size", "4", "--epochs", "4", "--learningrate", "0.0001", "--log_every", "5",
                    "--export", "none"],
                timeout=2 * HANG)   # real work: 135 s here idle (16 steps an epoch: 191 s; 980 s under load 11)
    assert p.returncode == 0, p.stderr[-3000:]
    dice = exported_dice(p.stdout)
    print("validation Dice of the exported model:", dice)
    for region, least in MIN_DICE.items():
        assert dice[region] >= least, (region, dice)


# The demo's recipe (batch normalisation at rate 0.001, the bias-field augmentation) at batch 2 per rank: half the
# batch, and 2.5x the rate, of the setting that sent the recipe before --head_bias prior into all-background on this
# data (batch 4, rate 0.0004: validation Dice WT 0.0001, TC 0.0010, ET 0.0018 from the first epoch on;
# scripts/robustness.py, docs/TRAINING.md "Robustness"); batch 2 per rank is also where batch statistics are
# noisiest. Measured (2026-12-07, a 2-core Xeon, oneDNN held to AVX2): the exported epoch at WT 0.927, TC 0.912,
# ET 0.829 (with the moving averages, --bn_batches 0: 0.934 / 0.919 / 0.842; the group-normalised recipe before it:
# 0.935 / 0.902 / 0.832, with `--norm group`); required: two thirds
# of that, far above the grid's collapse line (WT 0.5, TC and ET 0.1), a margin for another CPU's rounding taking
# training down another path.
DEMO_RECIPE = ["--norm", "batch", "--aug_bias", "0.1", "--learningrate", "0.001"]
MIN_DICE_SMALL_BATCH = {"WT": 0.62, "TC": 0.61, "ET": 0.56}


def test_demo_recipe_at_batch_two_trains_where_the_old_recipe_collapsed(small_cases):
    logdir = small_cases / "logs_batch_two"
    p = run_mpi(2, [os.path.join(ROOT, "train_hvd.py"), "--data", str(small_cases / "d.h5"), "--logdir", str(logdir),
                    "--batch_size", "2", "--epochs", "4", *DEMO_RECIPE, "--log_every", "5", "--export", "none"],
                timeout=2 * HANG)
    assert p.returncode == 0, p.stderr[-3000:]
    dice = exported_dice(p.stdout)
    print("validation Dice of the exported model:", dice)
    for region, least in MIN_DICE_SMALL_BATCH.items():
        assert dice[region] >= least, (region, dice)
