"""Floating-point work of the U-Net and the CPU's peak (pure; no TensorFlow).

Only convolutions are counted (2 flops per multiply-add); pooling, ReLU,
concatenation and the optimizer add well under 1 %. A training step costs
the forward pass, the weight gradients (one more pass of the same size) and
the input gradients (another, except for the first convolution, whose input
needs none): about 3x the forward pass.
"""
from __future__ import annotations

from unet.model import BOTTLENECK, FILTERS


def conv_flops(h: int, w: int, k: int, cin: int, cout: int) -> int:
    """A k x k convolution over an h x w grid of positions: 2*h*w*k^2*cin*cout."""
    return 2 * h * w * k * k * cin * cout


def unet_convs(height: int, width: int, channels: int, regions: int, *,
               use_upsampling: bool = False) -> list[tuple[str, int]]:
    """(layer name, forward flops per image) of every convolution, in model order.

    A 2x2 stride-2 transposed convolution touches each input position once per
    kernel tap, so it is counted over its input grid.
    """
    out, h, w, cin = [], height, width, channels
    skips = []
    for level, f in enumerate(FILTERS, start=1):
        out += [(f"conv{level}a", conv_flops(h, w, 3, cin, f)), (f"conv{level}b", conv_flops(h, w, 3, f, f))]
        skips.append((h, w, f))
        h, w, cin = h // 2, w // 2, f
    out += [("conv5a", conv_flops(h, w, 3, cin, BOTTLENECK)), ("conv5b", conv_flops(h, w, 3, BOTTLENECK, BOTTLENECK))]
    cin = BOTTLENECK
    for level, (sh, sw, f) in enumerate(reversed(skips), start=6):
        if use_upsampling:
            up = cin
        else:
            out.append((f"transConv{level}", conv_flops(h, w, 2, cin, f)))
            up = f
        h, w = sh, sw
        out += [(f"conv{level}a", conv_flops(h, w, 3, up + f, f)), (f"conv{level}b", conv_flops(h, w, 3, f, f))]
        cin = f
    out.append(("mask", conv_flops(h, w, 1, cin, regions)))
    return out


def forward_flops(height: int, width: int, channels: int, regions: int, **kw) -> int:
    return sum(f for _, f in unet_convs(height, width, channels, regions, **kw))


def training_flops(height: int, width: int, channels: int, regions: int, **kw) -> int:
    """Forward + weight gradients + input gradients (none for the first convolution)."""
    convs = unet_convs(height, width, channels, regions, **kw)
    total = sum(f for _, f in convs)
    return 3 * total - convs[0][1]


def peak_flops(cores: int, ghz: float, flops_per_cycle: int) -> float:
    """cores x clock x flops per cycle and core, in flop/s."""
    return cores * ghz * 1e9 * flops_per_cycle


def fp32_flops_per_cycle(cpu_flags) -> int:
    """fp32 flop per cycle and core from the CPU's flags (/proc/cpuinfo): two FMA units of the widest
    vectors it has, 2 flops per lane: AVX-512 64, AVX2 + FMA 32, AVX 16, else (SSE) 8."""
    flags = set(cpu_flags)
    if "avx512f" in flags:
        return 64
    if {"avx2", "fma"} <= flags:
        return 32
    return 16 if "avx" in flags else 8
