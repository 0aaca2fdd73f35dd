"""Losses and metrics of the training step (TensorFlow ops).

The seed's Dice loss pools the whole batch: ``-log((2*sum(y*p) + s) /
(sum(y) + sum(p) + s))`` with s = 1, over every pixel and region, so the whole
tumour (by far the largest region) dominates it and the tumour core and the
enhancing tumour get almost no gradient. The default, ``region_dice_bce``, takes
the soft Dice of each region separately (pooled over batch and pixels), averages
``-log(Dice)`` over the regions present in the batch, and adds binary
cross-entropy (docs/TRAINING.md, "Loss", for what was measured). Metrics are
per region, from pooled sums, so ranks can add their sums and get exactly the
single-process value. Inputs are cast to float32 first, so a bfloat16
prediction is summed in float32.
"""
from __future__ import annotations

import tensorflow as tf

SMOOTH = 1.0


def _f32(*tensors):
    return [tf.cast(t, tf.float32) for t in tensors]


def dice_loss(y_true: tf.Tensor, y_pred: tf.Tensor, smooth: float = SMOOTH) -> tf.Tensor:
    y_true, y_pred = _f32(y_true, y_pred)
    inter = tf.reduce_sum(y_true * y_pred)
    denom = tf.reduce_sum(y_true) + tf.reduce_sum(y_pred)
    return -tf.math.log((2.0 * inter + smooth) / (denom + smooth))


def bce_loss(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
    y_true, y_pred = _f32(y_true, y_pred)
    eps = 1e-7
    p = tf.clip_by_value(y_pred, eps, 1.0 - eps)
    return -tf.reduce_mean(y_true * tf.math.log(p) + (1.0 - y_true) * tf.math.log(1.0 - p))


def region_dice_loss(y_true: tf.Tensor, y_pred: tf.Tensor, smooth: float = SMOOTH,
                     present_only: bool = True, log: bool = True) -> tf.Tensor:
    """Soft Dice per region (pooled over batch and pixels), ``-log`` of it averaged over regions.

    ``present_only``: regions absent from the batch's reference are left out of the mean
    (their Dice is undefined; cross-entropy still punishes false positives there), so a
    batch without enhancing tumour does not reward an all-background answer.
    ``log``: ``-log(Dice)`` rather than ``1 - Dice``; near the all-background state the
    gradient of ``1 - Dice`` vanishes and training stays there (docs/TRAINING.md).
    """
    y_true, y_pred = _f32(y_true, y_pred)
    axes = tuple(range(len(y_true.shape) - 1))   # static: batch and pixels
    inter = tf.reduce_sum(y_true * y_pred, axis=axes)
    ref = tf.reduce_sum(y_true, axis=axes)
    dice = (2.0 * inter + smooth) / (ref + tf.reduce_sum(y_pred, axis=axes) + smooth)
    per_region = -tf.math.log(dice) if log else 1.0 - dice
    if not present_only:
        return tf.reduce_mean(per_region)
    present = tf.cast(ref > 0, tf.float32)
    return tf.reduce_sum(present * per_region) / tf.maximum(tf.reduce_sum(present), 1.0)


def get_loss(name: str, bce_weight: float = 1.0):
    """The loss of ``--loss name``; ``bce_weight`` multiplies the cross-entropy of the combined ones."""
    if name == "dice":
        return dice_loss
    if name == "bce":
        return bce_loss
    if name == "dice_bce":
        return lambda y, p: dice_loss(y, p) + bce_weight * bce_loss(y, p)
    if name == "region_dice_bce":
        return lambda y, p: region_dice_loss(y, p) + bce_weight * bce_loss(y, p)
    raise ValueError(f"unknown loss {name!r}")


def dice_sums(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
    """Per-region [intersection, sum(y)+sum(p)] over batch and pixels, shape (2, R)."""
    y_true, y_pred = _f32(y_true, y_pred)
    axes = (0, 1, 2)
    inter = tf.reduce_sum(y_true * y_pred, axis=axes)
    denom = tf.reduce_sum(y_true, axis=axes) + tf.reduce_sum(y_pred, axis=axes)
    return tf.stack([inter, denom])


def dice_from_sums(sums, smooth: float = SMOOTH):
    """Dice per region from (possibly rank-summed) ``dice_sums``."""
    return (2.0 * sums[0] + smooth) / (sums[1] + smooth)
