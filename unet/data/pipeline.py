"""Input pipeline: which samples each rank reads at each step, augmentation, tf.data.

Sharding rule (pure, tested): every epoch has one permutation of the training
set, drawn from (seed, epoch) and so identical on all ranks. Global batch ``t``
is ``perm[t*G:(t+1)*G]`` with G = batch_size x ranks; rank ``r`` reads the
slice ``[r*B:(r+1)*B]`` of it. Every sample is used once per epoch; the last
global batch is topped up from the start of the permutation, so every rank runs
the same number of equally sized steps (no rank waits in an allreduce for a
step another rank never takes). A single rank with batch 2B therefore sees
exactly the samples that two ranks with batch B see together.

A position inside an epoch is a count of samples, not of steps: a run resumed
(or an elastic job resized) at sample ``s`` continues with ``perm[s:]`` cut
into global batches of whatever size the job now has, so no sample of the
epoch is skipped or repeated when the number of ranks changes.
"""
from __future__ import annotations

import math

import numpy as np


def steps_per_epoch(n: int, global_batch: int, cap: int = 0) -> int:
    steps = math.ceil(n / global_batch)
    return min(steps, cap) if cap else steps


def epoch_samples(n: int, global_batch: int, cap: int = 0) -> int:
    """Samples an epoch covers: the whole set, or ``cap`` global batches of it."""
    return min(n, cap * global_batch) if cap else n


def epoch_order(n: int, epoch: int, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, 7919, epoch]).permutation(n)


def rank_batches(n: int, batch_size: int, rank: int, size: int, epoch: int, seed: int,
                 cap: int = 0, start_sample: int = 0) -> list[np.ndarray]:
    """Index arrays this rank reads, one per remaining step of ``epoch`` from ``start_sample``."""
    g = batch_size * size
    total = epoch_samples(n, g, cap)
    steps = max(math.ceil((total - start_sample) / g), 0)
    order = epoch_order(n, epoch, seed)
    need = start_sample + steps * g
    if need > n:
        order = np.concatenate([order, np.resize(order, need - n)])
    base = start_sample + rank * batch_size
    return [order[base + t * g: base + t * g + batch_size] for t in range(steps)]


def val_shard(n: int, rank: int, size: int) -> np.ndarray:
    """Validation indices of this rank: strided, so shards differ by at most one."""
    return np.arange(rank, n, size)


def augment(imgs: np.ndarray, msks: np.ndarray, rng: np.random.Generator):
    """Random flips, 90-degree rotations (square images) and intensity scale/shift.

    Geometric changes apply to image and mask alike; intensity only to the image.
    """
    imgs, msks = imgs.copy(), msks.copy()
    square = imgs.shape[1] == imgs.shape[2]
    for i in range(imgs.shape[0]):
        if rng.random() < 0.5:
            imgs[i], msks[i] = imgs[i, :, ::-1], msks[i, :, ::-1]
        if rng.random() < 0.5:
            imgs[i], msks[i] = imgs[i, ::-1], msks[i, ::-1]
        if square:
            k = int(rng.integers(4))
            if k:
                imgs[i], msks[i] = np.rot90(imgs[i], k), np.rot90(msks[i], k)
        c = imgs.shape[-1]
        imgs[i] = imgs[i] * rng.uniform(0.9, 1.1, c).astype(np.float32) \
            + rng.uniform(-0.1, 0.1, c).astype(np.float32)
    return imgs, msks


def train_dataset(source, *, batch_size: int, rank: int, size: int, epoch: int, seed: int,
                  cap: int = 0, augment_on: bool = True, prefetch: int = 2, start: int = 0,
                  start_sample: int | None = None):
    """tf.data.Dataset of this rank's (images, masks) batches for the rest of one epoch.

    The epoch continues at sample ``start_sample`` (default ``start`` global batches in),
    and ``start`` numbers the first step. Augmentation draws from a generator seeded by
    (seed, epoch, rank, step), so a run resumed mid-epoch sees exactly the batches an
    uninterrupted run would.
    """
    import tensorflow as tf
    h, w, c, r = source.shape
    if start_sample is None:
        start_sample = start * batch_size * size
    batches = rank_batches(len(source), batch_size, rank, size, epoch, seed, cap, start_sample)

    def gen():
        for i, idx in enumerate(batches):
            imgs, msks = source.read(idx)
            if augment_on:
                imgs, msks = augment(imgs, msks, np.random.default_rng([seed, 104729, epoch, rank, start + i]))
            yield imgs, msks

    sig = (tf.TensorSpec((batch_size, h, w, c), tf.float32), tf.TensorSpec((batch_size, h, w, r), tf.float32))
    return tf.data.Dataset.from_generator(gen, output_signature=sig).prefetch(prefetch), len(batches)


def val_batches(source, *, batch_size: int, rank: int, size: int):
    """This rank's validation batches (numpy), unaugmented; the last one may be short."""
    idx = val_shard(len(source), rank, size)
    for s in range(0, len(idx), batch_size):
        yield source.read(idx[s:s + batch_size])
