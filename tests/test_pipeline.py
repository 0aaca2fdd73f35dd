import numpy as np
import pytest

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


def dihedral(x):
    """The 8 flips/rotations of a (H, W, ...) array."""
    return [np.rot90(x[:, ::-1] if flip else x, k) for flip in (False, True) for k in range(4)]


def undo_augment(img, msk, a_img, a_msk):
    """(scale per channel, shift per channel) with a_img = scale * T(img) + shift and a_msk = T(msk)
    for one flip/rotation T; None if no T explains the pair."""
    for t_img, t_msk in zip(dihedral(img), dihedral(msk)):
        if not np.array_equal(t_msk, a_msk):
            continue
        x, y = t_img.reshape(-1, img.shape[-1]).astype(np.float64), a_img.reshape(-1, img.shape[-1])
        scale = ((x - x.mean(0)) * (y - y.mean(0))).sum(0) / ((x - x.mean(0)) ** 2).sum(0)
        shift = y.mean(0) - scale * x.mean(0)
        if np.abs(scale * x + shift - y).max() < 1e-4:
            return scale, shift
    return None


@pytest.mark.parametrize("scale,shift", [(None, None), (0.3, 0.5), (0.0, 0.0)])
def test_augment_scales_and_shifts_intensity_within_bounds(scale, shift):
    """Training augmentation: image = s * T(image) + b per channel, s in [1 - S, 1 + S], b in [-T, T]
    (the defaults S = T = 0.1; --aug_scale, --aug_shift)."""
    rng = np.random.default_rng(3)
    img = rng.normal(0, 1, (32, 16, 16, 2)).astype(np.float32)
    msk = (rng.random((32, 16, 16, 3)) < 0.3).astype(np.float32)
    kw = {} if scale is None else dict(scale=scale, shift=shift)
    s_max, t_max = (0.1, 0.1) if scale is None else (scale, shift)
    a_img, a_msk = augment(img, msk, np.random.default_rng(0), **kw)
    fits = [undo_augment(img[i], msk[i], a_img[i], a_msk[i]) for i in range(32)]
    assert all(f is not None for f in fits)
    scales, shifts = np.array([f[0] for f in fits]), np.array([f[1] for f in fits])
    assert (np.abs(scales - 1) <= s_max + 1e-5).all() and (np.abs(shifts) <= t_max + 1e-5).all()
    if s_max == 0:
        assert np.abs(scales - 1).max() < 1e-6 and np.abs(shifts).max() < 1e-6   # geometry only
        return
    assert np.abs(scales - 1).max() > s_max / 2 and np.abs(shifts).max() > t_max / 2   # it uses the range
    assert len({tuple(np.round(s, 4)) for s in scales}) == 32                 # drawn per image


def test_gamma_curve_by_hand_keeps_order_mean_and_spread():
    from unet.data.pipeline import gamma_channel
    v = np.array([0.0, 1.0, 2.0, 4.0], np.float32)
    curved = np.array([0.0, 0.25, 1.0, 4.0])     # ((v - 0) / 4) ** 2 * 4 + 0
    want = (curved - curved.mean()) * v.std() / curved.std() + v.mean()
    out = gamma_channel(v, 2.0)
    assert np.allclose(out, want, rtol=0, atol=1e-6)
    assert abs(out.mean() - 1.75) < 1e-6 and abs(out.std() - v.std()) < 1e-6
    assert np.array_equal(gamma_channel(np.full(5, 3.0, np.float32), 0.7), np.full(5, 3.0))   # flat: unchanged


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_augment_gamma_curves_the_head_and_leaves_the_background(p):
    """--aug_gamma P: each channel of each image, with probability P, through a gamma curve over its head's
    pixels; the background (0 in every channel) stays 0, the masks follow the geometry alone."""
    rng = np.random.default_rng(4)
    img = rng.normal(0, 1, (16, 16, 16, 3)).astype(np.float32)
    img[:, :3], img[:, :, :2] = 0, 0                       # background border
    msk = (rng.random((16, 16, 16, 3)) < 0.3).astype(np.float32)
    a_img, a_msk = augment(img, msk, np.random.default_rng(0), scale=0.0, shift=0.0, gamma=p)
    curved = 0
    for i in range(16):
        pair = next((t_img, t_msk) for t_img, t_msk in zip(dihedral(img[i]), dihedral(msk[i]))
                    if np.array_equal(t_msk, a_msk[i]) and np.array_equal(t_img == 0, a_img[i] == 0))
        head = np.any(pair[0] != 0, axis=-1)
        assert np.all(a_img[i][~head] == 0)
        for c in range(3):
            x, y = pair[0][..., c][head], a_img[i][..., c][head]
            assert np.diff(y[np.argsort(x)]).min() >= -1e-6          # the order kept (up to float32 rounding)
            assert abs(y.mean() - x.mean()) < 1e-5 and abs(y.std() - x.std()) < 1e-5 * x.std()
            curved += np.abs(x - y).max() > 1e-3
    assert curved == (48 if p == 1 else 0)


