"""The demo's synthetic image set (synthetic.py): deterministic images, disjoint splits, objects that are the
drawn shapes, and a background pattern with the symmetry it is named after."""
import numpy as np
import pytest

import data
import synthetic


def test_synthetic_deterministic_by_index_and_splits_disjoint():
    train, val = data.open_dataset("synthetic"), data.open_dataset("synthetic", "val")
    assert (len(train), len(val)) == (synthetic.TRAIN_IMAGES, synthetic.VAL_IMAGES)
    a, b = np.asarray(train.open(7)[0]), np.asarray(train.open(7)[0])
    assert a.shape == (synthetic.SIZE, synthetic.SIZE, 3) and np.array_equal(a, b)
    assert not np.array_equal(a, np.asarray(val.open(7)[0])) and not np.array_equal(a, np.asarray(train.open(8)[0]))
    assert train.open(7)[1] == val.open(7)[1] == 7 and sorted(set(train.targets.tolist())) == list(range(10))
    assert a.std() > 20  # real structure, not a flat colour
    assert len(data.open_dataset("synthetic:40")) == 40
    with pytest.raises(ValueError, match="synthetic"):
        data.open_dataset("synthetic:0")


def test_synthetic_scene_objects_are_the_drawn_shapes():
    ds = synthetic.SyntheticImages("val", 10)
    for i in range(10):
        img, label, objects = ds.scene(i)
        x = np.asarray(img).reshape(-1, 3).astype(int)
        assert np.array_equal(np.asarray(img), np.asarray(ds.open(i)[0])) and label == ds.targets[i]
        (main_cls, main), small = objects[0], objects[1:]
        assert main_cls == label and main.sum() > 100 and len(small) >= 3 and all(0 <= c < 5 for c, _ in small)
        masks = np.stack([m for _, m in objects])
        assert masks.any(axis=(1, 2)).all() and masks.sum(0).max() == 1  # visible pixels: none empty, no overlap
        if label < 5:  # a plain shape is one colour (up to the faint noise)
            assert np.ptp(x[main.ravel()], axis=0).max() <= 12
        for _, m in small:  # the small shapes are plain
            assert np.ptp(x[m.ravel()], axis=0).max() <= 12


def test_synthetic_background_is_a_symmetric_pattern():
    """Each symmetry map sends every pixel to one of the fundamental domain, which it fixes; the drawn
    patterns are symmetric under one of the maps (outside the main shape, up to the faint noise), not all
    under the same one."""
    h = synthetic.SIZE // 2
    invariant = {"none": [], "mirror-lr": [lambda g: g[:, ::-1]], "mirror-ud": [lambda g: g[::-1]],
                 "mirror-both": [lambda g: g[:, ::-1], lambda g: g[::-1]], "rot180": [lambda g: g[::-1, ::-1]],
                 "rot90": [np.rot90], "shift-x": [lambda g: np.roll(g, h, 1)], "shift-y": [lambda g: np.roll(g, h, 0)],
                 "tile": [lambda g: np.roll(g, h, 1), lambda g: np.roll(g, h, 0)], "mirror-diag": [lambda g: g.T],
                 "mirror-antidiag": [lambda g: g[::-1, ::-1].T]}
    noise = np.random.default_rng(0).random((synthetic.SIZE, synthetic.SIZE))
    for name, (sy, sx, copy) in zip(synthetic.SYMMETRIES, synthetic._SYMMETRY_MAPS):
        domain = copy == 0
        assert (sy[sy, sx] == sy).all() and (sx[sy, sx] == sx).all() and domain[sy, sx].all(), name
        assert domain.mean() == pytest.approx({1: 1, 2: 0.5, 4: 0.25}[len(np.unique(copy))], abs=0.01), name
        g = noise[sy, sx]  # any content copied by the map has the symmetry it is named after
        assert all(np.array_equal(g, t(g)) for t in invariant[name]), name
    ds, found = synthetic.SyntheticImages("train", 22), []
    for i in range(22):
        img, _, objects = ds.scene(i)
        x, main, pattern = np.asarray(img).astype(int), objects[0][1], np.any([m for _, m in objects[1:]], axis=0)
        for name, (sy, sx, _) in zip(synthetic.SYMMETRIES[1:], synthetic._SYMMETRY_MAPS[1:]):
            seen = ~main & ~main[sy, sx]  # the pattern where neither a pixel nor its source is behind the main shape
            if (pattern == pattern[sy, sx])[seen].all() and np.abs(x - x[sy, sx])[seen & pattern].max() <= 12:
                found.append(name)
                break
    assert len(found) >= 16 and len(set(found)) >= 6, found  # 'none' is 1 class in 11
