import numpy as np
import pytest

from unet.data.labels import labels_from_regions, regions_from_labels, unexpected_labels


@pytest.mark.parametrize("layout,wt,tc,et", [
    ("brats", {1, 2, 4}, {1, 4}, {4}),
    ("brats2023", {1, 2, 3}, {1, 3}, {3}),
    ("msd", {1, 2, 3}, {2, 3}, {3}),
])
def test_region_maps_per_layout(layout, wt, tc, et):
    seg = np.array([0, 1, 2, 3, 4])
    valid = seg if layout == "brats" else seg[:4]
    r = regions_from_labels(valid, layout)
    assert r.dtype == np.uint8 and r.shape == (len(valid), 3)
    for k, want in enumerate((wt, tc, et)):
        assert set(valid[r[:, k] == 1].tolist()) == want


def test_regions_round_trip_to_labels():
    for layout, labels in (("brats", [0, 1, 2, 4]), ("brats2023", [0, 1, 2, 3]), ("msd", [0, 1, 2, 3])):
        seg = np.array(labels * 3, np.uint8).reshape(3, 4)
        assert np.array_equal(labels_from_regions(regions_from_labels(seg, layout), layout), seg)


def test_unexpected_labels_are_named():
    assert unexpected_labels(np.array([0, 1, 3]), "brats") == [3]
    assert unexpected_labels(np.array([0, 4]), "msd") == [4]
    assert unexpected_labels(np.array([0, 1, 2, 4]), "brats") == []
