import os

import numpy as np
import pytest

pytestmark = pytest.mark.needs_stack
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def test_seed_unet_has_7759521_parameters():
    from unet.model import build_unet
    m = build_unet(128, 128, 1, 1)
    assert m.count_params() == 7_759_521
    assert m.output_shape == (None, 128, 128, 1)
    names = [l.name for l in m.layers]
    assert "drop3" in names and "drop4" in names and "drop1" not in names
    assert names.index("drop3") == names.index("conv3a") + 1   # right after the level's first conv
    assert names.index("drop4") == names.index("conv4a") + 1
    assert m.get_layer("drop3").rate == m.get_layer("drop4").rate == 0.2
    convs = [l for l in m.layers if type(l).__name__ in ("Conv2D", "Conv2DTranspose")]
    assert len(convs) == 23   # 18 3x3 + 4 transposed 2x2 + the 1x1 head
    for l in convs[:-1]:   # the seed's 1x1 head keeps Keras' default (Glorot) initializer
        assert type(l.kernel_initializer).__name__ == "HeUniform", l.name
    for l in convs:
        assert l.padding in ("same", "valid") and l.data_format == "channels_last"
    assert all(l.padding == "same" for l in convs if l.kernel_size == (3, 3))
    assert [l.filters for l in convs if l.kernel_size == (3, 3)] == \
        [32, 32, 64, 64, 128, 128, 256, 256, 512, 512, 256, 256, 128, 128, 64, 64, 32, 32]
    assert m.layers[-1].activation.__name__ == "sigmoid" and m.layers[-1].kernel_size == (1, 1)


def test_upsampling_variant_and_multi_region_head():
    from unet.model import build_unet
    up = build_unet(64, 64, 4, 3, use_upsampling=True)
    assert up.output_shape == (None, 64, 64, 3)
    assert not any("transConv" in l.name for l in up.layers)
    # UpSampling2D keeps the deeper level's channels, so the next convolutions see more inputs
    assert up.get_layer("conv6a").input.shape[-1] == 512 + 256


@pytest.mark.parametrize("norm, groups", [("group", [8] * 18), ("instance", None)])
def test_normalised_unet_puts_a_norm_between_each_3x3_conv_and_its_relu(norm, groups):
    from unet.model import build_unet
    m = build_unet(32, 32, 2, 3, norm=norm, dropout=0.0)
    convs = [l for l in m.layers if type(l).__name__ == "Conv2D" and l.kernel_size == (3, 3)]
    norms = [l for l in m.layers if type(l).__name__ == "GroupNormalization"]
    assert len(convs) == len(norms) == 18
    names = [l.name for l in m.layers]
    for c, n in zip(convs, norms):
        assert c.activation.__name__ == "linear"            # the ReLU comes after the normalisation
        assert names.index(n.name) == names.index(c.name) + 1
        assert names[names.index(n.name) + 1] == "relu" + c.name[4:]
    assert [n.groups for n in norms] == (groups or [c.filters for c in convs])
    # a scale and an offset per channel on top of the seed's 7,759,521 (1 channel, 1 region)
    assert build_unet(128, 128, 1, 1, norm=norm).count_params() == 7_759_521 + 2 * sum(c.filters for c in convs)
    # per-sample statistics: a slice's output does not depend on its batch, nor on training mode
    x = np.random.default_rng(0).normal(size=(3, 32, 32, 2)).astype(np.float32)
    full = np.asarray(m(x, training=False))
    np.testing.assert_allclose(np.asarray(m(x[1:2], training=False)), full[1:2], atol=1e-5)
    np.testing.assert_allclose(np.asarray(m(x, training=True)), full, atol=1e-6)
    with pytest.raises(ValueError, match="norm must be one of"):
        build_unet(32, 32, 2, 3, norm="layer")


