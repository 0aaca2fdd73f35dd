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
