#!/usr/bin/env python3
"""Performance targets measured in one run: one line per target, then a Markdown table,
on stdout; the table also in --out (progress goes to stderr).

    .venv/bin/python scripts/perf_targets.py [--quick] [--skip_dice] [--out perf_targets.md]

Every figure comes from a process started here, one at a time, on 1 rank (the
Dice runs: the demo's 2 ranks), at the same batch and threads:

* target 1: the full trainer (HDF5 from unet-synth + unet-convert, augmentation,
  training.log, TensorBoard, one image summary inside the timed windows) against
  ``--benchmark`` (one fixed in-memory batch, same shape), run alternately:
  benchmark, then ``--repeats`` x (trainer, benchmark); medians of each side, so the
  machine's drift between runs hits both alike. The trainer's rate is images / time
  over its logged windows after the first (goal: ratio >= 0.95);
* target 4: ``pipeline.train_dataset`` over the same file, augmented, iterated
  without training, against the trainer's rate (goal: >= 10x);
* target 5: peak RSS of the trainer (wait4 ru_maxrss of that process) on the 4-case
  file and on a 10x file (each case converted 10 times under another name):
  same steps, same batch, no validation (goal: within 10 %); and of the converter
  (``unet-convert --workers 2``: the process and its workers) writing those two files,
  4 and 40 cases (goal: within 10 %). ``--convert_only`` measures only the converter
  (about 2 min);
* target 7: ``--benchmark --precision bf16`` against fp32; without --quick and
  --skip_dice also the slice-pooled validation Dice after the demo's budget
  (8 cases, 2 ranks x batch 8, 2 epochs, rate 1e-4) for both precisions;
* FLOP/s: img/s x training flops per image (``unet.perf.flops``: convolutions, forward
  + both gradients) against the fp32 peak measured by unet/perf/peak.py (how, printed).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from unet.model import precision_error  # noqa: E402
from unet.perf import flops, peak  # noqa: E402  (pure modules: no TensorFlow in this process)
from unet.perf import measure as perf  # noqa: E402

PY = sys.executable
BENCH = re.compile(r"^benchmark: (.*)$", re.M)
PIPE = re.compile(r"^pipeline: (.*)$", re.M)
INTRA = re.compile(r"^rank 0/\d+ .* intra (\d+) ", re.M)
DICE = re.compile(r"^validation Dice of the exported model .*: (.*)$", re.M)
NOISY_CORES = 0.25          # other processes busier than this during a measurement: say so


class Failed(Exception):
    pass


def fields(line: str) -> dict:
    return dict(kv.split("=", 1) for kv in line.split() if "=" in kv)


def env() -> dict:
    e = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
    if os.geteuid() == 0:
        e.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return e


def run(name: str, cmd: list[str], log: list, timed: bool = True) -> perf.Child:
    """Run one process; record its command and the CPU others used meanwhile; stop if it fails."""
    c = perf.run_child(cmd, env=env(), cwd=ROOT)
    log.append((name, cmd, c.seconds, c.others_cores if timed else None))
    print(f"  {name}: {c.seconds:.0f} s, exit {c.returncode}, other processes busy {c.others_cores:.2f} cores",
          file=sys.stderr, flush=True)
    if c.returncode:
        raise Failed(f"{name} failed (exit {c.returncode}):\n{c.stderr[-2000:]}")
    return c


def make_data(tmp: str, log: list) -> tuple[str, str, dict]:
    """4 synthetic cases -> small.h5; the same 4 cases, 10 copies each under new ids -> large.h5.
    Also returns the converter's peak RSS and time for each: {cases: (maxrss MB, seconds)}."""
    cases, many = os.path.join(tmp, "cases"), os.path.join(tmp, "cases10x")
    run("unet-synth 4 cases", [PY, "-m", "unet.data.synth", "--out", cases, "--cases", "4", "--seed", "0",
                               "--workers", "2", "--anatomy", "sphere"], log, timed=False)
    for d in sorted(os.listdir(cases)):
        for r in range(10):
            dst = os.path.join(many, f"{d}_copy{r}")
            os.makedirs(dst)
            for f in os.listdir(os.path.join(cases, d)):
                os.symlink(os.path.join(cases, d, f), os.path.join(dst, f))
    small, large = os.path.join(tmp, "small.h5"), os.path.join(tmp, "large.h5")
    conv = {}
    for src, out, n in ((cases, small, 4), (many, large, 40)):
        c = run(f"unet-convert {n} cases", [PY, "-m", "unet.data.convert", "--input", src, "--output", out,
                                            "--size", "128", "--workers", "2", "--no_progress"], log, timed=False)
        conv[n] = (c.maxrss_mb, c.seconds)
    return small, large, conv


