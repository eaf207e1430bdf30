"""detect.py: a COCO-format fixture with the traps (category ids with gaps, an image without objects, a crowd RLE
region, a degenerate box, grayscale and CMYK JPEGs) and a COCO-sized json's generator, the compact index against
pycocotools, large-scale jitter (boxes from the cropped masks, bit-packed masks), the geometry of the fixed square
input, the normalised and the plain heads, COCO AP of perfect and of shifted predictions, evaluation over two
processes, loading an official checkpoint into the backbone."""
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from pycocotools import mask as mask_util

import data
import detect
import finetune
import mim
import swinv2
import synthetic
import train
import test_run

CATS = [dict(id=3, name="car"), dict(id=17, name="cat"), dict(id=90, name="toothbrush")]  # COCO-like gaps


def uncompressed_rle(m):
    """A bool (H, W) mask as COCO's uncompressed RLE (column-major run lengths, starting with a run of 0s):
    the form of COCO's crowd annotations."""
    flat = np.asfortranarray(m).ravel(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))  # where the value changes
    return dict(size=list(m.shape), counts=np.diff(np.concatenate([[0], edges])).tolist())


def write_split(root, split, images):
    """images: [(file name, (H, W), PIL mode, [(category id, (x, y, w, h), iscrowd)])]; objects are rectangles drawn
    in a colour per category; a crowd region is an uncompressed RLE, the rest polygons."""
    os.makedirs(root / f"{split}2017", exist_ok=True)
    os.makedirs(root / "annotations", exist_ok=True)
    rng = np.random.default_rng(len(split))
    entries, anns = [], []
    for image_id, (name, (H, W), mode, objects) in enumerate(images, start=1):
        pixels = rng.integers(0, 80, (H, W, 3), dtype=np.uint8)
        for cat, (x, y, w, h), crowd in objects:
            pixels[y:y + h, x:x + w] = {3: (250, 40, 40), 17: (40, 250, 40), 90: (40, 40, 250)}[cat]
            m = np.zeros((H, W), bool)
            m[y:y + h, x:x + w] = True
            seg = uncompressed_rle(m) if crowd else [[x, y, x + w, y, x + w, y + h, x, y + h]]
            anns.append(dict(id=len(anns) + 1, image_id=image_id, category_id=cat, bbox=[x, y, w, h], area=w * h, iscrowd=crowd,
                             segmentation=seg))
        Image.fromarray(pixels).convert(mode).save(root / f"{split}2017" / name, quality=95)
        entries.append(dict(id=image_id, file_name=name, height=H, width=W))
    json.dump(dict(images=entries, annotations=anns, categories=CATS), open(root / "annotations" / f"instances_{split}2017.json", "w"))


# COCO's 80 category ids (1..90 with gaps), for a json at COCO's scale
COCO_CAT_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


