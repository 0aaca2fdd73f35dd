"""Measuring the performance targets (used by ``scripts/perf_targets.py``).

* the trainer's steady rate from the img/s of its ``training.log`` windows;
* a child process's wall time, peak resident memory (``wait4``'s ru_maxrss) and the
  CPU that other processes used meanwhile (/proc/stat busy time minus the child's);
* the input pipeline on its own, without training:
  ``python -m unet.perf.measure pipeline --data FILE.h5 [--batch_size 8] [--batches 40] [--no_augment]``
  prints ``pipeline: img_per_sec=X batches=N batch_size=B augment=0|1``.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

STEP_LINE = re.compile(r"^step (\d+) epoch \d+ .* img/s ([\d.]+)$", re.M)


def log_rates(text: str) -> list[tuple[int, float]]:
    """(step, img/s) of every step line of a training.log, in order."""
    return [(int(s), float(r)) for s, r in STEP_LINE.findall(text)]


def steady_rate(rates: list[float]) -> dict:
    """Windows after the first (which holds tracing and start-up): images over time, and the median.

    Windows of equal size: total images / total time is the harmonic mean of their rates.
    """
    after = [r for r in rates[1:] if r > 0]
    if not after:
        raise ValueError("need at least two logged windows")
    return {"rate": statistics.harmonic_mean(after), "median": statistics.median(after), "windows": len(after)}


def cpu_mhz(cpuinfo: str) -> float:
    """Highest 'cpu MHz' of /proc/cpuinfo text (0 if none)."""
    found = [float(m) for m in re.findall(r"^cpu MHz\s*:\s*([\d.]+)", cpuinfo, re.M)]
    return max(found, default=0.0)


def cpu_busy_seconds(stat: str, ticks_per_second: int = 100) -> float:
    """CPU seconds spent busy by all CPUs, from the first ('cpu') line of /proc/stat."""
    v = [int(x) for x in stat.split("\n", 1)[0].split()[1:]]
    busy = sum(v[:8]) - v[3] - v[4]  # user nice system idle iowait irq softirq steal: all but idle, iowait
    return busy / ticks_per_second


def _busy_now() -> float:
    with open("/proc/stat") as f:
        return cpu_busy_seconds(f.read(), os.sysconf("SC_CLK_TCK"))


@dataclass
class Child:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    maxrss_mb: float     # peak resident set of the child (or of its largest waited-for descendant)
    others_cores: float  # CPUs other processes kept busy on average while it ran


def run_child(cmd: list[str], *, env: dict | None = None, cwd: str | None = None, timeout: float = 1800) -> Child:
    """Run one process to its end; peak RSS and CPU from ``wait4`` on it (itself and children it reaped)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        busy0, t0 = _busy_now(), time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=cwd, start_new_session=True)
        deadline = t0 + timeout
        while True:
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                os.killpg(p.pid, signal.SIGKILL)
                pid, status, usage = os.wait4(p.pid, 0)
                break
            time.sleep(0.05)
        seconds, busy = time.perf_counter() - t0, _busy_now() - busy0
        others = max(busy - usage.ru_utime - usage.ru_stime, 0.0) / seconds
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Child(p.returncode, out.read(), err.read(), seconds, usage.ru_maxrss / 1024, others)


def pipeline_rate(path: str, *, batch_size: int, batches: int, augment: bool = True, seed: int = 816) -> float:
    """img/s of ``pipeline.train_dataset`` over the train split of ``path`` (1 rank),
    timed from the first batch to the last, epochs chained until ``batches`` more arrived."""
    from unet.data.pipeline import train_dataset
    from unet.data.sources import H5Source
    src = H5Source(path, "train")
    seen, t0, epoch = -1, None, 0
    while seen < batches:
        ds, _ = train_dataset(src, batch_size=batch_size, rank=0, size=1, epoch=epoch, seed=seed,
                              augment_on=augment)
        for x, _y in ds:
            seen += 1
            if t0 is None:
                t0 = time.perf_counter()
            if seen == batches:
                break
        epoch += 1
    return batches * batch_size / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m unet.perf.measure", description="Time the input pipeline alone.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("pipeline", help="iterate train_dataset over an HDF5 file without training")
    pp.add_argument("--data", required=True)
    pp.add_argument("--batch_size", type=int, default=8)
    pp.add_argument("--batches", type=int, default=40, help="timed batches (after the first)")
    pp.add_argument("--no_augment", action="store_true")
    a = ap.parse_args(argv)
    rate = pipeline_rate(a.data, batch_size=a.batch_size, batches=a.batches, augment=not a.no_augment)
    print(f"pipeline: img_per_sec={rate:.2f} batches={a.batches} batch_size={a.batch_size} "
          f"augment={int(not a.no_augment)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
