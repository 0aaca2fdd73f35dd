import numpy as np

from unet.data.pipeline import augment, epoch_order, rank_batches, steps_per_epoch, val_shard


def test_every_sample_once_per_epoch_over_all_ranks():
    n, b, size = 100, 4, 3                      # global batch 12 -> 9 steps, 8 samples topped up
    per_rank = [rank_batches(n, b, r, size, epoch=0, seed=1) for r in range(size)]
    assert {len(p) for p in per_rank} == {steps_per_epoch(n, b * size)} == {9}
    assert all(len(idx) == b for p in per_rank for idx in p)
    seen = np.concatenate([np.concatenate(p) for p in per_rank])
    assert set(seen.tolist()) == set(range(n))
    assert len(seen) == 108 and np.bincount(seen).max() == 2   # only the top-up repeats


def test_two_ranks_of_batch_b_see_what_one_rank_of_batch_2b_sees():
    n = 50
    one = rank_batches(n, 8, 0, 1, epoch=3, seed=7)
    two = [rank_batches(n, 4, r, 2, epoch=3, seed=7) for r in range(2)]
    for t, idx in enumerate(one):
        assert np.array_equal(idx, np.concatenate([two[0][t], two[1][t]]))


def test_order_changes_per_epoch_but_not_per_rank():
    assert not np.array_equal(epoch_order(64, 0, 1), epoch_order(64, 1, 1))
    assert not np.array_equal(epoch_order(64, 2, 1), epoch_order(64, 2, 2))     # the seed matters
    # all ranks cut their batches from one shared permutation: rank 0 then rank 1 of every
    # global batch, in order, is exactly that epoch's permutation (a per-rank order would differ)
    ranks = [rank_batches(64, 4, r, 2, epoch=2, seed=1) for r in range(2)]
    joined = np.concatenate([np.concatenate([ranks[0][t], ranks[1][t]]) for t in range(len(ranks[0]))])
    assert np.array_equal(joined, epoch_order(64, 2, 1))
    assert not np.array_equal(ranks[0][0], ranks[1][0])


def test_steps_cap_and_validation_shards():
    assert steps_per_epoch(1000, 16, cap=5) == 5
    assert len(rank_batches(1000, 8, 1, 2, 0, 0, cap=5)) == 5
    shards = [val_shard(7, r, 3) for r in range(3)]
    assert sorted(np.concatenate(shards).tolist()) == list(range(7))
    assert [len(s) for s in shards] == [3, 2, 2]


def test_augment_moves_image_and_mask_together():
    rng = np.random.default_rng(0)
    img = np.zeros((16, 8, 8, 2), np.float32)
    img[:, 1, 2, :] = 5.0
    msk = (img[..., :1] > 0).astype(np.float32)
    a_img, a_msk = augment(img, msk, rng)
    assert a_img.shape == img.shape and a_msk.shape == msk.shape
    # the bright pixel and the mask pixel stay together after flips/rotations
    for i in range(16):
        assert np.argmax(a_img[i, ..., 0]) == np.argmax(a_msk[i, ..., 0])
    assert np.array_equal(np.sort(a_msk.ravel()), np.sort(msk.ravel()))  # masks stay binary
    assert len({np.argmax(a_msk[i, ..., 0]) for i in range(16)}) > 1      # it did transform


def test_resized_epoch_continues_where_it_stopped():
    """An epoch begun on 2 ranks and continued on 3 at sample s covers every sample once."""
    n, b = 50, 4
    first = [rank_batches(n, b, r, 2, epoch=1, seed=3)[:2] for r in range(2)]  # 2 steps x 8 samples
    rest = [rank_batches(n, b, r, 3, epoch=1, seed=3, start_sample=16) for r in range(3)]
    seen = [i for steps in first for bt in steps for i in bt] + [i for steps in rest for bt in steps for i in bt]
    assert len(rest[0]) == 3  # ceil(34 / 12)
    assert sorted(set(seen)) == list(range(n))  # nothing skipped
    assert len(seen) == 16 + 36 and len(seen) - n == 2  # only the last batch's top-up repeats
    # continuing at sample 0 is the plain epoch
    assert all((a == c).all() for a, c in zip(rank_batches(n, b, 1, 2, 1, 3, start_sample=0),
                                              rank_batches(n, b, 1, 2, 1, 3)))


def test_start_sample_matches_step_offset():
    full = rank_batches(100, 4, 1, 2, epoch=0, seed=5)
    later = rank_batches(100, 4, 1, 2, epoch=0, seed=5, start_sample=3 * 8)
    assert len(later) == len(full) - 3 and all((a == c).all() for a, c in zip(full[3:], later))
