"""The seed's 2D U-Net (Intel's distributed_unet), rebuilt in Keras 3.

Four poolings, filters 32-64-128-256 and a 512 bottleneck; two 3x3 ReLU
convolutions per level (he_uniform, 'same'); dropout after the first
convolution of levels 3 and 4; decoder by 2x2 stride-2 transposed convolution
(or UpSampling2D), skip concatenation, 1x1 sigmoid head, one channel per
region. With 1 input channel and 1 region the transposed variant has
7,759,521 parameters.

Normalisation (``norm``) between each 3x3 convolution and its ReLU: ``group`` / ``instance`` take their
statistics over each slice (training and inference alike), ``batch`` over the batch in training and the moving
averages of those at inference (Ioffe & Szegedy, 2015), so a slice is normalised by figures that do not depend
on the rest of that slice.

Options beyond the seed's network (whose defaults stay the seed's here): ``activation="leaky_relu"``
(LeakyReLU, slope 0.01, in place of every ReLU) and ``head_bias``: the sigmoid head's initial bias per
region, e.g. ``prior_bias`` of each region's foreground share, so the untrained network predicts the
prior instead of 0.5 everywhere (Lin et al., "Focal Loss for Dense Object Detection", 2017).

Precision is set per layer, never globally: ``fp32`` everywhere, or ``bf16``
(Keras policy ``mixed_bfloat16``: float32 variables, bfloat16 compute) with the
sigmoid head in float32, so the output, losses and metrics stay float32.
"""
from __future__ import annotations

import os

FILTERS = (32, 64, 128, 256)
NORMS = ("none", "group", "instance", "batch")  # --norm: what follows each 3x3 convolution before its ReLU
GROUPS = 8  # --norm group: channels per group = filters / 8 (Wu & He, "Group Normalization", 2018)
# --norm batch: the moving statistics inference uses follow the batches' at this rate (Keras' default, 0.99,
# would leave a tenth of the initial (0, 1) in them after a 224-step run)
BN_MOMENTUM = 0.9
BOTTLENECK = 512
DROPOUT_LEVELS = (3, 4)  # 1-based encoder levels with dropout, as in the seed
PRECISIONS = {"fp32": "float32", "bf16": "mixed_bfloat16"}  # flag value -> Keras dtype policy
# ONEDNN_MAX_CPU_ISA values that leave oneDNN no bf16 convolution (its bf16 kernels start at AVX2_VNNI_2 and
# AVX512_CORE), while TensorFlow, reading the CPU's own flags, still hands it bf16 convolutions
NO_BF16_ISAS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI")
ACTIVATIONS = ("relu", "leaky_relu")
LEAKY_SLOPE = 0.01
PRIOR_FLOOR = 1e-5   # a region absent from the training masks gets the bias of this share, not -inf


def precision_error(precision: str, env=None) -> str | None:
    """Why ``--precision`` cannot run here, in one line (None when it can)."""
    isa = (os.environ if env is None else env).get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    if precision == "bf16" and isa in NO_BF16_ISAS:
        return (f"--precision bf16: ONEDNN_MAX_CPU_ISA={isa} holds oneDNN to kernels without bf16 convolutions "
                f"(its first step would fail); unset it or use --precision fp32")
    return None


def prior_bias(share) -> list[float]:
    """log(p / (1 - p)) per region: the bias that makes sigmoid(bias) = p, the region's foreground share."""
    import math
    out = []
    for p in share:
        p = min(max(float(p), PRIOR_FLOOR), 1.0 - PRIOR_FLOOR)
        out.append(math.log(p / (1.0 - p)))
    return out


def build_unet(height: int, width: int, channels: int, regions: int, *,
               use_upsampling: bool = False, dropout: float = 0.2,
               precision: str = "fp32", norm: str = "none", activation: str = "relu",
               head_bias=None):
    import keras  # here, so the constants above import without Keras (unet.perf.flops)
    from keras import layers
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if head_bias is not None and len(head_bias) != regions:
        raise ValueError(f"head_bias has {len(head_bias)} values for {regions} regions")
    dt = PRECISIONS[precision]
    kw = dict(kernel_size=3, padding="same", kernel_initializer="he_uniform", dtype=dt)

    def conv(f, name):
        """3x3 convolution + ReLU; with ``norm``, conv -> normalisation -> ReLU (the same statistics
        in training and inference: nothing to drift between the two, nothing to synchronise)."""
        def apply(x):
            if norm == "none" and activation == "relu":
                return layers.Conv2D(f, activation="relu", name=name, **kw)(x)
            x = layers.Conv2D(f, name=name, **kw)(x)
            if norm == "batch":
                x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"norm{name[4:]}", dtype=dt)(x)
            elif norm != "none":
                x = layers.GroupNormalization(GROUPS if norm == "group" else f, name=f"norm{name[4:]}",
                                              dtype=dt)(x)
            if activation == "leaky_relu":
                return layers.LeakyReLU(LEAKY_SLOPE, name=f"relu{name[4:]}", dtype=dt)(x)
            return layers.Activation("relu", name=f"relu{name[4:]}", dtype=dt)(x)
        return apply
    inputs = keras.Input((height, width, channels), name="images")
    x, skips = inputs, []
    for level, f in enumerate(FILTERS, start=1):
        x = conv(f, f"conv{level}a")(x)
        if level in DROPOUT_LEVELS and dropout > 0:
            x = layers.Dropout(dropout, name=f"drop{level}", dtype=dt)(x)
        x = conv(f, f"conv{level}b")(x)
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"pool{level}", dtype=dt)(x)
    x = conv(BOTTLENECK, "conv5a")(x)
    x = conv(BOTTLENECK, "conv5b")(x)
    for level, (f, skip) in enumerate(zip(reversed(FILTERS), reversed(skips)), start=6):
        if use_upsampling:
            up = layers.UpSampling2D(2, name=f"up{level}", dtype=dt)(x)
        else:
            up = layers.Conv2DTranspose(f, 2, strides=2, padding="same",
                                        kernel_initializer="he_uniform", name=f"transConv{level}", dtype=dt)(x)
        x = layers.Concatenate(axis=-1, name=f"concat{level}", dtype=dt)([up, skip])
        x = conv(f, f"conv{level}a")(x)
        x = conv(f, f"conv{level}b")(x)
    bias = "zeros" if head_bias is None else keras.initializers.Constant([float(b) for b in head_bias])
    outputs = layers.Conv2D(regions, 1, activation="sigmoid", bias_initializer=bias, name="mask", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="unet")
