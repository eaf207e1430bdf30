"""
The demo's images: a procedurally drawn set in which data scale matters, so that the CPU demo, the
tests and the paper in miniature run without ImageNet (`--data synthetic` in every script).

Each image is a main shape (its class: 5 kinds, plain or striped) in front of a background pattern:
a few small shapes drawn in one part of the image and copied to the rest by one of 11 symmetries. A
masked part of the pattern can be predicted from its copy, a rule that holds in every image: 2000
images teach it, 20 images get memorised, which is the paper's question (arXiv 2206.04664, sec. 4) in
miniature. Images are a pure function of (split, index); scene(i) also returns every object's mask,
which detect.py and segment.py read as instances and per-pixel labels.

    python -c "import synthetic; synthetic.SyntheticImages('val', 4).open(0)[0].save('synthetic0.png')"
"""
import math

import numpy as np
from PIL import Image

import data

TRAIN_IMAGES, VAL_IMAGES, SIZE = 2000, 500, 96  # --data synthetic; synthetic:N has N training images

SHAPES = ("disc", "square", "triangle", "ring", "cross")
# Drawn in float32 with colours on the first axis, (3, S, S): numpy is slow on a trailing axis of 3.
_Y, _X = np.mgrid[:SIZE, :SIZE].astype(np.float32)  # (S, S) pixel coordinates


def _project(angle):
    """(S, S): pixel coordinates projected on the direction `angle` (math.cos keeps float32)."""
    return _X * math.cos(angle) + _Y * math.sin(angle)


def _shape_mask(kind, cx, cy, r, rot):
    """(S, S) bool mask of one shape of radius r centred at (cx, cy), rotated by rot."""
    dx, dy = _X - cx, _Y - cy
    if kind in (0, 3):  # disc, ring
        d2 = dx * dx + dy * dy
        return (d2 < r * r) & (d2 > (0.55 * r) ** 2 if kind == 3 else True)
    if kind == 2:  # equilateral triangle: inside three half-planes at 120 degrees
        return np.all([dx * math.cos(rot + a) + dy * math.sin(rot + a) < r / 2 for a in (0, 2.09, 4.19)], axis=0)
    c, s = math.cos(rot), math.sin(rot)
    u, v = abs(dx * c + dy * s), abs(dy * c - dx * s)  # coordinates in the shape's rotated frame
    if kind == 1:
        return np.maximum(u, v) < 0.8 * r
    return ((u < 0.3 * r) & (v < r)) | ((v < 0.3 * r) & (u < r))  # cross


def _stripes(rng, period_lo, period_hi):
    """(S, S) float32 in [-1, 1]: a sinusoidal grating of random angle, period and phase."""
    angle, period, phase = rng.uniform(0, math.pi), rng.uniform(period_lo, period_hi), rng.uniform(0, 6.3)
    return np.sin(_project(angle) * (2 * math.pi / period) + phase)


# The background's pattern: a few small shapes drawn in one part of the image (the fundamental domain)
# and copied to the rest by one of these symmetries. A masked part of the pattern can be predicted
# from its copy elsewhere, a rule that holds in every image; a model that has seen few images memorises
# them instead, and that does not carry to new images. This is what makes data scale matter here
# (the paper in miniature, docs/miniature.md, measures it).
SYMMETRIES = ("none", "mirror-lr", "mirror-ud", "mirror-both", "rot180", "rot90", "shift-x", "shift-y", "tile",
              "mirror-diag", "mirror-antidiag")


