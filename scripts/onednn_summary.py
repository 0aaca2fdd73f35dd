#!/usr/bin/env python3
"""Sum oneDNN's primitive times of the last step in an ``ONEDNN_VERBOSE=1`` log, by primitive,
implementation and propagation kind, and say how fast each convolution kind ran against the forward.

    ONEDNN_MAX_CPU_ISA=AVX2 ONEDNN_VERBOSE=1 python scripts/onednn_step.py 3 > log; scripts/onednn_summary.py log

The log's steps are separated by lines starting with ``STEP_MS`` (scripts/onednn_step.py prints
them); the last complete step is summed.
"""
import collections
import re
import sys


def conv_flops(desc: str) -> int:
    """2 x multiply-adds of a oneDNN convolution problem descriptor (mb..ic..oc..ih..oh..kh..iw..ow..kw..)."""
    d = {k: int(v) for k, v in re.findall(r"([a-z]+)(\d+)", desc)}
    return 2 * d["mb"] * d["ic"] * d["oc"] * d["oh"] * d["ow"] * d["kh"] * d["kw"]


def main(path: str) -> int:
    steps = open(path).read().split("STEP_MS")
    last = [l.strip().split(",") for l in steps[-2].splitlines() if l.startswith("onednn_verbose,v1,primitive,exec")]
    ms, n, gflop = collections.Counter(), collections.Counter(), collections.Counter()
    for f in last:
        key = (f[5], f[6], f[7])
        ms[key] += float(f[-1])
        n[key] += 1
        if f[5] == "convolution":
            gflop[key] += conv_flops(f[-2]) / 1e9
    total = sum(ms.values())
    print(f"{path}: {total:.0f} ms of oneDNN primitives in the last step")
    print("| primitive | implementation | kind | calls | ms | share | GFLOP/s |\n|---|---|---|---|---|---|---|")
    for key, v in ms.most_common():
        rate = f"{gflop[key] / v * 1e3:.1f}" if gflop[key] else ""
        print(f"| {key[0]} | {key[1]} | {key[2]} | {n[key]} | {v:.1f} | {v / total:.1%} | {rate} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
