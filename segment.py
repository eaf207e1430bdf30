"""
Semantic segmentation on ADE20K with UPerNet on a (SimMIM-pre-trained) SwinV2: "On Data Scaling in Masked
Image Modeling" (arXiv 2206.04664) relates the pre-training losses to five downstream metrics, one of them
the ADE20K mIoU of its S, B and L pre-trainings. The encoder gives four maps (strides 4..32,
swinv2.forward_pyramid); UPerNet (Xiao et al. 2018, arXiv 1807.10221) pools the coarsest one at four
scales, runs a top-down feature pyramid, fuses all levels at stride 4 and classifies every pixel. The
recipe is mmsegmentation's UPerNet-Swin on ADE20K (configs/swin/upernet_swin_*_512x512_160k_ade20k*.py)
with the SwinV2 paper's LR (arXiv 2111.09883, appendix; the data-scaling paper published none): 512
crops, 160K iterations at batch 16, AdamW 4e-5, layer decay 0.95; single-scale sliding-window mIoU
(mmseg's slide_inference, scored as its IoUMetric).

    python segment.py --model tiny --data synthetic --pretrained out/tiny_frac1_0.3k     # CPU demo: 1000 steps
    python segment.py --model tiny --data synthetic --pretrained none                     # from scratch
    torchrun --nproc_per_node 8 segment.py --model B --data data/ADEChallengeData2016 --pretrained out/B_frac0.5_125k

Data: an ADEChallengeData2016 folder as released, or data.py's synthetic images with per-pixel labels of
their shapes (so it runs on a CPU with no download). Read next: analyze.py.
"""
import argparse
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from tqdm import tqdm

import data
import finetune
import swinv2
import synthetic
import train
from train import print0

IGNORE = 255  # label of pixels that count nowhere: ADE's "other" (0) and the padding of small crops
EVAL_WINDOWS = 8  # windows per forward in evaluation: a constant, so the scores do not depend on --micro_batch

# -----------------------------------------------------------------------------
# UPerNet, written out (mmsegmentation's UPerHead + FCNHead, Conv-BN-ReLU everywhere)


class ConvBNReLU(nn.Module):
    """mmseg's ConvModule: conv without bias (the BatchNorm has one), BatchNorm, ReLU. Under DDP on GPUs
    main() converts the BatchNorms to SyncBatchNorm: 2 crops per GPU are too few for batch statistics."""

    def __init__(self, cin, cout, k):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")  # mmcv's ConvModule init

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


def resize_to(x, ref):
    """Bilinear resize of x to the spatial size of ref (align_corners=False, as mmseg)."""
    return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=False)


class Classifier(nn.Sequential):
    """Dropout2d(0.1) (whole channels), then a 1x1 conv to class logits, init N(0, 0.01) (mmseg)."""

    def __init__(self, channels, num_classes, dropout=0.1):
        super().__init__(nn.Dropout2d(dropout), nn.Conv2d(channels, num_classes, 1))
        nn.init.normal_(self[1].weight, std=0.01), nn.init.zeros_(self[1].bias)


class UPerHead(nn.Module):
    """maps (strides 4, 8, 16, 32; dims C..8C) -> logits (B, classes, H/4, W/4).
    1. Pyramid pooling (PSPNet) on the stride-32 map: average-pool to 1x1, 2x2, 3x3, 6x6, 1x1 conv each,
       upsample back, concatenate with the map, 3x3 conv: global and regional context for the top level.
    2. Feature pyramid (FPN): 1x1 lateral convs bring levels 0-2 to `channels`; top-down, each level adds
       the upsampled level above; a 3x3 conv smooths levels 0-2.
    3. Fuse: upsample all four to stride 4, concatenate, 3x3 conv, then the classifier."""

    def __init__(self, dims, channels, num_classes, pool_scales=(1, 2, 3, 6)):
        super().__init__()
        self.ppm = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvBNReLU(dims[-1], channels, 1))
                                 for s in pool_scales)
        self.bottleneck = ConvBNReLU(dims[-1] + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvBNReLU(d, channels, 1) for d in dims[:-1])
        self.fpn_convs = nn.ModuleList(ConvBNReLU(channels, channels, 3) for _ in dims[:-1])
        self.fpn_bottleneck = ConvBNReLU(len(dims) * channels, channels, 3)
        self.cls = Classifier(channels, num_classes)

    def forward(self, maps):
        top = maps[-1]  # (B, 8C, H/32, W/32)
        # (B, ch, H/32, W/32)
        psp = self.bottleneck(torch.cat([top] + [resize_to(pool(top), top) for pool in self.ppm], 1))
        levels = [conv(m) for conv, m in zip(self.lateral_convs, maps)] + [psp]  # (B, ch, H/2^(i+2), ...)
        for i in range(len(levels) - 1, 0, -1):  # top-down: coarse semantics flow into the finer levels
            levels[i - 1] = levels[i - 1] + resize_to(levels[i], levels[i - 1])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, levels)] + [levels[-1]]
        # (B, ch, H/4, W/4)
        fused = self.fpn_bottleneck(torch.cat([outs[0]] + [resize_to(o, outs[0]) for o in outs[1:]], 1))
        return self.cls(fused)


class FCNHead(nn.Sequential):
    """The auxiliary head on the stride-16 map: 3x3 Conv-BN-ReLU, classifier. Its loss (weight 0.4) adds
    a deeper supervision signal to the encoder during training; inference does not run it."""

    def __init__(self, dim, channels, num_classes):
        super().__init__(ConvBNReLU(dim, channels, 3), Classifier(channels, num_classes))


