"""
COCO object detection and instance segmentation from a (SimMIM-pre-trained) SwinV2 encoder: two of the
five downstream metrics of "On Data Scaling in Masked Image Modeling" (arXiv 2206.04664: the box AP and mask
AP of S/B/L on COCO follow the ImageNet trends). The paper published no detection recipe; we adopt the
closest published ones (the appendices of the SwinV2 paper, arXiv 2111.09883, and of the SimMIM paper, arXiv
2111.09886; detectron2; torchvision's maskrcnn_resnet50_fpn_v2 documentation): torchvision's Mask R-CNN with
an FPN over the encoder's four stage maps, large-scale jitter to a fixed 1024 x 1024 input, AdamW 1e-4 per 16
images, layer-wise decay 0.9, drop path 0.2, 36 epochs with x0.1 at epochs 27 and 33, and COCO AP from
pycocotools' COCOeval.

What this file teaches, in reading order:
  the recipe -> the backbone torchvision's detectors expect (swinv2.forward_pyramid -> FPN) -> Mask R-CNN
  with normalised heads and layer ids for layer-wise decay -> COCO as released and the synthetic set as COCO
  in flat arrays (no per-worker copies), with the traps (category ids 1..90 with gaps, images without objects,
  crowd regions, degenerate boxes, grayscale/CMYK) -> large-scale jitter with boxes recomputed from the cropped
  masks, bit-packed through the loader -> COCO evaluation gathered over ranks -> a picture of predictions.

    python detect.py --model tiny --data synthetic --pretrained out/tiny_frac1_0.3k    # CPU demo: 750 steps
    python detect.py --model tiny --data synthetic --pretrained none                    # from scratch
    torchrun --nproc_per_node 8 detect.py --model B --data data/coco --pretrained out/B_frac0.5_125k
    python detect.py --model B --data data/coco --pretrained out/B_frac0.5_125k --eval_only

Inputs are fixed squares, so every stage map tiles with its window: training images are jittered, then
cropped or padded (bottom-right) to the square; evaluation images are resized (longer side to the square) and
padded bottom-right by torchvision's own GeneralizedRCNNTransform, which also maps the predictions back.
The training loop, run directory and resume are train.py's (train.loop). Read next: analyze.py.
"""
import contextlib
import functools
import gc
import io
import itertools
import json
import math
import os
import sys
from collections import OrderedDict

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torchvision
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision import tv_tensors
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, RPNHead, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork, box_convert
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.transforms import v2
from tqdm import tqdm

import data
import finetune
import swinv2
import synthetic
import train
from train import print0

# -----------------------------------------------------------------------------
# the detector: SwinV2 pyramid -> FPN -> torchvision's Mask R-CNN


class SwinFPN(nn.Module):
    """The backbone torchvision's detectors expect: (B, 3, S, S) -> an OrderedDict of five maps with
    `out_channels` channels. The FPN (Lin et al. 2017) turns swinv2's four stage maps (strides 4-32, C..8C
    channels, each through its own LayerNorm) into '0'..'3' with top-down sums and 3x3 convs (each conv followed
    by `norm`, if given), and LastLevelMaxPool adds 'pool' (stride 64) for the largest anchors, as torchvision's
    ResNet-FPN does."""

    def __init__(self, encoder: swinv2.SwinV2, channels, norm=None):
        super().__init__()
        self.encoder, self.out_channels = encoder, channels
        dims = [encoder.cfg.embed_dim * 2**i for i in range(len(encoder.cfg.depths))]
        self.fpn = FeaturePyramidNetwork(dims, channels, extra_blocks=LastLevelMaxPool(), norm_layer=norm)
        self.autocast = contextlib.nullcontext()  # main() sets train.autocast(...): bf16 on GPUs

    def forward(self, x):
        # Mixed precision stops here: the heads after it decode boxes from anchors and regress towards the
        # targets, and bf16 (8-bit mantissa) would round coordinates near 1024 px to multiples of 4 px.
        with self.autocast:
            maps = self.encoder.forward_pyramid(x)  # [(B, C * 2^i, S / 2^(i+2), S / 2^(i+2))]
            out = self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))
        return OrderedDict((k, v.float()) for k, v in out.items())


