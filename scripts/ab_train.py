#!/usr/bin/env python3
"""Interleaved A/B of the real trainer: two git revisions, or two environments, or two sets of flags.

    .venv/bin/python scripts/ab_train.py --a_env UNET_MALLOC=system --b_env UNET_MALLOC=tcmalloc
    .venv/bin/python scripts/ab_train.py --a_rev main --b_rev HEAD --repeats 3 --steps 40
    .venv/bin/python scripts/ab_train.py --a_args "--num_inter_threads 2" --b_args "--num_inter_threads 1"

Each run is the demo's training (``scripts/demo.sh``'s mpirun line: 2 ranks, batch 4 per rank,
rate 0.0001, on the demo's converted cases: 8 synthetic cases by unet-synth, unet-convert
--size 128 --slices tumour, made under runs/ab/ when missing) for ``--steps`` steps, one epoch,
``--no_validation --export none``. Runs go A B A B ... (``--repeats`` pairs) so a change of the
machine's load hits both. Per run it prints:

* img/s: images over time of the training.log windows after the first (``--log_every`` steps each;
  the first holds the tracing);
* kernel share of the ranks' CPU time during the training steps (``/proc/PID/stat`` of both ranks,
  sampled when the first and the last step line appear), their minor page faults per second and
  rank, and how busy the ranks kept their cores; the kernel share of the whole run (``wait4``);
* the load average before and after, and the cores that other processes kept busy meanwhile;
* the sha256 prefix of the final weights the trainer prints (same arithmetic: same digest);
* GFLOP/s and the share of the fp32 peak measured on as many cores as ranks (``unet/perf/peak.py``,
  the AVX2 kernel when ``--isa AVX2``), best of the measurements taken between the runs.

and at the end the medians per variant and B/A, the ratio of the medians. ``--isa AVX2`` (default)
runs both with ``ONEDNN_MAX_CPU_ISA=AVX2``, as on the project's AVX2 machines; ``--isa native``
lets oneDNN use all the CPU has. A revision is exported with ``git archive`` into a temporary
folder and run with this checkout's .venv (its ``unet`` package first on the path).
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from unet.perf import flops, peak  # noqa: E402
from unet.perf.measure import _busy_now, log_rates, steady_rate  # noqa: E402

DIGEST = re.compile(r"weights: identical on \d+ ranks \(sha256 ([0-9a-f]+)\)")


@dataclass
class Variant:
    label: str
    root: str                      # checkout whose train_hvd.py runs
    env: dict
    args: list
    np: int = 2
    batch_size: int = 4
    mpirun_args: list = field(default_factory=list)
    runs: list = field(default_factory=list)


def parse_env(items: list[str], flag: str, prog: str = "ab_train.py") -> dict:
    """NAME=VALUE items of ``flag`` as a dict; a malformed one ends the script with ``prog: error: ...``."""
    env = {}
    for item in items:
        key, eq, val = item.partition("=")
        if not eq or not key:
            raise SystemExit(f"{prog}: error: {flag} {item}: expected NAME=VALUE")
        env[key] = val
    return env


def export_rev(rev: str, into: str) -> str:
    """``git archive`` of ``rev`` into a new folder under ``into``; returns it."""
    sha = subprocess.run(["git", "-C", ROOT, "rev-parse", "--verify", f"{rev}^{{commit}}"], capture_output=True,
                         text=True)
    if sha.returncode:
        raise SystemExit(f"ab_train.py: error: revision {rev!r}: {sha.stderr.strip()}")
    dest = os.path.join(into, f"rev-{sha.stdout.strip()[:10]}")
    if not os.path.isdir(dest):
        os.makedirs(dest)
        archive = subprocess.Popen(["git", "-C", ROOT, "archive", sha.stdout.strip()], stdout=subprocess.PIPE)
        subprocess.run(["tar", "-x", "-C", dest], stdin=archive.stdout, check=True)
        archive.wait()
    return dest


def make_data(path: str, py: str) -> None:
    """The demo's cases and conversion (scripts/demo.sh), written next to ``path``."""
    out = os.path.dirname(os.path.abspath(path))
    cases = os.path.join(out, "cases")
    print(f"ab_train: writing the demo's data to {path}", flush=True)
    subprocess.run([py, "-m", "unet.data.synth", "--out", cases, "--cases", "8", "--seed", "0", "--workers", "2"],
                   check=True, cwd=ROOT)
    subprocess.run([py, "-m", "unet.data.convert", "--input", cases, "--output", path, "--size", "128",
                    "--workers", "2", "--slices", "tumour"], check=True, cwd=ROOT)


