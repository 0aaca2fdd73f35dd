"""A rank killed or stopped mid-training ends the whole job quickly, naming the rank and host; no rank spins."""
import os
import signal
import sys

import pytest

from conftest import rank_pid, signal_rank_once_training, train_args

pytestmark = pytest.mark.mpi


def test_sigkill_of_one_rank_ends_the_job_within_60_s(tmp_path):
    logdir = str(tmp_path / "logs")
    cmd = ["mpirun", "-np", "2", "--oversubscribe", sys.executable,
           *train_args(logdir, "--epochs", "100", "--log_every", "1")]
    rc, out, err, took = signal_rank_once_training(cmd, logdir, signal.SIGKILL)
    print(f"job ended {took:.1f} s after rank 1 was killed")
    assert rc != 0 and took < 60
    assert "rank 1" in err and f"on node {os.uname().nodename}" in err and "signal 9" in err
    assert rank_pid(logdir, 0) is None                       # rank 0 is gone too


def test_a_hung_rank_ends_the_job_through_the_watchdog(tmp_path):
    """SIGSTOP (a rank that hangs, not dies): rank 0 waits in the allreduce, its watchdog
    (--step_timeout, 600 s by default, 8 s here) ends it, and mpirun ends the job."""
    logdir = str(tmp_path / "logs")
    cmd = ["mpirun", "-np", "2", "--oversubscribe", sys.executable,
           *train_args(logdir, "--epochs", "100", "--log_every", "1", "--step_timeout", "8")]
    rc, out, err, took = signal_rank_once_training(cmd, logdir, signal.SIGSTOP)
    print(f"job ended {took:.1f} s after rank 1 was stopped")
    assert rc != 0 and took < 60, err[-2000:]
    line = [l for l in err.splitlines() if l.startswith("train_hvd.py: error:")]
    # rank 0 names itself; the stopped rank, woken by mpirun's signals, may say the same
    assert line and f"rank 0 on {os.uname().nodename}: no progress for" in line[0] \
        and "a rank is hung" in line[0], err[-2000:]
    assert rank_pid(logdir, 1) is None and rank_pid(logdir, 0) is None   # nobody left behind