class Segmenter(nn.Module):
    """encoder (pyramid) + UPerHead + auxiliary FCNHead. forward(x) returns logits at stride 4,
    (B, classes, H/4, W/4); in training mode also the auxiliary logits at stride 16."""

    def __init__(self, encoder: swinv2.SwinV2, num_classes, channels=512, aux_channels=256):
        super().__init__()
        self.encoder, self.cfg = encoder, encoder.cfg  # cfg: finetune.param_groups reads the depths
        dims = [encoder.cfg.embed_dim * 2**i for i in range(len(encoder.cfg.depths))]
        self.decode_head = UPerHead(dims, channels, num_classes)
        self.aux_head = FCNHead(dims[2], aux_channels, num_classes)

    def forward(self, x):
        maps = self.encoder.forward_pyramid(x)
        logits = self.decode_head(maps)
        return (logits, self.aux_head(maps[2])) if self.training else logits

    def layer_id(self, name):
        """Layer-wise LR decay ids: the encoder's own (0 patch embedding .. L blocks), L + 1 for the heads
        and the pyramid norms, so finetune.param_groups gives them the full LR."""
        return (self.encoder.layer_id(name[len("encoder."):]) if name.startswith("encoder.")
                else sum(self.cfg.depths) + 1)


def predict(model, x):
    """Per-pixel logits at the input's size, (B, classes, H, W): the stride-4 logits upsampled."""
    return resize_to(model(x).float(), x)


def seg_loss(logits, aux_logits, y, aux_weight=0.4):
    """Cross-entropy of the main and (weight 0.4) auxiliary logits, both upsampled to the label size, as
    mmseg. Mean over the labelled pixels of the micro-batch (PyTorch's ignore_index convention; mmseg's
    default divides by all pixels, ignored ones included); a crop with none labelled contributes 0.
    Returns (loss, main term, auxiliary term)."""
    n = (y != IGNORE).sum().clamp(min=1)
    ce = lambda z: F.cross_entropy(resize_to(z.float(), y), y, ignore_index=IGNORE, reduction="sum") / n
    main, aux = ce(logits), ce(aux_logits)
    return main + aux_weight * aux, main, aux


# -----------------------------------------------------------------------------
# data: ADE20K as released, synthetic scenes, joint image + label-map augmentation


class LabelledImage:
    """An image and its label map, opened lazily. It is a context manager like a PIL image, so data.load
    (and so data.TrainStream and data.EvalSet) closes both files, and an unreadable file of either is
    logged and replaced. `lut` maps stored label values to training labels; a label map of another size
    than its image, or with a label that is neither a class (< num_classes) nor IGNORE, is unreadable, and
    the reason names the label file."""

    def __init__(self, image, labels, lut=None, num_classes=256):
        self.image, self.labels, self.lut, self.num_classes = image, labels, lut, num_classes

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for f in self.files():
            f.close()

    def load(self):
        """Decode both files and check them, as PIL's Image.load (raises what an unreadable file raises)."""
        for f in self.files():
            f.load()
        self.tensors()

    def files(self):
        return [f for f in (self.image, self.labels) if isinstance(f, Image.Image)]

    def tensors(self):
        """-> (tv_tensors.Image uint8 (3, H, W), tv_tensors.Mask uint8 (1, H, W))."""
        name = f"label map {getattr(self.labels, 'filename', '')}".rstrip()
        if isinstance(self.labels, Image.Image) and self.labels.mode not in ("L", "P"):
            raise ValueError(f"{name} is {self.labels.mode}, want a single-channel (L or P) PNG")
        raw = np.asarray(self.labels, dtype=np.uint8)
        labels = self.lut[raw] if self.lut is not None else raw
        wrong = (labels >= self.num_classes) & (labels != IGNORE)
        if wrong.any():  # (mIoU's per-class counts have no room for it)
            valid = self.lut is not None and np.flatnonzero((self.lut < self.num_classes) | (self.lut == IGNORE))
            raise ValueError(f"{name} holds the value {raw[wrong][0]}, which is no class"
                             + (f" (valid: {valid.min()}-{valid[valid < 255].max()} and 255)"
                                if valid is not False else ""))
        img = data.to_rgb(self.image)
        if img.size[::-1] != labels.shape:
            raise ValueError(f"{name} is {labels.shape[1]}x{labels.shape[0]} but its image "
                             f"{getattr(self.image, 'filename', '')} is {img.size[0]}x{img.size[1]}")
        return (tv_tensors.Image(v2.functional.pil_to_tensor(img)),
                tv_tensors.Mask(torch.from_numpy(labels.copy())[None]))


# ADE20K's "reduce_zero_label": 0 ("other", not annotated) -> ignored, k -> k - 1, so 150 classes 0..149
ADE_LUT = np.array([IGNORE] + list(range(255)), dtype=np.uint8)
ADE_LUT[255] = IGNORE  # 255 stays ignored (mmseg: 255 - 1 = 254 -> 255)


