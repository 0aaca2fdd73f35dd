"""The sbatch wrapper on a real single-node Slurm (munge, slurmctld, slurmd started here)."""
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest
from conftest import HANG, IN_CI, ROOT, mpi_env

pytestmark = pytest.mark.mpi
NEEDED = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol")
SBATCH = os.path.join(ROOT, "scripts", "slurm", "train_hvd.sbatch")


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


@pytest.mark.parametrize("launch", ["mpirun", "srun"])
def test_sbatch_wrapper_trains_on_real_slurm(slurm, tmp_path, launch):
    """The wrapper's two launch paths: mpirun inside the allocation, and srun --mpi=pmix."""
    env = mpi_env(SLURM_CONF=str(slurm / "slurm.conf"), UNET_HVD_ROOT=ROOT, LOGDIR=str(tmp_path / "logs"),
                  TB_PORT="16116", LAUNCH=launch)
    out = tmp_path / "job.out"
    sub = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--ntasks-per-socket=2",
                          "--cpus-per-task=1", f"--output={out}", "--time=00:20:00",
                          SBATCH,
                          "--synthetic", "--synthetic_size", "32", "--synthetic_train", "32",
                          "--batch_size", "4", "--epochs", "1"],
                         capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=60)
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().split(";")[0]
    deadline, state = time.time() + HANG, ""
    while time.time() < deadline:
        show = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, env=env).stdout
        state = re.search(r"JobState=(\w+)", show).group(1) if "JobState=" in show else ""
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            break
        time.sleep(2)
    log = out.read_text() if out.exists() else ""
    assert state == "COMPLETED" and "ExitCode=0:0" in show, log[-3000:]
    assert "weights: identical on 2 ranks" in log
    assert {"mpirun": "launch: mpirun, 2 ranks", "srun": "launch: srun --mpi=pmix, 2 tasks"}[launch] in log
    # TensorBoard answered on 127.0.0.1 before training started, and the tunnel to it is printed
    up = re.search(r"^tensorboard: up at http://127\.0\.0\.1:16116 \(pid (\d+)\) on \S+ after (\d+) s", log, re.M)
    assert up, log[-3000:]
    print(f"TensorBoard answered {up.group(2)} s after it was started (pid {up.group(1)})")
    assert "ssh -N -L 16116:127.0.0.1:16116" in log
    logs = tmp_path / "logs"
    assert "127.0.0.1:16116" in (logs / "tensorboard.log").read_text()       # its own log: bound to localhost
    assert (logs / "training.log").is_file() and (logs / "model.keras").is_file()
    assert list((logs / "checkpoints").glob("ckpt-*.npz"))
    assert list((logs / "train").glob("events.out.tfevents.*"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ends(pid: int, within: float = 30.0) -> bool:
    """True once ``pid`` is gone or a zombie. A signalled process dies when it next runs, which on a loaded
    machine can be a while after kill() returned: wait for that, up to ``within`` s, instead of looking once."""
    deadline = time.time() + within
    while True:
        try:
            with open(f"/proc/{pid}/status") as fh:
                if "State:\tZ" in fh.read():
                    return True
        except FileNotFoundError:
            return True
        if time.time() > deadline:
            return False
        time.sleep(0.05)


@pytest.mark.parametrize("case", ["exits", "silent", "port_taken"])
def test_sbatch_says_when_tensorboard_is_not_up(tmp_path, case):
    """Outside Slurm (the script run by hand), with a stand-in TensorBoard and trainer: a
    TensorBoard that dies, one that never answers, or a port someone else holds each give one
    honest line, no tunnel, and the job still runs."""
    root = tmp_path / "root"
    (root / ".venv" / "bin").mkdir(parents=True)
    tb = root / ".venv" / "bin" / "tensorboard"
    pidfile = tmp_path / "tb.pid"
    tb.write_text("#!/bin/sh\necho 'tensorboard: broken' >&2\nexit 3\n" if case == "exits"
                  else f"#!/bin/sh\necho $$ > {pidfile}\nexec sleep 60\n")
    tb.chmod(0o755)
    (root / ".venv" / "bin" / "python").symlink_to(sys.executable)
    (root / "train_hvd.py").write_text("print('trained')\n")
    port, logdir = free_port(), tmp_path / "logs"
    holder = socket.socket()
    if case == "port_taken":
        holder.bind(("127.0.0.1", port))
        holder.listen()
    env = mpi_env(UNET_HVD_ROOT=str(root), LOGDIR=str(logdir), TB_PORT=str(port), TB_WAIT="1")
    env.pop("SLURM_JOB_NODELIST", None)
    t0 = time.time()
    with holder:
        p = subprocess.run(["bash", SBATCH], capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=60)
    assert p.returncode == 0 and p.stdout.count("trained") == 2 and "unet-hvd: done" in p.stdout, p.stdout + p.stderr
    assert "ssh -N -L" not in p.stdout and "tensorboard: up" not in p.stdout
    expected = {
        "exits": f"tensorboard: NOT up on 127.0.0.1:{port} after 0 s (it exited with code 3); "
                 f"see {logdir}/tensorboard.log",
        "silent": f"tensorboard: NOT up on 127.0.0.1:{port} after 1 s (still not answering); "
                  f"see {logdir}/tensorboard.log",
        "port_taken": f"tensorboard: not started: something already answers on 127.0.0.1:{port} (set TB_PORT)",
    }[case]
    assert expected in p.stdout.splitlines(), p.stdout
    assert time.time() - t0 < 30                       # the wait is bounded by TB_WAIT
    if case == "exits":
        assert "tensorboard: broken" in (logdir / "tensorboard.log").read_text()
    if case == "silent":        # the stand-in was stopped when the job ended (gone, or a zombie not yet reaped)
        assert ends(int(pidfile.read_text())), "the stand-in TensorBoard outlived the job"