def group_norm(channels):
    """The normalisation of the 'gn' heads: GroupNorm with 32 groups (Wu & He 2018, whose Mask R-CNN puts it in the
    FPN and the heads; detectron2's Misc/mask_rcnn_R_50_FPN_3x_gn), fewer when the CPU recipe's narrow heads would
    leave a group one channel (InstanceNorm, the one setting of the GN paper's Table 3 that is clearly worse)."""
    return nn.GroupNorm(math.gcd(32, max(channels // 2, 1)), channels)


class Detector(MaskRCNN):
    """torchvision's Mask R-CNN on SwinFPN, K classes + background. Its GeneralizedRCNNTransform normalises
    and resizes images so the longer side is S (min_size = max_size = S; a training image, already S x S, is
    left as it is), then pads the batch to S x S (size_divisible = S): the fixed square every stage window
    tiles. Predictions come back at each input's own size. Heads 'gn' (default): every LSJ recipe normalises the
    neck and heads (torchvision's maskrcnn_resnet50_fpn_v2, mmdetection's LSJ baseline with SyncBN, ViTDet with
    LayerNorm); this is v2's layout (norm after every FPN conv, 2-conv RPN head, 4conv-1fc box head, 4-conv mask
    head with norm) with GroupNorm for v2's BatchNorm: it ignores the batch, so a run computes the same on any
    number of GPUs, micro-batch or accumulation (BatchNorm would need SyncBN: 2 images per GPU). 'plain': the
    original heads, no norm (1-conv RPN, 2-fc box head). `cfg` and `layer_id` let finetune.param_groups apply
    layer-wise LR decay: encoder parameters get swinv2's layer ids, all new layers the top id (full LR)."""

    def __init__(self, encoder: swinv2.SwinV2, num_classes, img_size, channels=256, rois=512, heads="gn"):
        C, K = channels, num_classes + 1  # label 0 is the background
        norm = group_norm if heads == "gn" else None
        fpn = SwinFPN(encoder, C, norm)
        if heads == "gn":  # RPNHead(C, 3): 3 anchors per location (torchvision's default aspect ratios 0.5, 1, 2)
            kw = dict(rpn_head=RPNHead(C, 3, conv_depth=2),
                      box_head=FastRCNNConvFCHead((C, 7, 7), [C] * 4, [4 * C], norm_layer=norm))
        else:
            kw = dict(box_head=TwoMLPHead(C * 7 * 7, 4 * C))
        super().__init__(fpn, min_size=img_size, max_size=img_size, size_divisible=img_size,
                         image_mean=list(data.IMAGENET_MEAN), image_std=list(data.IMAGENET_STD),
                         box_predictor=FastRCNNPredictor(4 * C, K),
                         mask_head=MaskRCNNHeads(C, (C,) * 4, 1, norm_layer=norm),
                         mask_predictor=MaskRCNNPredictor(C, C, K), box_batch_size_per_image=rois, **kw)
        self.cfg = encoder.cfg

    def layer_id(self, name):
        prefix = "backbone.encoder."
        return (self.backbone.encoder.layer_id(name[len(prefix):]) if name.startswith(prefix)
                else sum(self.cfg.depths) + 1)


def build_model(args, r, ckpt, num_classes):
    """The detector at the input size and window, its encoder loaded from the checkpoint as for classification
    (swinv2.load_pretrained; the window change goes through the pre-training windows, SwinV2 sec. 3.3). Only
    the per-stage norms are new in the encoder. Returns (model, missing encoder keys)."""
    torch.manual_seed(args.seed)  # the same new layers on every rank
    encoder = swinv2.create(args.model, img_size=r["img_size"], window_size=r["window"], pyramid=True,
                            pretrained_window_sizes=finetune.pretrained_windows(ckpt, args.model),
                            drop_path_rate=r["drop_path"], grad_ckpt=args.grad_ckpt)
    missing = swinv2.load_pretrained(encoder, ckpt) if ckpt is not None else []
    if not all(k.startswith("pyramid_norms.") for k in missing):
        raise ValueError(f"--pretrained: expected only the pyramid norms to be missing, got {missing}")
    return Detector(encoder, num_classes, r["img_size"], r["fpn_channels"], r["rois"], args.heads), missing


# -----------------------------------------------------------------------------
# data: COCO as released and the synthetic set as COCO, in flat arrays; large-scale jitter; targets for torchvision


class CocoIndex(torch.utils.data.Dataset):
    """A COCO annotation file as flat numpy arrays, and its images. Item i is (uint8 image (3, H, W), target), target
    = {boxes (N, 4) XYXY float32 as annotated, masks (N, H, W) uint8 as pycocotools' annToMask, labels (N,) int64}.
    Why not pycocotools' COCO object (or torchvision's CocoDetection on it): for train2017 (118K images, 860K
    polygons) it is millions of Python objects per process, which every data-loader worker copies page by page as
    it reads (reference counts and the garbage collector write to each object they visit). Here the json's objects
    live only while the index is built; what stays is per image its file name (data.Names), id, size and first
    annotation, per annotation its box, label, crowd flag, and polygons (all coordinates in one float64 array, as
    pycocotools rasterises the json's doubles) or RLE (compressed), and reading writes to none of it (detectron2
    serialises its dataset dicts into numpy buffers for the same reason). The COCO object is built only where
    COCOeval needs it: `.coco`, on first use (rank 0, validation set). The COCO traps: category ids (1..90 with
    gaps) become labels 1..K in sorted order (torchvision wants contiguous labels, 0 = background; `cat_ids[label
    - 1]` maps back); crowd regions stay in the index, out of the targets (they are 'ignore' regions, which only
    COCOeval knows how to use); an image without annotations gets empty targets (a valid negative example)."""

    def __init__(self, d, root, path=None):
        images, anns = d["images"], d["annotations"]
        # Mask R-CNN trains on masks: a detection-only json (boxes, no polygons) is refused before any work
        bare = next((a["id"] for a in anns if "segmentation" not in a), None)
        if bare is not None:
            raise ValueError(f"{path or 'annotations'}: annotation id {bare} has no 'segmentation' (boxes only); "
                             "Mask R-CNN needs instance masks")
        self.root, self.source = root, path or d  # what .coco is built from: the json file, else the dict itself
        self.cat_ids = sorted(c["id"] for c in d["categories"])
        self.classes = [c["name"] for c in sorted(d["categories"], key=lambda c: c["id"])]
        self.names = data.Names.from_list([im["file_name"] for im in images])
        self.ids = np.array([im["id"] for im in images], np.int64)
        self.sizes = np.array([(im["height"], im["width"]) for im in images], np.int64).reshape(-1, 2)  # (H, W)
        # annotations grouped by image, in the json's order within an image (as pycocotools lists them):
        # image k's are rows first[k]:first[k + 1] of the per-annotation arrays
        image_of = positions(self.ids, [a["image_id"] for a in anns], "image_id", path)
        order = np.argsort(image_of, kind="stable")
        self.first = np.searchsorted(image_of[order], np.arange(len(images) + 1))
        anns, image_of = [anns[j] for j in order], image_of[order]
        self.boxes = np.array([a["bbox"] for a in anns], np.float32).reshape(-1, 4)  # XYWH
        self.labels = positions(np.array(self.cat_ids), [a["category_id"] for a in anns], "category_id", path) + 1
        self.crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], bool)
        # segmentations: annotation k's polygons are polys[k]:polys[k + 1], polygon p is coords[ends[p]:ends[p + 1]];
        # or it is RLE number which[k] (-1: polygons), kept compressed (COCO's crowd regions come uncompressed)
        segs = [a["segmentation"] for a in anns]
        polygons = [s if isinstance(s, list) else [] for s in segs]
        self.polys = np.cumsum([0] + [len(p) for p in polygons])
        polygons = [p for ps in polygons for p in ps]
        self.ends = np.cumsum([0] + [len(p) for p in polygons])
        self.coords = np.fromiter(itertools.chain.from_iterable(polygons), np.float64, count=int(self.ends[-1]))
        regions = [k for k, s in enumerate(segs) if isinstance(s, dict)]
        self.which = np.full(len(anns), -1, np.int64)
        self.which[regions] = np.arange(len(regions))
        self.rle = data.Names.from_list([rle_counts(segs[k], *self.sizes[image_of[k]]) for k in regions])

    def __len__(self):
        return len(self.ids)

    def name(self, i):  # name(i) and open(i): data.failure names an unreadable image, and why
        return self.names[i]

    def open(self, i):
        return Image.open(os.path.join(self.root, self.names[i])), None

    def image(self, i):
        """Image i as uint8 (3, H, W) RGB (grayscale and CMYK JPEGs converted)."""
        img, _ = self.open(i)
        with img:
            return v2.functional.pil_to_tensor(data.to_rgb(img))

    def target(self, i):
        H, W = (int(v) for v in self.sizes[i])
        anns = [k for k in range(self.first[i], self.first[i + 1]) if not self.crowd[k]]
        masks = np.zeros((len(anns), H, W), np.uint8)
        for n, k in enumerate(anns):
            polygons = [self.coords[self.ends[p]:self.ends[p + 1]].tolist()
                        for p in range(self.polys[k], self.polys[k + 1])]
            if self.which[k] >= 0:
                masks[n] = mask_util.decode(dict(size=[H, W], counts=self.rle[self.which[k]].encode()))
            elif polygons:  # as annToMask; no segmentation at all leaves the mask empty (the jitter drops it)
                masks[n] = mask_util.decode(mask_util.merge(mask_util.frPyObjects(polygons, H, W)))
        anns = np.array(anns, np.int64)
        boxes = self.boxes[anns].copy()
        boxes[:, 2:] += boxes[:, :2]  # XYWH -> XYXY
        return dict(boxes=torch.from_numpy(boxes), masks=torch.from_numpy(masks),
                    labels=torch.from_numpy(self.labels[anns]))

    def __getitem__(self, i):
        image, target = self.image(i), self.target(i)
        if image.shape[1:] != target["masks"].shape[1:]:
            raise ValueError(f"{self.names[i]} is {image.shape[2]} x {image.shape[1]}, "
                             f"its annotations {target['masks'].shape[2]} x {target['masks'].shape[1]}")
        return image, target

    @functools.cached_property
    def coco(self):
        """pycocotools' COCO object of the same annotations, for COCOeval (built on first use)."""
        if isinstance(self.source, dict):
            return coco_from_dict(self.source)
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            return COCO(self.source)


def positions(keys, values, what, path):
    """The position in `keys` of each value (ids -> rows); a value not among them is an error naming it."""
    keys, values = np.asarray(keys, np.int64), np.asarray(values, np.int64)
    order = np.argsort(keys)
    at = (order[np.searchsorted(keys, values, sorter=order).clip(max=len(keys) - 1)] if len(keys)
          else np.zeros(0, np.int64))
    wrong = values[keys[at] != values] if len(keys) else values
    if len(wrong):
        raise ValueError(f"{path or 'annotations'}: an annotation's {what} {wrong[0]} is not in the json's list")
    return at


def rle_counts(segmentation, h, w):
    """An RLE segmentation's compressed counts, str (pycocotools compresses an uncompressed one)."""
    counts = (mask_util.frPyObjects(segmentation, h, w)["counts"] if isinstance(segmentation["counts"], list)
              else segmentation["counts"])
    return counts.decode() if isinstance(counts, bytes) else counts


class SyntheticCoco(CocoIndex):
    """synthetic.SyntheticImages as a COCO dataset held in memory: the main shape and every copy of the small shapes
    of the background pattern are each image's instances (category id = class + 1, an RLE mask of the visible
    pixels, its box; a small plain shape of kind k has the class of the plain main shape of that kind), so
    training and evaluation below treat it exactly like COCO. Only the image loading differs."""

    def __init__(self, images: synthetic.SyntheticImages):
        anns = []
        for i in range(len(images)):
            for cls, m in images.scene(i)[2]:  # never an empty mask: data.py leaves hidden copies out
                rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
                anns.append(dict(id=len(anns) + 1, image_id=i, category_id=cls + 1, iscrowd=0,
                                 area=float(mask_util.area(rle)), bbox=mask_util.toBbox(rle).tolist(),
                                 segmentation=dict(size=rle["size"], counts=rle["counts"].decode())))
        S = synthetic.SIZE
        super().__init__(dict(images=[dict(id=i, width=S, height=S, file_name=str(i)) for i in range(len(images))],
                              annotations=anns,
                              categories=[dict(id=k + 1, name=c) for k, c in enumerate(images.classes)]), root="")
        self.images = images

    def open(self, i):
        return self.images.scene(i)[0], None


def coco_from_dict(dataset):
    """A pycocotools COCO object from an in-memory annotation dict (quietly: pycocotools prints progress)."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def open_coco(path, split):
    """--data -> the CocoIndex of `split` (train or val): a COCO folder as released, or 'synthetic[:N]' (N
    training images, 500 validation images)."""
    if path == "synthetic" or path.startswith("synthetic:"):
        return SyntheticCoco(data.open_dataset(path, split))
    ann, images = os.path.join(path, "annotations", f"instances_{split}2017.json"), os.path.join(path, f"{split}2017")
    if not (os.path.isfile(ann) and os.path.isdir(images)):
        raise FileNotFoundError(f"--data {path}: no annotations/instances_{split}2017.json and {split}2017/ "
                                "(want COCO as released, or 'synthetic[:N]')")
    # json.load makes millions of lists and dicts, which the garbage collector would go through again and again as
    # they pile up, slowing the load of train2017; they hold no cycles, so nothing is missed
    enabled = gc.isenabled()
    gc.disable()
    try:
        with open(ann, encoding="utf-8") as f:  # text: json.load of bytes would hold the file twice (bytes, str)
            return CocoIndex(json.load(f), images, ann)  # the json's objects are freed on return
    finally:
        if enabled:
            gc.enable()


def training_set(path):
    """The training images of --data, indexable: len() and items (image, target) as CocoIndex (what the training
    stream reads; docs/detection.md)."""
    return open_coco(path, "train")


def jitter(image, target, size, scale, offset, flip):
    """Large-scale jitter (Ghiasi et al. 2021) of one image, its random draws given: `flip` it; resize by `scale` x
    the factor that fits it in the size x size square (bilinear, antialiased; rounded as detectron2's ResizeScale);
    where larger than the square, crop at `offset` (fractions of the room in y, x); where smaller, pad bottom-right
    with the mean colour (it normalises to 0, as evaluation's padding), as detectron2's FixedSizeCrop. Then each
    box is recomputed from its cropped mask (detectron2's recompute_boxes, mmdetection's
    RandomCrop(recompute_bbox=True)): a box clamped to the crop keeps the width of an L-shaped object cut to its
    vertical bar. An instance whose mask is empty (cropped away, too small, degenerate in the annotations) is
    dropped (mmdetection's FilterAnnotations). Returns (uint8 (3, size, size), {boxes (N', 4) XYXY float32,
    mask_bits (N', size, ceil(size / 8)), labels (N',)})."""
    masks = target["masks"]  # (N, H, W) uint8
    if flip:
        image, masks = image.flip(-1), masks.flip(-1)
    H, W = image.shape[1:]
    r = float(scale) * size / max(H, W)
    h, w = max(1, round(H * r)), max(1, round(W * r))
    y0, x0 = (round(float(f) * max(n - size, 0)) for f, n in zip(offset, (h, w)))
    image = v2.functional.resize(image, [h, w], antialias=True)[:, y0:y0 + size, x0:x0 + size]
    # masks: nearest neighbour, sampled only at the crop's pixels: crop pixel (i, j) is resized pixel (y0 + i, x0 + j),
    # whose centre lies over source pixel ((y0 + i + 0.5) H / h, (x0 + j + 0.5) W / w); no (N, h, w) tensor is made
    rows = ((torch.arange(y0, y0 + image.shape[1]) + 0.5) * H / h).long().clamp(max=H - 1)
    cols = ((torch.arange(x0, x0 + image.shape[2]) + 0.5) * W / w).long().clamp(max=W - 1)
    masks = masks[:, rows[:, None], cols]  # (N, h', w'), h', w' <= size
    boxes = mask_boxes(masks)
    keep = boxes[:, 2] > boxes[:, 0]  # a non-empty mask
    out = torch.tensor(data.FILL, dtype=torch.uint8).view(3, 1, 1).repeat(1, size, size)
    out[:, :image.shape[1], :image.shape[2]] = image
    bits = np.zeros((int(keep.sum()), size, (size + 7) // 8), np.uint8)  # the padding is 0s
    packed = np.packbits(masks[keep].numpy(), axis=-1)  # (N', h', ceil(w' / 8)); unpack_masks undoes it
    bits[:, :packed.shape[1], :packed.shape[2]] = packed
    return out, dict(boxes=boxes[keep], mask_bits=torch.from_numpy(bits), labels=target["labels"][keep])


def mask_boxes(masks):
    """(N, H, W) masks -> (N, 4) XYXY float32 boxes tight around each mask's pixels (pixel (y, x) spans [x, x + 1) x
    [y, y + 1)), as detectron2's BitMasks.get_bounding_boxes; an empty mask gets (0, 0, 0, 0)."""
    cols, rows = masks.any(1).bool(), masks.any(2).bool()  # (N, W), (N, H): the columns and rows the mask touches
    x, y = torch.arange(cols.shape[1]), torch.arange(rows.shape[1])
    boxes = torch.stack([torch.where(cols, x, cols.shape[1]).amin(1), torch.where(rows, y, rows.shape[1]).amin(1),
                         torch.where(cols, x + 1, 0).amax(1), torch.where(rows, y + 1, 0).amax(1)], 1)
    return boxes.float() * cols.any(1, keepdim=True)