def write_coco_sized(root, images=118_287, annotations=860_001, vertices=19, seed=0):
    """A train2017 at COCO's scale, for measuring what the index costs (the released one: 118,287 images,
    860,001 annotations, 1,021 images without any): `annotations` polygons of `vertices` points with 2 decimals,
    as COCO's, on 640 x 480 images picked at random but for the last 0.86 % (or one), in no order of image; COCO's
    category ids and image fields. Every image file is a link to one JPEG. The defaults write 410 MB of json in
    about two minutes."""
    rng = np.random.default_rng(seed)
    os.makedirs(root / "annotations", exist_ok=True)
    os.makedirs(root / "train2017", exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(root / "one.jpg")
    for k in range(1, images + 1):
        os.symlink(root / "one.jpg", root / "train2017" / f"{k:012d}.jpg")
    owner = rng.integers(1, images + 1 - max(1, round(0.0086 * images)), annotations)
    angle = np.sort(rng.uniform(0, 2 * np.pi, (annotations, vertices)), axis=1)
    radius = rng.uniform(4, 60, (annotations, 1)) * rng.uniform(0.6, 1, (annotations, vertices))
    xs = np.round(rng.uniform(60, 580, (annotations, 1)) + radius * np.cos(angle), 2)
    ys = np.round(rng.uniform(60, 420, (annotations, 1)) + radius * np.sin(angle), 2)
    area = np.round(0.5 * np.abs((xs * np.roll(ys, -1, 1) - np.roll(xs, -1, 1) * ys).sum(1)), 2)
    category = rng.choice(COCO_CAT_IDS, annotations)
    with open(root / "annotations" / "instances_train2017.json", "w") as f:
        f.write('{"info": {"description": "COCO-sized test json"}, "licenses": [{"id": 1, "name": "test"}], "images": [')
        f.write(", ".join(json.dumps(dict(license=1, file_name=f"{k:012d}.jpg", coco_url=f"http://images.cocodataset.org/train2017/{k:012d}.jpg",
                                          height=480, width=640, date_captured="2013-11-14 11:18:45",
                                          flickr_url=f"http://farm4.staticflickr.com/0/{k}_z.jpg", id=k)) for k in range(1, images + 1)))
        f.write('], "annotations": [')
        for j in range(annotations):
            poly = np.stack([xs[j], ys[j]], 1).ravel().tolist()
            x0, y0 = xs[j].min(), ys[j].min()
            box = [round(x0, 2), round(y0, 2), round(xs[j].max() - x0, 2), round(ys[j].max() - y0, 2)]
            f.write((", " if j else "") + json.dumps(dict(segmentation=[poly], area=float(area[j]), iscrowd=0, image_id=int(owner[j]),
                                                          bbox=box, category_id=int(category[j]), id=j + 1)))
        f.write('], "categories": ' + json.dumps([dict(supercategory="thing", id=c, name=f"class{c}") for c in COCO_CAT_IDS]) + "}")


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """A COCO folder as released, 4 training and 4 validation images, every trap of the real one."""
    root = tmp_path_factory.mktemp("coco")
    write_split(root, "train", [
        ("a.jpg", (48, 64), "RGB", [(3, (4, 6, 20, 16), 0), (17, (30, 20, 24, 20), 0), (90, (10, 10, 0, 6), 0)]),  # degenerate box
        ("b.jpg", (64, 48), "L", [(90, (8, 8, 30, 40), 0), (17, (0, 40, 48, 24), 1)]),  # grayscale; a crowd region
        ("c.jpg", (40, 56), "CMYK", [(3, (20, 4, 30, 30), 0)]),  # CMYK
        ("d.jpg", (56, 40), "RGB", []),  # no objects
    ])
    write_split(root, "val", [  # four sizes, so a fake model can tell the images apart by size
        ("e.jpg", (48, 64), "RGB", [(3, (4, 6, 20, 16), 0), (17, (30, 20, 24, 20), 0)]),
        ("f.jpg", (64, 48), "L", [(90, (8, 8, 30, 40), 0), (17, (0, 40, 48, 24), 1)]),
        ("g.jpg", (40, 56), "CMYK", [(3, (20, 4, 30, 30), 0), (90, (2, 2, 12, 10), 0)]),
        ("h.jpg", (56, 40), "RGB", []),
    ])
    return root


def tiny_args(extra=()):
    args = detect.get_parser().parse_args(["--model", "tiny", "--data", "synthetic:8", "--pretrained", "none", *extra])
    return args, detect.resolve(args, 1)


# -----------------------------------------------------------------------------
# data


def annotated_masks(coco_api, image_id):
    """pycocotools' own decoding of an image's non-crowd annotations, in the json's order: (N, H, W) uint8."""
    img = coco_api.imgs[image_id]
    anns = [a for a in coco_api.imgToAnns[image_id] if not a["iscrowd"]]
    return torch.from_numpy(np.stack([coco_api.annToMask(a) for a in anns]) if anns else np.zeros((0, img["height"], img["width"]), np.uint8))


def test_coco_traps_become_valid_mask_rcnn_targets(coco):
    train = detect.training_set(str(coco))
    assert len(train) == 4 and train.cat_ids == [3, 17, 90] and train.classes == ["car", "cat", "toothbrush"]
    samples = [train[i] for i in range(4)]
    # grayscale and CMYK come out RGB; category ids 3, 17, 90 become labels 1, 2, 3; the crowd region is left out
    assert [tuple(img.shape) for img, _ in samples] == [(3, 48, 64), (3, 64, 48), (3, 40, 56), (3, 56, 40)]
    assert [t["labels"].tolist() for _, t in samples] == [[1, 2, 3], [3], [1], []]
    assert samples[1][1]["masks"].shape == (1, 64, 48) and samples[3][1]["masks"].shape == (0, 56, 40)
    assert samples[0][1]["boxes"].tolist()[0] == [4, 6, 24, 22]  # XYXY
    for i, (_, t) in enumerate(samples):  # the masks are pycocotools' (COCO is built only now, on first use)
        assert torch.equal(t["masks"], annotated_masks(train.coco, int(train.ids[i])))
    crowd = np.flatnonzero(train.crowd)  # the crowd region's uncompressed RLE is kept compressed
    assert len(crowd) == 1 and train.rle[train.which[crowd[0]]] == mask_util.frPyObjects(train.coco.anns[5]["segmentation"], 64, 48)["counts"].decode()
    # the training transform: a fixed 128 x 128 square, uint8; masks bit-packed, each box tight around its mask,
    # no empty mask: the degenerate box is gone with its label
    stream = detect.PairStream(train, detect.LargeScaleJitter(128, (0.5, 1.5)), seed=0)
    for pos in range(12):
        item = stream[pos]
        x, t = item.image, item.target
        assert x.shape == (3, 128, 128) and x.dtype == torch.uint8 and (item.pos, item.bad) == (pos, 0)
        masks = detect.unpack_masks(t["mask_bits"], 128)
        assert t["mask_bits"].shape[1:] == (128, 16) and masks.shape[1:] == (128, 128) and len(t["boxes"]) == len(masks) == len(t["labels"])
        assert torch.equal(t["boxes"], detect.mask_boxes(masks)) and masks.flatten(1).any(1).all()
    assert 3 not in stream[stream_pos_of(stream, 0)].target["labels"].tolist()  # image a's degenerate box (label 3) is gone
    # the same position gives the same sample (resume), another position another draw
    assert torch.equal(stream[5].image, stream[5].image) and not torch.equal(stream[5].image, stream[9].image)


def test_compact_index_reads_as_pycocotools(tmp_path):
    """A small json of write_coco_sized's kind (polygons of 2 decimals, COCO's category ids and image fields, images
    without annotations, annotations not grouped by image): every image's masks, boxes and labels are pycocotools'."""
    write_coco_sized(tmp_path, images=12, annotations=20, vertices=7)
    index, coco_api = detect.training_set(str(tmp_path)), detect.COCO(str(tmp_path / "annotations" / "instances_train2017.json"))
    assert len(index) == 12 and index.cat_ids == COCO_CAT_IDS and any(index.first[1:] == index.first[:-1])  # some without annotations
    for i in range(len(index)):
        image, t = index[i]
        anns = coco_api.imgToAnns[int(index.ids[i])]
        assert image.shape == (3, 480, 640) and torch.equal(t["masks"], annotated_masks(coco_api, int(index.ids[i])))
        assert t["labels"].tolist() == [COCO_CAT_IDS.index(a["category_id"]) + 1 for a in anns]
        torch.testing.assert_close(t["boxes"], torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]).view(-1, 4))


