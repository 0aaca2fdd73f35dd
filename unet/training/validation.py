"""Validation at an epoch's end: every rank scores its shard of the validation split, Horovod adds the sums.

Dice comes from pooled sums (intersection, sizes) per region at threshold 0.5, so N ranks give exactly
the one-process value. Imported after ``prepare_rank`` (it loads TensorFlow).
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from unet.data import pipeline
from unet.training.losses import dice_from_sums, dice_sums


def pooled_sums(predict, batches, *, regions: int, loss_fn=None, beat=None) -> tuple[np.ndarray, float, int]:
    """(Dice sums per region at threshold 0.5: ``dice_sums``'s (2, regions), loss summed over the images, images)
    of ``predict`` on ``batches`` of (x, y), in this process; ``loss_fn`` None leaves the loss at 0, ``beat(what)``
    is called after each batch. ``dice_from_sums`` of the sums (of all ranks') is the trainer's validation Dice."""
    sums, loss_sum, count = np.zeros((2, regions)), 0.0, 0
    for x, y in batches:
        p = predict(x)
        if beat is not None:
            beat("a validation batch")
        sums += dice_sums(y, tf.cast(p > 0.5, tf.float32)).numpy()
        if loss_fn is not None:
            loss_sum += float(loss_fn(y, p)) * len(x)
        count += len(x)
    return sums, loss_sum, count


def validate(hvd, predict, loss_fn, source, *, batch_size: int, regions: int, beat) -> dict:
    """{"dice": per region, "loss": mean over the images} of ``source``'s validation split, over all
    ranks (collective); ``beat(what)`` after each batch tells the watchdog this rank progresses."""
    rank, size = hvd.rank(), hvd.size()
    batches = pipeline.val_batches(source, batch_size=batch_size, rank=rank, size=size)
    sums, loss_sum, count = pooled_sums(predict, batches, regions=regions, loss_fn=loss_fn, beat=beat)
    # Horovod: add every rank's share; Dice from pooled sums equals the 1-process value.
    total = hvd.allreduce(np.concatenate([sums.ravel(), [loss_sum, count]]), op=hvd.Sum).numpy()
    return {"dice": dice_from_sums(total[:-2].reshape(2, -1)), "loss": total[-2] / max(total[-1], 1)}
