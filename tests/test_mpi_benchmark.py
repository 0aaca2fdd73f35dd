"""--benchmark prints one well-formed line with positive figures (no speed thresholds here)."""
import os
import re

import pytest
from conftest import ROOT, run_mpi

from unet.perf.flops import training_flops

pytestmark = pytest.mark.mpi
LINE = re.compile(r"^benchmark: ranks=2 threads_per_rank=(\d+) global_batch=8 img_per_sec=([\d.]+) "
                  r"p50_ms=([\d.]+) p90_ms=([\d.]+) p99_ms=([\d.]+) allreduce_ms=([\d.]+) "
                  r"allreduce_alone_ms=([\d.]+) mpi_allreduce_ms=([\d.]+) grad_mb=([\d.]+) "
                  r"gflop_per_sec=([\d.]+) peak_gflops=([\d.]+) peak_share=([\d.]+) isa=(native|avx2)$", re.M)


def test_benchmark_line(tmp_path):
    p = run_mpi(2, [os.path.join(ROOT, "train_hvd.py"), "--benchmark", "--synthetic_size", "32",
                    "--batch_size", "4", "--warmup_steps", "2", "--bench_steps", "4", "--logdir", str(tmp_path)])
    assert p.returncode == 0, p.stderr[-2000:]
    (m,) = LINE.findall(p.stdout)
    threads, ips, p50, p90, p99, ar, alone, mpi, mb, gflops, peak, share = map(float, m[:-1])
    assert threads >= 1 and ips > 0 and 0 < p50 <= p90 <= p99 and alone > 0 and mpi > 0
    assert ar >= 0
    assert mb == pytest.approx(7_759_521 * 4 / 1e6, abs=0.1)     # the seed U-Net's gradients
    # 32x32x1 -> 1 region: the flops unet/perf/flops.py counts from the architecture, per image
    assert gflops == pytest.approx(ips * training_flops(32, 32, 1, 1) / 1e9, rel=0.01, abs=0.05)
    assert peak > 0 and share == pytest.approx(gflops / peak, rel=0.01, abs=0.001)
    assert not any(tmp_path.iterdir())                           # a benchmark writes no logs


def test_benchmark_refuses_a_data_file(tmp_path):
    p = run_mpi(2, [os.path.join(ROOT, "train_hvd.py"), "--benchmark", "--data", "x.h5"])
    assert p.returncode == 2 and "--benchmark uses in-memory synthetic data; drop --data" in p.stderr