def converter_line(conv: dict) -> str:
    (n1, (m1, s1)), (n2, (m2, s2)) = sorted(conv.items())
    return (f"target 5, converter: {n1} cases -> peak RSS {m1:.0f} MB ({s1:.0f} s); {n2} cases -> {m2:.0f} MB "
            f"({s2:.0f} s): ratio {m2 / m1:.3f} (goal <= 1.10: {verdict(m2 / m1 <= 1.10)})")


def h5_shape(path: str) -> tuple[int, int, int, int, int]:
    import h5py
    with h5py.File(path, "r") as f:
        n, h, w, c = f["train/images"].shape
        return n, h, w, c, f["train/masks"].shape[-1]


def bench(precision: str, a, shape, log: list, name: str = "") -> dict:
    _, h, _, c, r = shape
    cmd = [PY, "train_hvd.py", "--benchmark", "--precision", precision, "--batch_size", str(a.batch_size),
           "--warmup_steps", "3", "--bench_steps", str(a.bench_steps), "--synthetic_size", str(h),
           "--synthetic_channels", str(c), "--synthetic_regions", str(r), "--logdir", os.path.join(a.tmp, "bench")]
    out = run(f"benchmark {precision}{name}", cmd, log)
    m = BENCH.findall(out.stdout)
    if not m:
        raise Failed(f"benchmark {precision}: no 'benchmark:' line")
    return fields(m[-1])


def trainer(data: str, name: str, a, log: list) -> dict:
    logdir = os.path.join(a.tmp, "logs_" + name.replace(" ", "_"))
    measured = a.steps - 1 - (a.steps - 1) % a.log_every   # last logged step
    out = run(f"trainer on {name}", [PY, "train_hvd.py", "--data", data, "--batch_size", str(a.batch_size),
                                     "--epochs", "1", "--steps_per_epoch", str(a.steps),
                                     "--log_every", str(a.log_every), "--image_every", str(measured),
                                     "--no_validation", "--fresh", "--logdir", logdir], log)
    with open(os.path.join(logdir, "training.log")) as f:
        rates = [r for _, r in perf.log_rates(f.read())]
    intra = INTRA.findall(out.stdout)
    return dict(perf.steady_rate(rates), maxrss_mb=out.maxrss_mb, threads=intra[0] if intra else "?",
                size_mb=os.path.getsize(data) / 1e6, seconds=out.seconds)


def pipeline(data: str, a, log: list) -> float:
    out = run("pipeline alone", [PY, "-m", "unet.perf.measure", "pipeline", "--data", data,
                                 "--batch_size", str(a.batch_size), "--batches", str(a.pipeline_batches)], log)
    m = PIPE.findall(out.stdout)
    if not m:
        raise Failed("pipeline: no 'pipeline:' line")
    return float(fields(m[-1])["img_per_sec"])


def demo_dice(a, log: list) -> dict:
    """The demo's training budget for each precision: slice-pooled validation Dice and rate."""
    cases, data = os.path.join(a.tmp, "demo_cases"), os.path.join(a.tmp, "demo.h5")
    run("unet-synth 8 cases", [PY, "-m", "unet.data.synth", "--out", cases, "--cases", "8", "--seed", "0",
                               "--workers", "2", "--anatomy", "sphere"], log, timed=False)
    run("unet-convert 8 cases", [PY, "-m", "unet.data.convert", "--input", cases, "--output", data,
                                 "--size", "128", "--workers", "2", "--no_progress"], log, timed=False)
    res = {}
    for p in ("fp32", "bf16"):
        logdir = os.path.join(a.tmp, f"demo_{p}")
        out = run(f"demo budget {p}", ["mpirun", "-np", "2", "--oversubscribe", PY, "train_hvd.py", "--data", data,
                                       "--batch_size", "8", "--learningrate", "0.0001", "--epochs", "2",
                                       "--log_every", "10", "--precision", p, "--logdir", logdir], log)
        m = DICE.findall(out.stdout)
        with open(os.path.join(logdir, "training.log")) as f:
            rates = [r for _, r in perf.log_rates(f.read())]
        res[p] = {"dice": fields(m[-1]) if m else {}, "median": perf.steady_rate(rates)["median"],
                  "seconds": out.seconds}
    return res


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def p50_rate(b: dict) -> float:
    """img/s of a benchmark line's median step."""
    return float(b["global_batch"]) * 1e3 / float(b["p50_ms"])


