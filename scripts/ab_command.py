#!/usr/bin/env python3
"""Time one command under two environments, interleaved A B A B, and print the ratio of medians.

    .venv/bin/python scripts/ab_command.py --a_env UNET_MALLOC=system --a_label glibc --b_label tcmalloc \\
        --repeats 3 -- .venv/bin/unet-convert --input runs/demo/cases --output /tmp/ab.h5 --size 128

Each run is a whole process tree (``os.wait4``: wall seconds, user and system CPU seconds, minor page
faults, peak RSS of the largest process); the command's output goes to ``--log`` (one file per run),
not to the screen. A run that fails stops the comparison with its status and log. The ratio is A's
median wall time over B's (above 1: B is faster). ``--warmup`` runs the command once first, untimed
(file caches). The machines are noisy: only pairs from one run of this script compare.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from ab_train import parse_env  # the same NAME=VALUE flags as the trainer's A/B (this folder is on the path)


def run_once(cmd: list[str], env: dict[str, str], log: str) -> dict:
    """One timed run of ``cmd``; its rusage and wall time."""
    full = {**os.environ, **env}
    with open(log, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=full, stdout=out, stderr=subprocess.STDOUT)
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    # wait4's usage counts the process and the descendants it waited for (mpirun's ranks, a pool's workers);
    # ru_maxrss is the largest single process of them
    return {"rc": os.waitstatus_to_exitcode(status), "wall": wall, "user": ru.ru_utime, "sys": ru.ru_stime,
            "minflt": ru.ru_minflt, "maxrss_mib": ru.ru_maxrss / 1024}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a_env", nargs="*", default=[], help="NAME=VALUE for A's runs")
    ap.add_argument("--b_env", nargs="*", default=[], help="NAME=VALUE for B's runs")
    ap.add_argument("--a_label", default="A")
    ap.add_argument("--b_label", default="B")
    ap.add_argument("--repeats", type=int, default=3, help="pairs A B")
    ap.add_argument("--warmup", action="store_true", help="one untimed run first")
    ap.add_argument("--log", default="/tmp/ab_command", help="prefix of the runs' log files")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then the command")
    a = ap.parse_args(argv)
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if not cmd:
        ap.error("no command: give it after --")
    if a.repeats < 1:
        ap.error(f"--repeats must be >= 1 (got {a.repeats})")
    envs = {a.a_label: parse_env(a.a_env, "--a_env", "ab_command.py"),
            a.b_label: parse_env(a.b_env, "--b_env", "ab_command.py")}
    if a.warmup:
        run_once(cmd, envs[a.a_label], f"{a.log}.warmup.log")
    runs: dict[str, list[dict]] = {a.a_label: [], a.b_label: []}
    for i in range(a.repeats):
        for label in (a.a_label, a.b_label):
            log = f"{a.log}.{label}.{i}.log"
            r = run_once(cmd, envs[label], log)
            if r["rc"] != 0:
                print(f"{label} run {i}: exit status {r['rc']} (log {log})", file=sys.stderr)
                return 1
            runs[label].append(r)
            print(f"{label:>10} run {i}: wall {r['wall']:.2f} s, user {r['user']:.2f} s, sys {r['sys']:.2f} s, "
                  f"minor faults {r['minflt']}, peak RSS {r['maxrss_mib']:.0f} MiB", flush=True)
    med = {k: {f: statistics.median(r[f] for r in v) for f in ("wall", "user", "sys", "minflt", "maxrss_mib")}
           for k, v in runs.items()}
    for label, m in med.items():
        print(f"{label:>10} median: wall {m['wall']:.2f} s, user {m['user']:.2f} s, sys {m['sys']:.2f} s, "
              f"minor faults {m['minflt']:.0f}, peak RSS {m['maxrss_mib']:.0f} MiB")
    ratio = med[a.a_label]["wall"] / med[a.b_label]["wall"]
    print(f"ratio of medians (wall {a.a_label} / {a.b_label}): {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