def test_batch_normalised_unet_normalises_by_the_batch_in_training_and_by_moving_figures_at_inference():
    from unet.model import BN_MOMENTUM, build_unet
    m = build_unet(32, 32, 2, 3, norm="batch", dropout=0.0)
    convs = [l for l in m.layers if type(l).__name__ == "Conv2D" and l.kernel_size == (3, 3)]
    norms = [l for l in m.layers if type(l).__name__ == "BatchNormalization"]
    assert len(convs) == len(norms) == 18 and all(n.momentum == BN_MOMENTUM for n in norms)
    names = [l.name for l in m.layers]
    for c, n in zip(convs, norms):
        assert c.activation.__name__ == "linear" and names.index(n.name) == names.index(c.name) + 1
        assert names[names.index(n.name) + 1] == "relu" + c.name[4:]
    # trainable: a scale and an offset per channel, as group normalisation; plus two moving figures per channel
    b = build_unet(128, 128, 1, 1, norm="batch")
    extra = 2 * sum(c.filters for c in convs)
    assert sum(int(np.prod(w.shape)) for w in b.trainable_weights) == 7_759_521 + extra
    assert b.count_params() == 7_759_521 + 2 * extra
    # inference: a slice's output does not depend on the rest of its batch (nor on the rest of its slice's
    # statistics); one training-mode pass moves the first layer's moving mean by (1 - momentum) x the batch mean
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 32, 32, 2)).astype(np.float32)
    full = np.asarray(m(x, training=False))
    np.testing.assert_allclose(np.asarray(m(x[1:2], training=False)), full[1:2], atol=1e-5)
    first = m.get_layer("norm1a")
    pre = np.asarray(m.get_layer("conv1a")(x))
    m(x, training=True)
    np.testing.assert_allclose(np.asarray(first.moving_mean), (1 - BN_MOMENTUM) * pre.mean((0, 1, 2)),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm, activation", [("none", "relu"), ("group", "relu"), ("instance", "relu"),
                                              ("none", "leaky_relu"), ("group", "leaky_relu"),
                                              ("batch", "relu")])