def test_bias_field_by_hand():
    from unet.data.pipeline import bias_field
    e = np.e
    assert np.allclose(bias_field((3, 3), (1, 0, 0, 0, 0)), [[1 / e, 1, e]] * 3, rtol=1e-6)        # exp(x)
    assert np.allclose(bias_field((3, 3), (0, 0, 0, 0, 1)), [[e, 1, 1 / e], [1, 1, 1], [1 / e, 1, e]], rtol=1e-6)
    assert np.allclose(bias_field((2, 2), (0, 0.5, 0, 0.5, 0)), [[1, 1], [e, e]], rtol=1e-6)       # exp(y/2 + y^2/2)


def test_augment_bias_moves_the_head_smoothly_and_leaves_the_background():
    """--aug_bias B: z -> (z + k) * field - k on the head (k in [2, 5], the field's coefficients in [-B, B],
    so |log field| <= 5 B); the background stays 0, every channel moves, the masks follow the geometry alone."""
    rng = np.random.default_rng(5)
    img = rng.normal(0, 1, (8, 16, 16, 4)).astype(np.float32)
    img[:, :3] = 0
    msk = (rng.random((8, 16, 16, 3)) < 0.3).astype(np.float32)
    a_img, a_msk = augment(img, msk, np.random.default_rng(0), scale=0.0, shift=0.0, bias=0.1)
    moved = 0
    for i in range(8):
        t_img = next(t for t, tm in zip(dihedral(img[i]), dihedral(msk[i]))
                     if np.array_equal(tm, a_msk[i]) and np.array_equal(t == 0, a_img[i] == 0))
        head = np.any(t_img != 0, axis=-1)
        assert np.all(a_img[i][~head] == 0)
        bound = (np.abs(t_img[head]) + 5) * (np.exp(0.5) - 1) + 1e-5
        assert np.all(np.abs(a_img[i][head] - t_img[head]) <= bound)
        moved += int((np.abs(a_img[i][head] - t_img[head]).max(axis=0) > 1e-3).sum())
    assert moved == 32


def test_validation_batches_are_the_stored_slices_unaugmented(tmp_path):
    import h5py
    from h5fixture import write_h5

    from unet.data.pipeline import val_batches
    from unet.data.sources import H5Source
    path = write_h5(str(tmp_path / "d.h5"), n_val=11)
    with h5py.File(path) as f:
        stored_imgs, stored_msks = f["val"]["images"][:], f["val"]["masks"][:]
    src = H5Source(path, "val")
    for rank in range(2):
        batches = list(val_batches(src, batch_size=4, rank=rank, size=2))
        idx = val_shard(11, rank, 2)
        imgs, msks = np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])
        assert np.array_equal(imgs, stored_imgs[idx]) and np.array_equal(msks, stored_msks[idx])