def test_large_scale_jitter_recomputes_boxes_from_the_cropped_masks():
    # an L (a vertical bar x 8..16, y 8..56 and a foot x 8..56, y 48..56) and a square (x 40..60, y 4..20) on 64 x 64
    L, square = np.zeros((64, 64), np.uint8), np.zeros((64, 64), np.uint8)
    L[8:56, 8:16], L[48:56, 8:56], square[4:20, 40:60] = 1, 1, 1
    image = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    target = dict(boxes=torch.tensor([[8.0, 8, 56, 56], [40, 4, 60, 20]]), masks=torch.from_numpy(np.stack([L, square])), labels=torch.tensor([1, 2]))
    # at scale 2 of the fitting factor (32 / 64) the image keeps its size; the 32 x 32 crop at the top-left keeps
    # the L's bar, whose tight box is 8 wide, not the 24 of the annotated box clamped to the crop; the square is dropped
    x, t = detect.jitter(image, target, 32, 2.0, (0, 0), False)
    assert torch.equal(x, image[:, :32, :32]) and t["boxes"].tolist() == [[8, 8, 16, 32]] and t["labels"].tolist() == [1]
    assert torch.equal(detect.unpack_masks(t["mask_bits"], 32)[0], torch.from_numpy(L[:32, :32]))
    # flipped, the bar and the foot leave the crop (the L is dropped) and the square comes in
    x, t = detect.jitter(image, target, 32, 2.0, (0, 0), True)
    assert t["boxes"].tolist() == [[4, 4, 24, 20]] and t["labels"].tolist() == [2]
    # at scale 0.5 the image is 16 x 16, padded bottom-right with the mean colour (as evaluation pads); the masks
    # sample the source pixel under each pixel's centre (rows and columns 2, 6, 10, ...)
    x, t = detect.jitter(image, target, 32, 0.5, (0.7, 0.3), False)
    fill = torch.tensor(data.FILL, dtype=torch.uint8).view(3, 1, 1)
    assert (x[:, 16:] == fill).all() and (x[:, :, 16:] == fill).all() and not (x[:, :16, :16] == fill).all()
    masks = detect.unpack_masks(t["mask_bits"], 32)
    assert torch.equal(masks[:, :16, :16], target["masks"][:, 2::4, 2::4]) and masks[:, 16:].sum() == masks[:, :, 16:].sum() == 0
    assert t["boxes"].tolist() == [[2, 2, 14, 14], [10, 1, 15, 5]]
    # bit packing round-trips at any width
    m = torch.rand(3, 5, 13) > 0.5
    assert torch.equal(detect.unpack_masks(torch.from_numpy(np.packbits(m.numpy(), axis=-1)), 13), m.to(torch.uint8))


def stream_pos_of(stream, i):
    """The first stream position that shows dataset image i."""
    return next(p for p in range(100) if stream.index(p) == i)


def test_synthetic_set_is_a_coco_dataset_of_its_shapes():
    ds = detect.open_coco("synthetic:6", "train")
    images = synthetic.SyntheticImages("train", 6)
    for i in range(6):
        img, label, objects = images.scene(i)
        anns = ds.coco.loadAnns(ds.coco.getAnnIds(imgIds=i))
        visible = [(c, m) for c, m in objects if m.any()]
        assert [a["category_id"] for a in anns] == [c + 1 for c, _ in visible] and anns[0]["category_id"] == label + 1
        for a, (_, m) in zip(anns, visible):
            assert np.array_equal(ds.coco.annToMask(a), m) and a["area"] == m.sum()
        assert np.array_equal(ds[i][0].permute(1, 2, 0).numpy(), np.asarray(img))
    assert len(detect.open_coco("synthetic", "val")) == synthetic.VAL_IMAGES