def figures(shape, b32: list[dict], b16: dict, tr: dict, tr10: dict, pipe: float, mhz: float, cores: int,
            peak32: float, bf16_factor: int) -> dict:
    """The ratios, flops and peaks of one run (pure). fp32 benchmark: the median of the runs
    interleaved with the trainer's, so a drifting load on the machine hits both sides alike."""
    import statistics
    _, h, w, c, r = shape
    rb32, rb16 = statistics.median(float(b["img_per_sec"]) for b in b32), float(b16["img_per_sec"])
    p50_32 = statistics.median(p50_rate(b) for b in b32)
    train = flops.training_flops(h, w, c, r)
    return dict(
        rb32=rb32, rb32_each=[float(b["img_per_sec"]) for b in b32], rb16=rb16, t1=tr["rate"] / rb32,
        t1_median=tr["median"] / p50_32, p50_32=p50_32, t4=pipe / tr["rate"], t5=tr10["maxrss_mb"] / tr["maxrss_mb"],
        t7=rb16 / rb32, fwd=flops.forward_flops(h, w, c, r), train=train,
        seed_fwd=flops.forward_flops(128, 128, 1, 1), mhz=mhz, cores=cores,
        peak32=peak32, peak16=peak32 * bf16_factor)


def summary_lines(f: dict, shape, a, b32: list[dict], tr: dict, tr10: dict, pipe: float, dice: dict | None,
                  busiest, conv: dict) -> list[str]:
    """One line per target: the figures and the ratio."""
    _, h, w, c, r = shape
    g = lambda ips: ips * f["train"] / 1e9  # noqa: E731  img/s -> GFLOP/s
    lines = [
        f"target 1: trainer {tr['rate']:.2f} img/s ({tr['windows']} windows of {a.log_every} steps), benchmark "
        f"{f['rb32']:.2f} img/s (median of {', '.join(f'{x:.2f}' for x in f['rb32_each'])}; trainer runs "
        f"{', '.join(f'{x:.2f}' for x in tr.get('rates_each', [tr['rate']]))}), "
        f"batch {a.batch_size}, threads {tr['threads']}/{b32[0]['threads_per_rank']}: ratio {f['t1']:.3f} "
        f"(goal >= 0.95: {verdict(f['t1'] >= 0.95)}); medians {tr['median']:.2f} / {f['p50_32']:.2f}: "
        f"{f['t1_median']:.3f}",
        f"target 4: pipeline alone {pipe:.1f} img/s, training {tr['rate']:.2f} img/s: ratio {f['t4']:.1f}x "
        f"(goal >= 10x: {verdict(f['t4'] >= 10)})",
        f"target 5: file {tr['size_mb']:.1f} MB -> peak RSS {tr['maxrss_mb']:.0f} MB; file {tr10['size_mb']:.1f} MB "
        f"({tr10['size_mb'] / tr['size_mb']:.1f}x) -> {tr10['maxrss_mb']:.0f} MB: ratio {f['t5']:.3f} "
        f"(goal <= 1.10: {verdict(f['t5'] <= 1.10)})",
        converter_line(conv),
        f"target 7: benchmark bf16 {f['rb16']:.2f} img/s, fp32 {f['rb32']:.2f} img/s: ratio {f['t7']:.3f}",
        f"flops: forward {f['fwd'] / 1e9:.2f} GFLOP/image at {h}x{w}x{c}->{r} (seed 128x128x1: "
        f"{f['seed_fwd'] / 1e9:.2f}), training {f['train'] / 1e9:.2f} GFLOP/image; peak "
        f"{f['peak32'] / 1e9:.0f} GFLOP/s fp32 ({f['peak_how']}) "
        f"({f['peak16'] / 1e9:.0f} bf16); achieved: benchmark fp32 {g(f['rb32']):.0f} GFLOP/s "
        f"({100e9 * g(f['rb32']) / f['peak32']:.0f} %), bf16 {g(f['rb16']):.0f} GFLOP/s "
        f"({100e9 * g(f['rb16']) / f['peak16']:.0f} % of bf16 peak), trainer {g(tr['rate']):.0f} GFLOP/s "
        f"({100e9 * g(tr['rate']) / f['peak32']:.0f} %)",
    ]
    if dice:
        d = {p: " ".join(f"{k} {float(v):.3f}" for k, v in dice[p]["dice"].items()) for p in dice}
        lines.append(f"target 7: Dice after the demo budget: fp32 {d['fp32']} ({dice['fp32']['seconds']:.0f} s), "
                     f"bf16 {d['bf16']} ({dice['bf16']['seconds']:.0f} s)")
    if busiest[3] > NOISY_CORES:
        lines.append(f"warning: other processes kept {busiest[3]:.2f} cores busy during '{busiest[0]}': "
                     f"the figures are disturbed, rerun on an idle machine")
    return lines