@pytest.mark.needs_stack
def test_training_dataset_augments(tmp_path):
    from h5fixture import write_h5

    from unet.data.pipeline import train_dataset
    from unet.data.sources import H5Source
    src = H5Source(write_h5(str(tmp_path / "d.h5"), n_train=8), "train")
    ds, steps = train_dataset(src, batch_size=4, rank=0, size=1, epoch=0, seed=0)
    assert steps == 2 and len(ds) == 2 and len(list(ds)) == 2
    idx = rank_batches(8, 4, 0, 1, epoch=0, seed=0)[0]
    x, y = (np.asarray(t) for t in next(iter(ds)))
    stored_x, stored_y = src.read(idx)
    assert not np.array_equal(x, stored_x)
    for i in range(4):   # each image is a flipped/rotated, scaled and shifted stored slice
        assert undo_augment(stored_x[i], stored_y[i], x[i], y[i]) is not None


# ---- tumour oversampling (--foreground_fraction) ----

def test_foreground_places_are_round_f_times_b():
    from unet.data.pipeline import foreground_per_batch
    cases = {(0.33, 2): 1, (0.33, 4): 1, (0.33, 8): 3, (0.5, 1): 1, (0.5, 3): 2, (0.1, 4): 0, (1.0, 4): 4, (0.0, 8): 0}
    assert {fb: foreground_per_batch(*fb) for fb in cases} == cases


def oversampled(n=100, b=6, size=3, k=2, epoch=0, seed=1, **kw):
    fg = np.arange(3, n, 7)                     # 14 of the 100 slices hold tumour
    return fg, [rank_batches(n, b, r, size, epoch, seed, foreground=fg, k=k, **kw) for r in range(size)]


def test_every_batch_of_every_rank_holds_k_tumour_slices_and_the_rest_follow_the_epoch_order():
    n, b, size, k = 100, 6, 3, 2
    fg, per_rank = oversampled(n, b, size, k)
    assert {len(p) for p in per_rank} == {steps_per_epoch(n, b * size)} == {6}    # equal steps, as without
    assert all(len(idx) == b for p in per_rank for idx in p)
    assert all(np.isin(idx[-k:], fg).all() for p in per_rank for idx in p)       # the last k of each batch
    # the other places take the epoch's permutation of all slices in turn: global batch by global batch,
    # rank by rank, as without oversampling
    rest = np.concatenate([per_rank[r][t][:b - k] for t in range(6) for r in range(size)])
    assert np.array_equal(rest, epoch_order(n, 0, 1)[:len(rest)]) and len(rest) == 6 * 3 * 4
    # the tumour places walk through a permutation of the tumour slices, repeated when it ends
    drawn = np.concatenate([per_rank[r][t][b - k:] for t in range(6) for r in range(size)])
    assert sorted(drawn[:len(fg)].tolist()) == fg.tolist()
    assert np.array_equal(drawn[len(fg):], drawn[:len(drawn) - len(fg)])
    # share of tumour slices per batch: k/B from the tumour places and what the permutation brings
    share = np.mean([np.isin(idx, fg).mean() for p in per_rank for idx in p])
    assert share >= k / b


def test_oversampled_order_is_a_function_of_seed_epoch_and_position():
    fg, a = oversampled(epoch=2, seed=5)
    assert all(np.array_equal(x, y) for p, q in zip(a, oversampled(epoch=2, seed=5)[1]) for x, y in zip(p, q))
    for other in (dict(epoch=3, seed=5), dict(epoch=2, seed=6)):
        b = oversampled(**other)[1]
        assert not np.array_equal(a[0][0][-2:], b[0][0][-2:]) or not np.array_equal(a[0][1][-2:], b[0][1][-2:])
    # k = 0 is the plain order, whatever the foreground
    assert all(np.array_equal(x, y) for x, y in zip(rank_batches(100, 6, 1, 3, 0, 1, foreground=fg, k=0),
                                                     rank_batches(100, 6, 1, 3, 0, 1)))