# -----------------------------------------------------------------------------
# the model


def test_torchvision_transform_keeps_the_square_and_maps_predictions_back():
    args, r = tiny_args()
    model, missing = detect.build_model(args, r, None, 3)
    assert missing == [] and r["img_size"] == 128
    t = model.transform
    mean, std = torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(data.IMAGENET_STD).view(3, 1, 1)
    # training: a jittered 128 x 128 image and its targets pass unchanged (only normalised)
    t.train()
    x = torch.rand(3, 128, 128)
    target = dict(boxes=torch.tensor([[3.5, 4.0, 60.0, 90.25]]), labels=torch.tensor([1]), masks=(torch.rand(1, 128, 128) > 0.5).byte())
    images, targets = t([x], [target])
    assert images.tensors.shape == (1, 3, 128, 128) and images.image_sizes == [(128, 128)]
    assert torch.allclose(images.tensors[0], (x - mean) / std, atol=1e-6)
    assert torch.equal(targets[0]["boxes"], target["boxes"]) and torch.equal(targets[0]["masks"], target["masks"])
    # evaluation: a 60 x 40 image is resized to 128 x 85 (longer side 128) and padded to the square with 0s (the
    # normalised mean colour); predictions in that frame come back at 60 x 40
    t.eval()
    images, _ = t([torch.rand(3, 60, 40)])
    assert images.tensors.shape == (1, 3, 128, 128) and images.image_sizes == [(128, 85)]
    assert images.tensors[0, :, :, 85:].abs().max() == 0
    pred = dict(boxes=torch.tensor([[0.0, 0.0, 85.0, 128.0]]), masks=torch.ones(1, 1, 28, 28), scores=torch.ones(1), labels=torch.ones(1))
    back = t.postprocess([pred], images.image_sizes, [(60, 40)])[0]
    assert torch.allclose(back["boxes"], torch.tensor([[0.0, 0.0, 40.0, 60.0]]), atol=0.3)
    assert back["masks"].shape == (1, 1, 60, 40) and (back["masks"] > 0.5).float().mean() > 0.95  # pasted over the whole image
    # the whole model runs on the square: five FPN maps at strides 4..64, 32 channels (the cpu recipe)
    feats = model.backbone(torch.rand(2, 3, 128, 128))
    assert [(k, tuple(v.shape)) for k, v in feats.items()] == [("0", (2, 32, 32, 32)), ("1", (2, 32, 16, 16)), ("2", (2, 32, 8, 8)),
                                                              ("3", (2, 32, 4, 4)), ("pool", (2, 32, 2, 2))]


def test_layer_decay_reaches_the_encoder_only():
    args, r = tiny_args()
    model, _ = detect.build_model(args, r, None, 3)
    groups = finetune.param_groups(model, 0.05, 0.9)
    assert len({id(p) for g in groups for p in g["params"]}) == len(list(model.parameters()))
    where = {n: g for g in groups for n in g["names"]}
    # tiny: L = 8 blocks; scale 0.9^(9 - id): patch embedding 0, block j of stage i sum(depths[:i]) + j + 1
    for name, layer in [("backbone.encoder.patch_embed.proj.weight", 0), ("backbone.encoder.layers.1.blocks.0.attn.qkv.weight", 3),
                        ("backbone.encoder.pyramid_norms.0.weight", 9), ("backbone.fpn.layer_blocks.0.0.weight", 9),
                        ("rpn.head.conv.0.0.weight", 9), ("roi_heads.mask_predictor.mask_fcn_logits.weight", 9)]:
        assert where[name]["lr_scale"] == pytest.approx(0.9 ** (9 - layer)), name
    assert where["backbone.encoder.layers.1.blocks.0.attn.logit_scale"]["weight_decay"] == 0
    assert where["roi_heads.box_head.5.weight"]["weight_decay"] == 0.05  # the fc of the 4conv-1fc box head
    assert where["roi_heads.mask_head.0.1.weight"] == where["backbone.fpn.layer_blocks.0.1.weight"]  # GroupNorm: no decay
    assert where["backbone.fpn.layer_blocks.0.1.weight"]["weight_decay"] == 0 and where["roi_heads.mask_head.0.1.weight"]["lr_scale"] == 1


def test_normalised_heads_are_the_default_and_the_plain_ones_an_option():
    gn, _ = detect.build_model(*tiny_args(), None, 3)
    plain, _ = detect.build_model(*tiny_args(["--heads", "plain"]), None, 3)
    norms = [m for m in gn.modules() if isinstance(m, torch.nn.GroupNorm)]
    # torchvision's v2 layout: a norm after each of the FPN's 4 + 4 convs, the box head's 4 convs and the mask
    # head's 4; 16 groups of 2 channels at the cpu recipe's 32 (32 groups at 256, as detectron2 and the GN paper)
    assert len(norms) == 16 and all((m.num_groups, m.num_channels) == (16, 32) for m in norms) and detect.group_norm(256).num_groups == 32
    assert len(gn.rpn.head.conv) == 2 and [type(m).__name__ for m in gn.roi_heads.box_head][-3:] == ["Flatten", "Linear", "ReLU"]
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in plain.modules()) and len(plain.rpn.head.conv) == 1
    assert type(plain.roi_heads.box_head).__name__ == "TwoMLPHead"


