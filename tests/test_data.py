"""data.py: subsets, manifests, the iteration stream, robust decoding, JPEG draft, the synthetic set."""
import io
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

import data

MEAN, STD = torch.tensor(data.IMAGENET_MEAN)[:, None, None], torch.tensor(data.IMAGENET_STD)[:, None, None]


def smooth_rgb(W, H, seed=0):
    """A smooth colourful (H, W, 3) uint8 image: JPEG-friendly, and different crops look different."""
    y, x = np.mgrid[:H, :W] / max(W, H)
    phase = np.random.default_rng(seed).uniform(0, 6, 3)
    return (127.5 + 120 * np.sin(6 * x[..., None] + 4 * y[..., None] * np.arange(1, 4) + phase)).astype(np.uint8)


def take(sampler, k):
    return list(itertools.islice(iter(sampler), k))


def test_subsets_nested_deterministic_sized_and_validated():
    n, subs = 1003, {}
    for frac in (0.1, 0.2, 0.5, 1.0):
        torch.manual_seed(int(frac * 10))  # ranks seed their global RNGs differently: must not matter
        np.random.seed(int(frac * 10))
        subs[frac] = data.subset_indices(n, frac, seed=0)
        assert len(subs[frac]) == round(frac * n) and subs[frac].dtype == np.int64
        assert np.all(np.diff(subs[frac]) > 0)  # sorted, no duplicates
        assert np.array_equal(subs[frac], data.subset_indices(n, frac, seed=0))
    assert set(subs[0.1]) < set(subs[0.2]) < set(subs[0.5]) < set(subs[1.0]) == set(range(n))
    assert not np.array_equal(subs[0.1], data.subset_indices(n, 0.1, seed=1))
    for bad in (0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"--frac must be in \(0, 1\]"):
            data.subset_indices(n, bad, 0)
    with pytest.raises(ValueError, match="no image"):
        data.subset_indices(4, 0.1, 0)  # round(0.4) == 0


def test_manifest_round_trip_and_hash(tmp_path):
    names = [f"n{i % 7:03d}/img_{i}.JPEG" for i in range(500)]
    idx = data.subset_indices(len(names), 0.2, seed=3)
    path = str(tmp_path / "subset.txt")
    h = data.write_manifest(path, names, idx)
    assert h == data.subset_hash(names, idx) and len(h) == 10
    assert h != data.subset_hash(names, idx[1:])
    lines = open(path).read().splitlines()
    assert lines[0] == f"# {len(idx)} images, sha1 {h}" and lines[1:] == [names[i] for i in idx]
    assert np.array_equal(data.read_manifest(path, names), idx)
    assert [p.name for p in tmp_path.iterdir()] == ["subset.txt"]  # no temp file left behind
    with pytest.raises(ValueError, match="not in the dataset"):
        data.read_manifest(path, names[:50])


def test_global_batch_same_for_any_world_size_and_accumulation():
    B, steps = 8, 3
    one = take(data.StreamSampler(B, micro_batch=4), steps * B)  # world 1, accum 2
    ranks = [take(data.StreamSampler(B, 4, rank=r, world_size=2), steps * 4) for r in range(2)]  # accum 1
    for s in range(steps):
        expected = list(range(s * B, (s + 1) * B))
        assert sorted(one[s * B:(s + 1) * B]) == expected
        assert sorted(ranks[0][s * 4:(s + 1) * 4] + ranks[1][s * 4:(s + 1) * 4]) == expected
    # exact layout: step, micro-step, then this rank's contiguous micro-batch
    assert take(data.StreamSampler(8, 2, rank=1, world_size=2), 8) == [2, 3, 6, 7, 10, 11, 14, 15]
    with pytest.raises(ValueError, match="divisible"):
        data.StreamSampler(10, 4, world_size=2)
    assert sorted(data.shard(10, 0, 3) + data.shard(10, 1, 3) + data.shard(10, 2, 3)) == list(range(10))


def stream(n=37, seed=5):
    ds = data.open_dataset(f"synthetic:{n}")
    return data.TrainStream(ds, data.subset_indices(len(ds), 0.7, seed=0), data.pretrain_transform(32), seed)


