"""The launch scripts start real ranks: mpirun with socket/core binding, horovodrun with Gloo and MPI."""
import os
import subprocess

import pytest
from conftest import HANG, ROOT, mpi_env, signal_rank_once_training

pytestmark = pytest.mark.mpi
TINY = ["--synthetic", "--synthetic_size", "32", "--synthetic_train", "32", "--batch_size", "4", "--epochs", "1"]


def run(script, *args):
    return subprocess.run([os.path.join(ROOT, "scripts", script), *args], capture_output=True, text=True,
                          timeout=HANG, env=mpi_env())


def test_mpirun_launcher_binds_and_trains(tmp_path):
    p = run("launch_mpirun.sh", "--np", "2", "--", *TINY, "--dropout", "0.2", "--logdir", str(tmp_path / "l"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "bound to" in p.stderr or "MCW rank" in p.stderr          # --report-bindings
    ranks = sorted(l for l in p.stdout.splitlines() if "rank " in l and " intra " in l)
    assert len(ranks) == 2 and all("(1) cores 1 intra 1 inter 1 KMP_BLOCKTIME 0" in l for l in ranks)  # one core each
    # same weights, but each rank drops its own units (dropout seeds are not broadcast)
    assert "weights: identical on 2 ranks" in p.stdout and "dropout: 2 distinct random streams" in p.stdout


@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_horovodrun_launcher(tmp_path, controller):
    timeline = tmp_path / "timeline.json"
    p = run("launch_horovodrun.sh", "--np", "2", "--controller", controller, "--timeline-filename", str(timeline),
            "--", *TINY, "--logdir", str(tmp_path / "l"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "weights: identical on 2 ranks" in p.stdout
    assert timeline.exists() and "ALLREDUCE" in timeline.read_text()
    ranks = [l for l in p.stdout.splitlines() if "rank " in l and " intra " in l]
    assert len(ranks) == 2, p.stdout[-2000:]
    if controller == "mpi":       # bound as launch_mpirun.sh binds: one core each, and mpirun reports it
        assert "bound to" in p.stderr or "MCW rank" in p.stderr
        assert all("(1) cores 1 intra 1 " in l for l in ranks), ranks
    else:                         # Gloo cannot bind: both ranks see every CPU and split its cores
        ncpu = len(os.sched_getaffinity(0))
        assert all(f"({ncpu}) cores " in l for l in ranks), ranks


@pytest.mark.parametrize("launcher,controller", [("launch_mpirun.sh", None), ("launch_horovodrun.sh", "gloo"),
                                                 ("launch_horovodrun.sh", "mpi")])
def test_a_killed_rank_ends_a_launched_job_fast_and_is_named(tmp_path, launcher, controller):
    """SIGKILL one rank of a job started by a shipped launch script: the job ends within 60 s,
    non-zero, with a message naming the rank and its host."""
    import signal
    logdir = str(tmp_path / "l")
    args = ["--np", "2"] + (["--controller", controller] if controller else [])
    cmd = [os.path.join(ROOT, "scripts", launcher), *args, "--", *TINY, "--epochs", "100",
           "--log_every", "1", "--logdir", logdir]
    rc, out, err, took = signal_rank_once_training(cmd, logdir, signal.SIGKILL)
    print(f"{launcher} {controller or ''}: job ended {took:.1f} s after rank 1 was killed")
    assert rc != 0 and took < 60
    named = ("rank 1 on host localhost failed (killed by signal 9)" in err if controller == "gloo"
             else "rank 1" in err and f"on node {os.uname().nodename}" in err)
    assert named, err[-2000:]
