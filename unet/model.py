"""The seed's 2D U-Net (Intel's distributed_unet), rebuilt in Keras 3.

Four poolings, filters 32-64-128-256 and a 512 bottleneck; two 3x3 ReLU
convolutions per level (he_uniform, 'same'); dropout after the first
convolution of levels 3 and 4; decoder by 2x2 stride-2 transposed convolution
(or UpSampling2D), skip concatenation, 1x1 sigmoid head, one channel per
region. With 1 input channel and 1 region the transposed variant has
7,759,521 parameters.
"""
from __future__ import annotations

import keras
from keras import layers

FILTERS = (32, 64, 128, 256)
BOTTLENECK = 512
DROPOUT_LEVELS = (3, 4)  # 1-based encoder levels with dropout, as in the seed


def build_unet(height: int, width: int, channels: int, regions: int, *,
               use_upsampling: bool = False, dropout: float = 0.2) -> keras.Model:
    conv = dict(kernel_size=3, activation="relu", padding="same", kernel_initializer="he_uniform")
    inputs = keras.Input((height, width, channels), name="images")
    x, skips = inputs, []
    for level, f in enumerate(FILTERS, start=1):
        x = layers.Conv2D(f, name=f"conv{level}a", **conv)(x)
        if level in DROPOUT_LEVELS and dropout > 0:
            x = layers.Dropout(dropout, name=f"drop{level}")(x)
        x = layers.Conv2D(f, name=f"conv{level}b", **conv)(x)
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"pool{level}")(x)
    x = layers.Conv2D(BOTTLENECK, name="conv5a", **conv)(x)
    x = layers.Conv2D(BOTTLENECK, name="conv5b", **conv)(x)
    for level, (f, skip) in enumerate(zip(reversed(FILTERS), reversed(skips)), start=6):
        if use_upsampling:
            up = layers.UpSampling2D(2, name=f"up{level}")(x)
        else:
            up = layers.Conv2DTranspose(f, 2, strides=2, padding="same",
                                        kernel_initializer="he_uniform", name=f"transConv{level}")(x)
        x = layers.Concatenate(axis=-1, name=f"concat{level}")([up, skip])
        x = layers.Conv2D(f, name=f"conv{level}a", **conv)(x)
        x = layers.Conv2D(f, name=f"conv{level}b", **conv)(x)
    outputs = layers.Conv2D(regions, 1, activation="sigmoid", name="mask")(x)
    return keras.Model(inputs, outputs, name="unet")
