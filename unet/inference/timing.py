"""Timing the engines: the one loop behind unet-export's speeds, unet-predict --benchmark and int8's cost.

``interleaved`` calls every engine on every item, the engines' order rotating from one item to the
next, so no engine always runs after another and a change of load on a shared machine hits all of
them alike; it returns the seconds of each call and what the call returned. What one call is depends
on the caller: a batch of random slices (``unet.inference.export``), or a whole case, segmented as
unet-predict does (``segment_case``: the forward passes timed within it).
"""
from __future__ import annotations

import time

import numpy as np

from unet.data import preprocess as P
from unet.inference.postprocess import postprocess, tta_flips


def interleaved(calls: dict, items, rounds: int = 1) -> dict[str, list[tuple[float, object]]]:
    """``calls[name](item)`` for every engine ``name`` and item, ``rounds`` times over ``items`` (a sequence;
    any iterable for one round, read one item at a time), the engines' order shifted by one at each
    item; per engine, ``(seconds, result)`` of each call, in the order of the calls."""
    if rounds > 1:
        items = list(items)
    order = list(calls)
    done = {name: [] for name in order}
    turn = 0
    for _ in range(rounds):
        for item in items:
            shift = turn % len(order)
            turn += 1
            for name in order[shift:] + order[:shift]:
                t = time.perf_counter()
                result = calls[name](item)
                done[name].append((time.perf_counter() - t, result))
    return done


def warm_up(pred) -> None:
    """One batch through a Predictor's engine before it is timed: engine start, compilation, tracing."""
    pred.network_output(np.zeros((pred.batch_size, pred.size, pred.size, len(pred.modalities)), np.float32))


def segment_case(pred, chans: np.ndarray, spacing, post) -> tuple[float, int, np.ndarray, np.ndarray]:
    """One case through a Predictor as unet-predict segments it: (seconds of the forward passes alone,
    slices through the network, probabilities on the case grid, post-processed region masks)."""
    inp = pred.network_input(chans)
    t = time.perf_counter()
    out, run = pred.input_output(inp, post.tta, head_only=post.head_mask)
    forward = time.perf_counter() - t
    probs = P.to_case_grid(out, inp)
    masks = postprocess(probs, inp.brain, pred.regions, spacing, post)
    return forward, run * len(tta_flips(post.tta)), probs, masks
