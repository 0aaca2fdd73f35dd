"""The trainer under a real ``mpirun``: averaging, identical replicas, bad input."""
import glob
import os
import re

import numpy as np
import pytest
from conftest import ROOT, mpi_env, run_mpi, train_args
from h5fixture import write_h5

from unet.distributed.ranks import physical_cores

pytestmark = pytest.mark.mpi
# no randomness that differs between a 2-rank and a 1-rank run; a learning rate too small to move
# the weights (see the averaging test)
FROZEN = ["--loss", "bce", "--dropout", "0", "--no_augment", "--lr_scaling", "none", "--warmup_epochs", "0",
          "--const_learningrate", "--learningrate", "1e-12", "--seed", "5"]


# float32 unit roundoff. A gradient element is a sum over the global batch's pixels (8 x 32 x 32 =
# 8192 terms here, more inside the convolutions); the two runs add them in another order and
# blocking (4 + 4 averaged by Horovod against 8; oneDNN kernels for batch 4 on 1 thread against
# batch 8 on 2). Rounding then moves it by about sqrt(8192) * U = 5e-6 of the sum of the terms'
# magnitudes (random-walk estimate; at worst 8192 * U = 5e-4). Allowed per layer: 1e-4 of its
# gradient's norm. Measured on a 2-core AVX2 box: 8.9e-7 in the worst layer. A rank whose
# gradient is not averaged (its half batch alone) is off by 0.006-0.4 per layer (median 0.1),
# a sum instead of an average by 1.
U = 2.0 ** -24
GRAD_REL_TOL = 1e-4


def adam_first_moments(logdir):
    """Adam's iteration count and first moments (one per weight) from the run's last checkpoint."""
    (ckpt,) = glob.glob(os.path.join(logdir, "checkpoints", "ckpt-*.npz"))
    with np.load(ckpt) as z:
        opt = [z[k] for k in sorted(k for k in z.files if re.fullmatch(r"o\d+", k))]
        weights = [z[k] for k in sorted(k for k in z.files if re.fullmatch(r"m\d+", k))]
    # Keras 3 Adam's variables: iteration, learning_rate, then (momentum, velocity) per weight
    moments = opt[2::2]
    assert [m.shape for m in moments] == [w.shape for w in weights]
    return int(opt[0]), moments


def test_two_ranks_average_like_one_rank_with_double_batch(tmp_path):
    """2 ranks x batch 4 give Adam, at every step of an epoch, the gradient 1 rank x batch 8 gives it.

    What Horovod is responsible for is the averaged gradient, so that is what is compared. The
    learning rate is 1e-12: Adam's steps (about lr each) are below the float32 resolution of the
    kernels, so every step's gradient is taken at the same weights in both runs, and Adam's first
    moment after the 4 steps, m = 0.1 * sum_t 0.9^(3-t) g_t, is linear in the 4 averaged
    gradients. Weights after a real training run are not compared: Adam divides by sqrt(v), so a
    parameter whose gradient is near zero takes a +-lr step whose sign rounding decides, and
    the runs drift apart step by step whatever the averaging (measured here at lr 1e-3: Adam's
    first moments 1.4e-7 apart after step 1, 5e-5 after step 2, 7e-4 after step 4, relative)."""
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    # 32 training images: global batch 8 -> 4 steps, both runs see the same samples per step
    p2 = run_mpi(2, train_args(two, "--batch_size", "4", *FROZEN))
    assert p2.returncode == 0, p2.stderr[-3000:]
    p1 = run_mpi(1, train_args(one, "--batch_size", "8", *FROZEN))
    assert p1.returncode == 0, p1.stderr[-3000:]
    assert "global_batch=8 steps/epoch=4" in p2.stdout and "global_batch=8 steps/epoch=4" in p1.stdout
    assert re.search(r"weights: identical on 2 ranks", p2.stdout), p2.stdout

    (n2, m2), (n1, m1) = adam_first_moments(two), adam_first_moments(one)
    assert n2 == n1 == 4
    rel = [float(np.linalg.norm(a - b) / np.linalg.norm(b)) for a, b in zip(m2, m1)]
    whole = np.sqrt(sum(float(np.sum((a - b) ** 2)) for a, b in zip(m2, m1)) / sum(float(np.sum(b ** 2)) for b in m1))
    worst = int(np.argmax(rel))
    print(f"averaged gradients, 2 ranks vs 1, |dm|/|m|: worst layer ({worst}) {rel[worst]:.2e} = "
          f"{rel[worst] / U:.0f} x float32 roundoff (limit {GRAD_REL_TOL:.0e}); whole model {whole:.2e}")
    assert all(float(np.linalg.norm(b)) > 0 for b in m1)      # every layer has a gradient to compare
    assert max(rel) < GRAD_REL_TOL
    # validation: each rank scores its share of the 8 images, the sums are added over ranks,
    # so the 2-rank figures are the 1-rank figures (the weights are the same; the tolerance is
    # the log's 5 and 4 decimals, and a pixel whose prediction sits at the 0.5 threshold)
    v2, v1 = validation_line(two), validation_line(one)
    print(f"validation 2 ranks {v2}\nvalidation 1 rank  {v1}")
    assert v2.keys() == v1.keys() == {"loss", "dice_WT"}
    for k in v1:
        assert v2[k] == pytest.approx(v1[k], rel=1e-3, abs=1e-4)