class ADE20K:
    """ADEChallengeData2016 as released: images/{training,validation}/ADE_*.jpg with label maps
    annotations/{training,validation}/ADE_*.png (uint8, 0 = other, 1..150 the classes).
    open(i) -> (LabelledImage, -1): no image-level label."""
    num_classes = 150

    def __init__(self, root, split):
        sub = {"train": "training", "val": "validation"}[split]
        self.root, img_dir = root, os.path.join(root, "images", sub)
        if not os.path.isdir(img_dir):
            raise FileNotFoundError(f"--data {root} is not an ADEChallengeData2016 folder (no images/{sub}/) "
                                    f"nor 'synthetic[:N]'")
        self.names = sorted(os.path.join("images", sub, f) for f in os.listdir(img_dir) if f.lower().endswith(".jpg"))
        self.label_names = [os.path.join("annotations", sub, os.path.basename(n)[:-4] + ".png") for n in self.names]
        if not self.names:
            raise FileNotFoundError(f"--data {root}: no .jpg images in images/{sub}/")
        missing = [n for n in self.label_names if not os.path.isfile(os.path.join(root, n))]
        if missing:
            raise FileNotFoundError(f"--data {root}: {len(missing)} images without a label map, e.g. {missing[0]}")

    def __len__(self):
        return len(self.names)

    def name(self, i):
        return self.names[i]

    def open(self, i):
        return LabelledImage(Image.open(os.path.join(self.root, self.names[i])),
                             Image.open(os.path.join(self.root, self.label_names[i])), ADE_LUT, self.num_classes), -1


class SyntheticScenes:
    """data.py's synthetic images with per-pixel labels: 0 = background, 1..10 = the main shape's class
    + 1, and each small shape of the background pattern, a plain shape of kind k, gets k + 1 (the label
    of the plain shapes of its kind: same appearance, same label). Background is a real class here (as in Pascal
    VOC), not ignored like ADE's "other": every pixel is either background or a drawn shape, exactly
    known, so the labels are dense and the mIoU counts 11 classes. open(i) -> (LabelledImage, class)."""
    num_classes = 11

    def __init__(self, split, n):
        self.images = synthetic.SyntheticImages(split, n)
        self.root, self.names = "synthetic", self.images.names

    def __len__(self):
        return len(self.images)

    def name(self, i):
        return self.images.name(i)

    def open(self, i):
        img, label, objects = self.images.scene(i)
        labels = np.zeros((synthetic.SIZE, synthetic.SIZE), np.uint8)
        for cls, visible in objects:  # the masks are of visible pixels: they do not overlap
            labels[visible] = cls + 1
        return LabelledImage(img, labels, num_classes=self.num_classes), label


def open_splits(path):
    """--data -> (train, val) datasets: 'synthetic[:N]' (N training images, 500 validation) or an ADE folder."""
    if path == "synthetic" or path.startswith("synthetic:"):
        data.open_dataset(path)  # validates the name
        n = path.partition(":")[2]
        return SyntheticScenes("train", int(n or synthetic.TRAIN_IMAGES)), SyntheticScenes("val", synthetic.VAL_IMAGES)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--data {path} is not an existing ADEChallengeData2016 folder nor 'synthetic[:N]'")
    return ADE20K(path, "train"), ADE20K(path, "val")


def keep_ratio_size(h, w, long_side, short_side):
    """mmcv's keep-ratio rescale: the largest size with the same aspect ratio whose long side is at most
    long_side and short side at most short_side, rounded half up. (2048, 512): a 683x512 ADE image stays
    683x512, a 256x256 one becomes 512x512, a 3000x600 one 2048x410."""
    f = min(long_side / max(h, w), short_side / min(h, w))
    return int(h * f + 0.5), int(w * f + 0.5)


def to_input(img):
    """uint8 (3, H, W) -> float, ImageNet-normalised (the pre-training's statistics)."""
    return v2.functional.normalize(v2.functional.to_dtype(img, torch.float32, scale=True),
                                   data.IMAGENET_MEAN, data.IMAGENET_STD)


def photometric_distortion(img):
    """mmseg's PhotoMetricDistortion on a float [0, 1] image, each step with probability 0.5: brightness
    +-32/255 (added); contrast x 0.5-1.5 (multiplied), second or last; saturation x 0.5-1.5; hue +-0.1
    of the colour circle (mmseg's +-18 of OpenCV's 180 hue steps). Saturation and hue are torchvision's
    (a blend with grey; a rotation in HSV), close to mmseg's arithmetic in HSV."""
    coin = lambda: bool(torch.rand(()) < 0.5)
    uniform = lambda lo, hi: float(torch.empty(()).uniform_(lo, hi))
    contrast = lambda x: (x * uniform(0.5, 1.5)).clamp(0, 1) if coin() else x
    if coin():
        img = (img + uniform(-32, 32) / 255).clamp(0, 1)
    contrast_first = coin()
    if contrast_first:
        img = contrast(img)
    if coin():
        img = v2.functional.adjust_saturation(img, uniform(0.5, 1.5))
    if coin():
        img = v2.functional.adjust_hue(img, uniform(-0.1, 0.1))
    return img if contrast_first else contrast(img)


def crop_box(labels, crop, cat_max_ratio=0.75, tries=10):
    """mmseg's RandomCrop with cat_max_ratio: a uniformly placed crop x crop box (the whole side where the
    image is smaller), drawn again, up to `tries` draws in all (the last one is kept), while one class
    covers >= 75 % of the box's labelled pixels or the box holds a single class: fewer crops of only wall
    or sky. labels (1, H, W) -> (top, left, height, width)."""
    H, W = labels.shape[-2:]
    h, w = min(crop, H), min(crop, W)
    for _ in range(tries):
        top, left = int(torch.randint(H - h + 1, ())), int(torch.randint(W - w + 1, ()))
        counts = torch.bincount(labels[..., top:top + h, left:left + w].flatten().long(), minlength=256)[:IGNORE]
        counts = counts[counts > 0]
        if len(counts) > 1 and counts.max() < cat_max_ratio * counts.sum():
            break
    return top, left, h, w


