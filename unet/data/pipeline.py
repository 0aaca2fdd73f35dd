"""Input pipeline: which samples each rank reads at each step, augmentation, the epoch's batches.

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

Tumour oversampling (``--foreground_fraction F``, nnU-Net's): the last k = round(F x B)
places of every rank's batch of B take slices that hold tumour, from a second
permutation of those slices (drawn from (seed, epoch), repeated when it runs out);
the other B - k places take the epoch's permutation of all slices in turn. Which
slice sits at a position is a pure function of (seed, epoch, position), and a
position's place in its rank's batch is position mod B, so every rank's batch holds
exactly k of them, resume and resizing keep working as above, and an epoch has the
same steps as without oversampling (it then reaches only the first (1 - k/B) of its
permutation of all slices: each epoch a different part).

Tumour-free slices drawn anew each epoch (``--background_fraction F`` < 1): an epoch's
permutation runs over its members, every slice that holds tumour and round(F x the
tumour-free ones) of the others, drawn from (seed, epoch), instead of over the whole file.
On a file of every brain slice, F = 0.1 gives each epoch the batch mix of ``unet-convert
--slices tumour`` (which keeps a tenth of the tumour-free slices, the same tenth in every
epoch) with other tumour-free slices each epoch. The members depend on (seed, epoch) only,
so all ranks draw the same ones, and the rules above (equal steps, resume at a sample,
oversampling's places) hold over an epoch's members as over a whole file.
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


def foreground_per_batch(fraction: float, batch_size: int) -> int:
    """Places of a rank's batch that take tumour slices: round(fraction x batch_size), halves up."""
    return int(math.floor(fraction * batch_size + 0.5))


def background_count(free: int, fraction: float) -> int:
    """Tumour-free slices an epoch holds with ``--background_fraction``: round(fraction x free), halves up."""
    return min(free, int(math.floor(fraction * free + 0.5)))


def epoch_members(n: int, tumour: np.ndarray, fraction: float, epoch: int, seed: int) -> np.ndarray:
    """The sorted sample indices ``epoch`` permutes: every index of ``tumour`` and
    ``background_count`` of the other indices of ``range(n)``, drawn from (seed, epoch)."""
    tumour = np.asarray(tumour, np.int64)
    free = np.setdiff1d(np.arange(n, dtype=np.int64), tumour, assume_unique=True)
    pick = np.random.default_rng([seed, 32452843, epoch]).permutation(len(free))[:background_count(len(free), fraction)]
    return np.sort(np.concatenate([tumour, free[pick]]))


def epoch_length(n: int, n_tumour: int, fraction: float = 1.0) -> int:
    """Samples an epoch permutes: ``n``, or with ``fraction`` < 1 its members' count (``epoch_members``)."""
    return n if fraction >= 1 else n_tumour + background_count(n - n_tumour, fraction)


