"""A rank killed mid-training ends the whole job quickly, naming the rank and host; no rank spins."""
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, mpi_env, train_args

pytestmark = pytest.mark.mpi


def rank_pid(marker: str, rank: int) -> int | None:
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
            env = open(f"/proc/{pid}/environ", "rb").read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "train_hvd.py" in cmd and marker in cmd and f"OMPI_COMM_WORLD_RANK={rank}" in env:
            return int(pid)
    return None


def test_sigkill_of_one_rank_ends_the_job_within_60_s(tmp_path):
    logdir = str(tmp_path / "logs")
    cmd = ["mpirun", "-np", "2", "--oversubscribe", sys.executable,
           *train_args(logdir, "--epochs", "100", "--log_every", "1")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=mpi_env(),
                            cwd=ROOT, start_new_session=True)
    try:
        log = os.path.join(logdir, "training.log")
        deadline = time.time() + 180
        while time.time() < deadline and not (os.path.exists(log) and os.path.getsize(log) > 0):
            time.sleep(0.2)
        assert os.path.getsize(log) > 0, "training never started"
        victim = rank_pid(logdir, 1)
        assert victim, "rank 1 not found"
        t0 = time.time()
        os.kill(victim, signal.SIGKILL)
        out, err = proc.communicate(timeout=120)
        took = time.time() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    print(f"job ended {took:.1f} s after rank 1 was killed")
    assert proc.returncode != 0 and took < 60
    assert "rank 1" in err and f"on node {os.uname().nodename}" in err and "signal 9" in err
    assert rank_pid(logdir, 0) is None                       # rank 0 is gone too


def test_a_hung_rank_ends_the_job_through_the_watchdog(tmp_path):
    """SIGSTOP (a rank that hangs, not dies): rank 0 waits in the allreduce, its watchdog
    (--step_timeout, 600 s by default, 8 s here) ends it, and mpirun ends the job."""
    logdir = str(tmp_path / "logs")
    cmd = ["mpirun", "-np", "2", "--oversubscribe", sys.executable,
           *train_args(logdir, "--epochs", "100", "--log_every", "1", "--step_timeout", "8")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=mpi_env(),
                            cwd=ROOT, start_new_session=True)
    try:
        log = os.path.join(logdir, "training.log")
        deadline = time.time() + 180
        while time.time() < deadline and not (os.path.exists(log) and os.path.getsize(log) > 0):
            time.sleep(0.2)
        victim = rank_pid(logdir, 1)
        assert victim, "rank 1 not found"
        t0 = time.time()
        os.kill(victim, signal.SIGSTOP)
        out, err = proc.communicate(timeout=120)
        took = time.time() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    print(f"job ended {took:.1f} s after rank 1 was stopped")
    assert proc.returncode != 0 and took < 60, err[-2000:]
    line = [l for l in err.splitlines() if l.startswith("train_hvd.py: error:")]
    # rank 0 names itself; the stopped rank, woken by mpirun's signals, may say the same
    assert line and f"rank 0 on {os.uname().nodename}: no progress for" in line[0] \
        and "a rank is hung" in line[0], err[-2000:]
    assert rank_pid(logdir, 1) is None and rank_pid(logdir, 0) is None   # nobody left behind