def unpack_masks(bits, width):
    """(N, H, ceil(W / 8)) uint8 of np.packbits (first pixel in the high bit) -> (N, H, W) uint8 0/1, on bits' device:
    the training process unpacks what the workers packed (8x less shared memory per item: a bit per pixel, not
    a byte)."""
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=bits.device)
    return (bits[..., None] >> shifts & 1).flatten(-2)[..., :width]


class LargeScaleJitter:
    """jitter with its random draws (torch's generator, which PairStream seeds by stream position): a flip with
    probability 0.5, a scale uniform in `scale_range` (LSJ: 0.1-2.0), crop offsets uniform (independent in y and x,
    as torchvision's and mmdetection's RandomCrop; detectron2 draws one fraction for both)."""

    def __init__(self, size, scale_range):
        self.size, self.scale_range = size, scale_range

    def __call__(self, image, target):
        lo, hi = self.scale_range
        flip, scale, offset = bool(torch.rand(()) < 0.5), lo + (hi - lo) * float(torch.rand(())), torch.rand(2).tolist()
        return jitter(image, target, self.size, scale, offset, flip)


class PairStream(data.TrainStream):
    """data.TrainStream for (image, target) pairs: stream position p is image perm_e[p % n] of pass e = p // n,
    with its jitter, crop and flip seeded by (seed, p), so step s gets the same global batch for any world size
    or accumulation and a resumed run continues exactly; an unreadable image is replaced by the next position's
    (train.loop names and counts it). Items: (uint8 image (3, S, S), target with bit-packed masks, p, files skipped)."""

    def __init__(self, index: CocoIndex, transform, seed):
        super().__init__(index, np.arange(len(index)), transform, seed)

    def __getitem__(self, pos):
        for bad in range(data.MAX_BAD):
            with torch.random.fork_rng(devices=[]):  # the seeding of data.TrainStream
                torch.default_generator.manual_seed(
                    int(np.random.default_rng([self.seed, 1, pos + bad]).integers(2**62)))
                try:
                    image, target = self.transform(*self.dataset[self.index(pos + bad)])
                except data.READ_ERRORS:
                    continue
            return data.Item(image, -1, pos, bad, target=target)
        raise RuntimeError(f"{data.MAX_BAD} unreadable images in a row from stream position {pos}: check --data")


