"""unet-predict --benchmark: every engine on the same cases, in one run, interleaved.

Each case is read once. Then, ``repeats`` times over the cases, every engine that can run the
model segments the case in turn (the order rotates, so no engine always follows another): the
network's input slices, the forward pass over every slice (in batches, as unet-predict does),
the output back on the case grid and post-processed. Per engine it prints

* slices/s: all slices over the time of the forward passes alone;
* per-case latency p50/p90: input preparation + forward pass + post-processing of one case
  (reading and writing files excluded), over cases and rounds;
* the ratio of slices/s to TensorFlow's, and GFLOP/s as a share of the CPU's fp32 peak
  (``unet.perf.flops``: convolutions of the forward pass; the peak measured by ``unet.perf.peak`` on as
  many cores as the engines use, else cores x clock x flop/cycle of its ISA); for the int8 row
  it is the rate of the same fp32 flops, so it can exceed 100 %;
* the largest probability difference to TensorFlow on the first case.

With ``int8`` a row ``openvino-int8`` adds the NNCF-quantised IR (``unet-export --int8``), and the
Dice it costs, as measured when it was made, is printed under the table.

With ``eager`` a row ``tf-eager`` adds the Keras model called eagerly, layer by layer: how
unet-predict ran TensorFlow before the engines (the TensorFlow engine traces it as a tf.function).

Each engine gets the threads of the trainer's rule (the physical cores this process is bound to),
or ``--num_threads``.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

from unet.inference import engines as E
from unet.perf import flops
from unet.data import preprocess as P
from unet.perf.peak import fp32_peak
from unet.inference.postprocess import postprocess
from unet.inference.predictor import Predictor, reference_image

INT8_ROW = "openvino-int8"


def time_case(pred, chans, spacing, post) -> tuple[float, float, int, np.ndarray, np.ndarray]:
    """(seconds of the forward passes, seconds of the whole case, slices, probabilities on the case
    grid, post-processed region masks)."""
    t0 = time.perf_counter()
    inp = pred.network_input(chans)
    t1 = time.perf_counter()
    out = pred.network_output(inp.slices, post.tta)
    t2 = time.perf_counter()
    probs = P.to_case_grid(out, inp)
    masks = postprocess(probs, inp.brain, pred.regions, spacing, post)
    return t2 - t1, time.perf_counter() - t0, len(inp.slices) * (4 if post.tta else 1), probs, masks


def run(model: str, cases, post, *, threads: int = 0, repeats: int = 3, engines=None, eager: bool = False,
        int8: bool = False) -> int:
    from unet.distributed.ranks import inference_threads
    threads = threads or inference_threads()
    preds, skipped = {}, []
    for name in engines or E.ENGINES:
        try:
            preds[name] = Predictor(model, engine=name, threads=threads)
        except E.EngineError as e:
            skipped.append(str(e))
    if int8:       # the quantised IR, one more row (an error if it is missing: it was asked for)
        preds[INT8_ROW] = Predictor(model, engine="openvino", threads=threads, int8=True)
    if not preds:
        raise E.EngineError("; ".join(skipped))
    if eager and "tensorflow" in preds:     # the same model.keras called eagerly: the path before the engines
        preds["tf-eager"] = Predictor(model, engine="tensorflow", threads=threads)
        preds["tf-eager"]._model = E.TensorFlowEngine(preds["tf-eager"].model_path, threads, traced=False)
    first = next(iter(preds.values()))
    data = []
    for case in cases:
        chans, _, _ = first.read(case)
        data.append((case.case_id, chans, reference_image(case).GetSpacing()[::-1]))
    # the peak first, on the cores the engines will use, under the same load
    peak, how = fp32_peak(min(threads, len(os.sched_getaffinity(0))))
    load0 = os.getloadavg()[0]
    for name, pred in preds.items():           # warm-up: engine start, compilation, tracing
        pred.network_output(pred.network_input(data[0][1]).slices[:pred.batch_size])
    forward = {n: 0.0 for n in preds}
    slices = {n: 0 for n in preds}
    latency = {n: [] for n in preds}
    probs0 = {}
    order = list(preds)
    for r in range(repeats):
        for k, (cid, chans, spacing) in enumerate(data):
            shift = (r * len(data) + k) % len(order)
            for name in order[shift:] + order[:shift]:
                fwd, total, n, probs, _ = time_case(preds[name], chans, spacing, post)
                forward[name] += fwd
                slices[name] += n
                latency[name].append(total)
                if r == 0 and k == 0:
                    probs0[name] = probs
    load1 = os.getloadavg()[0]
    meta = first.meta
    d = meta["data"]
    fwd_flops = flops.forward_flops(d["height"], d["width"], d["channels"], d["regions"],
                                    use_upsampling=bool((meta.get("model") or {}).get("use_upsampling")))
    rows = {}
    for name in preds:
        rate = slices[name] / forward[name]
        rows[name] = dict(rate=rate, p50=float(np.percentile(latency[name], 50)),
                          p90=float(np.percentile(latency[name], 90)), gflops=rate * fwd_flops / 1e9,
                          share=rate * fwd_flops / peak, threads=preds[name].model.threads,
                          diff=float(np.abs(probs0[name] - probs0["tensorflow"]).max()) if "tensorflow" in probs0
                          else float("nan"))
    tf_rate = rows["tensorflow"]["rate"] if "tensorflow" in rows else float("nan")
    print(f"benchmark: model {model}; {len(data)} case(s) x {repeats} round(s), {slices[order[0]]} slices per engine"
          f"{' (flip TTA: 4 passes each)' if post.tta else ''}; batch {first.batch_size}; threads {threads} per "
          f"engine; {fwd_flops / 1e9:.2f} GFLOP per slice; fp32 peak {peak / 1e9:.0f} GFLOP/s ({how}); "
          f"load average {load0:.2f} before, {load1:.2f} after")
    for line in skipped:
        print(f"benchmark: skipped: {line}")
    print(f"{'engine':<14}{'slices/s':>10}{'vs TF':>8}{'case p50 s':>12}{'case p90 s':>12}{'GFLOP/s':>10}"
          f"{'% peak':>8}{'max |dp| vs TF':>16}")
    for name, w in rows.items():
        print(f"{name:<14}{w['rate']:>10.2f}{w['rate'] / tf_rate:>8.2f}{w['p50']:>12.2f}{w['p90']:>12.2f}"
              f"{w['gflops']:>10.1f}{100 * w['share']:>8.1f}{w['diff']:>16.2e}")
    for name, w in rows.items():   # one parseable line per engine
        print(f"benchmark: engine={name} slices_per_s={w['rate']:.3f} ratio_vs_tensorflow={w['rate'] / tf_rate:.3f} "
              f"latency_p50_s={w['p50']:.3f} latency_p90_s={w['p90']:.3f} peak_share={w['share']:.3f} "
              f"max_abs_diff_vs_tensorflow={w['diff']:.3g} threads={w['threads']}")
    if int8:
        print(f"benchmark: {E.int8_cost_line(preds[INT8_ROW].meta)}")
    sys.stdout.flush()
    return 0
