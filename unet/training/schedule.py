"""Learning-rate schedule: a pure function of the global step.

``step`` counts optimizer updates, i.e. global batches (batch_size x workers
images each); every rank computes the same value. The seed's decay is
continuous exponential, ``lr * lr_fraction ** (step / decay_steps)``. On top:

* the base rate is scaled with the number of workers (linear by default, as the
  global batch grows linearly with them; sqrt or none on request), and
* a linear warmup from the one-worker rate to the scaled rate over
  ``warmup_steps`` (Goyal et al., "Accurate, Large Minibatch SGD", 2017).

Because ``decay_steps`` counts global steps, adding workers (larger global
batch, fewer steps per epoch) makes the rate decay more slowly per epoch but
identically per update; a run resumed on a different worker count continues
the decay curve from the same global step, with the new scale factor.
"""
from __future__ import annotations

import math


def worker_scale(num_workers: int, scaling: str = "linear") -> float:
    """Factor applied to the base rate for ``num_workers`` workers."""
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if scaling == "linear":
        return float(num_workers)
    if scaling == "sqrt":
        return math.sqrt(num_workers)
    if scaling == "none":
        return 1.0
    raise ValueError(f"unknown lr scaling {scaling!r} (linear, sqrt, none)")


def learning_rate(step: int, *, base_lr: float, num_workers: int = 1, scaling: str = "linear",
                  warmup_steps: int = 0, decay_steps: int = 150, lr_fraction: float = 0.25,
                  constant: bool = False) -> float:
    """Learning rate to use for the update numbered ``step`` (0-based)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    peak = base_lr * worker_scale(num_workers, scaling)
    if warmup_steps > 0 and step < warmup_steps:
        lr = base_lr + (peak - base_lr) * step / warmup_steps
    else:
        lr = peak
    if not constant:
        lr *= lr_fraction ** (step / decay_steps)
    return lr
