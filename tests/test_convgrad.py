"""--conv_grad forward: the 3x3 convolutions' gradients as forward convolutions equal TensorFlow's own
up to float rounding, bounded by the classic error bound of a sum (Higham: |error| <= gamma_n * sum of
|terms|, gamma_n = n u / (1 - n u)) for two summation orders; a wrong gradient misses it by orders."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import IN_CI

pytestmark = pytest.mark.needs_stack
if IN_CI:   # under CI=true a missing TensorFlow fails the run (conftest's gate), it never skips
    import tensorflow as tf
else:
    tf = pytest.importorskip("tensorflow")

from unet.training import convgrad  # noqa: E402

U = np.finfo(np.float32).eps / 2


def _grads(fn, x, k, dy):
    with tf.GradientTape() as tape:
        tape.watch([x, k])
        y = fn(x, k)
    return tape.gradient(y, [x, k], output_gradients=dy)


def _bound(n, absolute):
    gamma = n * U / (1 - n * U)
    return 2 * gamma * absolute + 1e-30


@pytest.mark.parametrize("shape,ksize", [((2, 9, 11, 3, 5), 3), ((3, 8, 8, 16, 4), 3), ((1, 7, 6, 2, 3), 5)])
def test_forward_gradients_equal_tensorflows_within_rounding(shape, ksize):
    n, h, w, c, o = shape
    rng = np.random.default_rng(7)
    x = tf.constant(rng.standard_normal((n, h, w, c)), tf.float32)
    k = tf.constant(rng.standard_normal((ksize, ksize, c, o)), tf.float32)
    dy = tf.constant(rng.standard_normal((n, h, w, o)), tf.float32)
    ref_x, ref_k = _grads(lambda a, b: tf.nn.conv2d(a, b, 1, "SAME"), x, k, dy)
    got_x, got_k = _grads(convgrad.conv_forward_grads, x, k, dy)
    # the sums of |terms|: the same gradients of |x|, |k|, |dy|
    abs_x, abs_k = _grads(lambda a, b: tf.nn.conv2d(a, b, 1, "SAME"), tf.abs(x), tf.abs(k), tf.abs(dy))
    np.testing.assert_array_less(np.abs(got_x - ref_x), _bound(ksize * ksize * o, abs_x.numpy()))
    np.testing.assert_array_less(np.abs(got_k - ref_k), _bound(n * h * w, abs_k.numpy()))
    # and not trivially: the kernel's gradient is far from zero
    assert float(tf.reduce_max(tf.abs(ref_k))) > 1.0


def test_install_routes_the_unets_3x3_convolutions_and_training_matches(monkeypatch):
    """Every 3x3 convolution of the U-Net (18), not the 1x1 head nor the transposed ones, in float64 so
    that rounding is far below a wrong term: the same loss bit for bit (the forward op is the same), and
    every variable's gradient through the whole network within a multiple of float64 rounding."""
    import keras

    import unet.model as M
    monkeypatch.setitem(M.PRECISIONS, "fp64", "float64")
    keras.utils.set_random_seed(3)
    ref = M.build_unet(32, 32, 4, 3, dropout=0.0, precision="fp64")
    fast = M.build_unet(32, 32, 4, 3, dropout=0.0, precision="fp64")
    fast.set_weights(ref.get_weights())
    assert convgrad.install(fast) == 18
    assert all(type(layer).__name__ == "Conv2D" for layer in fast.layers if layer.name.startswith("conv"))
    rng = np.random.default_rng(1)
    x = tf.constant(rng.standard_normal((2, 32, 32, 4)), tf.float64)
    target = tf.constant(rng.random((2, 32, 32, 3)) > 0.7, tf.float32)

    def grads(model):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(keras.losses.binary_crossentropy(target, model(x, training=True)))
        return loss, tape.gradient(loss, model.trainable_variables)

    loss_ref, g_ref = grads(ref)
    loss_fast, g_fast = grads(fast)
    assert float(loss_ref) == float(loss_fast)
    # the longest sum of a gradient: the kernel's over batch x 32 x 32 positions; 1e4 x its gamma_n
    # leaves room for the chain's growth and stays ~1e-9, where a wrong term would be ~1
    tol = 1e4 * 2 * 32 * 32 * np.finfo(np.float64).eps / 2
    for v, a, b in zip(ref.trainable_variables, g_ref, g_fast):
        scale = float(tf.reduce_max(tf.abs(tf.cast(a, tf.float64))))
        assert scale > 0, v.path
        assert float(tf.reduce_max(tf.abs(tf.cast(a - b, tf.float64)))) <= tol * scale, v.path


def test_the_first_layer_skips_its_input_gradient():
    from unet.model import build_unet
    model = build_unet(16, 16, 2, 1, dropout=0.0)
    convgrad.install(model)
    x = tf.constant(np.ones((1, 16, 16, 2)), tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = model(x)
    assert tape.gradient(y, x) is None


@pytest.mark.parametrize("onednn,expect", [("0", "forward"), ("1", "tf")])
def test_auto_is_forward_without_onednn_and_tf_with_it(onednn, expect):
    """--conv_grad auto follows TensorFlow's own switch (read after TensorFlow loads, in a fresh process)."""
    import os
    import subprocess
    import sys
    code = ("import tensorflow; from unet.training import convgrad; "
            "print(convgrad.onednn_enabled(), convgrad.resolve('auto'), convgrad.resolve('tf'))")
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=onednn, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.split() == [str(onednn == "1"), expect, "tf"]
