"""Rank 0 logs and keeps; every other rank has the same methods, doing nothing, so a misspelt call
fails on every rank alike. What is kept: the latest checkpoints and the best validation epoch."""
import inspect
import json

import numpy as np
import pytest

from unet.training.keeper import Keeper, Rank0Keeper
from unet.training.reporting import Rank0Reporter, Reporter


def public(cls):
    return {n: inspect.signature(f) for n, f in inspect.getmembers(cls, inspect.isfunction)
            if not n.startswith("_")}


@pytest.mark.parametrize("base,chief", [(Reporter, Rank0Reporter), (Keeper, Rank0Keeper)])
def test_rank_0_and_the_others_have_the_same_methods(base, chief):
    own = public(chief)
    assert own.keys() == public(base).keys()
    for name, sig in public(base).items():     # every one of them overridden, with the same parameters
        assert name in vars(chief), f"{chief.__name__} does not define {name}"
        assert list(own[name].parameters) == list(sig.parameters), name


def test_a_misspelt_call_fails_on_the_other_ranks_too():
    with pytest.raises(AttributeError):
        Reporter().epoch_ended(0)
    with pytest.raises(AttributeError):
        Keeper().lastest(None, None, {}, step=1, epoch=0, step_in_epoch=1)


class Var:
    def __init__(self, a):
        self.a = np.asarray(a, np.float32)

    def numpy(self):
        return self.a

    def assign(self, a):
        self.a = np.asarray(a, np.float32)


class Net:
    def __init__(self):
        self.variables = [Var([1.0, 2.0]), Var([[3.0]])]


def test_best_is_the_best_validation_so_far_even_after_a_restart(tmp_path):
    net, opt = Net(), Net()
    keep = Rank0Keeper(str(tmp_path), keep=2, epochs=5)
    meta = {"seed": 1}
    ends = [keep.epoch_end(net, opt, meta, step=10 * e, epoch=e, val={"dice": [d, d], "loss": 0.1})
            for e, d in ((1, 0.5), (2, 0.4))]
    assert [best for _, best in ends] == [True, False]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == \
        ["best.npz", "ckpt-00000010.npz", "ckpt-00000020.npz"]
    again = Rank0Keeper(str(tmp_path), keep=2, epochs=5)       # resumed: the best so far is the one on disk
    again.continue_run()
    assert again.epoch_end(net, opt, meta, step=30, epoch=3, val={"dice": [0.45, 0.45], "loss": 0.1})[1] is False
    net.variables[0].assign([7.0, 7.0])
    assert again.epoch_end(net, opt, meta, step=40, epoch=4, val={"dice": [0.6, 0.6], "loss": 0.1})[1] is True
    with np.load(tmp_path / "checkpoints" / "best.npz") as z:
        kept = json.loads(str(z["meta"]))
        assert (kept["epoch"], kept["val_dice"]) == (4, pytest.approx(0.6)) and z["m000"].tolist() == [7.0, 7.0]
    # the latest two checkpoints stay, besides the best
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == \
        ["best.npz", "ckpt-00000030.npz", "ckpt-00000040.npz"]


def test_without_validation_nothing_is_best(tmp_path):
    keep = Rank0Keeper(str(tmp_path), keep=3, epochs=1)
    path, best = keep.epoch_end(Net(), Net(), {}, step=5, epoch=1, val=None)
    assert path.endswith("ckpt-00000005.npz") and best is False
    assert not (tmp_path / "checkpoints" / "best.npz").exists()
