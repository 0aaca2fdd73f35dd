"""Validation at an epoch's end: every rank scores its shard of the validation split, Horovod adds the sums.

Dice comes from pooled sums (intersection, sizes) per region at threshold 0.5, so N ranks give exactly
the one-process value. Imported after ``prepare_rank`` (it loads TensorFlow).
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from unet.data import pipeline
from unet.training.losses import dice_from_sums, dice_sums


def validate(hvd, predict, loss_fn, source, *, batch_size: int, regions: int, beat) -> dict:
    """{"dice": per region, "loss": mean over the images} of ``source``'s validation split, over all
    ranks (collective); ``beat(what)`` after each batch tells the watchdog this rank progresses."""
    rank, size = hvd.rank(), hvd.size()
    sums, loss_sum, count = np.zeros((2, regions)), 0.0, 0
    for x, y in pipeline.val_batches(source, batch_size=batch_size, rank=rank, size=size):
        p = predict(x)
        beat("a validation batch")
        sums += dice_sums(y, tf.cast(p > 0.5, tf.float32)).numpy()
        loss_sum += float(loss_fn(y, p)) * len(x)
        count += len(x)
    # Horovod: add every rank's share; Dice from pooled sums equals the 1-process value.
    total = hvd.allreduce(np.concatenate([sums.ravel(), [loss_sum, count]]), op=hvd.Sum).numpy()
    return {"dice": dice_from_sums(total[:-2].reshape(2, -1)), "loss": total[-2] / max(total[-1], 1)}
