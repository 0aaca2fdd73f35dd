"""Seconds per unet-synth case on one core: building it and writing its five NIfTI files.

    .venv/bin/python scripts/synth_timing.py [--cases 6] [--anatomy mni152 sphere] [--core 0]

Pins itself to one core (as ``taskset -c CORE`` would), reads and resamples the template once (as
``unet-synth`` does before its workers start), then writes --cases full-size (240x240x155) BraTS cases per
anatomy into a temporary folder, interleaving the anatomies case by case so that a change of load hits
both alike. Prints per anatomy the median and the maximum of the wall-clock and CPU seconds a case.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from unet.data import anatomy, synth  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=6, help="cases per anatomy")
    p.add_argument("--anatomy", nargs="+", default=["mni152", "sphere"], choices=tuple(synth.ANATOMIES),
                   help="anatomies to time")
    p.add_argument("--core", type=int, default=0, help="the one CPU core to run on")
    a = p.parse_args(argv)
    os.sched_setaffinity(0, {a.core})
    t0, c0 = time.perf_counter(), time.process_time()
    anatomy.template()
    print(f"template read and resampled: {time.perf_counter() - t0:.2f} s wall, {time.process_time() - c0:.2f} s CPU")
    times = {k: [] for k in a.anatomy}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.cases):
            for name in a.anatomy:
                t0, c0 = time.perf_counter(), time.process_time()
                synth.write_case(os.path.join(tmp, name), "brats", 0, i, synth.SHAPE, False, name)
                times[name].append((time.perf_counter() - t0, time.process_time() - c0))
    load = os.getloadavg()[0]
    for name, ts in times.items():
        wall, cpu = [t[0] for t in ts], [t[1] for t in ts]
        print(f"{name}: {len(ts)} cases, wall median {statistics.median(wall):.2f} s (max {max(wall):.2f}), "
              f"CPU median {statistics.median(cpu):.2f} s (max {max(cpu):.2f}) a case on core {a.core}")
    print(f"load average at the end: {load:.1f} (on {os.cpu_count()} cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
