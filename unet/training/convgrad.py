"""The gradients of the U-Net's 3x3 convolutions as forward convolutions (``--conv_grad forward``).

A 3x3 convolution with stride 1 and 'same' padding, ``y = conv(x, W)``, has two gradients that are
themselves forward convolutions, the kind of kernel a CPU library tunes best:

* the input's: ``dx = conv(dy, W')`` with ``W'[i, j, o, c] = W[2 - i, 2 - j, c, o]`` (the kernel turned
  by 180 degrees, its channel axes swapped), 'same' padding;
* the kernel's: ``dW[i, j, c, o] = sum over n, h, w of x_pad[n, h + i, w + j, c] * dy[n, h, w, o]``, a
  'valid' convolution of the padded input laid out as a batch of ``C`` one-image stacks of ``N``
  channels, ``[C, H + 2, W + 2, N]``, with ``dy`` as an ``H x W`` kernel of ``N`` input and ``O`` output
  channels: its output ``[C, 3, 3, O]`` is ``dW`` transposed.

The same sums as TensorFlow's ``Conv2DBackpropInput`` / ``Conv2DBackpropFilter`` in another order: the
results differ from theirs by float rounding only (``tests/test_convgrad.py``), training takes another
path bit-wise but not arithmetically. Which is faster depends on the CPU's kernels: docs/PERFORMANCE.md
gives the figures per CPU kind, ``scripts/ab_train.py --b_args "--conv_grad forward"`` measures it.

``install(model)`` makes every eligible ``Conv2D`` of a built model (3x3 or larger odd square kernel,
stride 1, dilation 1, 'same' padding, channels last) compute its convolution this way; the layers stay
Keras' ``Conv2D`` (the saved model, its export and inference are unchanged: the forward pass is the same
op). The first layer's input gradient is not computed (nothing upstream needs it).
"""
from __future__ import annotations

import os

MODES = ("auto", "tf", "forward")  # --conv_grad; auto: forward where TensorFlow's oneDNN rewrite is off


def onednn_enabled() -> bool:
    """Whether TensorFlow runs its oneDNN kernels here (its default on CPUs with AVX-512 VNNI/bf16 or AMX,
    or with TF_ENABLE_ONEDNN_OPTS=1); call after TensorFlow is imported."""
    try:
        from tensorflow.python.util import _pywrap_util_port
        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        return os.environ.get("TF_ENABLE_ONEDNN_OPTS", "").strip() == "1"


def resolve(mode: str) -> str:
    """``--conv_grad`` as run: auto is forward with TensorFlow's own (Eigen) convolutions, where it measured
    1.08x the img/s on a 2-core AVX2 EPYC, and tf under oneDNN, whose backward kernels the forward
    formulation did not beat (docs/PERFORMANCE.md)."""
    if mode != "auto":
        return mode
    return "tf" if onednn_enabled() else "forward"


def conv_forward_grads(x, kernel, need_input_grad: bool = True):
    """``conv(x, kernel)`` ('same', stride 1, NHWC, odd square kernel) whose gradients are forward convolutions."""
    import tensorflow as tf

    @tf.custom_gradient
    def conv(x, kernel):
        y = tf.nn.conv2d(x, kernel, strides=1, padding="SAME")

        def grad(dy):
            k = kernel.shape[0]
            p = k // 2
            dx = None
            if need_input_grad:
                dx = tf.nn.conv2d(dy, tf.transpose(tf.reverse(kernel, [0, 1]), [0, 1, 3, 2]),
                                  strides=1, padding="SAME")
            xp = tf.transpose(tf.pad(x, [[0, 0], [p, p], [p, p], [0, 0]]), [3, 1, 2, 0])   # C, H+2p, W+2p, N
            g = tf.nn.conv2d(xp, tf.transpose(dy, [1, 2, 0, 3]), strides=1, padding="VALID")  # C, k, k, O
            return dx, tf.transpose(g, [1, 2, 0, 3])
        return y, grad
    return conv(tf.convert_to_tensor(x), tf.convert_to_tensor(kernel))


def eligible(layer) -> bool:
    """A Conv2D whose gradients ``conv_forward_grads`` computes exactly (up to rounding)."""
    from keras import layers
    if type(layer) is not layers.Conv2D:
        return False
    k = tuple(layer.kernel_size)
    return (k[0] == k[1] and k[0] % 2 == 1 and k[0] > 1 and tuple(layer.strides) == (1, 1)
            and tuple(layer.dilation_rate) == (1, 1) and layer.padding == "same"
            and layer.data_format == "channels_last" and layer.groups == 1)


def install(model) -> int:
    """Route every eligible Conv2D of ``model`` through ``conv_forward_grads``; returns how many."""
    inputs = {id(t) for t in model.inputs}
    count = 0
    for layer in model.layers:
        if not eligible(layer):
            continue
        need = id(layer.input) not in inputs   # the model's images need no gradient

        def op(inputs, kernel, _need=need):
            return conv_forward_grads(inputs, kernel, _need)
        layer.convolution_op = op
        count += 1
    return count