def test_official_checkpoint_loads_into_the_detector_backbone(tmp_path):
    # the official SimMIM format: a `model` wrapper, `encoder.` prefix, persistent shape buffers, rpe_mlp, the
    # decoder and mask token, no model_config (so the pre-training windows are the tiny preset's 4,4,4,2)
    torch.manual_seed(1)
    simmim = mim.SimMIM(swinv2.create("tiny"))
    official = {k.replace("cpb_mlp", "rpe_mlp"): v for k, v in simmim.state_dict().items()}
    for k, v in simmim.encoder.named_buffers():
        if not k.endswith("k_bias"):
            official[f"encoder.{k}"] = v
    torch.save({"model": official}, tmp_path / "official.pth")
    args, r = tiny_args(["--pretrained", str(tmp_path / "official.pth")])
    ckpt, info = finetune.read_pretrained(args.pretrained)
    assert info["path"] == str(tmp_path / "official.pth") and info["run_dir"] is None
    model, missing = detect.build_model(args, r, ckpt, 3)
    assert sorted(missing) == sorted(f"pyramid_norms.{i}.{p}" for i in range(4) for p in ("weight", "bias"))
    encoder = model.backbone.encoder
    assert encoder.cfg.window_sizes == (4, 4, 4, 4) and encoder.cfg.pretrained_window_sizes == (4, 4, 4, 2)
    assert encoder.layers[3].blocks[0].attn.relative_coords_table.shape == (7 * 7, 2)  # rebuilt for window 4, not loaded (3 * 3)
    own, pre = encoder.state_dict(), simmim.encoder.state_dict()
    assert set(own) - set(pre) == set(missing) and set(pre) - set(own) == {"mask_token", "norm.weight", "norm.bias"}  # no final norm
    for k in set(own) & set(pre):
        assert torch.equal(own[k], pre[k]), k
    with pytest.raises(ValueError, match="SwinV2-nano"):  # another size is refused
        detect.build_model(tiny_args(["--model", "nano"])[0], tiny_args(["--model", "nano"])[1], ckpt, 3)


def test_recipe_follows_the_preset_and_bad_flags_are_named():
    r = detect.resolve(detect.get_parser().parse_args(["--pretrained", "none"]), 8)
    assert {k: r[k] for k in ("img_size", "window", "drop_path", "epochs", "milestones", "batch_size", "micro_batch", "layer_decay", "jitter")} == \
        dict(img_size=1024, window=16, drop_path=0.2, epochs=36, milestones=(27, 33), batch_size=16, micro_batch=2, layer_decay=0.9, jitter=(0.1, 2.0))
    assert r["peak_lr"] == 1e-4 and r["task"] == "coco" and r["out_dir"] == "out/det_coco_B_scratch"
    _, r = tiny_args(["--batch_size", "32", "--pretrained", "out/tiny_frac1_0.3k"])
    assert r["peak_lr"] == pytest.approx(2 * detect.RECIPES["demo"]["lr"]) and r["out_dir"] == "out/det_synthetic_tiny_tiny_frac1_0.3k"
    for extra, words in [(["--milestones", "5"], "--milestones"), (["--jitter", "2", "1"], "--jitter"), (["--window", "5"], "--window"),
                         (["--micro_batch", "3"], "not divisible")]:
        with pytest.raises(ValueError, match=words):
            tiny_args(extra)
    for extra in (["--model", "Z"], ["--jitter", "0", "1"], ["--milestones", "-1"]):  # refused by the flag's own type
        with pytest.raises(SystemExit):
            tiny_args(extra)
    with pytest.raises(FileNotFoundError, match="instances_train2017.json"):
        detect.open_coco("/nonexistent", "train")


# -----------------------------------------------------------------------------
# evaluation


class FakeDetector(torch.nn.Module):
    """Returns the validation ground truth (non-crowd) of an image, found by the image's size, as torchvision's
    predictions at the original size: contiguous labels, boxes shifted right by `shift` pixels, (N, 1, H, W) masks,
    plus one false positive of low score."""

    def __init__(self, coco_root, shift=0.0):
        super().__init__()
        inst = detect.open_coco(str(coco_root), "val")
        self.truth = {}
        for i in range(len(inst)):
            img, t = inst[i]
            H, W = img.shape[1:]
            self.truth[(H, W)] = dict(boxes=t["boxes"] + torch.tensor([shift, 0.0, shift, 0.0]),
                                      labels=t["labels"], masks=t["masks"].float()[:, None], scores=torch.linspace(0.9, 0.8, len(t["labels"])))
            fp = dict(boxes=torch.tensor([[0.0, 0.0, 5.0, 5.0]]), labels=torch.tensor([1]), masks=torch.zeros(1, 1, H, W), scores=torch.tensor([0.1]))
            fp["masks"][..., :5, :5] = 1
            self.truth[(H, W)] = {k: torch.cat([v, fp[k]]) for k, v in self.truth[(H, W)].items()}

    def forward(self, images):
        return [self.truth[tuple(x.shape[-2:])] for x in images]