def _symmetry_map(name):
    """(sy, sx, copy), three (S, S) int arrays: pixel (y, x) of the pattern shows pixel (sy, sx) of the
    fundamental domain, as copy number `copy` (0..3) of what is drawn there."""
    S, h = SIZE, SIZE // 2
    y, x = np.mgrid[:S, :S]
    sy, sx, copy = y, x, np.zeros((S, S), np.int64)
    if name in ("mirror-lr", "mirror-both"):
        sx, copy = np.where(x >= h, S - 1 - x, x), copy + (x >= h)
    if name in ("mirror-ud", "mirror-both"):
        sy, copy = np.where(y >= h, S - 1 - y, y), copy + 2 * (y >= h)
    if name == "rot180":
        r = y >= h
        sy, sx, copy = np.where(r, S - 1 - y, y), np.where(r, S - 1 - x, x), r.astype(np.int64)
    if name == "rot90":  # turn each quadrant by 90 degrees about the centre until it is the top-left one
        for _ in range(3):
            r = (sy >= h) | (sx >= h)
            sy, sx, copy = np.where(r, sx, sy), np.where(r, S - 1 - sy, sx), copy + r
    if name == "shift-x":
        sx, copy = x % h, x // h
    if name == "shift-y":
        sy, copy = y % h, y // h
    if name == "tile":
        sy, sx, copy = y % h, x % h, 2 * (y // h) + x // h
    if name == "mirror-diag":
        r = y > x
        sy, sx, copy = np.where(r, x, y), np.where(r, y, x), r.astype(np.int64)
    if name == "mirror-antidiag":
        r = y + x > S - 1
        sy, sx, copy = np.where(r, S - 1 - x, y), np.where(r, S - 1 - y, x), r.astype(np.int64)
    return sy, sx, copy


_SYMMETRY_MAPS = [_symmetry_map(name) for name in SYMMETRIES]  # 11 x 3 x (S, S): 2.4 MB, built once


class SyntheticImages:
    """A procedurally drawn image set, deterministic by (split, index). Class i % 10 is the main shape:
    one of 5 kinds, filled plain or striped, of random colour, size, position and rotation. Behind it,
    on a colour gradient, a pattern of 3-5 small plain shapes (any kind and colour) repeated by one of
    the SYMMETRIES (twice as many shapes, placed freely, for 'none'): the part of the image that needs
    many images to learn, where the class needs few."""
    classes = [f"{s}-{t}" for t in ("plain", "striped") for s in SHAPES]

    def __init__(self, split="train", n=TRAIN_IMAGES):
        self.split, self.names = split, data.Names.from_list([str(i) for i in range(n)])
        self.targets = np.arange(n, dtype=np.int64) % len(self.classes)

    def __len__(self):
        return len(self.names)

    def name(self, i):
        return str(i)

    def open(self, i):
        img, label, _ = self.scene(i)
        return img, label

    def scene(self, i):
        """(PIL image, class label, objects): objects lists (class, (S, S) bool mask of its visible pixels)
        for the main shape and for each copy of each small shape (a plain shape of kind k: class k), the
        instances and per-pixel labels of detect.py and segment.py. A copy hidden behind the main shape is left out."""
        S, label = SIZE, int(self.targets[i])
        # train and val draw from different seed sequences, so the splits never share an image
        rng = np.random.default_rng([("train", "val").index(self.split), i])
        c0, c1 = rng.uniform(0, 1, (2, 3, 1, 1)).astype(np.float32)  # two (3, 1, 1) background colours
        img = c0 + (c1 - c0) * (_project(rng.uniform(0, 6.3)) / (2 * S) + 0.5)  # (3, S, S) gradient
        symmetry = int(rng.integers(len(SYMMETRIES)))
        sy, sx, copy = _SYMMETRY_MAPS[symmetry]
        n = int(rng.integers(3, 6)) * (2 if SYMMETRIES[symmetry] == "none" else 1)
        pattern, owner, kinds = np.zeros((3, S, S), np.float32), np.full((S, S), -1), rng.integers(5, size=n)
        for j in range(n):
            y, x = rng.uniform(0, S, 2)
            # the source of a uniform random pixel: a centre spread evenly over the domain, whatever its shape
            cy, cx = sy[int(y), int(x)] + y % 1, sx[int(y), int(x)] + x % 1
            m = _shape_mask(int(kinds[j]), cx, cy, rng.uniform(4, 9), rng.uniform(0, 6.3))
            pattern = np.where(m, rng.uniform(0, 1, (3, 1, 1)).astype(np.float32), pattern)
            owner[m] = j  # later shapes cover earlier ones
        pattern, owner = pattern[:, sy, sx], owner[sy, sx]  # the domain copied by the symmetry: (3, S, S), (S, S)
        img = np.where(owner >= 0, pattern, img)
        fg = rng.uniform(0, 1, (3, 1, 1)).astype(np.float32)
        fill = fg if label < 5 else np.where(_stripes(rng, 4, 9) > 0, fg, 0.25 * fg)
        r = rng.uniform(0.18, 0.3) * S
        cx, cy, rot = rng.uniform(r, S - r), rng.uniform(r, S - r), rng.uniform(0, 6.3)
        main = _shape_mask(label % 5, cx, cy, r, rot)
        img = np.where(main, fill, img)  # (3, S, S)
        # faint sensor-like noise: the locally normalised SimMIM target amplifies noise in flat regions,
        # and unpredictable noise would dominate the loss
        img += rng.uniform(0.0, 0.03) * (rng.random((S, S), dtype=np.float32) - 0.5)
        objects = [(label, main)] + [(int(kinds[j]), m) for j in range(n) for c in range(4)
                                     if (m := (owner == j) & (copy == c) & ~main).any()]
        return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0), "RGB"), label, objects