def test_oversampled_epoch_resumes_and_resizes_where_it_stopped():
    n, b, k = 100, 6, 2
    fg, full = oversampled(n, b, 2, k, epoch=1, seed=3)
    _, later = oversampled(n, b, 2, k, epoch=1, seed=3, start_sample=3 * 12)      # resumed after 3 steps
    assert all(len(later[r]) == len(full[r]) - 3 for r in range(2))
    assert all(np.array_equal(x, y) for r in range(2) for x, y in zip(full[r][3:], later[r]))
    # begun on 2 ranks, continued on 3 at sample 36: the same sample at every position as on 2 ranks throughout
    _, resized = oversampled(n, b, 3, k, epoch=1, seed=3, start_sample=36)
    by_pos = lambda batches, size, start: {start + t * b * size + r * b + i: int(v) for r in range(size)
                                           for t, idx in enumerate(batches[r]) for i, v in enumerate(idx)}
    plain, cont = by_pos(full, 2, 0), by_pos(resized, 3, 36)
    assert all(plain[p] == cont[p] for p in cont if p in plain) and len(set(cont) & set(plain)) == 100 - 36 + 8
    assert all(np.isin(idx[-k:], fg).all() for p in resized for idx in p)


def test_oversampling_needs_places_and_tumour_slices():
    with pytest.raises(ValueError):
        rank_batches(10, 4, 0, 1, 0, 0, foreground=np.array([], int), k=1)
    with pytest.raises(ValueError):
        rank_batches(10, 4, 0, 1, 0, 0, foreground=np.arange(3), k=5)


def h5_with_empty_slices(path, n_train=24, every=3):
    from h5fixture import write_h5
    return write_h5(path, n_train=n_train, tumour_every=every)


def test_tumour_slices_are_the_slices_with_any_mask_voxel(tmp_path):
    from unet.data.sources import H5Source, SyntheticSource
    src = H5Source(h5_with_empty_slices(str(tmp_path / "d.h5"), n_train=600), "train")   # more than one block
    assert src.tumour_slices().tolist() == list(range(0, 600, 3))
    assert SyntheticSource(5, 32, 1, 2, 0, "train").tumour_slices().tolist() == [0, 1, 2, 3, 4]


@pytest.mark.needs_stack
def test_training_dataset_oversamples_and_resumes_to_the_same_batches(tmp_path):
    from unet.data.pipeline import train_dataset
    from unet.data.sources import H5Source
    src = H5Source(h5_with_empty_slices(str(tmp_path / "d.h5"), n_train=24), "train")
    kw = dict(batch_size=4, size=2, epoch=1, seed=9, foreground_fraction=0.5)   # 2 of every 4 with tumour
    full = [[tuple(np.asarray(t) for t in xy) for xy in train_dataset(src, rank=r, **kw)[0]] for r in range(2)]
    assert [len(f) for f in full] == [3, 3]
    for batches in full:
        for x, y in batches:       # augmentation moves the tumour but keeps it: the last 2 hold some
            assert all(y[i].any() for i in (2, 3))
    tumour_share = np.mean([y[i].any() for f in full for _, y in f for i in range(4)])
    assert tumour_share >= 0.5
    for r in range(2):             # resumed after step 1: the same images, augmented alike
        rest = [tuple(np.asarray(t) for t in xy) for xy in train_dataset(src, rank=r, start=1, **kw)[0]]
        assert len(rest) == 2 and all(np.array_equal(a, b) for p, q in zip(full[r][1:], rest) for a, b in zip(p, q))


# ---- tumour-free slices drawn anew each epoch (--background_fraction) ----