def validation_line(logdir):
    (line,) = [l for l in open(os.path.join(logdir, "training.log")) if l.startswith("validation ")]
    f = line.split()   # validation epoch E step S loss L dice_WT D
    return {f[i]: float(f[i + 1]) for i in range(5, len(f), 2)}


def test_missing_data_file_fails_fast_on_every_rank(tmp_path):
    p = run_mpi(2, [os.path.join(ROOT, "train_hvd.py"), "--data", str(tmp_path / "nope.h5"),
                    "--logdir", str(tmp_path / "logs")])
    assert p.returncode != 0
    errors = [l for l in p.stderr.splitlines() if l.startswith("train_hvd.py: error:")]
    assert errors == [f"train_hvd.py: error: --data {tmp_path / 'nope.h5'}: no such file or folder"]
    assert not (tmp_path / "logs").exists()
    # no --data and no --synthetic: the default data/brats.h5 (under the working directory)
    p = run_mpi(2, [os.path.join(ROOT, "train_hvd.py"), "--logdir", str(tmp_path / "logs")], cwd=str(tmp_path))
    assert p.returncode != 0
    errors = [l for l in p.stderr.splitlines() if l.startswith("train_hvd.py: error:")]
    assert len(errors) == 1 and errors[0].startswith("train_hvd.py: error: --data data/brats.h5: no such file "
                                                     "or folder (the default --data: convert BraTS with")
    assert not (tmp_path / "logs").exists()


def test_bad_flag_value_is_one_line_from_rank0(tmp_path):
    p = run_mpi(2, [os.path.join(ROOT, "train_hvd.py"), "--synthetic", "--batch_size", "0"])
    assert p.returncode != 0
    assert p.stderr.count("--batch_size must be >= 1 (got 0)") == 1


def test_bf16_under_an_avx2_cap_is_one_line_before_tensorflow_starts(tmp_path):
    """oneDNN held to AVX2 has no bf16 convolution: without the check the first step fails deep in oneDNN."""
    env = dict(mpi_env(), ONEDNN_MAX_CPU_ISA="avx2")
    p = run_mpi(2, [os.path.join(ROOT, "train_hvd.py"), "--synthetic", "--precision", "bf16", "--logdir",
                    str(tmp_path / "logs")], env=env)
    assert p.returncode == 2
    errors = [l for l in p.stderr.splitlines() if l.startswith("train_hvd.py: error:")]
    assert errors == ["train_hvd.py: error: --precision bf16: ONEDNN_MAX_CPU_ISA=AVX2 holds oneDNN to kernels "
                      "without bf16 convolutions (its first step would fail); unset it or use --precision fp32"]
    assert not (tmp_path / "logs").exists()


