#!/usr/bin/env python3
"""Scaling report: run train_hvd.py --benchmark for several configurations and a
baseline in the same run, and write a Markdown table (stdout and --out).

    .venv/bin/python scripts/scaling_report.py [--global_batch 16] [--steps 20] [--out runs/scaling.md] [--dry-run]

Rows: the baseline (1 rank x all cores), 2 ranks x 1 thread at the same global
batch (plain mpirun, and through the mpirun launch script), the same with Horovod's and Open MPI's own defaults
(what the trainer's
defaults buy), 2 ranks at the same per-rank batch, and MultiWorkerMirroredStrategy
on the same 2 processes (the outside baseline). Efficiency = img/s / baseline img/s.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINE = re.compile(r"^benchmark: (.*)$", re.M)


def configs(g: int, ncpu: int, steps: int, size: int):
    bench = [os.path.join(ROOT, "train_hvd.py"), "--benchmark", "--bench_steps", str(steps),
             "--synthetic_size", str(size), "--logdir", os.path.join(ROOT, "runs", "bench")]
    py = sys.executable
    mpi = ["mpirun", "--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    yield ("baseline: 1 rank x %d threads, batch %d" % (ncpu, g),
           mpi + ["-np", "1", "--bind-to", "none", py, *bench, "--batch_size", str(g)], {})
    yield (f"2 ranks x 1 thread, batch {g // 2}/rank (same global batch), shipped defaults",
           mpi + ["-np", "2", py, *bench, "--batch_size", str(g // 2)], {})
    yield (f"2 ranks x 1 thread, batch {g // 2}/rank, through scripts/launch_mpirun.sh (local profile)",
           [os.path.join(ROOT, "scripts", "launch_mpirun.sh"), "--np", "2", "--", *bench[1:],
            "--batch_size", str(g // 2)], {})
    yield (f"2 ranks x 1 thread, batch {g // 2}/rank, Horovod + Open MPI defaults",
           mpi + ["-np", "2", py, *bench, "--batch_size", str(g // 2)],
           {"HOROVOD_CYCLE_TIME": "1", "OMPI_MCA_mpi_yield_when_idle": "0"})
    yield (f"2 ranks x 1 thread, batch {g}/rank (same per-rank batch)",
           mpi + ["-np", "2", py, *bench, "--batch_size", str(g)], {})
    yield (f"MultiWorkerMirroredStrategy, 2 workers x 1 thread, batch {g // 2}/worker",
           [py, "-m", "unet.perf.mwms", "--workers", "2", "--batch_size", str(g // 2), "--steps", str(steps),
            "--size", str(size)], {})


def parse(line: str) -> dict:
    return dict(kv.split("=", 1) for kv in line.split() if "=" in kv)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--global_batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "scaling.md"))
    ap.add_argument("--dry-run", action="store_true")
    a = ap.parse_args(argv)
    ncpu = len(os.sched_getaffinity(0))
    rows = []
    for name, cmd, extra in configs(a.global_batch, ncpu, a.steps, a.size):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT, **extra)
        if os.geteuid() == 0:
            env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        shown = " ".join(f"{k}={v}" for k, v in extra.items()) + (" " if extra else "") + shlex.join(cmd)
        if a.dry_run:
            print(shown)
            continue
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
        m = LINE.findall(p.stdout)
        if p.returncode or not m:
            print(f"scaling_report: '{name}' failed (exit {p.returncode}):\n{p.stderr[-1500:]}", file=sys.stderr)
            return 1
        rows.append((name, parse(m[-1]), shown))
        print(f"{name}: {m[-1]}", file=sys.stderr)
    if a.dry_run:
        return 0
    base = float(rows[0][1]["img_per_sec"])
    out = ["| config | img/s | vs baseline | p50 ms/step | allreduce ms/step | raw MPI_Allreduce ms |",
           "|---|---|---|---|---|---|"]
    for name, r, _ in rows:
        out.append(f"| {name} | {float(r['img_per_sec']):.2f} | {float(r['img_per_sec']) / base:.3f} | "
                   f"{r.get('p50_ms', '')} | {r.get('allreduce_ms', '–')} | {r.get('mpi_allreduce_ms', '–')} |")
    out += ["", "Commands:", ""] + [f"    {s}" for _, _, s in rows]
    text = "\n".join(out) + "\n"
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