def markdown(f: dict, shape, a, tr: dict, tr10: dict, pipe: float, dice: dict | None, busiest, log: list,
             total: float, conv: dict) -> str:
    """The table, the assumptions behind it and every command run."""
    _, h, w, c, r = shape
    g = lambda ips: ips * f["train"] / 1e9  # noqa: E731
    md = ["| target | measured | reference | ratio | goal | |", "|---|---|---|---|---|---|",
          f"| 1: full trainer vs bare loop (1 rank, batch {a.batch_size}, {tr['threads']} threads) | "
          f"{tr['rate']:.2f} img/s | {f['rb32']:.2f} img/s | {f['t1']:.3f} | >= 0.95 | {verdict(f['t1'] >= 0.95)} |",
          f"| 1, medians: trainer's median window vs benchmark's p50 step | {tr['median']:.2f} img/s | "
          f"{f['p50_32']:.2f} img/s | {f['t1_median']:.3f} | – | |",
          f"| 4: input pipeline alone vs training | {pipe:.1f} img/s | {tr['rate']:.2f} img/s | {f['t4']:.1f}x | "
          f">= 10x | {verdict(f['t4'] >= 10)} |",
          f"| 5: peak RSS, {tr10['size_mb']:.0f} MB file vs {tr['size_mb']:.0f} MB file | "
          f"{tr10['maxrss_mb']:.0f} MB | {tr['maxrss_mb']:.0f} MB | {f['t5']:.3f} | <= 1.10 | "
          f"{verdict(f['t5'] <= 1.10)} |",
          f"| 5: peak RSS of unet-convert --workers 2, 40 vs 4 cases | {conv[40][0]:.0f} MB | {conv[4][0]:.0f} MB | "
          f"{conv[40][0] / conv[4][0]:.3f} | <= 1.10 | {verdict(conv[40][0] / conv[4][0] <= 1.10)} |",
          f"| 7: bf16 vs fp32, benchmark | {f['rb16']:.2f} img/s | {f['rb32']:.2f} img/s | {f['t7']:.3f} | – | |",
          f"| FLOP/s, benchmark fp32 | {g(f['rb32']):.0f} GFLOP/s | {f['peak32'] / 1e9:.0f} GFLOP/s peak | "
          f"{1e9 * g(f['rb32']) / f['peak32']:.3f} | – | |",
          f"| FLOP/s, benchmark bf16 | {g(f['rb16']):.0f} GFLOP/s | {f['peak16'] / 1e9:.0f} GFLOP/s peak | "
          f"{1e9 * g(f['rb16']) / f['peak16']:.3f} | – | |",
          f"| FLOP/s, full trainer fp32 | {g(tr['rate']):.0f} GFLOP/s | {f['peak32'] / 1e9:.0f} GFLOP/s peak | "
          f"{1e9 * g(tr['rate']) / f['peak32']:.3f} | – | |"]
    for p in (("fp32", "bf16") if dice else ()):
        dd = ", ".join(f"{k} {float(v):.3f}" for k, v in dice[p]["dice"].items())
        md.append(f"| 7: validation Dice after the demo budget, {p} | {dd} | – | – | – | "
                  f"{dice[p]['seconds']:.0f} s, median {dice[p]['median']:.2f} img/s (2 ranks) |")
    md += ["", f"Data {h}x{w}x{c} -> {r} regions. Training flops per image {f['train'] / 1e9:.2f} G (forward "
           f"{f['fwd'] / 1e9:.2f} G; the seed's 128x128x1: {f['seed_fwd'] / 1e9:.2f} G). fp32 peak "
           f"{f['peak32'] / 1e9:.0f} GFLOP/s, {f['peak_how']} (unet/perf/peak.py); bf16 peak {f['peak16'] / 1e9:.0f} "
           f"GFLOP/s ({'bf16 dot products: twice fp32' if f['peak16'] > f['peak32'] else 'no bf16 units: as fp32'}"
           f"); one vCPU = one core.",
           f"Trainer rate: images / time over the training.log windows after the first "
           f"({tr['windows']} windows of {a.log_every} steps), the median of "
           f"{', '.join(f'{x:.2f}' for x in tr.get('rates_each', [tr['rate']]))} img/s; benchmark: median of the "
           f"fp32 runs interleaved with the trainer's ({', '.join(f'{x:.2f}' for x in f['rb32_each'])} img/s). "
           f"Total {total:.0f} s{' (--quick)' if a.quick else ''}.",
           f"Other processes kept up to {busiest[3]:.2f} cores busy during a timed process ('{busiest[0]}', "
           f"average over its run){'; figures disturbed' if busiest[3] > NOISY_CORES else ''}.",
           "", "Commands:", ""]
    md += [f"    {' '.join(cmd)}   # {name}, {s:.0f} s" + ("" if o is None else f", others busy {o:.2f} cores")
           for name, cmd, s, o in log]
    return "\n".join(md) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps, no Dice runs (about 5 min)")
    ap.add_argument("--skip_dice", action="store_true", help="no Dice runs at the demo's budget")
    ap.add_argument("--batch_size", type=int, default=8, help="per rank, for every timed run")
    ap.add_argument("--out", default="perf_targets.md")
    ap.add_argument("--repeats", type=int, default=0,
                    help="trainer runs, each followed by a benchmark run (default 1 with --quick, else 3)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (data, logs)")
    ap.add_argument("--convert_only", action="store_true",
                    help="only the converter's peak RSS for 4 and 40 cases (target 5, converter)")
    a = ap.parse_args(argv)
    if not a.convert_only and precision_error("bf16"):    # target 7 runs bf16: say so now, not after 20 min
        ap.error(f"target 7 needs bf16 kernels: {precision_error('bf16')}")
    a.steps, a.log_every = (26, 5) if a.quick else (51, 5)
    a.bench_steps = 8 if a.quick else 20
    a.repeats = a.repeats or (1 if a.quick else 3)
    a.pipeline_batches = 40 if a.quick else 80
    a.tmp = tempfile.mkdtemp(prefix="perf_targets.")
    log: list = []
    t0 = time.perf_counter()
    try:
        print(f"perf_targets: working in {a.tmp}", file=sys.stderr, flush=True)
        small, large, conv = make_data(a.tmp, log)
        if a.convert_only:
            print(converter_line(conv), flush=True)
            return 0
        shape = h5_shape(small)
        b32, trs = [bench("fp32", a, shape, log, " #1")], []
        for i in range(a.repeats):
            trs.append(trainer(small, f"4 cases #{i + 1}", a, log))
            b32.append(bench("fp32", a, shape, log, f" #{i + 2}"))
        tr = sorted(trs, key=lambda t: t["rate"])[len(trs) // 2]  # the run with the median rate
        tr["rates_each"] = [t["rate"] for t in trs]
        b16 = bench("bf16", a, shape, log)
        tr10 = trainer(large, "40 cases", a, log)
        pipe = pipeline(small, a, log)
        dice = None if (a.quick or a.skip_dice) else demo_dice(a, log)
    except Failed as e:
        print(f"perf_targets: {e}", file=sys.stderr)
        return 1
    finally:
        if not a.keep:
            shutil.rmtree(a.tmp, ignore_errors=True)
    total = time.perf_counter() - t0
    with open("/proc/cpuinfo") as fh:
        mhz = perf.cpu_mhz(fh.read())
    cores = len(os.sched_getaffinity(0))
    peak32, peak_how = peak.fp32_peak(cores)      # measured after the runs, on an idle machine again
    f = figures(shape, b32, b16, tr, tr10, pipe, mhz, cores, peak32, peak.bf16_factor())
    f["peak_how"] = peak_how
    busiest = max((e for e in log if e[3] is not None), key=lambda e: e[3])
    text = markdown(f, shape, a, tr, tr10, pipe, dice, busiest, log, total, conv)
    print("\n".join(summary_lines(f, shape, a, b32, tr, tr10, pipe, dice, busiest, conv)) + "\n\n" + text,
          flush=True)
    with open(a.out, "w") as fh:
        fh.write(text)
    print(f"perf_targets: {total:.0f} s; table in {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
