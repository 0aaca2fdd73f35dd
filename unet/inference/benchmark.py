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

import numpy as np

from unet.distributed.ranks import inference_threads
from unet.inference import engines as E
from unet.inference.postprocess import tta_flips
from unet.inference.predictor import Predictor, reference_image
from unet.inference.timing import interleaved, segment_case, warm_up
from unet.perf import flops
from unet.perf.peak import fp32_peak

INT8_ROW = "openvino-int8"


def predictors(model: str, threads: int, engines=None, eager: bool = False, int8: bool = False):
    """(name -> Predictor of every engine that can run ``model``, why the others cannot)."""
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
    return preds, skipped


def run(model: str, cases, post, *, threads: int = 0, repeats: int = 3, engines=None, eager: bool = False,
        int8: bool = False) -> int:
    threads = threads or inference_threads()
    preds, skipped = predictors(model, threads, engines, eager, int8)
    first = next(iter(preds.values()))
    data = []
    for case in cases:
        chans, _, _ = first.read(case)
        data.append((case.case_id, chans, reference_image(case).GetSpacing()[::-1]))
    # the peak first, on the cores the engines will use, under the same load
    peak, how = fp32_peak(min(threads, len(os.sched_getaffinity(0))))
    load0 = os.getloadavg()[0]
    for pred in preds.values():
        warm_up(pred)
    probs0 = {}      # each engine's probabilities of the first case, to compare with TensorFlow's

    def call(name):
        def segment(item):
            _, chans, spacing = item
            fwd, n, probs, _ = segment_case(preds[name], chans, spacing, post)
            probs0.setdefault(name, probs)
            return fwd, n
        return segment

    timed = interleaved({name: call(name) for name in preds}, data, repeats)
    load1 = os.getloadavg()[0]
    d, m = first.meta["data"], first.meta.get("model") or {}
    fwd_flops = flops.forward_flops(d["height"], d["width"], d["channels"], d["regions"],
                                    use_upsampling=bool(m.get("use_upsampling")))
    rows = {}
    for name, calls in timed.items():
        rate = sum(n for _, (_, n) in calls) / sum(fwd for _, (fwd, _) in calls)
        latency = [total for total, _ in calls]
        rows[name] = dict(rate=rate, p50=float(np.percentile(latency, 50)), p90=float(np.percentile(latency, 90)),
                          gflops=rate * fwd_flops / 1e9, share=rate * fwd_flops / peak,
                          threads=preds[name].model.threads,
                          diff=float(np.abs(probs0[name] - probs0["tensorflow"]).max()) if "tensorflow" in probs0
                          else float("nan"))
    slices = sum(n for _, (_, n) in next(iter(timed.values())))
    tta_note = f" (flip TTA: {len(tta_flips(post.tta))} passes each)" if post.tta else ""
    print(f"benchmark: model {model}; {len(data)} case(s) x {repeats} round(s), {slices} slices per engine"
          f"{tta_note}; batch {first.batch_size}; threads {threads} per "
          f"engine; {fwd_flops / 1e9:.2f} GFLOP per slice; fp32 peak {peak / 1e9:.0f} GFLOP/s ({how}); "
          f"load average {load0:.2f} before, {load1:.2f} after")
    for line in skipped:
        print(f"benchmark: skipped: {line}")
    print_rows(rows)
    if int8:
        print(f"benchmark: {E.int8_cost_line(preds[INT8_ROW].meta)}")
    sys.stdout.flush()
    return 0


def print_rows(rows: dict) -> None:
    """The table, then one parseable line per engine."""
    tf_rate = rows["tensorflow"]["rate"] if "tensorflow" in rows else float("nan")
    print(f"{'engine':<14}{'slices/s':>10}{'vs TF':>8}{'case p50 s':>12}{'case p90 s':>12}{'GFLOP/s':>10}"
          f"{'% peak':>8}{'max |dp| vs TF':>16}")
    for name, w in rows.items():
        print(f"{name:<14}{w['rate']:>10.2f}{w['rate'] / tf_rate:>8.2f}{w['p50']:>12.2f}{w['p90']:>12.2f}"
              f"{w['gflops']:>10.1f}{100 * w['share']:>8.1f}{w['diff']:>16.2e}")
    for name, w in rows.items():
        print(f"benchmark: engine={name} slices_per_s={w['rate']:.3f} ratio_vs_tensorflow={w['rate'] / tf_rate:.3f} "
              f"latency_p50_s={w['p50']:.3f} latency_p90_s={w['p90']:.3f} peak_share={w['share']:.3f} "
              f"max_abs_diff_vs_tensorflow={w['diff']:.3g} threads={w['threads']}")
