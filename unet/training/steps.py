"""The compiled steps (tf.function): one training step, whose gradients Horovod averages over the ranks,
the forward pass that validation and the TensorBoard images use, and, for batch normalisation, the pass
that recomputes the moving statistics at an epoch's end (``refresh_statistics``).

Imported after ``prepare_rank`` (it loads TensorFlow).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import tensorflow as tf

from unet.training.losses import dice_from_sums, dice_sums


class Steps(NamedTuple):
    train: Callable      # (x, y) -> (global mean loss, global Dice per region); updates the weights
    predict: Callable    # x -> probabilities, inference mode
    batch_stats: Callable | None = None   # x -> [mean, variance] per BatchNormalization layer's input (None:
                                          # the model has none)


def batch_norm_layers(model) -> list:
    return [layer for layer in model.layers if type(layer).__name__ == "BatchNormalization"]


def compile_steps(hvd, model, optimizer, loss_fn, clipnorm: float = 0.0) -> Steps:
    """The training step and the forward pass of ``model``, traced once each; ``clipnorm`` > 0 clips the
    averaged gradients to that global norm."""
    # batch normalisation's moving statistics: each rank's forward pass moves them towards its own batch;
    # averaged over the ranks after every step, they stay the same on every rank (the average of the ranks'
    # updates is the update by the mean of their batch statistics)
    bns = batch_norm_layers(model)
    moving = [v for layer in bns for v in layer.non_trainable_variables]

    @tf.function
    def train(x, y):
        with tf.GradientTape() as tape:
            pred = model(x, training=True)
            loss = loss_fn(y, pred)
        grads = tape.gradient(loss, model.trainable_variables)
        # Horovod: average gradients over all ranks with one fused ring allreduce;
        # the loss and Dice sums ride along so rank 0 logs global figures (and the moving statistics, if any).
        n = len(grads)
        reduced = hvd.grouped_allreduce(grads + [loss, dice_sums(y, pred)] + [tf.identity(v) for v in moving],
                                        op=hvd.Average)
        grads, loss, sums = reduced[:n], reduced[n], reduced[n + 1]
        for v, mean in zip(moving, reduced[n + 2:]):
            v.assign(mean)
        if clipnorm:   # after the average: every rank clips the same gradients alike
            grads, _ = tf.clip_by_global_norm(grads, clipnorm)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss, dice_from_sums(sums)

    spec = tf.TensorSpec((None,) + tuple(model.input_shape[1:]), tf.float32)

    @tf.function(input_signature=[spec])
    def predict(x):
        return model(x, training=False)

    return Steps(train, predict, compile_batch_stats(model, bns, spec) if bns else None)


def compile_batch_stats(model, bns: list, spec):
    """x -> [mean, variance, mean, variance, ...]: each batch normalisation layer's input statistics over the
    batch (per channel; the biased variance, as the layer takes it), in a training-mode forward pass."""
    import keras
    inputs_of = keras.Model(model.inputs, [layer.input for layer in bns])

    @tf.function(input_signature=[spec])
    def batch_stats(x):
        out = []
        # training mode: every layer before normalises by this batch, as in the training step (their moving
        # statistics move too; refresh_statistics sets them all afterwards)
        for h in inputs_of(x, training=True):
            mean, var = tf.nn.moments(tf.cast(h, tf.float32), axes=list(range(len(h.shape) - 1)))
            out += [mean, var]
        return out

    return batch_stats


def refresh_statistics(hvd, model, batch_stats, batches) -> int:
    """Set every batch normalisation layer's moving mean and variance to the mean of ``batch_stats`` over
    ``batches`` of (x, y) and over the ranks (collective; every rank passes the same number of batches, so
    the average of the ranks' means is the mean over all of them). Returns the batches this rank used."""
    sums, n = None, 0
    for x, _ in batches:
        stats = batch_stats(x)
        sums = stats if sums is None else [a + b for a, b in zip(sums, stats)]
        n += 1
    if not n:
        return 0
    # Horovod: one grouped allreduce; every rank ends with the same statistics
    means = hvd.grouped_allreduce([s / n for s in sums], op=hvd.Average)
    for layer, mean, var in zip(batch_norm_layers(model), means[0::2], means[1::2]):
        layer.moving_mean.assign(tf.cast(mean, layer.moving_mean.dtype))
        layer.moving_variance.assign(tf.cast(var, layer.moving_variance.dtype))
    return n
