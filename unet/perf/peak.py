"""The CPU's fp32 peak, measured: fused multiply-adds that never wait for memory or for each other.

A clock read from /proc/cpuinfo is not the clock a core runs at (under KVM it is the host's
nominal clock; turbo raises it), so a peak reckoned from it can be lower than what an engine
reaches. Here the peak is timed instead: a loop of ``CHAINS`` independent FMA chains on vector
registers (enough chains to hide the FMA latency on both FMA ports of a core), compiled for
this CPU (``-march=native``: the widest vectors it has) and run on each of ``cores`` threads at
once. flop/s = threads x iterations x CHAINS x lanes x 2 / seconds: the rate of the CPU's
arithmetic alone, which no convolution can exceed.

``isa="avx2"`` compiles the same kernel for AVX2 + FMA (``-march=x86-64-v3``): the peak of an AVX2
machine's vector units on this CPU, the reference when oneDNN is held to AVX2 kernels
(``ONEDNN_MAX_CPU_ISA=AVX2``, ``isa_for_onednn``) on a CPU that has AVX-512.

The kernel is compiled once per process and ISA with the system C compiler (``cc``, which
scripts/setup.sh installs for the Horovod build); where it cannot be built or loaded (no compiler,
a /tmp mounted noexec), ``measured_peak`` returns None, ``why_not_measured`` says why,
and ``fp32_peak`` falls back to the nominal peak: cores x /proc/cpuinfo's clock x the flop/cycle of
the CPU's vector units (``unet.perf.flops``).
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tempfile
import threading
import time

CHAINS = 12
SOURCE = r"""
#if defined(__AVX512F__)
#define BYTES 64
#else
#define BYTES 32
#endif
typedef float vec __attribute__((vector_size(BYTES)));
int lanes(void) { return BYTES / 4; }
/* n iterations of CHAINS independent a = a * b + c; returns a sum so nothing is optimised away */
float fma_chains(long n) {
    vec a[CHAINS], b = (vec){} + 0.999999f, c = (vec){} + 1e-6f;   /* broadcasts: kept in registers */
    for (int j = 0; j < CHAINS; j++) for (int k = 0; k < BYTES / 4; k++) a[j][k] = 1.0f + j + k;
    for (long i = 0; i < n; i++) {
#pragma GCC unroll 16
        for (int j = 0; j < CHAINS; j++) a[j] = a[j] * b + c;
    }
    float s = 0;
    for (int j = 0; j < CHAINS; j++) for (int k = 0; k < BYTES / 4; k++) s += a[j][k];
    return s;
}
"""

ISA_FLAGS = {"native": "-march=native", "avx2": "-march=x86-64-v3"}   # x86-64-v3: AVX2, FMA, no AVX-512
_libs = {}                # isa -> compiled kernel
_failed = None            # why the kernel could not be built (once: not retried on every call)
_lock = threading.Lock()


def _kernel(isa: str = "native"):
    """The compiled kernel (ctypes library), or None when it cannot be built or loaded here."""
    global _failed
    with _lock:
        if isa not in _libs and _failed is None:
            try:
                _libs[isa] = _build(ISA_FLAGS[isa])
            except (OSError, subprocess.SubprocessError, RuntimeError) as e:
                _failed = str(e).splitlines()[0] if str(e) else type(e).__name__
        return _libs.get(isa)


def isa_for_onednn(env=os.environ) -> str:
    """'avx2' when ONEDNN_MAX_CPU_ISA holds oneDNN to AVX2 kernels, else 'native'."""
    return "avx2" if env.get("ONEDNN_MAX_CPU_ISA", "").upper().startswith("AVX2") else "native"


def _build(march: str = "-march=native"):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc, gcc)")
    with tempfile.TemporaryDirectory() as tmp:
        src, so = os.path.join(tmp, "peak.c"), os.path.join(tmp, "peak.so")
        with open(src, "w") as f:
            f.write(SOURCE)
        done = subprocess.run([cc, "-O2", march, "-ffp-contract=fast", f"-DCHAINS={CHAINS}",
                               "-shared", "-fPIC", src, "-o", so], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} {march} failed: {done.stderr.strip()[:200]}")
        lib = ctypes.CDLL(so)          # loaded: the file may go
    lib.fma_chains.argtypes, lib.fma_chains.restype = [ctypes.c_long], ctypes.c_float
    lib.lanes.argtypes, lib.lanes.restype = [], ctypes.c_int
    return lib


def why_not_measured() -> str | None:
    """Why the kernel could not be built, once it was tried (None: it was, or was not tried)."""
    return _failed


def measured_peak(cores: int, seconds: float = 0.3, isa: str = "native", cpu_time: bool = False) -> float | None:
    """fp32 flop/s of ``cores`` threads of FMA chains (ctypes drops the GIL, so they run at once),
    the best of 3 runs of about ``seconds`` each; None without a C compiler. ``cpu_time``: each
    thread's flops over its own CPU time, summed: the rate of cores the threads had to themselves,
    which other processes sharing the cores do not lower (they do lower the wall-clock rate)."""
    lib = _kernel(isa)
    if lib is None:
        return None
    per_iter = CHAINS * lib.lanes() * 2
    n = 1_000_000
    while True:                            # size the run to the clock: about ``seconds``
        t = time.perf_counter()
        lib.fma_chains(n)
        dt = time.perf_counter() - t
        if dt > seconds / 4:
            n = int(n * seconds / dt)
            break
        n *= 4
    best = 0.0
    for _ in range(3):
        cpu = []

        def chains():
            t0 = time.thread_time()
            lib.fma_chains(n)
            cpu.append(time.thread_time() - t0)

        threads = [threading.Thread(target=chains) for _ in range(cores)]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t
        rate = sum(n * per_iter / max(c, 1e-9) for c in cpu) if cpu_time else cores * n * per_iter / wall
        best = max(best, rate)
    return best


def cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        line = next((l for l in f if l.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def fp32_peak(cores: int, isa: str = "native") -> tuple[float, str]:
    """fp32 peak flop/s of ``cores`` cores, and how it was found: measured, else nominal.
    ``isa`` "avx2": the AVX2 + FMA units' peak (see the module's doc)."""
    from unet.perf import flops
    from unet.perf.measure import cpu_mhz
    with open("/proc/cpuinfo") as f:
        mhz = cpu_mhz(f.read())
    flags = cpu_flags() - ({"avx512f"} if isa == "avx2" else set())
    fpc = flops.fp32_flops_per_cycle(flags)
    nominal = flops.peak_flops(cores, mhz / 1e3, fpc)
    reckoned = f"{cores} core(s) x {mhz:.0f} MHz x {fpc} flop/cycle = {nominal / 1e9:.0f} GFLOP/s"
    measured = measured_peak(cores, isa=isa)
    if measured is None:
        return nominal, f"nominal: {reckoned}; not measured: {why_not_measured()}"
    where = " (AVX2 + FMA kernel)" if isa == "avx2" else ""
    return measured, (f"measured: FMA chains on {cores} core(s){where}, i.e. {fpc} flop/cycle at "
                      f"{measured / 1e9 / cores / fpc:.2f} GHz; /proc/cpuinfo's clock gives {reckoned}")


def main(argv: list[str] | None = None) -> int:
    """``python -m unet.perf.peak [--cores N] [--isa native|avx2]``: prints ``peak: gflops=X how=...``."""
    import argparse
    ap = argparse.ArgumentParser(prog="python -m unet.perf.peak", description="Measure the CPU's fp32 peak.")
    ap.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)),
                    help="threads of FMA chains at once (default: the CPUs this process may use, %(default)s)")
    ap.add_argument("--isa", choices=tuple(ISA_FLAGS), default=isa_for_onednn(),
                    help="vector ISA of the kernel (default: avx2 under ONEDNN_MAX_CPU_ISA=AVX2*, else native)")
    a = ap.parse_args(argv)
    if a.cores < 1:
        ap.error(f"--cores must be >= 1 (got {a.cores})")
    flops, how = fp32_peak(a.cores, a.isa)
    print(f"peak: gflops={flops / 1e9:.1f} cores={a.cores} isa={a.isa} how={how}", flush=True)
    return 0


def bf16_factor() -> int:
    """bf16 flop/cycle over fp32's: 2 with bf16 dot-product instructions (AVX512_BF16, AMX), else 1
    (bf16 then computes on the fp32 units)."""
    return 2 if cpu_flags() & {"avx512_bf16", "amx_bf16"} else 1


if __name__ == "__main__":
    raise SystemExit(main())
