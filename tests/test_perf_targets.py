"""The pieces of scripts/perf_targets.py: flop count, log parsing, CPU figures (no speed thresholds)."""
import os
import sys

import pytest

from unet.perf import flops
from unet.perf import measure as perf

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def test_seed_unet_forward_is_about_6_gflop():
    assert flops.forward_flops(128, 128, 1, 1) / 1e9 == pytest.approx(6.0, abs=0.3)
    # forward + weight gradients + input gradients (none for the first convolution)
    first = flops.unet_convs(128, 128, 1, 1)[0][1]
    assert flops.training_flops(128, 128, 1, 1) == 3 * flops.forward_flops(128, 128, 1, 1) - first


def test_conv_flops_by_hand():
    assert flops.conv_flops(128, 128, 3, 1, 32) == 2 * 128 * 128 * 9 * 32
    assert flops.peak_flops(2, 2.3, 64) == pytest.approx(294.4e9)


@pytest.mark.needs_stack
@pytest.mark.parametrize("upsampling", [False, True])
def test_flop_count_matches_the_keras_model(upsampling):
    """Every convolution of the built model, counted from its kernel and its grid."""
    from unet.model import build_unet
    m = build_unet(64, 64, 4, 3, use_upsampling=upsampling)
    counted = {}
    for layer in m.layers:
        if not hasattr(layer, "kernel"):
            continue
        k, _, a, b = layer.kernel.shape                    # Conv2D (k,k,in,out); Conv2DTranspose (k,k,out,in)
        grid = layer.input.shape if "transConv" in layer.name else layer.output.shape
        counted[layer.name] = 2 * grid[1] * grid[2] * k * k * a * b
    assert counted == dict(flops.unet_convs(64, 64, 4, 3, use_upsampling=upsampling))


@pytest.mark.needs_stack
@pytest.mark.parametrize("upsampling", [False, True])
def test_the_training_benchmark_counts_the_same_flops_from_the_live_model(upsampling):
    """unet/training/benchmark.py counts from the built layers (it may not import unet.perf)."""
    from unet.model import build_unet
    from unet.training.benchmark import training_flops
    m = build_unet(64, 64, 4, 3, use_upsampling=upsampling)
    assert training_flops(m) == flops.training_flops(64, 64, 4, 3, use_upsampling=upsampling)


def test_steady_rate_drops_the_first_window():
    log = ("step 0 epoch 1 loss 8.3 dice_WT 0.0010 lr 0.0005 img/s 2.22\n"
           "step 5 epoch 1 loss 4.1 dice_WT 0.0262 lr 0.000477421 img/s 10.00\n"
           "validation epoch 1 step 6 loss 2.0 dice_WT 0.1\n"
           "step 10 epoch 1 loss 1.3 dice_WT 0.3547 lr 0.000455861 img/s 15.00\n")
    assert perf.log_rates(log) == [(0, 2.22), (5, 10.0), (10, 15.0)]
    s = perf.steady_rate([2.22, 10.0, 15.0])
    assert s["windows"] == 2 and s["median"] == 12.5
    assert s["rate"] == pytest.approx(2 / (1 / 10 + 1 / 15))      # images over time
    with pytest.raises(ValueError):
        perf.steady_rate([3.0])


def test_cpu_figures_from_proc_text():
    assert perf.cpu_mhz("cpu MHz\t\t: 2300.000\ncpu MHz\t\t: 2400.5\n") == 2400.5
    assert perf.cpu_mhz("") == 0.0
    # user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait
    assert perf.cpu_busy_seconds("cpu  100 0 50 900 20 0 10 5 0 0\ncpu0 1 2 3\n") == pytest.approx(1.65)


def test_child_peak_rss_is_its_own():
    c = perf.run_child([sys.executable, "-c", "b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096])"])
    assert c.returncode == 0 and c.maxrss_mb > 200 and c.seconds > 0 and c.others_cores >= 0


def test_fp32_flops_per_cycle_follow_the_widest_vectors_the_cpu_has():
    from unet.perf.flops import fp32_flops_per_cycle
    assert fp32_flops_per_cycle("fpu sse2 avx avx2 fma avx512f avx512bw".split()) == 64
    assert fp32_flops_per_cycle("fpu sse2 avx avx2 fma".split()) == 32     # the AMD EPYC (Zen 3) machines
    assert fp32_flops_per_cycle("fpu sse2 avx".split()) == 16
    assert fp32_flops_per_cycle("fpu sse2".split()) == 8


def test_measured_peak_is_above_what_sgemm_reaches_and_below_any_clock():
    """unet/perf/peak.py times FMA chains; a matrix product cannot beat the CPU's arithmetic, so on the same
    core (measurements interleaved, best of 3 each, so a change of load hits both) OpenBLAS's sgemm
    must stay under it; 10 % margin for the timer. A wrong flop count or an unvectorised kernel
    (8x or 16x less) fails one of the two bounds."""
    import time

    import numpy as np
    from threadpoolctl import threadpool_limits

    from unet.perf import peak
    assert peak._kernel() is not None, f"the FMA kernel was not built: {peak.why_not_measured()}"
    fpc = flops.fp32_flops_per_cycle(peak.cpu_flags())
    a, b = np.random.default_rng(0).random((2, 1024, 1024), np.float32)
    fma, gemm = 0.0, 0.0
    with threadpool_limits(1):
        a @ b
        for _ in range(3):
            fma = max(fma, peak.measured_peak(1, seconds=0.1))
            t = time.perf_counter()
            for _ in range(4):
                a @ b
            gemm = max(gemm, 4 * 2 * 1024 ** 3 / (time.perf_counter() - t))
    print(f"one core: FMA chains {fma / 1e9:.1f} GFLOP/s, sgemm {gemm / 1e9:.1f} GFLOP/s, {fpc} flop/cycle")
    assert gemm <= 1.1 * fma
    assert fma <= fpc * 6.0e9          # no core runs at 6 GHz