def test_batch_larger_than_a_shard_is_refused_before_training(tmp_path):
    logdir = tmp_path / "logs"
    p = run_mpi(2, train_args(str(logdir), "--batch_size", "20"))   # 2 x 20 > 32 images
    assert p.returncode == 2
    errors = [l for l in p.stderr.splitlines() if l.startswith("train_hvd.py: error:")]
    assert errors == ["train_hvd.py: error: --batch_size 20 x 2 ranks = 40 images per step, more than "
                      "the 32 training images in --synthetic data"]
    assert not logdir.exists()


def rank_lines(stdout):
    return sorted(l for l in stdout.splitlines() if l.startswith("rank "))


def test_threads_follow_the_binding_of_plain_mpirun_map_by_socket(tmp_path):
    ncpu = len(os.sched_getaffinity(0))   # this box: one socket
    ncores = physical_cores(frozenset(os.sched_getaffinity(0)))
    hostfile = os.path.join(ROOT, "hostfiles", "localhost")
    # as users type it: mpirun -hostfile hosts -np N --map-by socket python train_hvd.py
    # (no --data: the trainer reads data/brats.h5 under the working directory)
    os.makedirs(tmp_path / "data")
    write_h5(str(tmp_path / "data" / "brats.h5"))
    one = run_mpi(1, [os.path.join(ROOT, "train_hvd.py"), "--batch_size", "4", "--epochs", "1",
                      "--logdir", str(tmp_path / "a"), "--blocktime", "30", "--export", "none"],
                  mpi_args=["-hostfile", hostfile, "--map-by", "socket"], cwd=str(tmp_path))
    assert one.returncode == 0, one.stderr[-2000:]
    assert "data: data/brats.h5" in one.stdout, one.stdout[-2000:]
    (line,) = rank_lines(one.stdout)
    assert f"({ncpu}) cores {ncores} intra {ncores} inter 2 KMP_BLOCKTIME 30" in line   # the socket's cores
    two = run_mpi(2, train_args(str(tmp_path / "b")), mpi_args=["-hostfile", hostfile, "--map-by", "socket"])
    assert two.returncode == 0, two.stderr[-2000:]
    lines = rank_lines(two.stdout)
    assert [l.split()[1] for l in lines] == ["0/2", "1/2"]
    for l in lines:   # both ranks bound to the same socket: they split its cores
        assert f"({ncpu}) cores {ncores} intra {max(1, ncores // 2)} " in l
    forced = run_mpi(2, train_args(str(tmp_path / "c"), "--num_threads", "3", "--num_inter_threads", "1"))
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert all(" intra 3 inter 1 " in l for l in rank_lines(forced.stdout))


def model_arrays(logdir):
    """The model variables of the run's last checkpoint, in ``model.variables`` order."""
    (ckpt,) = glob.glob(os.path.join(logdir, "checkpoints", "ckpt-*.npz"))
    with np.load(ckpt) as z:
        return [z[k] for k in sorted(k for k in z.files if re.fullmatch(r"m\d+", k))]


def test_batch_norm_moving_statistics_are_the_global_batchs_and_the_same_on_every_rank(tmp_path):
    """--norm batch: each rank normalises by its own half batch, and the moving statistics are averaged over
    the ranks after every step, so they are equal on every rank (the weights digest covers them) and the first
    layer's moving mean, which sees the raw slices, is what one rank with the whole batch computes: the mean
    of two 4-image means is the 8-image mean. (Deeper layers' inputs were normalised by the half batch's
    statistics, so theirs differ.) The rate is FROZEN's 1e-12, so the weights stay the same in both runs.
    ``--bn_batches 0``: the moving averages as the steps leave them (the next test: recomputed at the end)."""
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    p2 = run_mpi(2, train_args(two, "--batch_size", "4", "--norm", "batch", "--bn_batches", "0", *FROZEN))
    assert p2.returncode == 0, p2.stderr[-3000:]
    p1 = run_mpi(1, train_args(one, "--batch_size", "8", "--norm", "batch", "--bn_batches", "0", *FROZEN))
    assert p1.returncode == 0, p1.stderr[-3000:]
    assert re.search(r"weights: identical on 2 ranks", p2.stdout), p2.stdout
    from unet.model import build_unet
    names = [v.path for v in build_unet(32, 32, 4, 3, norm="batch", dropout=0.0).variables]
    m2, m1 = model_arrays(two), model_arrays(one)
    assert len(m2) == len(m1) == len(names)
    i = names.index("norm1a/moving_mean")
    # 4 steps of m <- 0.9 m + 0.1 batch mean from 0: about a third of the batches' mean, nowhere near 0
    assert np.abs(m1[i]).max() > 1e-3
    # the same sums in another grouping (2 x 4 pixels' sums then averaged, against 8): float32 rounding of a
    # mean over 8 x 32 x 32 values, a few units of 1e-7 of the values' scale
    np.testing.assert_allclose(m2[i], m1[i], rtol=1e-4, atol=1e-6)
    j = names.index("norm1a/moving_variance")
    assert not np.allclose(m2[j], 1.0) and not np.allclose(m1[j], 1.0)     # the variances moved as well