def stream(n: int, batch_size: int, epoch: int, seed: int, positions: np.ndarray,
           foreground: np.ndarray | None = None, k: int = 0, members: np.ndarray | None = None) -> np.ndarray:
    """The sample at each position (sample count from the epoch's start) of ``epoch``'s stream: the
    epoch's permutation in turn (repeated past its end), or with ``k`` > 0 the last ``k`` places of each
    ``batch_size`` positions from a permutation of the ``foreground`` indices instead. ``members``: the
    permutation runs over these indices (``epoch_members``) instead of ``range(n)``."""
    j = np.asarray(positions, np.int64)
    order = epoch_order(n if members is None else len(members), epoch, seed)
    if members is not None:
        order, n = np.asarray(members, np.int64)[order], len(members)
    if not k:
        return order[j % n]
    fg = np.asarray(foreground, np.int64)
    fg = fg[np.random.default_rng([seed, 15485863, epoch]).permutation(len(fg))]
    place = j % batch_size
    fg_before = (j // batch_size) * k + np.maximum(place - (batch_size - k), 0)   # tumour places before j
    return np.where(place >= batch_size - k, fg[fg_before % len(fg)], order[(j - fg_before) % n])


def rank_batches(n: int, batch_size: int, rank: int, size: int, epoch: int, seed: int,
                 cap: int = 0, start_sample: int = 0, foreground: np.ndarray | None = None,
                 k: int = 0, members: np.ndarray | None = None) -> list[np.ndarray]:
    """Index arrays this rank reads, one per remaining step of ``epoch`` from ``start_sample``;
    with ``k`` > 0 the last ``k`` of each are slices among ``foreground`` (tumour oversampling);
    ``members``: the epoch covers these of the ``n`` samples (``epoch_members``), not all."""
    if k and (not 0 < k <= batch_size or foreground is None or not len(foreground)):
        raise ValueError(f"{k} tumour places per batch of {batch_size} need 1..{batch_size} places and tumour slices")
    if members is not None and not len(members):
        raise ValueError("an epoch with no member")
    g = batch_size * size
    total = epoch_samples(n if members is None else len(members), g, cap)
    steps = max(math.ceil((total - start_sample) / g), 0)
    base = start_sample + rank * batch_size
    pos = base + np.arange(steps)[:, None] * g + np.arange(batch_size)[None, :]
    return list(stream(n, batch_size, epoch, seed, pos, foreground, k, members))


def val_shard(n: int, rank: int, size: int) -> np.ndarray:
    """Validation indices of this rank: strided, so shards differ by at most one."""
    return np.arange(rank, n, size)


AUG_SCALE = 0.1   # each channel of an image times U(1 - s, 1 + s) ...
AUG_SHIFT = 0.1   # ... plus U(-t, t), in the z-scored units of unet-convert's normalisation
GAMMA_RANGE = (0.7, 1.5)   # nnU-Net's: half the draws below 1 (mid-tones brighter), half above


def gamma_channel(values: np.ndarray, gamma: float) -> np.ndarray:
    """``values`` (one channel's head pixels, 1-D) through a gamma curve over their own range, then brought back
    to their mean and standard deviation: the order of intensities stays, the contrast between tissues changes."""
    lo, span = float(values.min()), float(np.ptp(values))
    if span <= 0:
        return values
    out = ((values - lo) / span) ** gamma * span + lo
    sd = float(out.std())
    return ((out - out.mean()) * (float(values.std()) / sd if sd > 0 else 1.0) + float(values.mean())).astype(
        values.dtype)


def _gamma(img: np.ndarray, p: float, rng: np.random.Generator) -> None:
    """Each channel of ``img`` (H, W, C), with probability ``p``, through ``gamma_channel`` on the head's pixels (any
    channel non-zero; the background stays 0), gamma drawn from ``GAMMA_RANGE``'s lower or upper part alike."""
    head = np.any(img != 0, axis=-1)
    if head.sum() < 2:
        return
    for c in range(img.shape[-1]):
        if rng.random() < p:
            lo, hi = GAMMA_RANGE
            g = rng.uniform(lo, 1.0) if rng.random() < 0.5 else rng.uniform(1.0, hi)
            img[..., c][head] = gamma_channel(img[..., c][head], g)


BIAS_K = (2.0, 5.0)   # mean / std of a skull-stripped brain's intensities, the z-scores' offset from 0 signal


def bias_field(shape: tuple[int, int], coeffs) -> np.ndarray:
    """exp(a x + b y + c x^2 + d y^2 + e x y) over an (H, W) grid, x and y running over [-1, 1]: a smooth
    multiplicative field, the shape of an MR coil's bias (``coeffs`` = (a, b, c, d, e))."""
    y, x = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    a, b, c, d, e = coeffs
    return np.exp(a * x + b * y + c * x * x + d * y * y + e * x * y).astype(np.float32)


def _bias(img: np.ndarray, amp: float, rng: np.random.Generator) -> None:
    """Each channel of ``img`` (H, W, C) as if its intensities had met a bias field before the z-scoring: the
    head's z-scores z taken back to a signal z + k (k drawn from ``BIAS_K``), times ``bias_field`` with
    coefficients drawn from [-``amp``, ``amp``], less k. Normal tissue so turns brighter or darker by region,
    as on a scanner; the background stays 0."""
    head = np.any(img != 0, axis=-1)
    for c in range(img.shape[-1]):
        k = rng.uniform(*BIAS_K)
        field = bias_field(img.shape[:2], rng.uniform(-amp, amp, 5))
        img[..., c][head] = (img[..., c][head] + k) * field[head] - k


def augment(imgs: np.ndarray, msks: np.ndarray, rng: np.random.Generator,
            scale: float = AUG_SCALE, shift: float = AUG_SHIFT, gamma: float = 0.0, bias: float = 0.0):
    """Random flips, 90-degree rotations (square images), gamma (with probability ``gamma`` per channel), and
    intensity scale/shift.

    Geometric changes apply to image and mask alike; intensity only to the image, each channel
    (modality) its own factor in [1 - ``scale``, 1 + ``scale``] and offset in [-``shift``, ``shift``].
    ``bias`` > 0: each channel through ``_bias`` with coefficients up to ``bias``. ``gamma`` and ``bias`` 0
    draw nothing: the other draws are then those of an augmentation without them.
    """
    imgs, msks = imgs.copy(), msks.copy()
    square = imgs.shape[1] == imgs.shape[2]
    for i in range(imgs.shape[0]):
        if gamma > 0:
            _gamma(imgs[i], gamma, rng)
        if bias > 0:
            _bias(imgs[i], bias, rng)
        if rng.random() < 0.5:
            imgs[i], msks[i] = imgs[i, :, ::-1], msks[i, :, ::-1]
        if rng.random() < 0.5:
            imgs[i], msks[i] = imgs[i, ::-1], msks[i, ::-1]
        if square:
            k = int(rng.integers(4))
            if k:
                imgs[i], msks[i] = np.rot90(imgs[i], k), np.rot90(msks[i], k)
        c = imgs.shape[-1]
        imgs[i] = imgs[i] * rng.uniform(1.0 - scale, 1.0 + scale, c).astype(np.float32) \
            + rng.uniform(-shift, shift, c).astype(np.float32)
    return imgs, msks


class Batches:
    """An epoch's batches for one rank: iterating reads and augments them in turn, as TensorFlow tensors.

    A plain Python iterable, not a ``tf.data`` pipeline: destroying a ``from_generator`` + ``prefetch``
    iterator at the end of every epoch blocked the training loop for 10-12 s on these 2-core machines
    (a rank bound to one core; docs/PERFORMANCE.md, "The epoch's end"), while reading and augmenting a
    batch of 4 takes ~10 ms of a ~900 ms step, so nothing is gained by overlapping it."""

    def __init__(self, produce, n: int):
        self._produce, self._n = produce, n

    def __len__(self) -> int:
        return self._n

    def __iter__(self):
        import tensorflow as tf
        for imgs, msks in self._produce():
            yield tf.convert_to_tensor(imgs), tf.convert_to_tensor(msks)


def train_dataset(source, *, batch_size: int, rank: int, size: int, epoch: int, seed: int,
                  cap: int = 0, augment_on: bool = True, start: int = 0,
                  start_sample: int | None = None, foreground_fraction: float = 0.0,
                  background_fraction: float = 1.0, aug_scale: float = AUG_SCALE,
                  aug_shift: float = AUG_SHIFT, aug_gamma: float = 0.0, aug_bias: float = 0.0):
    """(``Batches`` of this rank's (images, masks) for the rest of one epoch, their number).

    The epoch continues at sample ``start_sample`` (default ``start`` global batches in),
    and ``start`` numbers the first step. Augmentation draws from a generator seeded by
    (seed, epoch, rank, step), so a run resumed mid-epoch sees exactly the batches an
    uninterrupted run would. ``foreground_fraction`` > 0: round(F x batch_size) of each batch
    are slices with tumour (``source.tumour_slices()``); ``background_fraction`` < 1: the epoch
    covers the tumour slices and that share of the others, drawn for this epoch (``epoch_members``).
    """
    if start_sample is None:
        start_sample = start * batch_size * size
    k = foreground_per_batch(foreground_fraction, batch_size)
    members = (epoch_members(len(source), source.tumour_slices(), background_fraction, epoch, seed)
               if background_fraction < 1 else None)
    batches = rank_batches(len(source), batch_size, rank, size, epoch, seed, cap, start_sample,
                           source.tumour_slices() if k else None, k, members)

    def gen():
        for i, idx in enumerate(batches):
            imgs, msks = source.read(idx)
            if augment_on:
                imgs, msks = augment(imgs, msks, np.random.default_rng([seed, 104729, epoch, rank, start + i]),
                                     aug_scale, aug_shift, aug_gamma, aug_bias)
            yield imgs.astype(np.float32, copy=False), msks.astype(np.float32, copy=False)

    return Batches(gen, len(batches)), len(batches)


def val_batches(source, *, batch_size: int, rank: int, size: int):
    """This rank's validation batches (numpy), unaugmented; the last one may be short."""
    idx = val_shard(len(source), rank, size)
    for s in range(0, len(idx), batch_size):
        yield source.read(idx[s:s + batch_size])
