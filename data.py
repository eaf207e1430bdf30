"""Data for the data-scaling study (Xie et al., arXiv 2206.04664): from image files to batches.

The paper pre-trains for a fixed number of *iterations* on random 10/20/50/100 % subsets of
ImageNet-1K and on ImageNet-22K. Three ideas make such runs comparable and resumable:
  1. a subset is the first round(frac*N) entries of one permutation drawn from a seed, so 10 % is
     inside 20 % is inside 50 %; it is written as a manifest (subset.txt) with a short hash;
  2. training reads an endless stream: position p is image perm_e[p % n] of pass e = p // n, with
     its augmentation seeded by (seed, p), so step s gets the same global batch for any world size,
     accumulation or worker count, and a restart at step s continues exactly;
  3. decoding is robust (any mode -> RGB; a broken file is logged, counted, replaced) and fast (a
     JPEG is decoded at 1/2..1/8 scale when the random crop allows it).
`open_dataset("synthetic")` is a built-in procedural image set: no ImageNet needed for the demo and tests.
mim.py (read it next) calls open_dataset -> subset_indices -> TrainStream + StreamSampler -> make_loader.
"""
import functools
import hashlib
import math
import os
import signal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
SYNTHETIC_TRAIN, SYNTHETIC_VAL, SYNTHETIC_SIZE = 2000, 500, 96
MAX_BAD = 100  # this many unreadable files in a row means the data path is broken, not one file

# ----------------------------------------------------------------------------- datasets
# Every dataset has __len__, .classes, .names (one str per image, used by manifests), .targets,
# and .open(i) -> (PIL image, label). Files are opened lazily: header read, pixels not yet decoded.

class ImageFiles:
    """Images at root/names[i] with integer labels; built by scanning class folders or from a file list."""
    def __init__(self, root, names, targets, classes):
        self.root, self.names, self.targets, self.classes = root, names, np.asarray(targets, np.int64), classes

    def __len__(self):
        return len(self.names)

    def open(self, i):
        return Image.open(os.path.join(self.root, self.names[i])), int(self.targets[i])