def test_bf16_model_is_rebuilt_in_float32_for_export_with_its_normalisation(norm, activation):
    from unet.inference.export import float32_model
    from unet.model import build_unet
    m = build_unet(32, 32, 2, 3, precision="bf16", norm=norm, dropout=0.0, activation=activation)
    f = float32_model(m)
    assert f is not m and all(layer.dtype_policy.name == "float32" for layer in f.layers)
    assert [type(layer).__name__ for layer in f.layers] == [type(layer).__name__ for layer in m.layers]
    assert [l.groups for l in f.layers if hasattr(l, "groups")] == [l.groups for l in m.layers if hasattr(l, "groups")]
    for a, b in zip(f.get_weights(), m.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_head_bias_prior_starts_the_network_at_each_regions_foreground_share():
    from unet.model import PRIOR_FLOOR, build_unet, prior_bias
    share = [0.02, 0.0016, 0.0005]
    bias = prior_bias(share)
    assert bias == pytest.approx([np.log(0.02 / 0.98), np.log(0.0016 / 0.9984), np.log(0.0005 / 0.9995)], rel=1e-12)
    assert prior_bias([0.0]) == pytest.approx([np.log(PRIOR_FLOOR / (1 - PRIOR_FLOOR))])   # absent region: finite
    m = build_unet(32, 32, 2, 3, head_bias=bias, dropout=0.0)
    np.testing.assert_allclose(m.get_layer("mask").bias.numpy(), bias, rtol=1e-6)
    # an input that leaves every ReLU at 0 (zero image, zero conv biases): the output is the prior itself
    out = np.asarray(m(np.zeros((1, 32, 32, 2), np.float32), training=False))
    np.testing.assert_allclose(out.reshape(-1, 3), np.tile(share, (32 * 32, 1)), rtol=1e-5)
    assert not np.any(build_unet(32, 32, 2, 3).get_layer("mask").bias.numpy())   # the seed's: zero, 0.5 everywhere
    with pytest.raises(ValueError, match="head_bias has 2 values for 3 regions"):
        build_unet(32, 32, 2, 3, head_bias=bias[:2])


def test_leaky_relu_network_replaces_every_relu_and_adds_no_parameter():
    from unet.model import LEAKY_SLOPE, build_unet
    m = build_unet(128, 128, 1, 1, activation="leaky_relu")
    assert m.count_params() == 7_759_521
    convs = [l for l in m.layers if type(l).__name__ == "Conv2D" and l.kernel_size == (3, 3)]
    leaky = [l for l in m.layers if type(l).__name__ == "LeakyReLU"]
    assert len(convs) == len(leaky) == 18 and all(c.activation.__name__ == "linear" for c in convs)
    assert all(l.negative_slope == pytest.approx(LEAKY_SLOPE) for l in leaky) and LEAKY_SLOPE == 0.01
    names = [l.name for l in m.layers]
    assert all(names[names.index(c.name) + 1] == "relu" + c.name[4:] for c in convs)
    with pytest.raises(ValueError, match="activation must be one of"):
        build_unet(32, 32, 2, 3, activation="gelu")


def test_dice_loss_equals_hand_computation():
    import tensorflow as tf

    from unet.training.losses import dice_from_sums, dice_loss, dice_sums
    y = np.zeros((1, 4, 4, 1), np.float32); y[0, :2, :2] = 1          # 4 pixels
    p = np.zeros((1, 4, 4, 1), np.float32); p[0, :2, :] = 0.5         # 8 pixels at 0.5
    # sum(y*p)=2, sum(y)=4, sum(p)=4 -> -log((2*2+1)/(4+4+1)) = -log(5/9)
    assert float(dice_loss(tf.constant(y), tf.constant(p))) == pytest.approx(-np.log(5 / 9), rel=1e-6)
    sums = dice_sums(tf.constant(y), tf.constant(p)).numpy()
    assert sums.tolist() == [[2.0], [8.0]]
    assert float(dice_from_sums(sums)[0]) == pytest.approx(5 / 9)


def test_pooled_sums_over_batches_give_the_slice_pooled_dice_by_hand():
    import tensorflow as tf

    from unet.training.losses import dice_from_sums
    from unet.training.validation import pooled_sums
    # two batches of 1 and 2 images, 2 regions; predict returns fixed probabilities per batch
    y1 = np.zeros((1, 4, 4, 2), np.float32); y1[0, :2, :2, 0] = 1          # region 0: 4 pixels, region 1 none
    p1 = np.zeros((1, 4, 4, 2), np.float32); p1[0, :2, :, 0] = 0.6         # 8 pixels above 0.5, 4 on y
    y2 = np.zeros((2, 4, 4, 2), np.float32); y2[:, 0, 0, :] = 1            # 2 pixels per region
    p2 = np.zeros((2, 4, 4, 2), np.float32); p2[0, 0, 0, :] = 0.9; p2[1, 0, 0, 1] = 0.4   # 0.4 is below 0.5
    probs = {1: p1, 2: p2}
    beats = []
    sums, loss_sum, count = pooled_sums(lambda x: tf.constant(probs[len(x)]), [(np.zeros(1), y1), (np.zeros(2), y2)],
                                        regions=2, loss_fn=lambda y, p: float(len(y)), beat=beats.append)
    # region 0: intersection 4 + 1 = 5, sizes (4 + 8) + (2 + 1) = 15; region 1: intersection 1, sizes 2 + 1 = 3
    assert sums.tolist() == [[5.0, 1.0], [15.0, 3.0]]
    assert [float(v) for v in dice_from_sums(sums)] == pytest.approx([(2 * 5 + 1) / (15 + 1), (2 * 1 + 1) / (3 + 1)])
    assert (loss_sum, count, len(beats)) == (1.0 * 1 + 2.0 * 2, 3, 2)   # the loss is weighted by the batch's images
    assert pooled_sums(lambda x: tf.constant(probs[len(x)]), [(np.zeros(1), y1)], regions=2)[1:] == (0.0, 1)


def test_dice_bce_is_dice_plus_binary_cross_entropy_by_hand():
    import tensorflow as tf

    from unet.training.losses import get_loss
    y = np.zeros((1, 4, 4, 1), np.float32); y[0, :2, :2] = 1
    p = np.zeros((1, 4, 4, 1), np.float32); p[0, :2, :] = 0.5
    # BCE over 16 pixels: 8 at p=0.5 (-log 0.5 each, whatever y), 8 at p=0 clipped to 1e-7 with y=0
    bce = (8 * np.log(2) + 8 * -np.log(1 - 1e-7)) / 16
    assert float(get_loss("bce")(tf.constant(y), tf.constant(p))) == pytest.approx(bce, rel=1e-5)
    assert float(get_loss("dice_bce")(tf.constant(y), tf.constant(p))) == \
        pytest.approx(-np.log(5 / 9) + bce, rel=1e-5)


def test_perfect_prediction_gives_zero_loss():
    import tensorflow as tf

    from unet.training.losses import dice_loss
    y = np.zeros((2, 8, 8, 1), np.float32); y[:, 2:5, 2:6] = 1
    assert float(dice_loss(tf.constant(y), tf.constant(y))) == pytest.approx(0.0, abs=1e-6)


def test_bf16_model_keeps_float32_variables_and_output():
    import keras
    import tensorflow as tf

    from unet.model import build_unet
    m = build_unet(128, 128, 1, 1, precision="bf16")
    assert m.count_params() == 7_759_521
    assert {v.dtype for v in m.trainable_variables} == {"float32"}
    fp32 = build_unet(128, 128, 1, 1)        # the same variable list (dropout seed states are int64 in both)
    assert [(v.dtype, tuple(v.shape)) for v in m.variables] == [(v.dtype, tuple(v.shape)) for v in fp32.variables]
    assert m.get_layer("conv1a").compute_dtype == "bfloat16"
    assert m.get_layer("mask").compute_dtype == "float32"
    x = tf.random.stateless_normal((2, 128, 128, 1), seed=(1, 2))
    p = m(x, training=True)
    assert p.dtype == tf.float32 and p.shape == (2, 128, 128, 1)
    assert bool(tf.reduce_all(tf.math.is_finite(p)))
    assert keras.config.dtype_policy().name == "float32"        # set per layer, not globally


def test_bf16_checkpoint_and_export_round_trip(tmp_path):
    import keras
    import tensorflow as tf

    from unet.model import build_unet
    from unet.modelfolder import save_model as export_model
    from unet.training.checkpoint import load_checkpoint, save_checkpoint
    m = build_unet(32, 32, 2, 1, precision="bf16")
    opt = keras.optimizers.Adam()
    opt.build(m.trainable_variables)
    path = save_checkpoint(str(tmp_path / "ck"), model=m, optimizer=opt, step=1, epoch=0, meta={})
    fresh = build_unet(32, 32, 2, 1, precision="bf16")
    load_checkpoint(path, model=fresh, optimizer=None)
    assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(m.variables, fresh.variables))
    keras_path, _ = export_model(str(tmp_path / "export"), m, {})
    back = keras.saving.load_model(keras_path, compile=False)
    assert back.get_layer("conv1a").compute_dtype == "bfloat16"
    x = tf.random.stateless_normal((1, 32, 32, 2), seed=(3, 4))
    assert back(x).dtype == tf.float32
    assert np.array_equal(back(x).numpy(), m(x).numpy())