class TrainTransform:
    """mmseg's ADE20K training pipeline on an (image, label map) pair, with torchvision.transforms.v2 on
    tv_tensors (a Mask is always resized with nearest neighbours, never blended): random rescale into
    base x U(0.5, 2) keeping the aspect ratio (2048x512 for ADE), a crop with the class cap, horizontal
    flip, photometric distortion, normalisation, then padding to crop x crop: the image with 0 (the mean
    colour, as mmseg pads after normalising), the labels with IGNORE. -> ((3, crop, crop), (crop, crop))."""

    def __init__(self, crop, base, ratio=(0.5, 2.0), cat_max_ratio=0.75):
        self.crop, self.base, self.ratio, self.cat_max_ratio = crop, base, ratio, cat_max_ratio
        self.flip = v2.RandomHorizontalFlip()  # one draw flips image and labels together

    def __call__(self, item):
        img, labels = item.tensors()
        s = float(torch.empty(()).uniform_(*self.ratio))
        size = keep_ratio_size(*img.shape[-2:], int(self.base[0] * s), int(self.base[1] * s))
        img = v2.functional.resize(img, size, v2.InterpolationMode.BILINEAR, antialias=False)  # cv2's bilinear, as mmcv
        labels = v2.functional.resize(labels, size)
        box = crop_box(labels, self.crop, self.cat_max_ratio)
        img, labels = self.flip(v2.functional.crop(img, *box), v2.functional.crop(labels, *box))
        x = photometric_distortion(v2.functional.to_dtype(img, torch.float32, scale=True))
        x = v2.functional.normalize(x, data.IMAGENET_MEAN, data.IMAGENET_STD)
        pad = [0, 0, self.crop - box[3], self.crop - box[2]]  # left, top, right, bottom
        return v2.functional.pad(x, pad, fill=0), v2.functional.pad(labels, pad, fill=IGNORE)[0].long()


class EvalTransform:
    """mmseg's test pipeline: the image keep-ratio resized into `base` (2048x512 for ADE: most validation
    images get a 512 px short side), the labels left at the original size: evaluate() scores the original
    pixels, resizing the logits back. -> ((3, h, w) resized image, (H, W) labels)."""

    def __init__(self, base):
        self.base = base

    def __call__(self, item):
        img, labels = item.tensors()
        size = keep_ratio_size(*img.shape[-2:], *self.base)
        img = v2.functional.resize(img, size, v2.InterpolationMode.BILINEAR, antialias=False)
        return to_input(img), labels[0].long()


# -----------------------------------------------------------------------------
# evaluation: sliding windows, mIoU, pictures


