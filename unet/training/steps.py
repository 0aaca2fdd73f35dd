"""The compiled steps (tf.function): one training step, whose gradients Horovod averages over the ranks, and
the forward pass that validation and the TensorBoard images use.

Imported after ``prepare_rank`` (it loads TensorFlow).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import tensorflow as tf

from unet.training.losses import dice_from_sums, dice_sums


class Steps(NamedTuple):
    train: Callable      # (x, y) -> (global mean loss, global Dice per region); updates the weights
    predict: Callable    # x -> probabilities, inference mode


def compile_steps(hvd, model, optimizer, loss_fn, clipnorm: float = 0.0) -> Steps:
    """The training step and the forward pass of ``model``, traced once each; ``clipnorm`` > 0 clips the
    averaged gradients to that global norm."""
    # batch normalisation's moving statistics: each rank's forward pass moves them towards its own batch;
    # averaged over the ranks after every step, they stay the same on every rank (the average of the ranks'
    # updates is the update by the mean of their batch statistics)
    moving = [v for layer in model.layers if type(layer).__name__ == "BatchNormalization"
              for v in layer.non_trainable_variables]

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

    return Steps(train, predict)