def evaluate_fixture(model, coco_root, rank=0, world=1, micro_batch=2):
    val_set = detect.open_coco(str(coco_root), "val")
    loader = data.make_loader(detect.EvalImages(val_set, range(len(val_set))), micro_batch, sampler=data.shard(len(val_set), rank, world),
                              collate_fn=detect.collate)
    return detect.evaluate(model, loader, val_set, val_set.cat_ids, torch.device("cpu"))


def test_perfect_predictions_score_100_and_shifted_boxes_less(coco):
    perfect = evaluate_fixture(FakeDetector(coco), coco)
    # the crowd region is not predicted, and not a miss: COCOeval ignores it; the false positive ranks last
    assert perfect["box_ap"] == perfect["mask_ap"] == perfect["box_ap50"] == perfect["mask_ap75"] == pytest.approx(100)
    assert perfect["box_apl"] is None  # no object in the fixture is large (> 96^2 px)
    shifted = evaluate_fixture(FakeDetector(coco, shift=4.0), coco)
    assert shifted["box_ap"] < 90 and shifted["box_ap50"] == pytest.approx(100)  # still overlapping > 50 %
    assert shifted["mask_ap"] == pytest.approx(100)  # the masks did not move
    nothing = FakeDetector(coco)
    nothing.truth = {size: {k: v[:0] for k, v in t.items()} for size, t in nothing.truth.items()}  # no detection anywhere
    assert evaluate_fixture(nothing, coco)["box_ap"] == evaluate_fixture(nothing, coco)["mask_ap"] == 0


def test_an_unreadable_evaluation_image_is_left_out_and_counted_never_replaced(coco, tmp_path, capsys):
    """COCOeval scores the images that could be read, each under its own id: the broken one's objects are
    neither misses nor matched against another image's predictions."""
    shutil.copytree(coco, tmp_path / "coco")
    val_set = detect.open_coco(str(tmp_path / "coco"), "val")
    with open(os.path.join(val_set.root, val_set.names[0]), "wb") as f:
        f.write(b"not a JPEG")
    metrics = evaluate_fixture(FakeDetector(coco), tmp_path / "coco")
    assert metrics["images"] == len(val_set) - 1 and metrics["box_ap"] == metrics["mask_ap"] == pytest.approx(100)
    assert f"unreadable evaluation image {os.path.join(val_set.root, val_set.names[0])}" in capsys.readouterr().err


def test_bf16_stops_at_the_fpn_so_boxes_are_decoded_in_float32():
    model = detect.Detector(swinv2.create("nano", img_size=128, window_size=4, pyramid=True), 3, 128, channels=32, rois=16)
    model.backbone.autocast = train.autocast(torch.device("cpu"), torch.bfloat16)
    model.eval()
    with torch.no_grad():
        features = model.backbone(torch.randn(1, 3, 128, 128))
        pred = model([torch.rand(3, 100, 120)])[0]
    assert all(f.dtype == torch.float32 for f in features.values())
    assert pred["boxes"].dtype == pred["scores"].dtype == pred["masks"].dtype == torch.float32
    with model.backbone.autocast:  # the encoder itself did run in bf16
        assert model.backbone.encoder.forward_pyramid(torch.randn(1, 3, 128, 128))[0].dtype == torch.bfloat16