class EvalImages(torch.utils.data.Dataset):
    """Validation images at their original size, uint8 (3, H, W), as data.Items whose pos is the image's
    index in the CocoIndex: the model's transform resizes and pads them, and maps its predictions back to
    this size."""

    def __init__(self, index: CocoIndex, indices):
        self.dataset, self.indices = index, [int(i) for i in indices]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        k = self.indices[i]
        try:
            return data.Item(self.dataset.image(k), -1, k, 0)
        except data.READ_ERRORS:  # left out of the scores and counted (data.scored), never replaced
            return data.Item(torch.zeros(3, 1, 1, dtype=torch.uint8), -1, k, 1)


def collate(items):
    """data.collate for detection: images and targets stay lists (Mask R-CNN takes lists; evaluation images
    differ in size); labels, positions and skipped files (which train.loop reads) become tensors."""
    numbers = lambda field: torch.tensor([getattr(item, field) for item in items])
    targets = [item.target for item in items]
    return data.Item([item.image for item in items], numbers("label"), numbers("pos"), numbers("bad"),
                     target=None if targets[0] is None else targets)


def model_input(images, device):
    """uint8 images -> what torchvision's detectors take: float in [0, 1] on the device (they normalise)."""
    return [x.to(device, non_blocking=True).float().div(255) for x in images]