def _two_regions():
    # region 0: the top two rows (8 pixels), predicted 0.5 on 8 pixels of them;
    # region 1: one pixel, not predicted at all
    y = np.zeros((1, 4, 4, 2), np.float32); y[0, :2, :, 0] = 1; y[0, 0, 0, 1] = 1
    p = np.zeros((1, 4, 4, 2), np.float32); p[0, :2, :, 0] = 0.5
    return y, p


def test_region_dice_averages_regions_where_pooled_dice_lets_the_large_one_dominate():
    import tensorflow as tf

    from unet.training.losses import dice_loss, region_dice_loss
    y, p = _two_regions()
    # pooled over both regions: sum(y*p) = 4, sum(y) = 9, sum(p) = 4 -> -log((8+1)/(13+1))
    pooled = float(dice_loss(tf.constant(y), tf.constant(p)))
    assert pooled == pytest.approx(-np.log(9 / 14), rel=1e-6)
    # per region: Dice_0 = (8+1)/(12+1) = 9/13, Dice_1 = (0+1)/(1+0+1) = 1/2; loss = mean(-log Dice_r)
    per_region = float(region_dice_loss(tf.constant(y), tf.constant(p)))
    assert per_region == pytest.approx((-np.log(9 / 13) - np.log(1 / 2)) / 2, rel=1e-6)
    # the missed one-pixel region weighs as much as the large one; pooled, it is 1 pixel of 9
    assert per_region > pooled
    linear = float(region_dice_loss(tf.constant(y), tf.constant(p), log=False))
    assert linear == pytest.approx(((1 - 9 / 13) + (1 - 1 / 2)) / 2, rel=1e-6)


def test_region_dice_leaves_regions_absent_from_the_batch_out_of_the_mean():
    import tensorflow as tf

    from unet.training.losses import region_dice_loss
    y, p = _two_regions()
    y[..., 1] = 0                      # no pixel of region 1 in this batch
    p[0, 3, 3, 1] = 0.9                # a false positive there: cross-entropy's to punish
    loss = float(region_dice_loss(tf.constant(y), tf.constant(p)))
    assert loss == pytest.approx(-np.log(9 / 13), rel=1e-6)
    nothing = np.zeros_like(y)
    assert float(region_dice_loss(tf.constant(nothing), tf.constant(p))) == 0.0


def test_region_dice_bce_is_the_default_and_adds_cross_entropy():
    import tensorflow as tf

    from unet.training.config import parse_args
    from unet.training.losses import bce_loss, get_loss, region_dice_loss
    assert parse_args(["--synthetic"]).loss == "region_dice_bce"
    y, p = _two_regions()
    y, p = tf.constant(y), tf.constant(p)
    assert float(get_loss("region_dice_bce")(y, p)) == \
        pytest.approx(float(region_dice_loss(y, p)) + float(bce_loss(y, p)), rel=1e-6)
    assert float(get_loss("region_dice_bce", bce_weight=0.25)(y, p)) == \
        pytest.approx(float(region_dice_loss(y, p)) + 0.25 * float(bce_loss(y, p)), rel=1e-6)