def test_stream_restart_and_order_are_pure_functions_of_position():
    ts, B = stream(), 4
    first = [ts[p] for p in take(data.StreamSampler(B, 2), 6 * B)]
    torch.manual_seed(123)
    before = torch.get_rng_state()
    again = [stream()[p] for p in take(data.StreamSampler(B, 2, start_step=3), 3 * B)]  # a fresh process
    assert torch.equal(torch.get_rng_state(), before)  # augmentations leave the caller's RNG alone
    for a, b in zip(first[3 * B:], again):
        assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
    # one pass (n = 26 positions) visits every subset image exactly once, the next pass in another order
    n = len(ts.indices)
    pass0, pass1 = [ts.index(p) for p in range(n)], [ts.index(p) for p in range(n, 2 * n)]
    assert sorted(pass0) == sorted(pass1) == sorted(ts.indices.tolist()) and pass0 != pass1
    assert not torch.equal(ts[0][0], ts[n][0])  # same image may recur, its crop does not


def test_loader_same_crops_with_and_without_workers():
    batches = {}
    for workers in (0, 2):
        loader = data.make_loader(stream(), 4, sampler=data.StreamSampler(8, 4), workers=workers)
        it = iter(loader)
        batches[workers] = [next(it) for _ in range(3)]
        del it, loader  # shuts the persistent workers down
    for a, b in zip(batches[0], batches[2]):
        assert a[0].shape == (4, 3, 32, 32)
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_bad_files_replaced_and_counted_odd_modes_become_rgb(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    rgb = Image.fromarray(smooth_rgb(40, 30))
    buf = io.BytesIO()
    rgb.save(buf, "JPEG")
    (tmp_path / "a/corrupt.jpg").write_bytes(np.random.default_rng(0).bytes(3000))
    (tmp_path / "a/truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    Image.new("L", (40, 30), 90).save(tmp_path / "a/gray.png")
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(tmp_path / "a/cmyk.jpg")  # pure red
    rgba = Image.new("RGBA", (40, 30), (255, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 20, 30))  # left half fully transparent
    rgba.save(tmp_path / "a/rgba.png")
    rgb.convert("P").save(tmp_path / "b/palette.png")
    rgb.save(tmp_path / "b/z_good.jpg")
    ds = data.open_dataset(str(tmp_path))
    assert ds.classes == ["a", "b"] and len(ds) == 7
    items = {ds.names[i]: data.EvalSet(ds, range(len(ds)), data.val_transform(24))[i] for i in range(len(ds))}
    assert {k: v[3] for k, v in items.items() if v[3]} == {"a/corrupt.jpg": 1, "a/truncated.jpg": 1}
    for x, label, index, bad in items.values():
        assert x.shape == (3, 24, 24) and torch.isfinite(x).all()
    pix = {k: v[0] * STD + MEAN for k, v in items.items()}  # back to [0, 1]
    assert torch.allclose(pix["a/gray.png"][0], pix["a/gray.png"][2], atol=1e-6)
    assert pix["a/cmyk.jpg"][0].mean() > 0.9 and pix["a/cmyk.jpg"][1:].mean() < 0.1
    assert items["a/rgba.png"][0][:, :, :8].abs().max() < 0.05  # transparent -> the mean -> ~0
    assert torch.equal(items["a/corrupt.jpg"][0], items["a/gray.png"][0])  # replaced by the next file
    why = data.failure(ds, ds.names.index("a/corrupt.jpg"))  # what the training process prints
    assert why.startswith(str(tmp_path / "a/corrupt.jpg")) and "Error" in why, why
    # a training stream over only bad files and one good one: counted, never raised
    ts = data.TrainStream(ds, [ds.names.index("a/corrupt.jpg"), ds.names.index("a/truncated.jpg"), 6],
                          data.pretrain_transform(16), seed=0)
    skips = [next(k for k in range(9) if ts.index(p + k) == 6) for p in range(9)]  # bad run from p
    assert [ts[p][1:] for p in range(9)] == [(1, p, skips[p]) for p in range(9)] and sum(skips) >= 6
    broken = {ds.names.index("a/corrupt.jpg"), ds.names.index("a/truncated.jpg")}
    assert all(set(ts.skipped(p, skips[p])) <= broken and len(ts.skipped(p, skips[p])) == skips[p] for p in range(9))


def test_synthetic_deterministic_by_index_and_splits_disjoint():
    train, val = data.open_dataset("synthetic"), data.open_dataset("synthetic", "val")
    assert (len(train), len(val)) == (data.SYNTHETIC_TRAIN, data.SYNTHETIC_VAL)
    a, b = np.asarray(train.open(7)[0]), np.asarray(train.open(7)[0])
    assert a.shape == (data.SYNTHETIC_SIZE, data.SYNTHETIC_SIZE, 3) and np.array_equal(a, b)
    assert not np.array_equal(a, np.asarray(val.open(7)[0])) and not np.array_equal(a, np.asarray(train.open(8)[0]))
    assert train.open(7)[1] == val.open(7)[1] == 7 and sorted(set(train.targets.tolist())) == list(range(10))
    assert a.std() > 20  # real structure, not a flat colour
    assert len(data.open_dataset("synthetic:40")) == 40
    with pytest.raises(ValueError, match="synthetic"):
        data.open_dataset("synthetic:0")


def test_file_list_dataset(tmp_path):
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        Image.fromarray(smooth_rgb(20, 20, i)).save(tmp_path / f"imgs/im {i}.png")
    (tmp_path / "train.txt").write_text("imgs/im 0.png 2\nimgs/im 1.png 0\n\nimgs/im 2.png 1\n")
    ds = data.open_dataset(str(tmp_path / "train.txt"))
    assert ds.names == ["imgs/im 0.png", "imgs/im 1.png", "imgs/im 2.png"] and ds.targets.tolist() == [2, 0, 1]
    img, label = ds.open(0)
    assert img.size == (20, 20) and label == 2 and ds.classes == ["0", "1", "2"]
    (tmp_path / "bad.txt").write_text("imgs/im 0.png\n")
    with pytest.raises(ValueError, match="bad.txt:1"):
        data.open_dataset(str(tmp_path / "bad.txt"))


def test_empty_or_missing_data_path_is_a_one_line_error(tmp_path):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    (tmp_path / "empty" / "cls" / "notes.txt").write_text("not an image")
    for path in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(FileNotFoundError) as e:
            data.open_dataset(str(path))
        assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_jpeg_draft_crop_covers_same_region(tmp_path):
    Image.fromarray(smooth_rgb(1024, 768)).save(tmp_path / "big.jpg", quality=95)
    out = {}
    for draft in (True, False):
        img = Image.open(tmp_path / "big.jpg")
        torch.manual_seed(0)
        out[draft] = data.pretrain_transform(64, draft=draft)(img)
        assert (img.size[0] < 1024) == draft  # the draft path really decoded at reduced scale
    assert out[True].shape == (3, 64, 64)
    torch.manual_seed(1)  # a different crop of the same image, for scale
    other = data.pretrain_transform(64, draft=False)(Image.open(tmp_path / "big.jpg"))
    diff, diff_other = (out[True] - out[False]).abs().mean(), (other - out[False]).abs().mean()
    assert diff < 0.05 and diff_other > 5 * diff, (diff, diff_other)


def test_finetune_transforms_shapes():
    img = Image.fromarray(smooth_rgb(50, 40))
    torch.manual_seed(0)
    assert data.finetune_transform(32, train=True)(img).shape == (3, 32, 32)
    light = data.finetune_transform(32, train=True, aug="light")
    names = [type(t).__name__ for t in light.transforms]
    assert light(img).shape == (3, 32, 32) and "RandAugment" not in names and "RandomErasing" not in names
    assert [t.scale for t in light.transforms if hasattr(t, "scale")] == [(0.35, 1.0)]
    ev = data.finetune_transform(32, train=False)
    assert torch.equal(ev(img), ev(img)) and ev(img).shape == (3, 32, 32)


def test_synthetic_scene_objects_are_the_drawn_shapes():
    ds = data.SyntheticImages("val", 10)
    for i in range(10):
        img, label, objects = ds.scene(i)
        assert np.array_equal(np.asarray(img), np.asarray(ds.open(i)[0])) and label == ds.targets[i]
        (main_cls, main), (small_cls, small) = objects
        assert main_cls == label and 0 <= small_cls < 5 and main.sum() > 100 and not (main & small).any()
        pixels = np.asarray(img).reshape(-1, 3)[main.ravel()]
        if label < 5:  # a plain shape is one colour (up to the faint noise)
            assert np.ptp(pixels.astype(int), axis=0).max() <= 12
