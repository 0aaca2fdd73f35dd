#!/usr/bin/env python3
"""How long the trainer's epoch ends take: runs a command that trains into LOGDIR and stamps each new line of
LOGDIR/training.log with the wall time it appeared, then prints the gaps longer than ``--min_gap`` seconds
(with ``--log_every 1`` the gap before a ``validation`` line is the epoch's end: the last step's log line to
the validation's, so the validation and everything between the loop and it).

    .venv/bin/python scripts/epoch_end.py /tmp/ee -- mpirun -np 2 --oversubscribe .venv/bin/python train_hvd.py \\
        --data runs/demo/brats.h5 --batch_size 4 --epochs 2 --steps_per_epoch 30 --logdir /tmp/ee \\
        --export none --log_every 1 --fresh
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("logdir", help="the --logdir the command trains into")
    ap.add_argument("--min_gap", type=float, default=1.5, help="print the lines that came this many seconds late")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then the training command")
    a = ap.parse_args(argv)
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd:
        ap.error("give the training command after --")
    path = os.path.join(a.logdir, "training.log")
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stamped, seen = [], 0
    while True:
        done = p.poll() is not None
        if os.path.exists(path):
            with open(path) as fh:
                lines = fh.read().splitlines()
            stamped += [(time.monotonic() - t0, line) for line in lines[seen:]]
            seen = len(lines)
        if done:
            break
        time.sleep(0.05)
    if p.returncode:
        sys.stderr.write(p.stderr.read()[-2000:])
        return p.returncode
    prev = None
    for t, line in stamped:
        gap = t - prev if prev is not None else 0.0
        if gap >= a.min_gap or line.startswith("validation"):
            print(f"{t:8.1f} s  +{gap:5.1f} s  {' '.join(line.split()[:5])}")
        prev = t
    return 0


if __name__ == "__main__":
    sys.exit(main())
