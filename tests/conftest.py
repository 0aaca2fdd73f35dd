"""Shared fixtures: a real ``mpirun`` launcher and the CI dependency gate.

Under CI=true a missing TensorFlow, Horovod (with its TensorFlow ops), MPI, panoptica, the
official brats-evaluation, or an inference engine or exporter (OpenVINO, ONNX Runtime, onnx,
tf2onnx) ends the run with an error; elsewhere the tests that need them are skipped.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IN_CI = os.environ.get("CI", "").lower() == "true"


def _missing_stack() -> list[str]:
    missing = []
    for mod in ("tensorflow", "horovod.tensorflow", "mpi4py", "panoptica", "brats_evaluation"):
        r = subprocess.run([sys.executable, "-c", f"import {mod}"], capture_output=True, text=True,
                           env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
        if r.returncode:
            missing.append(f"{mod} ({(r.stderr.strip().splitlines() or ['?'])[-1]})")
    if shutil.which("mpirun") is None:
        missing.append("mpirun (Open MPI)")
    return missing


MISSING = _missing_stack()
ENGINE_MODULES = ("openvino", "onnxruntime", "onnx", "tf2onnx", "nncf")   # engines, exporters, int8


def _missing_engines() -> list[str]:
    # installed or not, without importing them (tf2onnx would import TensorFlow): a package that is
    # there but broken fails the tests that use it, it does not skip them
    return [f"{mod} (not installed)" for mod in ENGINE_MODULES if importlib.util.find_spec(mod) is None]


MISSING_ENGINES = _missing_engines()


def pytest_sessionstart(session):
    if IN_CI and (MISSING or MISSING_ENGINES):
        pytest.exit("CI=true and the stack is incomplete: " + "; ".join(MISSING + MISSING_ENGINES), returncode=3)


FIRST_MULTI_RANK = "test_mpi_collectives.py"


def pytest_collection_modifyitems(config, items):
    # The collectives smoke (allreduce of known values, broadcast from rank 0) runs
    # before any other test: when it fails, nothing multi-rank can be trusted.
    items.sort(key=lambda item: item.path.name != FIRST_MULTI_RANK)
    if MISSING:
        skip = pytest.mark.skip(reason="stack missing: " + "; ".join(MISSING))
        for item in items:
            if "mpi" in item.keywords or "needs_stack" in item.keywords:
                item.add_marker(skip)
    if MISSING_ENGINES:
        skip = pytest.mark.skip(reason="inference engines missing: " + "; ".join(MISSING_ENGINES))
        for item in items:
            if "needs_engines" in item.keywords:
                item.add_marker(skip)


def mpi_env(**extra) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    env.update(extra)
    return env


# A wait on a job ends with the event it waits for, or when the job ends; HANG only stops a job
# that hangs. (The slowest job of the suite takes about 3 minutes on a 2-core AVX2 box with a busy
# loop on each core: a budget tuned to a fast machine would fail a slow one.)
HANG = 900


def run_mpi(np_: int, argv: list[str], *, timeout: float = HANG, cwd: str | None = None,
            mpi_args: list[str] = (), env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``mpirun -np N python ARGV`` for real; a hang fails the test at ``timeout``."""
    cmd = ["mpirun", "-np", str(np_), "--oversubscribe", *mpi_args, sys.executable, *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd or ROOT,
                          env=env or mpi_env())


@pytest.fixture
def mpirun():
    return run_mpi


def train_args(logdir: str, *extra: str) -> list[str]:
    """Flags for a small, fast, deterministic training run (model.keras only: the exports to the
    inference engines cost ~10 s a run and are tested in test_engines.py)."""
    return [os.path.join(ROOT, "train_hvd.py"), "--logdir", logdir, "--synthetic",
            "--synthetic_size", "32", "--synthetic_train", "32", "--synthetic_val", "8",
            "--batch_size", "4", "--epochs", "1", "--export", "none", *extra]


def rank_pid(marker: str, rank: int) -> int | None:
    """The trainer process of ``rank`` whose command line contains ``marker`` (e.g. its logdir)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "train_hvd.py" in cmd and marker in cmd and \
                (f"OMPI_COMM_WORLD_RANK={rank}" in env or f"HOROVOD_RANK={rank}" in env):
            return int(pid)
    return None


def signal_rank_once_training(cmd: list[str], logdir: str, sig: int, *, rank: int = 1,
                              env: dict | None = None) -> tuple[int, str, str, float]:
    """Start ``cmd`` (a job training into ``logdir``), send ``sig`` to ``rank`` once a step is logged
    and the rank's process is found, and wait for the job to end: (exit code, stdout, stderr,
    seconds from the signal). A job that ends before that fails the test with its output."""
    import signal as signals
    import time
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env or mpi_env(), cwd=ROOT, start_new_session=True)
    try:
        log = os.path.join(logdir, "training.log")
        deadline, victim = time.time() + HANG, None
        while not victim:
            if proc.poll() is not None:
                out, err = proc.communicate()
                raise AssertionError(f"the job ended (exit {proc.returncode}) before rank {rank} trained "
                                     f"a step:\n{out[-1500:]}\n{err[-3000:]}")
            assert time.time() < deadline, f"no step of rank {rank} logged in {HANG} s: the job hangs"
            if os.path.exists(log) and os.path.getsize(log) > 0:
                victim = rank_pid(logdir, rank)
            if not victim:
                time.sleep(0.2)
        t0 = time.time()
        os.kill(victim, sig)
        out, err = proc.communicate(timeout=HANG)
        return proc.returncode, out, err, time.time() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signals.SIGKILL)
            proc.wait()
