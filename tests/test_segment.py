"""segment.py: UPerNet's shapes and its training-only auxiliary head, mIoU against a hand computation,
sliding windows against whole-image inference, the joint image + label augmentation, ADE20K as released,
and exact evaluation over two processes."""
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import data
import segment
import swinv2


def tiny_segmenter(num_classes=7, seed=0):
    torch.manual_seed(seed)
    return segment.Segmenter(swinv2.create("tiny", pyramid=True), num_classes, channels=16, aux_channels=8)


def test_head_shapes_and_the_auxiliary_head_runs_only_in_training():
    model = tiny_segmenter(num_classes=7)
    calls = []
    model.aux_head.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    logits, aux = model.train()(x)
    assert logits.shape == (2, 7, 16, 16) and aux.shape == (2, 7, 4, 4) and len(calls) == 1  # strides 4 and 16
    y = torch.randint(0, 7, (2, 64, 64))
    y[0, :10] = segment.IGNORE
    loss = segment.seg_loss(logits, aux, y)
    up = lambda z: F.interpolate(z, size=(64, 64), mode="bilinear", align_corners=False)
    want = F.cross_entropy(up(logits), y, ignore_index=255) + 0.4 * F.cross_entropy(up(aux), y, ignore_index=255)
    assert torch.allclose(loss, want)
    # every level of the pyramid reaches the main head (PPM on stride 32, laterals on 4, 8, 16)
    maps = [m.detach().requires_grad_() for m in model.encoder.forward_pyramid(x)]
    model.decode_head(maps).square().sum().backward()
    assert all(m.grad.abs().sum() > 0 for m in maps)
    model.eval()
    out = model(x)
    assert torch.is_tensor(out) and out.shape == (2, 7, 16, 16) and len(calls) == 1  # no auxiliary head at inference
    assert segment.predict(model, x).shape == (2, 7, 64, 64)


def test_miou_and_pixel_accuracy_match_a_hand_computation():
    K, I = 4, segment.IGNORE
    y1, p1 = torch.tensor([[0, 0, 1, 1], [0, I, 1, 1]]), torch.tensor([[0, 1, 1, 1], [0, 2, 1, 2]])
    y2, p2 = torch.tensor([[1, 1], [0, 0]]), torch.tensor([[1, 0], [0, 0]])
    areas = segment.intersect_union(p1, y1, K) + segment.intersect_union(p2, y2, K)
    # the ignored pixel, predicted 2, counts nowhere; class 2 is predicted once but never labelled
    assert areas.tolist() == [[4, 4, 0, 0], [6, 7, 1, 0], [5, 6, 0, 0]]  # intersection, union, labelled
    miou, acc = segment.scores(areas)
    # class 3 is neither labelled nor predicted: left out; class 2 counts with IoU 0
    assert miou == pytest.approx(100 * (4 / 6 + 4 / 7 + 0) / 3)
    assert acc == pytest.approx(100 * 8 / 11)
    per_image = np.mean([segment.scores(segment.intersect_union(p, y, K))[0] for p, y in ((p1, y1), (p2, y2))])
    assert abs(per_image - miou) > 1  # sums over the set, not a mean of per-image scores


def test_sliding_windows_equal_whole_image_inference_where_they_coincide():
    assert segment.slide_windows(512, 683, 512, 341) == [(0, 0, 512, 512), (0, 171, 512, 683)]  # an ADE image
    # a pointwise model gives the same logits from any window: sliding = whole image everywhere,
    # for an image not a multiple of the window and for one smaller than the window (padded)
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 1)
    for H, W in ((70, 100), (20, 50)):
        img = torch.randn(3, H, W)
        with torch.no_grad():
            assert torch.allclose(segment.slide_logits(conv, img, 32, 21, batch=3), conv(img[None])[0], atol=1e-6)
    # the real model on 64x96 with 64 px windows every 42 px: windows at x = 0 and x = 32
    model = tiny_segmenter().eval()
    f = lambda w: segment.predict(model, w)
    img = torch.randn(3, 64, 96)
    with torch.no_grad():
        slid, left, right = segment.slide_logits(f, img, 64, 42), f(img[None, :, :, :64])[0], f(img[None, :, :, 32:])[0]
        assert torch.allclose(slid[..., :32], left[..., :32], atol=1e-5)  # only the first window
        assert torch.allclose(slid[..., 64:], right[..., 32:], atol=1e-5)  # only the second
        assert torch.allclose(slid[..., 32:64], (left[..., 32:] + right[..., :32]) / 2, atol=1e-5)  # their mean
        assert torch.equal(segment.slide_logits(f, img[..., :64], 64, 42), left)  # a window-sized image: one window