def eval_worker(rank, world, coco_root, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/pg", rank=rank, world_size=world)
    torch.set_num_threads(1)
    args, r = tiny_args(SMALL)
    model, _ = detect.build_model(args, r, None, 3)  # the same random weights on both ranks (seeded)
    results = [evaluate_fixture(FakeDetector(coco_root, shift=2.0), coco_root, rank, world),
               evaluate_fixture(model, coco_root, rank, world, micro_batch=1)]
    json.dump(results, open(os.path.join(out_dir, f"rank{rank}.json"), "w"))
    dist.destroy_process_group()


def test_two_process_evaluation_equals_one_process(coco, tmp_path):
    # the first number: shifted ground truth, so each image's results matter (a lost or doubled image changes
    # AP); the second: a random detector, 100 detections per image
    args, r = tiny_args(SMALL)
    model, _ = detect.build_model(args, r, None, 3)
    one = [evaluate_fixture(FakeDetector(coco, shift=2.0), coco), evaluate_fixture(model, coco, micro_batch=1)]
    assert 0 < one[0]["box_ap"] < 100
    mp.spawn(eval_worker, args=(2, str(coco), str(tmp_path)), nprocs=2)
    for rank in range(2):
        assert json.load(open(tmp_path / f"rank{rank}.json")) == json.loads(json.dumps(one))


# -----------------------------------------------------------------------------
# the script: training on the fixture, resume, bad input

# the smallest detector that runs the whole path: nano at 64 px (windows 4, 4, 4, 2), a 16-channel FPN, 16 RoIs;
# a global batch of 2 in 2 micro-batches (gradient accumulation)
SMALL = ["--model", "nano", "--img_size", "64", "--fpn_channels", "16", "--rois", "16"]
FAST = SMALL + ["--pretrained", "none", "--batch_size", "2", "--micro_batch", "1", "--warmup_iters", "1", "--milestones", "1",
                "--log_every", "1", "--workers", "0"]


def read_log(d):
    return [json.loads(line) for line in open(d / "log.jsonl")]


def test_trains_on_the_coco_fixture_and_evaluates(coco, tmp_path):
    out = tmp_path / "det"
    metrics = detect.main(FAST + ["--data", str(coco), "--epochs", "2", "--out_dir", str(out)])
    log, summary = read_log(out), json.load(open(out / "summary.json"))
    # 4 training images at batch 2: 4 steps, one line each with the five Mask R-CNN losses, then the evaluation
    terms = {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    assert [l["step"] for l in log] == [1, 2, 3, 4, 4] and all(terms | {"train_loss", "lr", "grad_norm"} <= set(l) for l in log[:4])
    assert log[0]["train_loss"] == pytest.approx(sum(log[0][k] for k in terms)) and np.isfinite(log[3]["train_loss"])
    # step 1 warms up from 0.001 x the peak, step 2 is at the peak, steps 3-4 come after milestone epoch 1: x0.1
    assert [l["lr"] / log[1]["lr"] for l in log[:4]] == pytest.approx([0.001, 1, 0.1, 0.1])
    assert log[4]["box_ap"] == metrics["box_ap"] and 0 <= metrics["mask_ap"] <= 100 and log[4]["epoch"] == 2
    assert summary["kind"] == "detect" and summary["task"] == "coco" and summary["metrics"] == dict(box_ap=metrics["box_ap"], mask_ap=metrics["mask_ap"])
    assert summary["pretrained"]["path"] is None and (out / "args.json").exists() and (out / "pred_0000004.png").exists()
    # --eval_only re-measures the checkpoint: the same numbers
    again = detect.main(FAST + ["--data", str(coco), "--epochs", "2", "--out_dir", str(out), "--eval_only"])
    assert {k: again[k] for k in metrics} == metrics and json.load(open(out / "eval.json"))["box_ap"] == metrics["box_ap"]
    # ... but not as another model: the position bias is computed from the window, so a checkpoint would load
    # into it silently; a head of another width would not load at all
    for extra, words in [(["--window", "2"], "window_size 4 vs 2"), (["--fpn_channels", "32"], "size mismatch"),
                         (["--heads", "plain"], "Missing key(s)")]:
        with pytest.raises(SystemExit) as e:
            detect.main(FAST + ["--data", str(coco), "--epochs", "2", "--out_dir", str(out), "--eval_only"] + extra)
        assert str(e.value.code).startswith("error:") and words in str(e.value.code) and "\n" not in str(e.value.code), e.value.code
    # a rerun may change how the run is measured (--val_images is free), not what it computes
    assert detect.main(FAST + ["--data", str(coco), "--epochs", "2", "--out_dir", str(out), "--val_images", "1"]) == metrics
    with pytest.raises(SystemExit) as e:
        detect.main(FAST + ["--data", str(coco), "--epochs", "2", "--out_dir", str(out), "--seed", "1"])
    assert "belongs to another run: --seed 0 there, 1 here" in str(e.value.code)


def test_resume_after_sigterm_or_sigkill_gives_the_same_weights_and_log(tmp_path, monkeypatch):
    # 4 steps of 2 images, a log row per step, checkpoints at steps 2 and 4
    argv = FAST + ["--data", "synthetic:4", "--epochs", "2", "--val_images", "2", "--save_every", "2", "--out_dir"]

    class PreemptedAtStep2(train.StopSignal):  # SIGTERM arrives during step 2 of 4
        def requested(self):
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().requested()

    handler = signal.getsignal(signal.SIGTERM)
    try:
        detect.main(argv + [str(tmp_path / "straight")])
        monkeypatch.setattr(train, "StopSignal", PreemptedAtStep2)
        with pytest.raises(SystemExit) as e:
            detect.main(argv + [str(tmp_path / "resumed")])
        assert e.value.code == 143 and torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)["step"] == 2
        monkeypatch.undo()
        detect.main(argv + [str(tmp_path / "resumed")])  # the same command again: it resumes
    finally:
        signal.signal(signal.SIGTERM, handler)
    # SIGKILL (test_run.py's killer) right after the step-3 row is written: the rerun cuts it, redoes step 3
    test_run.killed("after_log_row", 3, ["detect.py"] + argv[:-1], tmp_path / "killed")
    assert len(read_log(tmp_path / "killed")) == 3
    detect.main(argv + [str(tmp_path / "killed")])
    for d in ("resumed", "killed"):
        test_run.assert_same_run(tmp_path / "straight", tmp_path / d)


def test_two_processes_train_as_one_process_with_accumulation(coco, tmp_path):
    """torchrun with 2 processes x 1 image vs 1 process x 2 accumulated micro-batches, on the COCO fixture: the
    same losses, gradient norms and weights (RoI and anchor sampling are seeded per micro-batch by the loop, not
    per process). Two steps only: an untrained RPN scores every anchor near 0.5, so after that the float-level
    difference between DDP's all-reduce and accumulation can flip which near-tied proposals are kept, and
    the sampled negatives (and the classifier loss) part ways, though the run is equally correct."""
    argv = FAST + ["--data", str(coco), "--epochs", "1", "--milestones", "0.5", "--out_dir"]
    detect.main(argv + [str(tmp_path / "one")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "detect.py", *argv, str(tmp_path / "two")]
    proc = subprocess.run(cmd, cwd=test_run.ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 2]
    for r1, r2 in zip(one[:2], two[:2]):
        for k in ("train_loss", "loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg", "grad_norm"):
            assert r1[k] == pytest.approx(r2[k], rel=1e-5), (k, r1, r2)
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True)["model"] for d in ("one", "two"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_bad_input_is_refused_in_one_line(coco, tmp_path):
    torch.save({"model": {}}, tmp_path / "empty.pt")
    torch.save({"model": swinv2.create("tiny").state_dict()}, tmp_path / "tiny.pt")
    cases = [(["--data", str(tmp_path / "nothing")], "instances_train2017.json"), (["--data", "synthetic:0"], "synthetic"),
             (["--model", "S", "--pretrained", str(tmp_path / "tiny.pt")], "SwinV2-tiny"), (["--milestones", "9"], "--milestones"),
             (["--pretrained", str(tmp_path / "no.pt")], "does not exist"), (["--pretrained", str(tmp_path / "empty.pt")], "no SwinV2 encoder")]
    for extra, words in cases:
        with pytest.raises(SystemExit) as e:
            detect.main(FAST + ["--data", str(coco), "--epochs", "2", "--out_dir", str(tmp_path / "det")] + extra)
        msg = str(e.value.code)
        assert msg.startswith("error:") and words in msg and "\n" not in msg, msg
    assert not (tmp_path / "det").exists()


def test_soft_masks_are_cut_at_one_half(coco):
    """torchvision's masks are probabilities: COCO's are the pixels above 0.5. 0.4 everywhere and 0.9 on the object
    scores perfect masks only with that threshold (at 0 every mask would cover the whole image)."""
    model = FakeDetector(coco)
    for pred in model.truth.values():
        pred["masks"] = 0.4 + 0.5 * pred["masks"]
    metrics = evaluate_fixture(model, coco)
    assert metrics["mask_ap"] == pytest.approx(100) and metrics["box_ap"] == pytest.approx(100)


def test_a_json_without_masks_is_refused_naming_the_file_and_annotation(coco, tmp_path):
    shutil.copytree(coco, tmp_path / "coco")
    ann = tmp_path / "coco" / "annotations" / "instances_train2017.json"
    d = json.load(open(ann))
    del d["annotations"][1]["segmentation"]  # a detection-only annotation (boxes only)
    json.dump(d, open(ann, "w"))
    with pytest.raises(SystemExit) as e:
        detect.main(FAST + ["--data", str(tmp_path / "coco"), "--epochs", "2", "--out_dir", str(tmp_path / "det")])
    msg = str(e.value.code)
    assert msg.startswith(f"error: {ann}: annotation id {d['annotations'][1]['id']} has no 'segmentation'") and "\n" not in msg, msg
    assert not (tmp_path / "det").exists()


def test_the_schedule_follows_a_shorter_run_unless_given():
    def resolved(*extra, n=16000):  # n images at batch 16: n / 16 steps per epoch
        args = detect.get_parser().parse_args(["--pretrained", "none", *extra])
        return detect.steps(detect.resolve(args, 1), n, 1)
    r = resolved("--model", "B", "--epochs", "12", n=1600)  # 100 steps per epoch, 1200 in all
    assert r["milestones"] == pytest.approx((9, 11)) and r["warmup_iters"] == 300  # 27/36, 33/36; 1000 capped at a quarter
    assert resolved("--model", "B")["milestones"] == (27, 33) and resolved("--model", "B")["warmup_iters"] == 1000
    assert resolved("--model", "tiny", "--epochs", "1")["milestones"] == pytest.approx((2.5 / 3,))
    assert resolved("--model", "B", "--epochs", "12", "--milestones", "8", "10")["milestones"] == (8, 10)
    with pytest.raises(ValueError, match="--warmup_iters 2000 must be shorter"):
        resolved("--model", "B", "--epochs", "12", "--warmup_iters", "2000", n=1600)
