"""Figures over cases for the evaluation summary: mean, spread, bootstrap interval, per-fold means (pure numpy).

The 95 % interval of a mean over cases is the percentile bootstrap: resample the n case values
with replacement, take each resample's mean, and report the 2.5th and 97.5th percentiles of those
means (numpy's linear interpolation). Resamples are drawn in blocks of ``BLOCK``, block ``j`` from
``numpy.random.default_rng([seed, j]).integers(0, n, (rows, n))``, so memory stays bounded for
thousands of cases and the same seed gives the same interval.
"""
from __future__ import annotations

import numpy as np

RESAMPLES = 10000
SEED = 0
LEVEL = 0.95
BLOCK = 1000         # resamples drawn at once


def bootstrap_mean_ci(values, level: float = LEVEL, resamples: int = RESAMPLES,
                      seed: int = SEED) -> tuple[float, float]:
    """(low, high) percentile-bootstrap interval of the mean of ``values``; (nan, nan) for no values."""
    v = np.asarray(values, float).ravel()
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1) (got {level})")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1 (got {resamples})")
    if v.size == 0:
        return float("nan"), float("nan")
    means = np.empty(resamples)
    for j, start in enumerate(range(0, resamples, BLOCK)):
        rows = min(BLOCK, resamples - start)
        means[start:start + rows] = v[np.random.default_rng([seed, j]).integers(0, v.size, (rows, v.size))].mean(1)
    lo, hi = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def describe(values, seed: int = SEED) -> dict:
    """Mean, standard deviation (population, ddof 0, as ``unet.metrics.summarise``), the bootstrap
    interval of the mean (``ci_lo``, ``ci_hi``), and the number of values."""
    v = np.asarray(values, float).ravel()
    lo, hi = bootstrap_mean_ci(v, seed=seed)
    nan = float("nan")
    return {"n": int(v.size), "mean": float(v.mean()) if v.size else nan, "std": float(v.std()) if v.size else nan,
            "ci_lo": lo, "ci_hi": hi}


def per_fold_means(rows: list[dict], columns: list[str], key: str = "fold") -> dict[int, dict]:
    """fold -> {"n": cases, column: mean over that fold's cases} for the rows that carry ``key``."""
    out: dict[int, dict] = {}
    for fold in sorted({int(r[key]) for r in rows if r.get(key) is not None}):
        mine = [r for r in rows if r.get(key) is not None and int(r[key]) == fold]
        out[fold] = dict(n=len(mine), **{c: float(np.mean([float(r[c]) for r in mine])) for c in columns})
    return out