def proc_stat(pid: int) -> tuple[float, float, int] | None:
    """(user s, system s, minor faults) of a process and all its threads, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    return int(rest[11]) / tick, int(rest[12]) / tick, int(rest[7])


def rank_pids(launcher: int) -> list[int]:
    """Processes running train_hvd.py among the launcher's descendants."""
    found, todo = [], [launcher]
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                kids = [int(k) for k in f.read().split()]
        except OSError:
            continue
        for k in kids:
            try:
                with open(f"/proc/{k}/cmdline", "rb") as f:
                    if b"train_hvd.py" in f.read():
                        found.append(k)
                        continue
            except OSError:
                pass
            todo.append(k)
    return sorted(found)


def snapshot(pids: list[int]) -> dict:
    return {p: s for p in pids if (s := proc_stat(p)) is not None}


def step_cpu(first: dict, last: dict, seconds: float) -> dict:
    """Kernel share, faults and core use of the ranks between two snapshots. Pure."""
    pids = [p for p in first if p in last]
    user = sum(last[p][0] - first[p][0] for p in pids)
    sys_ = sum(last[p][1] - first[p][1] for p in pids)
    faults = sum(last[p][2] - first[p][2] for p in pids)
    n = max(len(pids), 1)
    return {"kernel_share": sys_ / max(user + sys_, 1e-9), "cpu_s": user + sys_,
            "minflt_per_s_rank": faults / max(seconds, 1e-9) / n,
            "busy_per_rank": (user + sys_) / max(seconds, 1e-9) / n}


def cores_of(v: Variant) -> int:
    """Cores the variant's ranks use: ranks x --num_threads when given, else one each."""
    threads = [int(x) for f, x in zip(v.args, v.args[1:]) if f == "--num_threads" and x.isdigit()]
    return v.np * (threads[-1] if threads and threads[-1] > 0 else 1)


def train_cmd(a, v: Variant, logdir: str) -> list[str]:
    py = os.path.join(ROOT, ".venv", "bin", "python")
    return (["mpirun", "-np", str(v.np), "--oversubscribe", *v.mpirun_args, py,
             os.path.join(v.root, "train_hvd.py"), "--data", os.path.abspath(a.data), "--batch_size", str(v.batch_size),
             "--learningrate", "0.0001", "--epochs", "1", "--steps_per_epoch", str(a.steps), "--no_validation",
             "--export", "none", "--log_every", str(a.log_every), "--image_every", "100000", "--logdir", logdir]
            + v.args)


def run_once(a, v: Variant, logdir: str) -> dict:
    env = dict(os.environ, **a.common_env, **v.env)
    env["PYTHONPATH"] = v.root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    log = os.path.join(logdir, "training.log")
    load0, busy0, t0 = os.getloadavg()[0], _busy_now(), time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        p = subprocess.Popen(train_cmd(a, v, logdir), stdout=out, stderr=subprocess.STDOUT, env=env, cwd=v.root)
        pids, seen, first, last = [], 0, None, None
        while True:
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if len(pids) < v.np:
                pids = rank_pids(p.pid)
            logged = log_rates(open(log).read()) if os.path.exists(log) else []
            if len(logged) > seen:     # a step line appeared: sample the ranks now
                seen = len(logged)
                snap = (time.perf_counter(), snapshot(pids), logged[-1][0])
                first, last = (first or snap), snap
            time.sleep(0.05)
        wall, busy = time.perf_counter() - t0, _busy_now() - busy0
        out.seek(0)
        text = out.read()
    rc = os.waitstatus_to_exitcode(status)
    if rc:
        raise SystemExit(f"ab_train.py: error: run of {v.label} exited {rc}:\n{text[-3000:]}")
    cpu = usage.ru_utime + usage.ru_stime
    rates = [r for _, r in log_rates(open(log).read())]
    r = {"img_s": steady_rate(rates)["rate"], "windows": len(rates) - 1, "wall": wall,
         "run_kernel_share": usage.ru_stime / max(cpu, 1e-9), "run_cpu_s": cpu,
         "others_cores": max(busy - cpu, 0.0) / wall, "load": (load0, os.getloadavg()[0]),
         "sha": (DIGEST.findall(text) or ["?"])[-1]}
    if first and last and last[0] > first[0]:
        r.update(step_cpu(first[1], last[1], last[0] - first[0]))
        # images per CPU-second of the ranks, times the ranks: the rate if each had its core to itself
        r["img_s_cpu"] = (last[2] - first[2]) * v.batch_size * v.np / max(r["cpu_s"], 1e-9) * cores_of(v)
    return r