def scan_folder(root):
    """ImageFolder layout: root/<class>/**/<image>; classes sorted by name get labels 0, 1, ..."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    names, targets = [], []
    for label, c in enumerate(classes):
        for d, subdirs, files in os.walk(os.path.join(root, c), followlinks=True):
            subdirs.sort()  # os.walk order is file-system dependent; the manifest must not be
            names += [os.path.relpath(os.path.join(d, f), root) for f in sorted(files) if f.lower().endswith(IMG_EXTS)]
            targets += [label] * (len(names) - len(targets))
    return ImageFiles(root, names, targets, classes)


def read_file_list(path):
    """Lines 'relative/path label' (paths relative to the list's folder): ImageNet-22K's usual format,
    because scanning 14M files on every start takes longer than reading one text file."""
    names, targets = [], []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                parts = line.strip().rsplit(maxsplit=1)  # rsplit: a path may contain spaces, a label cannot
                if len(parts) != 2 or not parts[1].isdigit():
                    raise ValueError(f"{path}:{n}: expected 'relative/path label', got {line.strip()!r}")
                names.append(parts[0])
                targets.append(int(parts[1]))
    classes = [str(k) for k in range(max(targets, default=-1) + 1)]
    return ImageFiles(os.path.dirname(os.path.abspath(path)), names, targets, classes)


SHAPES = ("disc", "square", "triangle", "ring", "cross")
# Drawn in float32 with colours on the first axis, (3, S, S): numpy is slow on a trailing axis of 3.
_Y, _X = np.mgrid[:SYNTHETIC_SIZE, :SYNTHETIC_SIZE].astype(np.float32)  # (S, S) pixel coordinates


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


class SyntheticImages:
    """A procedurally drawn image set, deterministic by (split, index). Class i % 10 is one of 5 shape
    kinds, filled plain or striped; colours, position, size, rotation, a distracting small shape and a
    gradient + grating + noise background are random, so the class is learnable but not given away."""
    classes = [f"{s}-{t}" for t in ("plain", "striped") for s in SHAPES]

    def __init__(self, split="train", n=SYNTHETIC_TRAIN):
        self.split, self.names = split, [str(i) for i in range(n)]
        self.targets = np.arange(n, dtype=np.int64) % len(self.classes)

    def __len__(self):
        return len(self.names)

    def open(self, i):
        img, label, _ = self.scene(i)
        return img, label

    def scene(self, i):
        """(PIL image, class label, objects): objects lists (class, (S, S) bool mask of its visible pixels)
        for the main shape and the small distracting one (a plain shape of a random kind, class = kind),
        the instances and per-pixel labels of detect.py and segment.py."""
        S, label = SYNTHETIC_SIZE, int(self.targets[i])
        # train and val draw from different seed sequences, so the splits never share an image
        rng = np.random.default_rng([("train", "val").index(self.split), i])
        c0, c1 = rng.uniform(0, 1, (2, 3, 1, 1)).astype(np.float32)  # two (3, 1, 1) background colours
        ramp = _project(rng.uniform(0, 6.3)) / (2 * S) + 0.5  # (S, S), about 0..1 across the image
        img = c0 + (c1 - c0) * ramp + 0.1 * _stripes(rng, 8, 40)  # (3, S, S)
        fg = rng.uniform(0, 1, (3, 1, 1)).astype(np.float32)
        if np.abs(fg - (c0 + c1) / 2).max() < 0.35:  # keep the object visible against its background
            fg = 1 - (c0 + c1) / 2
        fill = fg if label < 5 else np.where(_stripes(rng, 4, 9) > 0, fg, 0.25 * fg)
        r = rng.uniform(0.18, 0.34) * S
        cx, cy, rot = rng.uniform(r, S - r), rng.uniform(r, S - r), rng.uniform(0, 6.3)
        main = _shape_mask(label % 5, cx, cy, r, rot)
        img = np.where(main, fill, img)  # (3, S, S)
        cx, cy, small_r, rot = rng.uniform(0, S), rng.uniform(0, S), rng.uniform(4, 8), rng.uniform(0, 6.3)
        kind = int(rng.integers(5))
        small = _shape_mask(kind, cx, cy, small_r, rot)
        img = np.where(small, rng.random((3, 1, 1), np.float32), img)
        # faint sensor-like noise: the locally normalised SimMIM target amplifies noise in flat regions,
        # and unpredictable noise would dominate the loss
        img += rng.uniform(0.0, 0.03) * (rng.random((S, S), dtype=np.float32) - 0.5)
        objects = [(label, main & ~small), (kind, small)]  # the small shape is drawn on top
        return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0), "RGB"), label, objects


def open_dataset(path, split="train"):
    """'synthetic[:N]' | a folder (with a `split` subfolder, or of class folders) | a .txt file list."""
    if path == "synthetic" or path.startswith("synthetic:"):
        n = path.partition(":")[2]
        if split not in ("train", "val") or not (n.isdigit() and int(n) > 0 or n == ""):
            raise ValueError(f"data path {path!r}: use 'synthetic' or 'synthetic:N' with N > 0, split train|val")
        return SyntheticImages(split, SYNTHETIC_VAL if split == "val" else int(n or SYNTHETIC_TRAIN))
    if not (os.path.isdir(path) or path.endswith(".txt") and os.path.isfile(path)):
        raise FileNotFoundError(f"data path {path!r} is not an existing folder, .txt file list or 'synthetic'")
    if os.path.isdir(os.path.join(path, split)):
        path = os.path.join(path, split)
    ds = read_file_list(path) if path.endswith(".txt") else scan_folder(path)
    if len(ds) == 0:
        raise FileNotFoundError(f"no images found in data path {path!r} (want <class>/<image>{IMG_EXTS[0]} "
                                f"folders or 'relative/path label' lines)")
    return ds

# ----------------------------------------------------------------------------- subsets and manifests

def subset_indices(n, frac, seed):
    """The first round(frac*n) entries of one permutation drawn from `seed`, sorted: uniformly random
    (not class-balanced), nested across frac, and independent of rank, world size and global RNGs."""
    if not 0 < frac <= 1:  # also rejects NaN
        raise ValueError(f"--frac must be in (0, 1], got {frac}")
    if round(frac * n) == 0:
        raise ValueError(f"--frac {frac} of a dataset of {n} images selects no image")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[:round(frac * n)]).astype(np.int64)


def subset_hash(names, indices):
    """Short sha1 (10 hex chars) of the selected names in order: logged and saved with checkpoints."""
    return hashlib.sha1("\n".join(names[i] for i in indices).encode()).hexdigest()[:10]


def write_manifest(path, names, indices):
    """Write subset.txt: a '#' header with size and hash, then one name per line. Atomic (tmp + rename),
    so a crash never leaves half a manifest behind. Returns the hash."""
    h = subset_hash(names, indices)
    with open(path + ".tmp", "w") as f:
        f.write(f"# {len(indices)} images, sha1 {h}\n" + "".join(names[i] + "\n" for i in indices))
    os.replace(path + ".tmp", path)
    return h


def read_manifest(path, names):
    """Indices (in file order) of the names listed in a manifest; every name must exist in the dataset."""
    where = {name: i for i, name in enumerate(names)}
    with open(path) as f:
        wanted = [line.rstrip("\n") for line in f if line.strip() and not line.startswith("#")]
    try:
        return np.array([where[w] for w in wanted], dtype=np.int64)
    except KeyError as e:
        raise ValueError(f"manifest {path}: {e.args[0]!r} is not in the dataset") from None

# ----------------------------------------------------------------------------- decoding and transforms

def to_rgb(img):
    """Decode to 3-channel RGB. L, P, CMYK convert as PIL defines; alpha is composited onto the ImageNet
    mean colour, so transparent pixels normalise to ~0 instead of to whatever colour they hide."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        bg = Image.new("RGBA", img.size, tuple(round(255 * m) for m in IMAGENET_MEAN) + (255,))
        return Image.alpha_composite(bg, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")


_normalize = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])  # PIL (H, W) RGB -> (3, H, W) float