def striped_item(size=(96, 128)):
    """An image whose left half is white and right half black, labelled 1 and 2."""
    img = np.zeros((*size, 3), np.uint8)
    img[:, : size[1] // 2] = 255
    labels = np.full(size, 2, np.uint8)
    labels[:, : size[1] // 2] = 1
    return segment.LabelledImage(Image.fromarray(img), labels)


def test_train_transform_keeps_image_and_labels_aligned_and_pads_with_ignore():
    t = segment.TrainTransform(64, (384, 96))
    seen = set()
    for seed in range(30):
        torch.manual_seed(seed)
        x, y = t(striped_item())
        assert x.shape == (3, 64, 64) and y.shape == (64, 64) and y.dtype == torch.int64
        seen |= set(y.unique().tolist())
        # brightness and contrast keep the order of grey levels; flips, crops and resizes move both alike
        if (y == 1).any() and (y == 2).any():
            assert x[:, y == 1].mean() > x[:, y == 2].mean() + 0.5
        assert (x[:, y == segment.IGNORE] == 0).all()  # padding: mean colour, ignored
        torch.manual_seed(seed)
        assert torch.equal(t(striped_item())[0], x)  # a pure function of the RNG state (data.py seeds it per sample)
    assert seen == {1, 2, segment.IGNORE}
    # at scale 0.5 a 96x128 image becomes 48x64 (keep ratio into 192x48): rows 48.. are padding
    small = segment.TrainTransform(64, (384, 96), ratio=(0.5, 0.5))
    x, y = small(striped_item())
    assert (y[48:] == segment.IGNORE).all() and (y[:48] != segment.IGNORE).all()
    assert segment.keep_ratio_size(512, 683, 2048, 512) == (512, 683) and segment.keep_ratio_size(600, 3000, 2048, 512) == (410, 2048)


def test_crop_box_caps_the_largest_class():
    labels = torch.zeros(1, 100, 100, dtype=torch.uint8)
    labels[:, :30, :30] = 1  # a small object in a large background
    ok = lambda box: (lambda c: len(c[c > 0]) > 1 and c.max() < 0.75 * c.sum())(
        torch.bincount(labels[..., box[0]:box[0] + box[2], box[1]:box[1] + box[3]].flatten().long(), minlength=2))
    rates = []
    for tries in (1, 10):
        torch.manual_seed(0)
        boxes = [segment.crop_box(labels, 40, tries=tries) for _ in range(300)]
        assert all(b[2] == b[3] == 40 and 0 <= b[0] <= 60 and 0 <= b[1] <= 60 for b in boxes)
        rates.append(np.mean([ok(b) for b in boxes]))
    assert rates[1] > 3 * rates[0] > 0  # redrawing finds the crops with both classes


def write_ade(root, n_train=3, n_val=2, size=(40, 56)):
    """An ADEChallengeData2016 folder: tiny JPEGs and uint8 PNG label maps with 0 ('other') pixels."""
    rng = np.random.default_rng(0)
    for split, n in (("training", n_train), ("validation", n_val)):
        os.makedirs(root / "images" / split), os.makedirs(root / "annotations" / split)
        for i in range(n):
            name = f"ADE_{split[:5] if split == 'training' else 'val'}_{i + 1:08d}"
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / "images" / split / f"{name}.jpg")
            labels = rng.integers(0, 151, size, dtype=np.uint8)
            labels[:4] = 0
            Image.fromarray(labels).save(root / "annotations" / split / f"{name}.png")


def test_ade20k_as_released_reduces_the_zero_label(tmp_path):
    write_ade(tmp_path)
    train, val = segment.open_splits(str(tmp_path))
    assert (len(train), len(val), train.num_classes) == (3, 2, 150)
    stored = np.asarray(Image.open(tmp_path / val.label_names[0]))
    x, y = segment.EvalTransform((2048, 512))(val.open(0)[0])
    assert x.shape == (3, 512, 717) and y.shape == (40, 56)  # the image resized into 2048x512, labels at full size
    want = torch.from_numpy(stored.astype(np.int64) - 1)
    want[want < 0] = segment.IGNORE  # 0 -> ignored, k -> k - 1
    assert torch.equal(y, want) and (y[:4] == segment.IGNORE).all() and y[y != segment.IGNORE].max() <= 149
    os.remove(tmp_path / val.label_names[1])
    with pytest.raises(FileNotFoundError, match="without a label map"):
        segment.open_splits(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="ADEChallengeData2016"):
        segment.open_splits(str(tmp_path / "images"))


def test_synthetic_labels_are_background_and_the_drawn_shapes():
    ds = segment.SyntheticScenes("val", 20)
    for i in range(20):
        item, label = ds.open(i)
        _, _, objects = ds.images.scene(i)
        labels = torch.from_numpy(item.labels)
        assert (labels[torch.from_numpy(objects[0][1])] == label + 1).all()
        assert (labels[torch.from_numpy(objects[1][1])] == objects[1][0] + 1).all()
        assert ((labels == 0) == torch.from_numpy(~objects[0][1] & ~objects[1][1])).all()


def _evaluate(rank, world, port, indices, out):
    """evaluate() on rank `rank` of `world` gloo processes (world 1: no process group)."""
    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    val = segment.SyntheticScenes("val", 20)
    stream = data.EvalSet(val, indices, segment.EvalTransform((384, 96)))
    loader = data.make_loader(stream, 1, sampler=data.shard(len(stream), rank, world))
    model = tiny_segmenter(num_classes=11)
    for m in model.modules():  # non-trivial running statistics, so the eval-mode BatchNorm matters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
    result = segment.evaluate(model, loader, 11, 64, 42, 4, torch.device("cpu"), torch.autocast("cpu", enabled=False))
    if rank == 0:
        torch.save(result, out)
    if world > 1:
        torch.distributed.destroy_process_group()


def test_evaluation_is_exact_for_one_and_two_processes(tmp_path):
    indices = np.arange(7)  # odd: the ranks score 4 and 3 images, none twice
    _evaluate(0, 1, 0, indices, tmp_path / "one.pt")
    torch.multiprocessing.spawn(_evaluate, args=(2, 29517, indices, tmp_path / "two.pt"), nprocs=2)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one == two and one[2] == 7
    assert 0 < one[0] < 100 and 0 < one[1] < 100