def describe(label: str, i: int, r: dict, gflop_per_img: float, peak_gflops: float | None) -> str:
    g = r["img_s"] * gflop_per_img
    share = (f", {r['img_s_cpu'] * gflop_per_img / peak_gflops:.0%} of the peak per CPU-s"
             if peak_gflops and "img_s_cpu" in r else "")
    steps = (f"{r['img_s_cpu']:.2f} img/s per CPU-s{share}; kernel {r['kernel_share']:.1%} of "
             f"{r['cpu_s']:.0f} CPU-s in steps, "
             f"{r['minflt_per_s_rank']:,.0f} minflt/s/rank, ranks busy {r['busy_per_rank']:.2f} cores each; "
             if "kernel_share" in r else "")
    return (f"run {i} {label}: {r['img_s']:.2f} img/s ({r['windows']} windows), {g:.1f} GFLOP/s; "
            f"{steps}whole run kernel {r['run_kernel_share']:.1%} of {r['run_cpu_s']:.0f} CPU-s, "
            f"wall {r['wall']:.0f} s; "
            f"load {r['load'][0]:.2f}->{r['load'][1]:.2f}, others {r['others_cores']:.2f} cores; sha256 {r['sha']}")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ab_train.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    for s in ("a", "b"):
        ap.add_argument(f"--{s}_rev", default=None, help=f"git revision for {s.upper()} (default: this checkout)")
        ap.add_argument(f"--{s}_env", action="append", default=[], metavar="NAME=VALUE",
                        help=f"environment of {s.upper()}'s runs (repeatable)")
        ap.add_argument(f"--{s}_args", default="", help=f"extra train_hvd.py flags of {s.upper()} (one string)")
        ap.add_argument(f"--{s}_label", default=s.upper(), help="name printed for it (default: %(default)s)")
        ap.add_argument(f"--{s}_np", type=int, default=0, help=f"ranks of {s.upper()} (default: --np)")
        ap.add_argument(f"--{s}_batch_size", type=int, default=0,
                        help=f"batch per rank of {s.upper()} (default: --batch_size)")
        ap.add_argument(f"--{s}_mpirun_args", default=None,
                        help=f"mpirun options of {s.upper()} (default: --mpirun_args)")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="environment of every run")
    ap.add_argument("--isa", choices=("AVX2", "native"), default="AVX2",
                    help="AVX2: ONEDNN_MAX_CPU_ISA=AVX2 in every run and the AVX2 peak; native: oneDNN's "
                         "own choice and the CPU's widest vectors (default: %(default)s)")
    ap.add_argument("--data", default=os.path.join(ROOT, "runs", "ab", "brats.h5"),
                    help="converted HDF5 (made like the demo's when missing; default: %(default)s)")
    ap.add_argument("--steps", type=int, default=40, help="training steps per run (default: %(default)s)")
    ap.add_argument("--log_every", type=int, default=5, help="steps per timed window (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=2, help="A B pairs (default: %(default)s)")
    ap.add_argument("--np", type=int, default=2, help="ranks (default: %(default)s)")
    ap.add_argument("--batch_size", type=int, default=4, help="images per rank per step (default: %(default)s)")
    ap.add_argument("--mpirun_args", default="", help="extra mpirun options for both (one string)")
    ap.add_argument("--keep", default=None, help="folder to keep the runs' logdirs in (default: removed)")
    return ap


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    if a.steps < 2 * a.log_every or a.log_every < 1 or a.repeats < 1 or a.np < 1 or a.batch_size < 1:
        raise SystemExit("ab_train.py: error: need --steps >= 2 x --log_every >= 2, --repeats, --np, --batch_size >= 1")
    a.common_env = parse_env(a.env, "--env")
    if a.isa == "AVX2":
        a.common_env.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")
    py = os.path.join(ROOT, ".venv", "bin", "python")
    if not os.path.isfile(a.data):
        make_data(a.data, py)
    import h5py
    with h5py.File(a.data, "r") as f:
        _, h, w, c = f["train"]["images"].shape
        regions = f["train"]["masks"].shape[-1]
    gflop = flops.training_flops(h, w, c, regions) / 1e9
    work = tempfile.mkdtemp(prefix="ab_train-")
    try:
        variants = [Variant(getattr(a, f"{s}_label"),
                            export_rev(getattr(a, f"{s}_rev"), work) if getattr(a, f"{s}_rev") else ROOT,
                            parse_env(getattr(a, f"{s}_env"), f"--{s}_env"), shlex.split(getattr(a, f"{s}_args")),
                            getattr(a, f"{s}_np") or a.np, getattr(a, f"{s}_batch_size") or a.batch_size,
                            shlex.split(a.mpirun_args if getattr(a, f"{s}_mpirun_args") is None
                                        else getattr(a, f"{s}_mpirun_args")))
                    for s in ("a", "b")]
        isa = "avx2" if a.isa == "AVX2" else "native"
        print(f"ab_train: {a.repeats} x A B, {a.steps} steps, {h}x{w}x{c} -> "
              f"{regions} regions ({gflop:.2f} GFLOP per training image), env {a.common_env}", flush=True)
        for v in variants:
            print(f"  {v.label}: {v.np} ranks x batch {v.batch_size}, {v.root}, env {v.env}, args {v.args}, "
                  f"mpirun {v.mpirun_args}", flush=True)
        # the peak over CPU time (unet/perf/peak.py): what the cores do when they are the ranks' own;
        # best of the measurements before and between the runs
        cores = max(cores_of(v) for v in variants)
        peaks = [peak.measured_peak(cores, isa=isa, cpu_time=True) or 0.0]
        for i in range(1, a.repeats + 1):
            for v in variants:
                logdir = os.path.join(a.keep or work, f"{v.label}-{i}")
                shutil.rmtree(logdir, ignore_errors=True)
                r = run_once(a, v, logdir)
                v.runs.append(r)
                peaks.append(peak.measured_peak(cores, isa=isa, cpu_time=True) or 0.0)
                print(describe(v.label, i, r, gflop, max(peaks) / 1e9 or None), flush=True)
        summarise(variants, gflop, max(peaks) / 1e9 or None, isa)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def median_of(runs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in runs if key in r]
    return statistics.median(vals) if vals else None


def summarise(variants: list[Variant], gflop: float, peak_gflops: float | None, isa: str) -> None:
    for v in variants:
        m, mc, k = (median_of(v.runs, key) for key in ("img_s", "img_s_cpu", "kernel_share"))
        share = (f" = {mc * gflop / peak_gflops:.0%} of the {isa} peak ({peak_gflops:.0f} GFLOP/s per CPU-s)"
                 if peak_gflops and mc else "")
        each = ", ".join(f"{r['img_s']:.2f}" for r in v.runs)
        print(f"{v.label}: median {m:.2f} img/s of {each}" + (f"; per CPU-s {mc:.2f}{share}" if mc else "")
              + (f"; kernel in steps {k:.1%}" if k is not None else "")
              + f"; load {min(r['load'][0] for r in v.runs):.1f}-{max(r['load'][1] for r in v.runs):.1f}", flush=True)
    a, b = variants
    ratio = median_of(b.runs, "img_s") / median_of(a.runs, "img_s")
    cpu = [median_of(v.runs, "img_s_cpu") for v in variants]
    shas = {r["sha"] for v in variants for r in v.runs}
    print(f"ratio {b.label}/{a.label} of medians: {ratio:.3f} img/s"
          + (f", {cpu[1] / cpu[0]:.3f} per CPU-s" if all(cpu) else "") + "; weights "
          + ("bit-identical in every run" if len(shas) == 1 else f"differ: {sorted(shas)}"), flush=True)


if __name__ == "__main__":
    sys.exit(main())