def test_an_epoch_holds_every_tumour_slice_and_round_f_of_the_others_drawn_per_epoch():
    from unet.data.pipeline import background_count, epoch_length, epoch_members
    n, tumour = 100, np.arange(3, 100, 7)                       # 14 tumour slices, 86 without
    assert [background_count(86, f) for f in (0, 0.1, 0.25, 0.5, 1)] == [0, 9, 22, 43, 86]
    draws = [epoch_members(n, tumour, 0.1, e, 4) for e in range(4)]
    for m in draws:
        assert len(m) == epoch_length(n, 14, 0.1) == 14 + 9 and len(set(m.tolist())) == len(m)
        assert np.isin(tumour, m).all() and np.all(np.diff(m) > 0) and m.min() >= 0 and m.max() < n
    free = [set(m.tolist()) - set(tumour.tolist()) for m in draws]
    assert len(set.union(*free)) > 9                            # other tumour-free slices in other epochs
    assert np.array_equal(draws[2], epoch_members(n, tumour, 0.1, 2, 4))      # a function of (seed, epoch)
    assert not np.array_equal(draws[2], epoch_members(n, tumour, 0.1, 2, 5))
    assert epoch_length(n, 14, 1.0) == n and epoch_members(n, tumour, 0, 0, 0).tolist() == tumour.tolist()


def test_an_epoch_of_members_is_shared_out_like_a_file_of_them_and_resumes():
    from unet.data.pipeline import epoch_members
    n, b, size, tumour = 100, 3, 2, np.arange(0, 100, 4)
    m = epoch_members(n, tumour, 0.2, 1, 7)                     # 25 + 15 = 40 samples: 7 global batches of 6
    per_rank = [rank_batches(n, b, r, size, 1, 7, members=m) for r in range(size)]
    assert [len(p) for p in per_rank] == [steps_per_epoch(len(m), b * size)] * 2 == [7, 7]
    seen = np.concatenate([per_rank[r][t] for t in range(7) for r in range(size)])
    assert np.array_equal(seen[:40], m[epoch_order(40, 1, 7)])             # each member once, in the epoch's order
    assert sorted(seen[:40].tolist()) == m.tolist() and np.isin(seen[40:], m).all()   # the top-up from the start
    later = [rank_batches(n, b, r, size, 1, 7, start_sample=12, members=m) for r in range(size)]
    assert all(np.array_equal(x, y) for r in range(size) for x, y in zip(per_rank[r][2:], later[r]))
    # with oversampling: the last k of each batch still from the tumour slices, the rest from the members
    over = [rank_batches(n, 4, r, size, 1, 7, foreground=tumour, k=1, members=m) for r in range(size)]
    assert all(np.isin(idx[-1:], tumour).all() and np.isin(idx, m).all() for p in over for idx in p)
    with pytest.raises(ValueError):
        rank_batches(n, b, 0, size, 1, 7, members=np.zeros(0, int))


@pytest.mark.needs_stack
def test_training_dataset_draws_the_tumour_free_slices_of_each_epoch(tmp_path):
    from unet.data.pipeline import train_dataset
    from unet.data.sources import H5Source
    src = H5Source(h5_with_empty_slices(str(tmp_path / "d.h5"), n_train=60), "train")   # 20 tumour, 40 free
    kw = dict(batch_size=2, rank=0, size=1, seed=3, augment_on=False, background_fraction=0.25)
    empty = []
    for epoch in (0, 1):
        ds, steps = train_dataset(src, epoch=epoch, **kw)
        ys = [np.asarray(y) for _, y in ds]
        assert steps == len(ys) == 15                              # (20 + 10) / 2
        has = [bool(y[i].any()) for y in ys for i in range(2)]
        assert sum(has) == 20 and has.count(False) == 10
        empty.append({np.asarray(x)[i].tobytes() for (x, y) in train_dataset(src, epoch=epoch, **kw)[0]
                      for i in range(2) if not np.asarray(y)[i].any()})
    assert empty[0] != empty[1]                                    # other tumour-free slices in epoch 1
