"""The launch scripts start real ranks: mpirun with socket/core binding, horovodrun with Gloo and MPI."""
import os
import subprocess

import pytest

from conftest import ROOT, mpi_env

pytestmark = pytest.mark.mpi
TINY = ["--synthetic", "--synthetic_size", "32", "--synthetic_train", "32", "--batch_size", "4", "--epochs", "1"]


def run(script, *args):
    return subprocess.run([os.path.join(ROOT, "scripts", script), *args], capture_output=True, text=True,
                          timeout=300, env=mpi_env())


def test_mpirun_launcher_binds_and_trains(tmp_path):
    p = run("launch_mpirun.sh", "--np", "2", "--", *TINY, "--logdir", str(tmp_path / "l"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "bound to" in p.stderr or "MCW rank" in p.stderr          # --report-bindings
    ranks = sorted(l for l in p.stdout.splitlines() if "rank " in l and " intra " in l)
    assert len(ranks) == 2 and all("(1) intra 1 inter 1 KMP_BLOCKTIME 0" in l for l in ranks)  # one core each
    assert "weights: identical on 2 ranks" in p.stdout


@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_horovodrun_launcher(tmp_path, controller):
    timeline = tmp_path / "timeline.json"
    p = run("launch_horovodrun.sh", "--np", "2", "--controller", controller, "--timeline-filename", str(timeline),
            "--", *TINY, "--logdir", str(tmp_path / "l"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "weights: identical on 2 ranks" in p.stdout
    assert timeline.exists() and "ALLREDUCE" in timeline.read_text()


@pytest.mark.parametrize("launcher,controller", [("launch_mpirun.sh", None), ("launch_horovodrun.sh", "gloo"),
                                                 ("launch_horovodrun.sh", "mpi")])
def test_a_killed_rank_ends_a_launched_job_fast_and_is_named(tmp_path, launcher, controller):
    """SIGKILL one rank of a job started by a shipped launch script: the job ends within 60 s,
    non-zero, with a message naming the rank and its host."""
    import signal
    import time
    logdir = tmp_path / "l"
    args = ["--np", "2"] + (["--controller", controller] if controller else [])
    proc = subprocess.Popen([os.path.join(ROOT, "scripts", launcher), *args, "--", *TINY, "--epochs", "100",
                             "--log_every", "1", "--logdir", str(logdir)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=mpi_env(), start_new_session=True)
    try:
        log = logdir / "training.log"
        deadline = time.time() + 180
        while time.time() < deadline and not (log.exists() and log.stat().st_size > 0):
            time.sleep(0.2)
        victim = None
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read()
                env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            except OSError:
                continue
            if b"train_hvd.py" in cmd and str(logdir).encode() in cmd and \
                    (b"OMPI_COMM_WORLD_RANK=1" in env or b"HOROVOD_RANK=1" in env):
                victim = int(pid)
        assert victim, "rank 1 not found"
        t0 = time.time()
        os.kill(victim, signal.SIGKILL)
        out, err = proc.communicate(timeout=120)
        took = time.time() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    print(f"{launcher} {controller or ''}: job ended {took:.1f} s after rank 1 was killed")
    host = os.uname().nodename
    assert proc.returncode != 0 and took < 60
    named = (f"rank 1 on host localhost failed (killed by signal 9)" in err if controller == "gloo"
             else "rank 1" in err and f"on node {host}" in err)
    assert named, err[-2000:]