def test_batch_norm_statistics_are_recomputed_at_the_epochs_end_from_its_first_batches_on_every_rank(tmp_path):
    """--bn_batches 2: after the epoch (4 steps) every batch normalisation layer's moving mean and variance
    are the mean, over 2 ranks x the epoch's first 2 batches of 4, unaugmented (training augments them), of
    that layer's input statistics at the epoch's final weights, not the moving averages of the steps.
    Recomputed here from the checkpoint's weights and the same batches: the first layer's input is a
    convolution of the raw slices (computed without any normalisation), the last layer's comes through every
    layer before it in training mode."""
    import keras

    from unet.data.pipeline import train_dataset
    from unet.data.sources import SyntheticSource
    from unet.model import build_unet
    from unet.training.checkpoint import load_checkpoint

    logdir = str(tmp_path / "r")
    augmented = [f for f in FROZEN if f != "--no_augment"]
    p = run_mpi(2, train_args(logdir, "--norm", "batch", "--bn_batches", "2", *augmented))
    assert p.returncode == 0, p.stderr[-3000:]
    assert re.search(r"weights: identical on 2 ranks", p.stdout), p.stdout
    assert "steps/epoch=4" in p.stdout
    model = build_unet(32, 32, 1, 1, norm="batch", dropout=0.0)
    (ckpt,) = glob.glob(os.path.join(logdir, "checkpoints", "ckpt-*.npz"))
    load_checkpoint(ckpt, model=model, optimizer=None)
    bns = [l for l in model.layers if type(l).__name__ == "BatchNormalization"]
    saved = [(l.moving_mean.numpy().copy(), l.moving_variance.numpy().copy()) for l in bns]
    first, last = bns[0], bns[-1]
    conv = keras.Model(model.inputs, first.input)        # conv1a: no normalisation before it
    deep = keras.Model(model.inputs, last.input)
    src = SyntheticSource(32, 32, 1, 1, 5, "train")       # FROZEN's --seed 5, the trainer's --synthetic images
    stats = {0: [], -1: []}
    for rank in range(2):
        batches, n = train_dataset(src, batch_size=4, rank=rank, size=2, epoch=0, seed=5, cap=2, augment_on=False)
        assert n == 2
        for x, _ in batches:
            for key, h in ((0, conv(x).numpy().astype(np.float64)), (-1, deep(x, training=True).numpy())):
                stats[key].append((h.mean(axis=(0, 1, 2)), h.var(axis=(0, 1, 2))))
    for key in (0, -1):
        mean = np.mean([m for m, _ in stats[key]], axis=0)
        var = np.mean([v for _, v in stats[key]], axis=0)
        # float32 sums over 4 x 32 x 32 pixels in another order: a few units of 1e-7 of the values' scale
        # (the last layer's input through 17 layers of float32 convolutions: more, still far below 1e-4);
        # the moving averages the steps leave, 4 steps from (0, 1) at momentum 0.9, are ~0.34 of the mean
        np.testing.assert_allclose(saved[key][0], mean, rtol=1e-4, atol=1e-5 * float(np.abs(mean).max()))
        np.testing.assert_allclose(saved[key][1], var, rtol=1e-4, atol=1e-5 * float(var.max()))