def model_targets(targets, size, device):
    """The stream's targets -> torchvision's, on the device: masks unpacked to (N, size, size) uint8 there."""
    return [dict(boxes=t["boxes"].to(device, non_blocking=True), labels=t["labels"].to(device, non_blocking=True),
                 masks=unpack_masks(t["mask_bits"].to(device, non_blocking=True), size)) for t in targets]


# -----------------------------------------------------------------------------
# evaluation: COCO AP with pycocotools, gathered over ranks


def coco_results(pred, image_id, cat_ids):
    """One image's predictions (torchvision's output at the original image size) -> COCO result dicts: XYWH
    boxes, the dataset's own category ids, masks thresholded at 0.5 and RLE-encoded."""
    n = len(pred["scores"])
    if n == 0:
        return []
    boxes = box_convert(pred["boxes"].float(), "xyxy", "xywh").tolist()
    masks = (pred["masks"][:, 0] > 0.5).cpu().numpy()  # (N, H, W)
    rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))  # wants (H, W, N)
    return [dict(image_id=int(image_id), category_id=cat_ids[int(label) - 1], bbox=box, score=float(score),
                 segmentation=dict(size=rle["size"], counts=rle["counts"].decode()))
            for box, score, label, rle in zip(boxes, pred["scores"].tolist(), pred["labels"].tolist(), rles)]


AP_NAMES = ("ap", "ap50", "ap75", "aps", "apm", "apl")  # COCOeval.stats[:6]: AP@[.5:.95], @.5, @.75, small/medium/large


def coco_ap(coco_gt, results, image_ids):
    """COCOeval (pycocotools, the reference evaluator) of boxes and masks on image_ids -> {box_ap, box_ap50, ...,
    mask_apl} in percent (None where no ground truth falls in an area range). Crowd annotations are ignore
    regions there. As detectron2, a mask result's area and box come from its mask (loadRes then computes them)."""
    out = {}
    with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints its own table
        for iou_type, name, drop in (("bbox", "box", "segmentation"), ("segm", "mask", "bbox")):
            res = [{k: v for k, v in d.items() if k != drop} for d in results]
            dt = coco_gt.loadRes(res) if res else coco_from_dict(dict(coco_gt.dataset, annotations=[]))
            E = COCOeval(coco_gt, dt, iou_type)
            E.params.imgIds = sorted(image_ids)
            E.evaluate()
            E.accumulate()
            E.summarize()
            out.update({f"{name}_{k}": 100 * float(v) if v >= 0 else None for k, v in zip(AP_NAMES, E.stats[:6])})
    return out


@torch.no_grad()
def evaluate(model, loader, gt: CocoIndex, cat_ids, device):
    """Box and mask AP in percent of the raw (unwrapped) model on the loader's images. Each rank predicts its
    shard (data.shard: every image exactly once), rank 0 gathers the COCO results of all ranks and runs
    COCOeval on gt.coco (built there only), and every rank returns its numbers, the same for any world size."""
    model.eval()
    results, image_ids = [], []
    for batch in loader:
        keep = data.scored(batch, loader.dataset).tolist()  # an unreadable image is left out of COCOeval
        if not any(keep):
            continue
        preds = model(model_input([x for x, k in zip(batch.image, keep) if k], device))
        ids = [int(gt.ids[p]) for p, k in zip(batch.pos.tolist(), keep) if k]  # COCO's image ids
        for pred, image_id in zip(preds, ids):
            results += coco_results(pred, image_id, cat_ids)
        image_ids += ids
    model.train()
    master = not dist.is_initialized() or dist.get_rank() == 0
    if dist.is_initialized():  # to rank 0 only: the other ranks never hold the results of all images
        parts = [None] * dist.get_world_size() if master else None
        dist.gather_object((results, image_ids), parts, dst=0)
        if master:
            results, image_ids = [r for p in parts for r in p[0]], [i for p in parts for i in p[1]]
    metrics = [dict(coco_ap(gt.coco, sorted(results, key=lambda d: d["image_id"]), image_ids), images=len(image_ids))
               if master else None]
    if dist.is_initialized():
        dist.broadcast_object_list(metrics, src=0)
    return metrics[0]


@torch.no_grad()
def save_pictures(path, model, index, indices, names, device, n=4, min_score=0.3, top=3, size=320):
    """The `top` best predictions (class, score, mask, box) with score >= min_score on n validation images, drawn
    by torchvision on each image enlarged so its longer side is `size`, side by side in one PNG."""
    model.eval()
    tiles = []
    for k in indices[:n]:
        image = index.image(int(k))  # (3, H, W) uint8
        pred = model(model_input([image], device))[0]
        # the predictions come sorted by score
        keep = (pred["scores"] >= min_score) & (torch.arange(len(pred["scores"]), device=device) < top)
        boxes = tv_tensors.BoundingBoxes(pred["boxes"][keep].float().cpu(), format="XYXY", canvas_size=image.shape[-2:])
        masks = tv_tensors.Mask(pred["masks"][keep, 0].float().cpu() > 0.5)
        image, boxes, masks = v2.Resize(None, max_size=size)(image, boxes, masks)  # one geometry for all three
        labels = [f"{names[int(c) - 1]} {s:.2f}" for c, s in zip(pred["labels"][keep], pred["scores"][keep])]
        drawn = image
        if keep.any():
            drawn = torchvision.utils.draw_segmentation_masks(drawn, masks.bool(), alpha=0.5)
            drawn = torchvision.utils.draw_bounding_boxes(drawn, boxes, labels, colors="yellow", width=2)
        tiles.append(v2.functional.pad(drawn, [0, 0, size - drawn.shape[2], size - drawn.shape[1]]))
    model.train()
    grid = torchvision.utils.make_grid(tiles, nrow=len(tiles), padding=4)
    train.atomic_write(path, lambda f: f.write(torchvision.io.encode_png(grid).numpy().tobytes()))


# -----------------------------------------------------------------------------
# command line


