import math

import pytest

from unet.training.schedule import learning_rate, worker_scale


def test_seed_decay_is_continuous_exponential():
    # lr * lr_fraction ** (step / decay_steps): after decay_steps the rate is lr_fraction of itself
    kw = dict(base_lr=0.0005, decay_steps=150, lr_fraction=0.25)
    assert learning_rate(0, **kw) == pytest.approx(0.0005)
    assert learning_rate(150, **kw) == pytest.approx(0.000125)
    assert learning_rate(75, **kw) == pytest.approx(0.0005 * 0.5)
    assert learning_rate(300, **kw) == pytest.approx(0.0005 / 16)


def test_const_learningrate_switches_decay_off():
    assert learning_rate(1000, base_lr=0.01, constant=True) == pytest.approx(0.01)


@pytest.mark.parametrize("scaling,factor", [("linear", 8.0), ("sqrt", math.sqrt(8)), ("none", 1.0)])
def test_base_rate_scaled_by_workers(scaling, factor):
    assert worker_scale(8, scaling) == pytest.approx(factor)
    assert learning_rate(0, base_lr=0.001, num_workers=8, scaling=scaling, constant=True) == \
        pytest.approx(0.001 * factor)


def test_warmup_ramps_linearly_from_one_worker_rate_to_scaled_rate():
    kw = dict(base_lr=0.001, num_workers=4, warmup_steps=100, constant=True)
    assert learning_rate(0, **kw) == pytest.approx(0.001)
    assert learning_rate(50, **kw) == pytest.approx(0.0025)
    assert learning_rate(100, **kw) == pytest.approx(0.004)
    assert learning_rate(500, **kw) == pytest.approx(0.004)


def test_decay_counts_global_steps_whatever_the_worker_count():
    # the same step gives the same decay factor on 2 or 16 workers; only the scale differs
    a = learning_rate(300, base_lr=1.0, num_workers=2, decay_steps=150, lr_fraction=0.5)
    b = learning_rate(300, base_lr=1.0, num_workers=16, decay_steps=150, lr_fraction=0.5)
    assert a / 2 == pytest.approx(0.25) and b / 16 == pytest.approx(0.25)


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        worker_scale(0)
    with pytest.raises(ValueError):
        worker_scale(2, "cubic")
    with pytest.raises(ValueError):
        learning_rate(-1, base_lr=0.1)