class PretrainTransform:
    """SimMIM's augmentation: RandomResizedCrop(scale 0.67-1, ratio 3/4-4/3, bilinear), flip, normalise.
    The crop box is drawn on the undecoded image's size; a JPEG is then decoded at the smallest DCT scale
    (1/2, 1/4, 1/8) that keeps >= img_size pixels on each side of the box, and the box is rescaled, so it
    covers the same region. E.g. a 1000x750 JPEG cropped to 192 decodes at 1/2 scale: 4x fewer pixels."""
    def __init__(self, img_size, draft=True):
        self.img_size, self.draft = img_size, draft

    def __call__(self, img):
        top, left, h, w = T.RandomResizedCrop.get_params(img, [0.67, 1.0], [3 / 4, 4 / 3])  # reads .size only
        W, H = img.size
        f = next((f for f in (8, 4, 2) if min(h, w) >= f * self.img_size), 1)
        reduced = self.draft and img.format == "JPEG" and f > 1 and img.draft("RGB", (W // f, H // f))
        # draft returns (mode, (0, 0, W/s, H/s)): a reduced pixel is s original pixels, exactly s = f here
        scale = reduced[1][2] / W if reduced else 1.0
        box = (left * scale, top * scale, (left + w) * scale, (top + h) * scale)
        img = to_rgb(img).resize((self.img_size, self.img_size), Image.BILINEAR, box=box)
        if torch.rand(1) < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return _normalize(img)


def pretrain_transform(img_size, draft=True):
    return PretrainTransform(img_size, draft)


def val_transform(img_size):
    """Deterministic view for the pre-training validation loss: shorter side to img_size, centre crop."""
    return T.Compose([to_rgb, T.Resize(img_size, T.InterpolationMode.BILINEAR), T.CenterCrop(img_size), _normalize])


def finetune_transform(img_size, train, aug="paper"):
    """The official fine-tuning recipe (aug='paper'). torchvision's RandAugment(2 ops, m9) stands in for
    timm's rand-m9-mstd0.5-inc1, and value='random' makes RandomErasing fill with noise like timm's 'pixel'
    mode. aug='light' (crop 35-100 % and flip) is for short CPU runs on the synthetic set."""
    bicubic = T.InterpolationMode.BICUBIC
    if not train:
        return T.Compose([to_rgb, T.Resize(int(256 / 224 * img_size), bicubic), T.CenterCrop(img_size), _normalize])
    if aug == "light":
        return T.Compose([to_rgb, T.RandomResizedCrop(img_size, (0.35, 1.0), interpolation=bicubic),
                          T.RandomHorizontalFlip(), _normalize])
    return T.Compose([to_rgb, T.RandomResizedCrop(img_size, (0.08, 1.0), interpolation=bicubic),
                      T.RandomHorizontalFlip(), T.RandAugment(2, 9, interpolation=bicubic), _normalize,
                      T.RandomErasing(p=0.25, value="random")])


READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)  # PIL's failures


def load(dataset, i, transform):
    """dataset[i] through transform -> (tensor, label), or None if the file cannot be read or decoded.
    Silent: it runs in a data-loader worker; the training process names the file (see failure)."""
    try:
        img, label = dataset.open(i)
        with img:  # closes the file handle even when decoding fails halfway
            return transform(img), label
    except READ_ERRORS:
        return None


def failure(dataset, i):
    """'path (why)' for an image that load() could not read: the training process's warning."""
    path = os.path.join(getattr(dataset, "root", ""), dataset.names[i])
    try:
        with dataset.open(i)[0] as img:
            img.load()
    except READ_ERRORS as e:
        return f"{path} ({type(e).__name__}: {e})"
    return f"{path} (failed in a transform)"


# ----------------------------------------------------------------------------- training stream and sampler

@functools.lru_cache(maxsize=2)  # a batch may straddle two passes; 14M entries (IN-22K) are 112 MB each
def pass_permutation(seed, e, n):
    """The visiting order of pass e over a subset of n images: (n,) int64, a pure function of (seed, e)."""
    return np.random.default_rng([seed, 0, e]).permutation(n)


class TrainStream(Dataset):
    """Map-style over stream positions p = 0, 1, 2, ... (endless). Position p is subset entry
    perm_e[p % n] of pass e = p // n, with perm_e drawn from (seed, e), and its augmentation is drawn
    from (seed, p): a sample is a pure function of its position, whichever worker or rank loads it.
    An item is (image, label, p, bad, *extra): bad counts the unreadable files skipped to get it, and
    extra(p), if given, is computed in the worker too (mim.py's mask: the training process stays free)."""
    def __init__(self, dataset, indices, transform, seed, extra=None):
        self.dataset, self.indices, self.transform, self.seed = dataset, np.asarray(indices), transform, seed
        self.extra = extra

    def index(self, pos):
        """The dataset index at stream position pos."""
        n = len(self.indices)
        return int(self.indices[pass_permutation(self.seed, pos // n, n)[pos % n]])

    def __getitem__(self, pos):
        # A broken file is replaced by the next position's sample (deterministic); `bad` counts skips
        for bad in range(MAX_BAD):
            # fork_rng restores the CPU RNG afterwards, so with workers=0 the caller's stream is untouched;
            # default_generator (not torch.manual_seed) leaves the CUDA generators alone
            with torch.random.fork_rng(devices=[]):
                seed = np.random.default_rng([self.seed, 1, pos + bad]).integers(2**62)  # (seed, p) -> 62 bits
                torch.default_generator.manual_seed(int(seed))
                out = load(self.dataset, self.index(pos + bad), self.transform)
            if out is not None:
                return (out[0], out[1], pos, bad) + ((self.extra(pos),) if self.extra else ())
        raise RuntimeError(f"{MAX_BAD} unreadable images in a row from stream position {pos}: check the data path")

    def skipped(self, pos, bad):
        """Dataset indices of the `bad` unreadable files skipped for the item at position pos."""
        return [self.index(pos + j) for j in range(bad)]


class EvalSet(Dataset):
    """Fixed images with a deterministic transform; item i is dataset image indices[i], or the next
    readable one if that file is broken. An item is (image, label, requested index, bad, *extra): the
    requested index is what extra (mim.py's mask) is computed from, so a broken file keeps its mask."""
    def __init__(self, dataset, indices, transform, extra=None):
        self.dataset, self.indices, self.transform, self.extra = dataset, np.asarray(indices), transform, extra

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        for bad in range(min(MAX_BAD, len(self))):
            out = load(self.dataset, int(self.indices[(i + bad) % len(self)]), self.transform)
            if out is not None:
                return (out[0], out[1], int(self.indices[i]), bad) + ((self.extra(int(self.indices[i])),) if self.extra else ())
        raise RuntimeError(f"no readable image near evaluation item {i}: check the data path")


class StreamSampler(Sampler):
    """Yields stream positions forever: step s, micro-step m, then this rank's micro_batch positions
    s*B + (m*world_size + rank)*micro_batch + [0, micro_batch). The global batch of step s is always
    positions [s*B, (s+1)*B), split into contiguous pieces, so it is the same for any world size and
    accumulation; start_step resumes mid-run. Use with DataLoader(batch_size=micro_batch)."""
    def __init__(self, global_batch, micro_batch, rank=0, world_size=1, start_step=0):
        if global_batch % (micro_batch * world_size):
            raise ValueError(f"global batch {global_batch} is not divisible by micro-batch {micro_batch} "
                             f"x world size {world_size}")
        self.B, self.mb, self.rank, self.ws = global_batch, micro_batch, rank, world_size
        self.start_step = start_step
        self.accum = global_batch // (micro_batch * world_size)

    def __iter__(self):
        step = self.start_step
        while True:
            for m in range(self.accum):
                first = step * self.B + (m * self.ws + self.rank) * self.mb
                yield from range(first, first + self.mb)
            step += 1


def shard(n, rank, world_size):
    """Rank r evaluates items r, r + world_size, ...: no padding and no duplicates, so (sum, count)
    reduced over ranks is exact (DistributedSampler pads with repeats)."""
    return list(range(rank, n, world_size))


def quiet_worker(_):
    """Workers ignore Ctrl-C and SIGTERM: the training process decides when to stop (it saves first), and
    its workers end with it, without a traceback each."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(dataset, batch_size, sampler=None, workers=0, shuffle=False, collate_fn=None):
    """A DataLoader with the throughput settings. It gets its own generator (so `shuffle` is seeded by 0):
    DataLoader draws a base seed on every iter(), and from the global RNG that would shift a resumed run."""
    extra = dict(persistent_workers=True, prefetch_factor=4, worker_init_fn=quiet_worker) if workers > 0 else {}
    return DataLoader(dataset, batch_size, shuffle=shuffle and sampler is None, sampler=sampler, num_workers=workers,
                      pin_memory=torch.cuda.is_available(), drop_last=False, generator=torch.Generator().manual_seed(0),
                      collate_fn=collate_fn, **extra)


def normalize(x):
    """A batch of images as the model wants them: float, ImageNet-normalised, on x's device."""
    return x  # the transforms normalise today