def get_parser():
    p = train.Parser(prog="detect.py", description="Fine-tune a (SimMIM-pre-trained) SwinV2 for COCO detection and "
                                                   "instance segmentation (Mask R-CNN + FPN)")
    g = p.add_argument_group("model")
    g.add_argument("--model", type=train.model_name, default="B",
                   help="SwinV2 size: S, B, L, H, g (the paper's) or nano, tiny; must match the checkpoint")
    g.add_argument("--pretrained", required=True,
                   help="a mim.py run directory, its ckpt.pt, an official SimMIM checkpoint, or 'none' (from scratch)")
    g.add_argument("--allow_unfinished", action="store_true",
                   help="accept a --pretrained run that has not reached its end (no summary.json)")
    g.add_argument("--img_size", type=train.count, default=None,
                   help="side of the square input; default 1024 (LSJ, SimMIM Swin-B Mask R-CNN config; tiny 128)")
    g.add_argument("--window", type=train.count, default=None,
                   help="attention window; default 16 (SwinV2 paper's detection window; tiny 4)")
    g.add_argument("--drop_path", type=train.number(float, 0, 1, hi_open=True), default=None,
                   help="stochastic depth rate; default 0.2 (SimMIM Swin-B Mask R-CNN config; tiny 0.1)")
    g.add_argument("--fpn_channels", type=train.count, default=None,
                   help="FPN width C (box head fc 4C, its convs and the mask head C); default 256 (FPN paper, "
                        "torchvision; tiny 32)")
    g.add_argument("--heads", default="gn", choices=["gn", "plain"],
                   help="default gn: torchvision's maskrcnn_resnet50_fpn_v2 heads (2-conv RPN, 4conv-1fc box, "
                        "4-conv mask) with GroupNorm (32 groups; Wu & He 2018, detectron2's GN Mask R-CNN) in them "
                        "and the FPN, on GPUs and CPUs alike: batch-independent, where mmdetection's LSJ baseline "
                        "needs SyncBN; plain: torchvision's original heads, no normalisation")
    g.add_argument("--rois", type=train.count, default=None,
                   help="RoIs sampled per image for the box head; default 512 (torchvision, detectron2; tiny 64)")
    g.add_argument("--grad_ckpt", action="store_true", help="activation checkpointing per block (for H and g)")
    g = p.add_argument_group("data and augmentation")
    g.add_argument("--data", default="data/coco",
                   help="a COCO folder as released (annotations/instances_{train,val}2017.json, {train,val}2017/) "
                        "or 'synthetic[:N]'")
    g.add_argument("--val_images", type=train.natural, default=0,
                   help="evaluate a fixed subset of this many validation images; 0 = all (COCO: the 5000 of "
                        "val2017)")
    g.add_argument("--jitter", type=train.positive, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="large-scale jitter: scale range relative to fitting the square; default 0.1 2.0 "
                        "(Ghiasi et al. 2021, LSJ; tiny 0.5 1.5)")
    g.add_argument("--workers", type=train.natural, default=None,
                   help="data-loader processes per process; default 8 on CUDA, 0 on CPU")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=train.count, default=None,
                   help="training epochs; default 36 (the 3x schedule of SwinV2/SimMIM detection; tiny 3)")
    g.add_argument("--milestones", type=train.positive, nargs="*", default=None,
                   help="epochs after which the LR drops x0.1; default 27/36 and 33/36 of --epochs (27 33 of the "
                        "3x schedule; tiny 2.5 of 3)")
    g.add_argument("--warmup_iters", type=train.natural, default=None,
                   help="linear warmup steps from 0.001 x the LR; default 1000 (detectron2's default; Swin's "
                        "mmdetection configs use 500; tiny 25), at most a quarter of the run")
    g.add_argument("--batch_size", type=train.count, default=None,
                   help="global batch in images; default 16 (SwinV2 paper appendix; tiny 8)")
    g.add_argument("--micro_batch", type=train.count, default=None,
                   help="images per GPU per forward; default batch_size / world size")
    g.add_argument("--lr", type=train.positive, default=None,
                   help="peak AdamW LR per 16 images, scaled by batch/16; default 1e-4 (SwinV2 paper appendix; "
                        "cpu 2e-3)")
    g.add_argument("--layer_decay", type=train.number(float, 0, 1, lo_open=True), default=None,
                   help="layer-wise LR decay, 1 = off; default 0.9 (SimMIM detection config; tiny 1)")
    g.add_argument("--weight_decay", type=train.non_negative, default=0.05,
                   help="AdamW weight decay (SwinV2 paper appendix: 0.05)")
    g.add_argument("--clip_grad", type=train.non_negative, default=0.0,
                   help="max gradient norm, 0 = no clipping (Swin-Transformer-Object-Detection configs: "
                        "grad_clip None)")
    g.add_argument("--seed", type=train.natural, default=0,
                   help="seed of the new layers, data order, augmentation, RoI sampling, drop path")
    g = p.add_argument_group("run")
    g.add_argument("--out_dir", default=None,
                   help="run directory; default out/det_{task}_{model}_{pretrained run}; resumes if it has ckpt.pt")
    g.add_argument("--eval_every", type=train.natural, default=0,
                   help="epochs between evaluations; 0 = at the end only (detectron2's default)")
    g.add_argument("--log_every", type=train.count, default=None, help="steps between log lines; default 50 (cpu 10)")
    g.add_argument("--save_every", type=train.count, default=None,
                   help="steps between checkpoints; default 1000 (cpu 50)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="autocast dtype; auto = bf16 on CUDA (the recipe), fp32 on CPU")
    g.add_argument("--eval_only", action="store_true", help="evaluate --out_dir's checkpoint, write eval.json")
    g.add_argument("--tensorboard", action=train.TensorBoard,
                   help="also write the log's numbers as TensorBoard events in the run directory (optional package)")
    g.add_argument("--dist_timeout", type=train.count, default=60,
                   help="minutes a process waits for the others (rank 0 evaluating alone) before the run fails; "
                        "default 60")
    return p


# The flags a preset decides: for S..g the COCO recipe (the appendices of the SwinV2 paper, arXiv 2111.09883, and
# of the SimMIM paper, arXiv 2111.09886; detectron2's warmup); for nano and tiny a CPU-minutes recipe on the 96 px
# synthetic images: a 128 px square (the tiny encoder's window 4 tiles 32/16/8/4), a narrower FPN and fewer sampled
# RoIs (a few objects per image), milder jitter, 3 epochs at a higher LR (a single epoch leaves the detections weak).
RECIPES = {
    "paper": dict(img_size=1024, window=16, drop_path=0.2, fpn_channels=256, rois=512, jitter=(0.1, 2.0), epochs=36,
                  milestones=(27, 33), warmup_iters=1000, batch_size=16, lr=1e-4, layer_decay=0.9, log_every=50,
                  save_every=1000),
    "demo": dict(img_size=128, window=4, drop_path=0.1, fpn_channels=32, rois=64, jitter=(0.5, 1.5), epochs=3,
                milestones=(2.5,), warmup_iters=25, batch_size=8, lr=2e-3, layer_decay=1.0, log_every=10,
                save_every=50),
}
# the evaluation subset is a measurement choice, not part of training
FREE = train.FREE | {"allow_unfinished", "val_images"}


def resolve(args, world_size):
    """Check the flags together and derive the run's numbers in one visible place; args is never modified.
    Raises ValueError with a one-line message naming the flag. (Steps per epoch need the data: see steps.)"""
    recipe = RECIPES["paper" if args.model in swinv2.PAPER_SIZES else "demo"]
    r = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in recipe.items()}
    # the recipe's fractions of the run (27/36 and 33/36 of the 3x schedule), whatever --epochs
    if args.milestones is None:
        r["milestones"] = tuple(m * r["epochs"] / recipe["epochs"] for m in recipe["milestones"])
    r["milestones"], r["jitter"] = tuple(r["milestones"]), tuple(r["jitter"])
    r["warmup_default"] = args.warmup_iters is None  # capped to the run's length in steps()
    if list(r["milestones"]) != sorted(r["milestones"]) or not all(m <= r["epochs"] for m in r["milestones"]):
        raise ValueError(f"--milestones {' '.join(f'{m:g}' for m in r['milestones'])} must be increasing epochs "
                         f"in (0, {r['epochs']}] (--epochs)")
    if r["jitter"][0] > r["jitter"][1]:
        raise ValueError(f"--jitter {r['jitter'][0]:g} {r['jitter'][1]:g}: MIN is larger than MAX")
    B = r["batch_size"]
    r["micro_batch"], r["accum"] = train.batch_split(B, args.micro_batch, world_size)
    r["peak_lr"] = r["lr"] * B / 16  # linear scaling rule; the detection recipes give the LR at batch 16
    r["task"] = "synthetic" if args.data == "synthetic" or args.data.startswith("synthetic:") else "coco"
    r["out_dir"] = args.out_dir or f"out/det_{r['task']}_{args.model}_{finetune.pretrained_name(args.pretrained)}"
    train.check_out_dir(r["out_dir"])
    try:  # checks that the windows tile every stage's map of the square input
        swinv2.SwinV2Config(**dict(swinv2.PRESETS[args.model], img_size=r["img_size"], window_size=r["window"]))
    except ValueError as e:
        raise ValueError(f"--img_size {r['img_size']} / --window {r['window']}: {e}") from None
    r.update(clip_grad=args.clip_grad, seed=args.seed)
    return r


