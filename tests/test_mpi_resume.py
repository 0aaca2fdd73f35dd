"""Checkpoints and resume: a 2-rank run killed mid-training and rerun lands where an uninterrupted run does."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import HANG, ROOT, mpi_env, run_mpi, train_args
from h5fixture import write_h5

pytestmark = pytest.mark.mpi
FLAGS = ["--loss", "bce", "--dropout", "0", "--epochs", "2", "--checkpoint_every", "2", "--no_validation",
         "--seed", "11"]                                   # augmentation stays on


def weights(path):
    with np.load(path) as z:
        return [z[k] for k in sorted(z.files) if k[0] == "m" and k[1:].isdigit()]


SAMPLING = {"plain": [], "oversampled": ["--foreground_fraction", "0.5"],
            "fresh_background": ["--background_fraction", "0.5"]}


def run_args(logdir, data, sampling):
    """train_args, or the same run on an HDF5 file where a third of the 32 training slices hold
    tumour: ``oversampled``, 2 of every batch of 4 drawn from them; ``fresh_background``, each epoch
    every tumour slice and half of the others, drawn anew (11 + 11 slices: 3 steps an epoch)."""
    if sampling == "plain":
        return train_args(logdir, *FLAGS)
    return [os.path.join(ROOT, "train_hvd.py"), "--logdir", logdir, "--data", data, "--batch_size", "4",
            "--export", "none", *SAMPLING[sampling], *FLAGS]


def last_step(logdir):
    return max(int(f[5:13]) for f in os.listdir(os.path.join(logdir, "checkpoints")) if f.startswith("ckpt-"))


@pytest.mark.parametrize("oversampled", list(SAMPLING))
def test_killed_run_resumes_to_the_same_weights(tmp_path, oversampled):
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    data = write_h5(str(tmp_path / "d.h5"), n_train=32, tumour_every=3)
    p = run_mpi(2, run_args(full, data, oversampled))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "resumed" not in p.stdout
    end = last_step(full)
    assert end == {"fresh_background": 6}.get(oversampled, 8)          # 2 epochs of 4 (or 3) steps

    cmd = ["mpirun", "-np", "2", "--oversubscribe", sys.executable, *run_args(cut, data, oversampled)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=mpi_env(),
                            cwd=ROOT, start_new_session=True)
    first = os.path.join(cut, "checkpoints", "ckpt-00000002.npz")
    deadline = time.time() + HANG
    while not os.path.exists(first) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)                      # the whole job, mid-training
    proc.wait(timeout=60)
    assert os.path.exists(first)
    done = sorted(os.listdir(os.path.join(cut, "checkpoints")))
    assert f"ckpt-{end:08d}.npz" not in done, "killed too late to test anything"

    again = run_mpi(2, run_args(cut, data, oversampled))       # the same command again
    assert again.returncode == 0, again.stderr[-2000:]
    resumed = [l for l in again.stdout.splitlines() if l.startswith("resumed from step ")]
    assert len(resumed) == 1 and 2 <= int(resumed[0].split()[3]) < end    # an every-2 or an epoch-end one
    a = weights(os.path.join(full, "checkpoints", f"ckpt-{end:08d}.npz"))
    b = weights(os.path.join(cut, "checkpoints", f"ckpt-{end:08d}.npz"))
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_fresh_ignores_and_resume_names_a_checkpoint(tmp_path):
    logdir = str(tmp_path / "l")
    assert run_mpi(2, train_args(logdir, "--epochs", "1")).returncode == 0
    again = run_mpi(2, train_args(logdir, "--epochs", "1", "--fresh"))
    assert again.returncode == 0 and "resumed" not in again.stdout
    bad = run_mpi(2, train_args(logdir, "--resume", str(tmp_path / "none.npz")))
    assert bad.returncode == 2 and f"--resume {tmp_path / 'none.npz'}: no such checkpoint file" in bad.stderr


def test_checkpoint_of_another_model_is_refused_on_every_rank(tmp_path):
    logdir = str(tmp_path / "l")
    assert run_mpi(2, train_args(logdir, "--epochs", "1")).returncode == 0
    (ckpt,) = [f for f in os.listdir(os.path.join(logdir, "checkpoints")) if f.startswith("ckpt-")]
    other = run_mpi(2, train_args(str(tmp_path / "o"), "--synthetic_channels", "3", "--resume",
                                  os.path.join(logdir, "checkpoints", ckpt)))
    assert other.returncode == 2
    errs = [l for l in other.stderr.splitlines() if l.startswith("train_hvd.py: error:")]
    assert len(errs) == 1 and "checkpoint of another model" in errs[0]


def test_checkpoint_on_data_of_another_size_is_refused(tmp_path):
    logdir = str(tmp_path / "l")
    assert run_mpi(2, train_args(logdir, "--epochs", "1")).returncode == 0   # 32x32 images
    bigger = train_args(logdir, "--epochs", "2")
    bigger[bigger.index("--synthetic_size") + 1] = "64"   # same weights fit, the data does not
    p = run_mpi(2, bigger)
    assert p.returncode == 2
    errs = [l for l in p.stderr.splitlines() if l.startswith("train_hvd.py: error:")]
    assert len(errs) == 1 and "trained on 32x32x1 -> 1 region(s), but --synthetic data is 64x64x1" in errs[0]
