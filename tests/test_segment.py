"""segment.py: UPerNet's shapes and its training-only auxiliary head, mIoU against a hand computation,
sliding windows against whole-image inference, the joint image + label augmentation, ADE20K as released
(trained and evaluated), exact evaluation over two processes, a kill and resume, bad input."""
import contextlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import data
import finetune
import mim
import segment
import swinv2
from test_run import ROOT, assert_same_run, killed, rows


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
    loss, main, aux_term = segment.seg_loss(logits, aux, y)
    up = lambda z: F.interpolate(z, size=(64, 64), mode="bilinear", align_corners=False)
    ce = F.cross_entropy(up(logits), y, ignore_index=255), F.cross_entropy(up(aux), y, ignore_index=255)
    assert torch.allclose(main, ce[0]) and torch.allclose(aux_term, ce[1]) and torch.allclose(loss, ce[0] + 0.4 * ce[1])
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
        assert objects[0][0] == label and len(objects) >= 4
        for cls, m in objects:  # the main shape, then the small plain shapes: each pixel labelled once
            assert (labels[torch.from_numpy(m)] == cls + 1).all()
        assert ((labels == 0) == torch.from_numpy(~np.any([m for _, m in objects], axis=0))).all()


# 16 synthetic images, global batch 4 in micro-batches of 2; rows at steps 2, 4, 6, evaluations (3 images)
# and checkpoints at 3 and 6
SEG = ["segment.py", "--model", "tiny", "--data", "synthetic:16", "--batch_size", "4", "--micro_batch", "2", "--iters", "6",
       "--warmup_iters", "2", "--log_every", "2", "--eval_every", "3", "--save_every", "3", "--val_images", "3",
       "--channels", "16", "--workers", "0", "--pretrained", "none"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted run to compare with."""
    out = tmp_path_factory.mktemp("seg") / "straight"
    segment.main(SEG[1:] + ["--out_dir", str(out)])
    return out


def test_killed_between_a_log_row_and_its_checkpoint_resumes_to_the_same_weights_and_log(straight, tmp_path):
    killed("after_log_row", 3, SEG, tmp_path / "run")  # rows 2, eval 3, 4 <- killed; the checkpoint is step 3
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == 3
    segment.main(SEG[1:] + ["--out_dir", str(tmp_path / "run")])  # the same command again: it resumes
    assert_same_run(straight, tmp_path / "run")
    log = rows(straight)
    assert [r["step"] for r in log] == [2, 3, 4, 6, 6] and all({"decode_loss", "aux_loss"} <= set(r) for r in log if "train_loss" in r)
    assert (straight / "pred_0000003.png").exists() and (straight / "pred_0000006.png").exists()


def test_evaluation_is_exact_for_one_and_two_processes(straight):
    # 3 images (odd): two ranks score 2 and 1, none twice; the scores equal the 1-process ones of the run
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *SEG, "--out_dir", str(straight), "--eval_only"]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two, one = json.load(open(straight / "eval.json")), rows(straight)[-1]
    assert two == dict(one, step=6) and one["images"] == 3  # every image scored once: no padding, no repeats
    assert json.load(open(straight / "summary.json"))["metrics"] == dict(miou=one["miou"], pixel_acc=one["pixel_acc"])


def test_an_ade20k_folder_trains_evaluates_and_names_its_pretraining(tmp_path):
    pre = tmp_path / "pre"
    mim.main(["--model", "tiny", "--data", "synthetic:8", "--iters", "2", "--batch_size", "4", "--val_images", "4",
              "--workers", "0", "--out_dir", str(pre)])
    write_ade(tmp_path / "ade")
    (tmp_path / "ade" / "images" / "training" / "ADE_train_00000002.jpg").write_bytes(b"not a jpeg")  # logged, replaced
    out = tmp_path / "seg"
    metrics = segment.main(["--model", "tiny", "--data", str(tmp_path / "ade"), "--pretrained", str(pre), "--iters", "2",
                            "--warmup_iters", "1", "--batch_size", "2", "--log_every", "1", "--eval_every", "2", "--channels", "16",
                            "--workers", "0", "--out_dir", str(out)])
    summary = json.load(open(out / "summary.json"))
    assert summary["kind"] == "segment" and summary["task"] == "ade20k" and summary["val_images"] == 2
    assert summary["bad_files"] == 1 and summary["bad_images"] >= 1  # 4 crops drawn from 3 images
    assert summary["metrics"] == metrics and set(metrics) == {"miou", "pixel_acc"}
    assert all(0 <= v <= 100 for v in metrics.values())
    assert summary["pretrained"] == finetune.read_pretrained(str(pre))[1] and summary["pretrained"]["run_dir"] == str(pre)
    assert [r["step"] for r in rows(out)] == [1, 2, 2] and (out / "pred_0000002.png").exists() and (out / "args.json").exists()
    # the encoder started from the pre-training (a fresh init differs by ~0.05): two small steps moved it little
    key = "encoder.layers.0.blocks.0.attn.qkv.weight"
    pre_w, seg_w = (torch.load(d / "ckpt.pt", weights_only=True)["model"][key] for d in (pre, out))
    assert 0 < (seg_w - pre_w).abs().max() < 0.01


@pytest.mark.parametrize("extra,words", [(["--crop", "60"], "--crop 60 / --window 4"),
                                          (["--batch_size", "2", "--micro_batch", "1"], "BatchNorm needs"),
                                          (["--data", "nowhere"], "ADEChallengeData2016"),
                                          (["--pretrained", "nowhere/ckpt.pt"], "does not exist"),
                                          (["--warmup_iters", "6"], "--warmup_iters 6")])
def test_bad_input_is_refused_in_one_line_before_any_work(extra, words, tmp_path):
    with pytest.raises(SystemExit) as e:
        segment.main(SEG[1:] + ["--out_dir", str(tmp_path / "run")] + extra)
    msg = str(e.value.code)
    assert msg.startswith("error:") and words in msg and "\n" not in msg, msg
    assert not (tmp_path / "run").exists()


def test_scale_is_parsed_and_checked(capsys):
    assert segment.get_parser().parse_args(SEG[1:] + ["--scale", "512,2048"]).scale == (2048, 512)
    with pytest.raises(SystemExit):
        segment.get_parser().parse_args(SEG[1:] + ["--scale", "512"])
    assert "want LONG,SHORT" in capsys.readouterr().err


def test_a_label_map_of_another_size_or_with_no_class_is_named_with_the_reason(tmp_path, capsys):
    write_ade(tmp_path)
    val = segment.open_splits(str(tmp_path))[1]
    png = tmp_path / val.label_names[0]
    good = Image.open(png).copy()
    good.resize((good.width - 3, good.height), Image.NEAREST).save(png)  # another size than its image
    with pytest.raises(ValueError, match=rf"label map {png} is {good.width - 3}x{good.height} but its image \S+ is {good.width}x{good.height}"):
        val.open(0)[0].load()
    assert f"label map {png} is" in data.failure(val, 0)  # the training process's warning names the label file
    # evaluation leaves it out (never scores another image in its place), and says which one, and why
    stream = data.EvalSet(val, [0, 1], segment.EvalTransform((96, 64)))
    loader = data.make_loader(stream, 1, sampler=data.shard(2, 0, 1), workers=0)
    args = segment.get_parser().parse_args(SEG[1:])
    model = segment.build_model(args, segment.resolve(args, 1), None, 150)[0]
    capsys.readouterr()
    *_, n = segment.evaluate(model, loader, 150, 64, 42, 8, torch.device("cpu"), contextlib.nullcontext())
    assert n == 1 and f"unreadable evaluation image {tmp_path / val.names[0]} (ValueError: label map {png} is" in capsys.readouterr().err
    labels = np.asarray(good).copy()
    labels[0, 0] = 200  # neither a class (1..150 stored) nor ignored (0, 255): mIoU's counts have no room for it
    Image.fromarray(labels).save(png)
    with pytest.raises(ValueError, match=r"holds the value 200, which is no class \(valid: 0-150 and 255\)"):
        val.open(0)[0].load()


def test_warmup_follows_a_shorter_run_unless_given():
    resolved = lambda *extra: segment.resolve(segment.get_parser().parse_args(["--pretrained", "none", *extra]), 1)
    assert resolved("--model", "B")["warmup_iters"] == 1500 and resolved("--model", "B", "--iters", "10")["warmup_iters"] == 2
    assert resolved("--model", "tiny", "--iters", "100")["warmup_iters"] == 25  # the CPU recipe's 50, capped at a quarter
    with pytest.raises(ValueError, match="--warmup_iters 50 must be shorter than --iters 10"):
        resolved("--model", "B", "--iters", "10", "--warmup_iters", "50")


def test_a_rerun_may_change_how_it_is_measured_not_what_it_computes(straight, capsys):
    before = rows(straight)
    segment.main(SEG[1:] + ["--out_dir", str(straight), "--stride", "40", "--val_images", "2"])
    assert "this run is complete" in capsys.readouterr().out and rows(straight) == before
    with pytest.raises(SystemExit) as e:
        segment.main(SEG[1:] + ["--out_dir", str(straight), "--seed", "1"])
    assert "belongs to another run: --seed 0 there, 1 here" in str(e.value.code)