def slide_windows(H, W, crop, stride):
    """mmseg's sliding-window grid: windows every `stride` pixels, the last of each row and column moved
    back to end flush with the image. -> [(top, left, bottom, right)], clipped to the image."""
    rows, cols = (max(n - crop + stride - 1, 0) // stride + 1 for n in (H, W))
    boxes = []
    for i in range(rows):
        for j in range(cols):
            bottom, right = min(i * stride + crop, H), min(j * stride + crop, W)
            boxes.append((max(bottom - crop, 0), max(right - crop, 0), bottom, right))
    return boxes


def slide_logits(f, img, crop, stride, batch=8):
    """Logits of a whole image from crop x crop windows, averaged where windows overlap (mmseg's 'slide'
    inference; 512/341 for ADE). f: (n, 3, crop, crop) -> (n, classes, crop, crop); img (3, H, W) ->
    (classes, H, W). SwinV2's shifted-window masks are built for one input size, so a window of an image
    smaller than the crop is padded with 0 (the mean colour) and the padding's logits are dropped."""
    _, H, W = img.shape
    boxes = slide_windows(H, W, crop, stride)
    total, count = None, torch.zeros(1, H, W, device=img.device)
    for k in range(0, len(boxes), batch):
        chunk = boxes[k:k + batch]
        windows = torch.stack([F.pad(img[:, t:b, l:r], (0, crop - (r - l), 0, crop - (b - t)))
                               for t, l, b, r in chunk])
        out = f(windows).float()  # (n, classes, crop, crop)
        total = out.new_zeros(out.shape[1], H, W) if total is None else total
        for o, (t, l, b, r) in zip(out, chunk):
            total[:, t:b, l:r] += o[:, :b - t, :r - l]
            count[:, t:b, l:r] += 1
    return total / count


def intersect_union(pred, labels, num_classes):
    """(3, classes) pixel counts of one image: intersection, union and labelled pixels per class.
    Pixels labelled IGNORE count nowhere, whatever is predicted there."""
    keep = labels != IGNORE
    p, y = pred[keep], labels[keep]
    inter = torch.bincount(y[p == y], minlength=num_classes)
    area_p, area_y = torch.bincount(p, minlength=num_classes), torch.bincount(y, minlength=num_classes)
    return torch.stack([inter, area_p + area_y - inter, area_y]).double()


def scores(areas):
    """mmseg's IoUMetric from (3, classes) summed counts -> (mIoU, pixel accuracy) in percent. IoU of a
    class = intersection / union over the whole set (not a mean of per-image IoUs); the mean is over
    classes with a non-empty union: a class neither labelled nor predicted anywhere is left out, one
    predicted but never labelled counts with IoU 0. Pixel accuracy = correct / labelled pixels."""
    inter, union, labelled = areas
    return 100 * float((inter / union)[union > 0].mean()), 100 * float(inter.sum() / labelled.sum())


@torch.no_grad()
def evaluate(model, loader, num_classes, crop, stride, batch, device, ctx):
    """Single-scale sliding-window (mIoU, pixel accuracy, images) over the loader's images, one image per
    batch. Each rank scores a disjoint shard (data.shard) and the per-class sums are added over ranks,
    so the numbers are exact and the same for any world size."""
    model.eval()
    areas, n = torch.zeros(3, num_classes, dtype=torch.float64), 0
    for one in loader:  # one image per batch
        x, y = one.image, one.target  # (1, 3, h, w) resized for the model, (1, H, W) original labels
        if not data.scored(one, loader.dataset).item():  # an unreadable image is left out and counted
            continue
        with ctx:
            logits = slide_logits(lambda w: predict(model, w), x[0].to(device, non_blocking=True), crop, stride, batch)
        pred = resize_to(logits[None], y).argmax(1)[0].cpu()  # (H, W), the logits resized to the original size
        areas, n = areas + intersect_union(pred, y[0], num_classes), n + 1
    model.train()
    *sums, n = train.all_sum(*areas.flatten().tolist(), n, device=device)  # float64: exact below 2^53 pixels
    miou, acc = scores(torch.tensor(sums, dtype=torch.float64).view(3, num_classes))
    return miou, acc, int(n)


def colorize(labels, num_classes):
    """(H, W) labels -> (3, H, W) in [0, 1]: a fixed random colour per class, black where ignored."""
    palette = torch.rand(num_classes + 1, 3, generator=torch.Generator().manual_seed(3))
    palette[num_classes] = 0
    return palette[torch.where(labels == IGNORE, num_classes, labels)].permute(2, 0, 1)


@torch.no_grad()
def save_pictures(path, model, val_stream, num_classes, crop, stride, device, ctx, step, n=4, height=128):
    """A labelled grid, one row per validation image: the image, its true label map and the predicted one,
    at the original size, shown `height` px high (black: ignored pixels)."""
    from PIL import ImageDraw

    model.eval()
    mean, std = torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(data.IMAGENET_STD).view(3, 1, 1)
    rows = []
    for i in range(min(n, len(val_stream))):
        item = val_stream[i]
        x, y = item.image, item.target
        with ctx:
            logits = slide_logits(lambda w: predict(model, w), x.to(device), crop, stride)
        pred = resize_to(logits[None], y).argmax(1)[0].cpu()
        size = [height, round(height * y.shape[1] / y.shape[0])]
        panels = [v2.functional.resize((x * std + mean).clamp(0, 1), size, antialias=True)]
        panels += [v2.functional.resize(colorize(t, num_classes), size, v2.InterpolationMode.NEAREST)
                   for t in (y, pred)]
        rows.append(torch.cat([F.pad(p, (0, 2), value=1.0) for p in panels], dim=2))  # (3, height, 3 * (width + 2))
    width = max(r.shape[2] for r in rows)
    grid = torch.cat([F.pad(r, (0, width - r.shape[2], 0, 2), value=1.0) for r in rows], dim=1)  # (3, H, W)
    canvas = Image.new("RGB", (grid.shape[2], grid.shape[1] + 16), "white")
    canvas.paste(Image.fromarray((grid * 255).round().byte().permute(1, 2, 0).numpy()), (0, 16))
    draw = ImageDraw.Draw(canvas)
    for col, label in enumerate(["image", "true labels", f"predicted, step {step}"]):
        draw.text((col * (rows[0].shape[2] // 3) + 4, 2), label, fill="black")
    train.atomic_write(path, lambda f: canvas.save(f, format="png"))
    model.train()


# -----------------------------------------------------------------------------
# model, optimizer groups, LR


def build_model(args, r, ckpt, num_classes):
    """Segmenter at the crop size and window, its encoder loaded from the checkpoint (see
    finetune.build_model: the position-bias MLP keeps the pre-training windows as its reference).
    Only the pyramid norms are new in the encoder; the heads are new. Returns (model, missing keys)."""
    torch.manual_seed(args.seed)  # the same heads on every rank
    encoder = swinv2.create(args.model, img_size=r["crop"], window_size=r["window"],
                            pretrained_window_sizes=finetune.pretrained_windows(ckpt, args.model),
                            drop_path_rate=r["drop_path"], grad_ckpt=args.grad_ckpt, pyramid=True)
    missing = swinv2.load_pretrained(encoder, ckpt) if ckpt is not None else []
    model = Segmenter(encoder, num_classes, r["channels"], r["channels"] // 2)
    return model, [f"encoder.{k}" for k in missing]


def group_lr(step, scale, r):
    """mmseg's schedule: linear warmup from ~0 (LinearLR, start factor 1e-6) to peak_lr x scale over
    warmup_iters, then linear decay (PolyLR, power 1) to 0 at iters. Layer decay scales the whole curve."""
    peak = r["peak_lr"] * scale
    if step < r["warmup_iters"]:
        return peak * max(step / r["warmup_iters"], 1e-6)
    return peak * (1 - (step - r["warmup_iters"]) / (r["iters"] - r["warmup_iters"]))


# -----------------------------------------------------------------------------
# command line


def scale_pair(text):
    """--scale 'LONG,SHORT' -> (long, short) pixels, an argparse type."""
    try:
        long, short = sorted((int(v) for v in text.split(",")), reverse=True)
        if short > 0:
            return long, short
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"want LONG,SHORT in pixels, e.g. 2048,512; got {text!r}")


def get_parser():
    p = train.Parser(prog="segment.py",
                     description="Semantic segmentation (ADE20K) with UPerNet on a (SimMIM-pre-trained) SwinV2")
    g = p.add_argument_group("model")
    g.add_argument("--model", type=train.model_name, default="B",
                   help="SwinV2 size: S, B, L, H, g (the paper's) or nano, tiny; must match the checkpoint")
    g.add_argument("--pretrained", required=True,
                   help="a mim.py run directory, its ckpt.pt, an official SimMIM checkpoint, or 'none' (from scratch)")
    g.add_argument("--allow_unfinished", action="store_true",
                   help="accept a --pretrained run that has not reached its end (no summary.json)")
    g.add_argument("--crop", type=train.count, default=None,
                   help="training crop and sliding window, pixels; default 512 (mmseg ADE20K; tiny 64)")
    g.add_argument("--window", type=train.count, default=None,
                   help="attention window; default 16 (SwinV2 paper's ADE20K; tiny 4)")
    g.add_argument("--channels", type=train.count, default=None,
                   help="UPerNet width; the auxiliary head gets half; default 512 (mmseg UPerNet, aux 256; tiny 64)")
    g.add_argument("--drop_path", type=train.number(float, 0, 1, hi_open=True), default=None,
                   help="stochastic depth rate; default 0.3 (mmseg UPerNet-Swin; tiny 0.1)")
    g.add_argument("--grad_ckpt", action="store_true", help="activation checkpointing per block (for H and g)")
    g = p.add_argument_group("data and evaluation")
    g.add_argument("--data", default="data/ADEChallengeData2016",
                   help="an ADEChallengeData2016 folder as released, or 'synthetic[:N]' (the CPU demo)")
    g.add_argument("--scale", type=scale_pair, default=None,
                   help="LONG,SHORT: base size of the random rescale (x 0.5-2) and of the test resize; "
                   "default 2048,512 (mmseg ADE20K; tiny 384,96: the synthetic images are 96 px)")
    g.add_argument("--stride", type=train.count, default=None,
                   help="sliding-window stride in pixels; default 2/3 of --crop (mmseg: 341 for 512)")
    g.add_argument("--val_images", type=train.natural, default=0,
                   help="evaluate a fixed subset of this many validation images; 0 = all (ADE20K: 2000)")
    g.add_argument("--workers", type=train.natural, default=None,
                   help="data-loader processes per process; default 8 on CUDA, 0 on CPU")
    g = p.add_argument_group("optimisation")
    g.add_argument("--iters", type=train.count, default=None,
                   help="optimizer steps; default 160000 (mmseg 160K schedule; tiny 1000)")
    g.add_argument("--warmup_iters", type=train.natural, default=None,
                   help="linear warmup steps from ~0; default 1500 (mmseg; tiny 50), at most a quarter of --iters")
    g.add_argument("--batch_size", type=train.count, default=None,
                   help="global batch in crops; default 16 (mmseg: 8 GPUs x 2; tiny 16)")
    g.add_argument("--micro_batch", type=train.count, default=None,
                   help="crops per GPU per forward; default batch_size / world size")
    g.add_argument("--lr", type=train.positive, default=None,
                   help="peak LR per 16 crops, scaled by batch/16, then linear decay to 0; "
                   "default 4e-5 (SwinV2 paper's ADE20K; tiny 4e-3)")
    g.add_argument("--layer_decay", type=train.number(float, 0, 1, lo_open=True), default=None,
                   help="layer-wise LR decay, 1 = off; default 0.95 (SwinV2 paper's ADE20K; tiny 1)")
    g.add_argument("--weight_decay", type=train.non_negative, default=0.05,
                   help="AdamW weight decay (SwinV2 paper's ADE20K: 0.05; mmseg's Swin config uses 0.01)")
    g.add_argument("--clip_grad", type=train.non_negative, default=0.0,
                   help="max gradient norm, 0 = no clipping (mmseg UPerNet-Swin clips nothing)")
    g.add_argument("--seed", type=train.natural, default=0,
                   help="seed of the heads, data order, augmentation, drop path")
    g = p.add_argument_group("run")
    g.add_argument("--out_dir", default=None,
                   help="run directory; default out/seg_{task}_{model}_{pretrained run}; resumes if it has ckpt.pt")
    g.add_argument("--eval_every", type=train.count, default=None,
                   help="steps between evaluations (and after the last); default 16000 (mmseg; tiny 500)")
    g.add_argument("--log_every", type=train.count, default=None,
                   help="steps between log lines; default 50 (mmseg; tiny 10)")
    g.add_argument("--save_every", type=train.count, default=None,
                   help="steps between checkpoints; default 1000 (tiny 100)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="autocast dtype; auto = bf16 on CUDA (the recipe), fp32 on CPU")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--eval_only", action="store_true", help="evaluate --out_dir's checkpoint, write eval.json")
    g.add_argument("--tensorboard", action=train.TensorBoard,
                   help="also write the log's numbers as TensorBoard events in the run directory (optional package)")
    g.add_argument("--dist_timeout", type=train.count, default=60,
                   help="minutes a process waits for the others (rank 0 evaluating alone) before the run fails; "
                   "default 60")
    return p


# The flags a preset decides: for S..g, mmseg's UPerNet-Swin ADE20K recipe
# (configs/swin/upernet_swin_*_512x512_160k_ade20k*.py) with the SwinV2 paper's LR, layer decay and window
# (arXiv 2111.09883, appendix); for nano and tiny, a CPU-minutes recipe on the synthetic scenes: 64 px
# crops of the 96 px images, a narrow head, 1000 steps at a LR a tiny model can use (a shorter run at a
# lower LR stops before the model has found the shapes).
RECIPES = {
    "paper": dict(iters=160000, warmup_iters=1500, batch_size=16, lr=4e-5, crop=512, window=16, scale=(2048, 512),
                  channels=512, drop_path=0.3, layer_decay=0.95, eval_every=16000, log_every=50, save_every=1000),
    "demo": dict(iters=1000, warmup_iters=50, batch_size=16, lr=4e-3, crop=64, window=4, scale=(384, 96),
                channels=64, drop_path=0.1, layer_decay=1.0, eval_every=500, log_every=10, save_every=100),
}
FREE = train.FREE | {"allow_unfinished", "val_images", "stride"}  # how the evaluation looks, not what training computes


def resolve(args, world_size):
    """Check the flags together and derive the run's numbers in one visible place; args is never modified.
    Raises ValueError with a one-line message naming the flag."""
    recipe = RECIPES["paper" if args.model in swinv2.PAPER_SIZES else "demo"]
    r = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in recipe.items()}
    if args.warmup_iters is None:  # a short run needs no restated schedule: at most a quarter of it warms up
        r["warmup_iters"] = min(r["warmup_iters"], r["iters"] // 4)
    elif r["warmup_iters"] >= r["iters"]:
        raise ValueError(f"--warmup_iters {r['warmup_iters']} must be shorter than --iters {r['iters']}")
    r["stride"] = args.stride or r["crop"] * 2 // 3
    if r["stride"] > r["crop"]:
        raise ValueError(f"--stride {r['stride']} is larger than --crop {r['crop']}: the windows would leave gaps")
    B = r["batch_size"]
    r["micro_batch"], r["accum"] = train.batch_split(B, args.micro_batch, world_size)
    # BatchNorm of the 1x1 pooled map needs 2 values per channel: 2 crops per process, or SyncBN on GPUs
    if r["micro_batch"] * (world_size if torch.cuda.is_available() else 1) < 2:
        raise ValueError(f"--micro_batch {r['micro_batch']}: BatchNorm needs at least 2 crops per process here")
    r["peak_lr"] = r["lr"] * B / 16  # linear scaling from the recipe's batch of 16
    r["task"] = "synthetic" if args.data.startswith("synthetic") else "ade20k"
    r["out_dir"] = args.out_dir or f"out/seg_{r['task']}_{args.model}_{finetune.pretrained_name(args.pretrained)}"
    train.check_out_dir(r["out_dir"])
    try:  # the windows must tile every stage's map of a crop
        swinv2.SwinV2Config(**dict(swinv2.PRESETS[args.model], img_size=r["crop"], window_size=r["window"]))
    except ValueError as e:
        raise ValueError(f"--crop {r['crop']} / --window {r['window']}: {e}") from None
    r.update(clip_grad=args.clip_grad, seed=args.seed)
    return r

# -----------------------------------------------------------------------------
# the script


def eval_only(run, model, score, K, model_name, master):
    """--eval_only: mIoU and pixel accuracy of the run directory's checkpoint, written to eval.json. A
    measurement: no lock is taken and nothing else is written but its picture."""
    ckpt = train.load_for_eval(run.ckpt, model, model.encoder, model_name, master, classes=K)
    metrics = score(ckpt["step"])
    if master:
        train.save_json(run.file("eval.json"), dict(step=ckpt["step"], **metrics))
        print0(f"-> {run.file('eval.json')}")
    return metrics


def main(argv=None):
    # ---- flags, checkpoint, data: every bad flag, path or file is refused in one line, before any work
    args = get_parser().parse_args(argv)
    train.warn_cpu(args.model)
    try:
        r = resolve(args, int(os.environ.get("WORLD_SIZE", 1)))
        ckpt, pretrained = finetune.read_pretrained(args.pretrained, args.allow_unfinished)
        train_set, val_set = open_splits(args.data)
        for dataset, split in ((train_set, "training"), (val_set, "validation")):
            data.check_readable(dataset, range(len(dataset)), f"--data {args.data} ({split})")
        model, missing = build_model(args, r, ckpt, train_set.num_classes)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    del ckpt  # the encoder is in the model now
    K, N, B, p = train_set.num_classes, len(train_set), r["batch_size"], pretrained
    r["epoch_steps"] = N / B  # log rows show epochs, a derived figure
    # fixed evaluation images, one per batch (sizes differ); the training stream of random crops
    val_idx = np.arange(len(val_set))
    if 0 < args.val_images < len(val_set):
        val_idx = np.sort(np.random.default_rng(0).permutation(len(val_set))[:args.val_images])
    val_stream = data.EvalSet(val_set, val_idx, EvalTransform(r["scale"]))
    stream = data.TrainStream(train_set, np.arange(N), TrainTransform(r["crop"], r["scale"]), args.seed)

    # ---- processes and the run directory (let go however this block ends)
    with train.session(r["out_dir"], args.dist_timeout, args.tensorboard) as (run, device, rank, world):
        master = rank == 0
        dtype, ctx, workers = train.device_setup(device, args.dtype, args.workers)
        print0(f"{'model':>14} SwinV2-{args.model} + UPerNet ({r['channels']} channels), {r['crop']} px crops, windows "
               f"{model.cfg.window_sizes} over pre-trained {model.cfg.pretrained_window_sizes}, {K} classes")
        finetune.print_pretrained(p, sorted({k.rsplit('.', 2)[0] for k in missing} | {'decode_head', 'aux_head'}))
        print0(f"{'global batch':>14} {B} = {r['micro_batch']} per process x {world} processes x {r['accum']} "
               f"accumulation{', SyncBatchNorm' if world > 1 and device.type == 'cuda' else ''}")
        print0(f"{'schedule':>14} {r['iters']} steps ({r['iters'] / r['epoch_steps']:.1f} epochs of {N} images, task "
               f"{r['task']}), warmup {r['warmup_iters']}; rescale {r['scale'][0]}x{r['scale'][1]} x 0.5-2, "
               f"crop {r['crop']}")
        print0(f"{'LR':>14} {r['lr']:g} per 16 -> peak {r['peak_lr']:.3g} x layer scale (decay {r['layer_decay']}), "
               f"linear to 0")
        val_loader = data.make_loader(val_stream, 1, sampler=data.shard(len(val_stream), rank, world), workers=workers)
        print0(f"{'evaluation':>14} {len(val_stream)} images, resized into {r['scale'][0]}x{r['scale'][1]}, "
               f"{r['crop']} px windows every {r['stride']} px, scored at the original size")

        # ---- model and optimizer: BatchNorm statistics over all GPUs (SyncBatchNorm runs on GPUs only)
        if world > 1 and device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = raw_model = model.to(device)
        optimizer = train.adamw(finetune.param_groups(model, args.weight_decay, r["layer_decay"]), r["peak_lr"])

        def score(step):  # an evaluation (every rank); rank 0 prints and draws
            if world > 1:  # every rank scores with rank 0's BatchNorm statistics, the checkpoint's (SyncBatchNorm
                for m in raw_model.modules():  # keeps them equal; on CPUs each process has its own)
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        for b in m.buffers():
                            dist.broadcast(b, 0)
            miou, acc, n = evaluate(raw_model, val_loader, K, r["crop"], r["stride"], EVAL_WINDOWS, device, ctx)
            if master:
                tqdm.write(f"step {step}: mIoU {miou:.2f} %, pixel accuracy {acc:.2f} % on {n} images")
                save_pictures(run.file(f"pred_{step:07d}.png"), raw_model, val_stream, K, r["crop"], r["stride"],
                              device, ctx, step)
            return dict(miou=miou, pixel_acc=acc, images=n)  # images: as scored over all ranks, each once

        if args.eval_only:
            return eval_only(run, raw_model, score, K, args.model, master)

        # ---- the run directory: lock, resume (another run's checkpoint is refused)
        origin = f"{os.path.basename(p['run_dir'] or p['path'] or 'none')} step {p['step']}"  # what it starts from
        identity = train.identity_of(args, r, FREE, pretrained=origin, data_train_images=N, data_classes=K,
                                     dtype=str(dtype))
        state, done = run.start(identity, raw_model, optimizer, master, r["iters"])
        if done:
            return done["metrics"]
        if master:
            train.save_json(run.file("args.json"), dict(vars(args), identity=identity, pretrained=pretrained,
                                                        world_size=world, micro_batch=r["micro_batch"],
                                                        accum=r["accum"], task=r["task"], iters=r["iters"],
                                                        stride=r["stride"], classes=K, torch=str(torch.__version__)))

        # ---- the loop: train.loop runs the steps, with the segmentation loss and the sliding-window mIoU
        sampler = data.StreamSampler(B, r["micro_batch"], rank, world, state["step"])
        batches = iter(data.make_loader(stream, r["micro_batch"], sampler=sampler, workers=workers))
        if args.compile:
            model = torch.compile(model)
        if world > 1:
            model = train.ddp(model, device)

        def loss_fn(batch):
            x = batch.image.to(device, non_blocking=True)  # (B, 3, crop, crop), normalised
            y = batch.target.to(device, non_blocking=True)  # (B, crop, crop) labels
            with ctx:
                logits, aux = model(x)
            loss, main_term, aux_term = seg_loss(logits, aux, y)
            return loss, dict(decode_loss=main_term, aux_loss=aux_term)

        keep = dict(identity=identity, args=vars(args), pretrained=pretrained,
                    model_config=swinv2.model_config(raw_model.encoder))
        train.loop(run, r, state, device, model=model, raw_model=raw_model, optimizer=optimizer, stream=stream,
                   batches=batches, loss_fn=loss_fn, lr_at=lambda step, scale: group_lr(step, scale, r),
                   evaluate=score, keep=keep)

        # ---- the summary, from the log: the last evaluation (the 160K checkpoint is what mmseg reports)
        if not master:
            return {}
        evals = [row for _, row in run.rows() if "miou" in row]
        summary = dict(kind="segment", task=r["task"], model=args.model, iters=r["iters"], data=args.data,
                       pretrained=pretrained, metrics=dict(miou=evals[-1]["miou"], pixel_acc=evals[-1]["pixel_acc"]),
                       val_images=evals[-1]["images"], val_unreadable=len(val_stream) - evals[-1]["images"],
                       **run.counters())
        run.finish(summary)
        return summary["metrics"]


if __name__ == "__main__":
    main()