def steps(r, n_train, eval_every):
    """Epochs become steps on data.py's stream (n_train // batch per epoch); evaluation every `eval_every`
    epochs, or only at the end (0)."""
    if r["batch_size"] > n_train:
        raise ValueError(f"--batch_size {r['batch_size']} is larger than the {n_train} training images")
    spe = n_train // r["batch_size"]
    r.update(epoch_steps=spe, iters=r["epochs"] * spe)
    r["eval_every"] = eval_every * spe or r["iters"]
    if r.pop("warmup_default"):  # a short run needs no restated schedule: at most a quarter of it warms up
        r["warmup_iters"] = min(r["warmup_iters"], r["iters"] // 4)
    elif r["warmup_iters"] >= r["iters"]:
        raise ValueError(f"--warmup_iters {r['warmup_iters']} must be shorter than the run's {r['iters']} steps "
                         f"(--epochs {r['epochs']})")
    return r


def get_lr(step, r):
    """LR of step `step` (the 3x schedule): linear warmup from 0.001 x peak over warmup_iters (detectron2's
    default), then the peak, x0.1 after each milestone epoch."""
    if step < r["warmup_iters"]:
        return r["peak_lr"] * (0.001 + 0.999 * step / r["warmup_iters"])
    return r["peak_lr"] * 0.1 ** sum(step >= m * r["epoch_steps"] for m in r["milestones"])

# -----------------------------------------------------------------------------
# the script


def eval_only(run, model, K, val_loader, val_set, cat_ids, classes, val_idx, device, model_name, epoch_steps, master):
    """--eval_only: box and mask AP of the run directory's checkpoint, written to eval.json. A measurement:
    no lock is taken and nothing else is written but its picture."""
    ckpt = train.load_for_eval(run.ckpt, model, model.backbone.encoder, model_name, master, classes=K)
    metrics = coco_eval(ckpt["step"], model, val_loader, val_set, cat_ids, classes, val_idx, run, device, master)
    metrics = dict(epoch=ckpt["step"] / epoch_steps, **metrics)
    if master:
        train.save_json(run.file("eval.json"), dict(step=ckpt["step"], **metrics))
        print0(f"-> {run.file('eval.json')}")
    return metrics


def coco_eval(step, model, val_loader, val_set, cat_ids, classes, val_idx, run, device, master):
    """An evaluation (every rank): COCO AP, printed and drawn by rank 0."""
    metrics = evaluate(model, val_loader, val_set, cat_ids, device)
    if master:
        pct = lambda v: "n/a (no objects)" if v is None else f"{v:.2f}"  # COCOeval's -1: no ground truth to score
        tqdm.write(f"step {step}: box AP {pct(metrics['box_ap'])}, mask AP {pct(metrics['mask_ap'])} "
                   f"on {metrics['images']} images")
        save_pictures(run.file(f"pred_{step:07d}.png"), model, val_set, val_idx, classes, device)
    return metrics


def main(argv=None):
    # ---- flags, checkpoint, data: every bad flag, path or file is refused in one line, before any work
    args = get_parser().parse_args(argv)
    train.warn_cpu(args.model)
    try:
        r = resolve(args, int(os.environ.get("WORLD_SIZE", 1)))
        ckpt, pretrained = finetune.read_pretrained(args.pretrained, args.allow_unfinished)
        train_set, val_set = training_set(args.data), open_coco(args.data, "val")
        if val_set.cat_ids != train_set.cat_ids:
            raise ValueError(f"--data {args.data}: the validation categories are not the training categories")
        steps(r, len(train_set), args.eval_every)
        for dataset, split in ((train_set, "training"), (val_set, "validation")):
            data.check_readable(dataset, range(len(dataset)), f"--data {args.data} ({split})")
        model, missing = build_model(args, r, ckpt, len(train_set.cat_ids))
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    del ckpt  # the encoder is in the model now
    K, N, B, p = len(train_set.cat_ids), len(train_set), r["batch_size"], pretrained
    # fixed evaluation images (sharded over ranks below); the training stream, jittered per stream position
    val_idx = np.arange(len(val_set))
    if 0 < args.val_images < len(val_set):
        val_idx = np.sort(np.random.default_rng(0).permutation(len(val_set))[:args.val_images])
    stream = PairStream(train_set, LargeScaleJitter(r["img_size"], r["jitter"]), args.seed)

    # ---- processes and the run directory (let go however this block ends)
    with train.session(r["out_dir"], args.dist_timeout, args.tensorboard) as (run, device, rank, world):
        master = rank == 0
        dtype, ctx, workers = train.device_setup(device, args.dtype, args.workers)
        print0(f"{'model':>14} Mask R-CNN + FPN ({r['fpn_channels']} ch) on SwinV2-{args.model}, {r['img_size']} px "
               f"square, windows {model.cfg.window_sizes} over pre-trained {model.cfg.pretrained_window_sizes}, "
               f"{K} classes")
        finetune.print_pretrained(p, missing)
        print0(f"{'global batch':>14} {B} = {r['micro_batch']} per process x {world} processes x "
               f"{r['accum']} accumulation")
        print0(f"{'schedule':>14} {r['epochs']} epochs x {r['epoch_steps']} steps ({N} images, task {r['task']}) = "
               f"{r['iters']} steps, x0.1 after epochs {', '.join(f'{m:.3g}' for m in r['milestones'])}; "
               f"jitter {r['jitter'][0]:g}-{r['jitter'][1]:g}")
        print0(f"{'LR':>14} {r['lr']:g} per 16 -> peak {r['peak_lr']:.3g} x layer scale (decay {r['layer_decay']}), "
               f"warmup {r['warmup_iters']} steps from 0.001x")
        val_loader = data.make_loader(EvalImages(val_set, val_idx), r["micro_batch"], workers=workers,
                                      sampler=data.shard(len(val_idx), rank, world), collate_fn=collate)

        # ---- model and optimizer: layer-wise decay over the encoder, the full LR for everything new
        model = raw_model = model.to(device)
        raw_model.backbone.autocast = ctx  # mixed precision in the encoder and FPN only (SwinFPN.forward)
        optimizer = train.adamw(finetune.param_groups(model, args.weight_decay, r["layer_decay"]), r["peak_lr"])
        print0(f"{'parameters':>14} {sum(p.numel() for p in raw_model.backbone.encoder.parameters()) / 1e6:.1f}M "
               f"encoder, {sum(p.numel() for p in raw_model.parameters()) / 1e6:.1f}M in all")
        if args.eval_only:
            return eval_only(run, raw_model, K, val_loader, val_set, train_set.cat_ids, train_set.classes, val_idx,
                             device, args.model, r["epoch_steps"], master)

        # ---- the run directory: lock, resume (another run's checkpoint is refused)
        origin = f"{os.path.basename(p['run_dir'] or p['path'] or 'none')} step {p['step']}"  # what it starts from
        identity = train.identity_of(args, r, FREE, pretrained=origin, data_train_images=N, data_classes=K,
                                     dtype=str(dtype))
        state, done = run.start(identity, raw_model, optimizer, master, r["iters"])
        if done:
            return done["coco_eval"]
        if master:
            train.save_json(run.file("args.json"), dict(vars(args), identity=identity, pretrained=pretrained,
                                                        world_size=world, micro_batch=r["micro_batch"],
                                                        accum=r["accum"], task=r["task"],
                                                        steps_per_epoch=r["epoch_steps"],
                                                        iters=r["iters"], classes=train_set.classes,
                                                        torch=str(torch.__version__)))

        # ---- the loop: train.loop runs the steps; the five Mask R-CNN losses are the terms of each log row
        sampler = data.StreamSampler(B, r["micro_batch"], rank, world, state["step"])
        batches = iter(data.make_loader(stream, r["micro_batch"], sampler=sampler, workers=workers, collate_fn=collate))
        if world > 1:
            model = train.ddp(model, device)

        def loss_fn(batch):
            images, targets = model_input(batch.image, device), model_targets(batch.target, r["img_size"], device)
            losses = model(images, targets)  # RoI sampling is seeded by the loop, per micro-batch; bf16 in the backbone
            return sum(losses.values()), losses

        def evaluate_at(step):
            metrics = coco_eval(step, raw_model, val_loader, val_set, train_set.cat_ids, train_set.classes, val_idx,
                                run, device, master)
            return dict(epoch=step / r["epoch_steps"], **metrics)

        keep = dict(identity=identity, args=vars(args), pretrained=pretrained,
                    model_config=swinv2.model_config(raw_model.backbone.encoder))
        train.loop(run, r, state, device, model=model, raw_model=raw_model, optimizer=optimizer, stream=stream,
                   batches=batches, loss_fn=loss_fn, lr_at=lambda step, scale: scale * get_lr(step, r),
                   evaluate=evaluate_at, keep=keep)

        # ---- the summary, from the log: the last evaluation (detection reports the final model)
        if not master:
            return {}
        evals = [row for _, row in run.rows() if "box_ap" in row]
        coco = {k: evals[-1][k] for k in evals[-1] if k.startswith(("box_", "mask_"))}
        summary = dict(kind="detect", task=r["task"], model=args.model, epochs=r["epochs"], data=args.data,
                       pretrained=pretrained, metrics=dict(box_ap=coco["box_ap"], mask_ap=coco["mask_ap"]),
                       coco_eval=coco, val_images=evals[-1]["images"],
                       val_unreadable=len(val_idx) - evals[-1]["images"], **run.counters())
        run.finish(summary)
        return coco


if __name__ == "__main__":
    main()
