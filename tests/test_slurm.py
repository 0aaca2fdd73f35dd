"""The sbatch wrapper on a real single-node Slurm (munge, slurmctld, slurmd started here)."""
import os
import re
import shutil
import subprocess
import time

import pytest

from conftest import IN_CI, ROOT, mpi_env

pytestmark = pytest.mark.mpi
NEEDED = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol")


@pytest.fixture
def slurm(tmp_path):
    missing = [b for b in NEEDED if not shutil.which(b) and not os.path.exists(f"/usr/sbin/{b}")]
    if missing or os.geteuid() != 0:
        why = f"Slurm not available ({', '.join(missing) or 'not root'})"
        if IN_CI:
            pytest.fail(why + " under CI=true: scripts/setup.sh installs slurm-wlm and munge")
        pytest.skip(why)
    d = tmp_path / "slurm"
    script = os.path.join(ROOT, "scripts", "slurm", "local_cluster.sh")
    start = subprocess.run([script, "start", str(d)], capture_output=True, text=True, timeout=120)
    try:
        assert start.returncode == 0, start.stdout + start.stderr
        yield d
    finally:
        subprocess.run([script, "stop", str(d)], capture_output=True, timeout=60)


def test_sbatch_wrapper_trains_on_real_slurm(slurm, tmp_path):
    env = mpi_env(SLURM_CONF=str(slurm / "slurm.conf"), UNET_HVD_ROOT=ROOT, LOGDIR=str(tmp_path / "logs"),
                  TB_PORT="16116")
    out = tmp_path / "job.out"
    sub = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--ntasks-per-socket=2",
                          "--cpus-per-task=1", f"--output={out}", "--time=00:10:00",
                          os.path.join(ROOT, "scripts", "slurm", "train_hvd.sbatch"),
                          "--synthetic", "--synthetic_size", "32", "--synthetic_train", "32",
                          "--batch_size", "4", "--epochs", "1"],
                         capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=60)
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().split(";")[0]
    deadline, state = time.time() + 300, ""
    while time.time() < deadline:
        show = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, env=env).stdout
        state = re.search(r"JobState=(\w+)", show).group(1) if "JobState=" in show else ""
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            break
        time.sleep(2)
    log = out.read_text() if out.exists() else ""
    assert state == "COMPLETED" and "ExitCode=0:0" in show, log[-3000:]
    assert "weights: identical on 2 ranks" in log
    assert "ssh -N -L 16116:127.0.0.1:16116" in log           # the tunnel to TensorBoard is printed
    logs = tmp_path / "logs"
    assert (logs / "training.log").is_file() and (logs / "model.keras").is_file()
    assert list((logs / "checkpoints").glob("ckpt-*.npz"))
    assert list((logs / "train").glob("events.out.tfevents.*"))
