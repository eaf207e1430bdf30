"""
Data for the data-scaling study (Xie et al., arXiv 2206.04664): from image files to batches.

The paper pre-trains for a fixed number of *iterations* on random 10/20/50/100 % subsets of ImageNet-1K
and on ImageNet-22K (sec. 3). This file follows one pre-training sample from disk to the batch, in order:

  1. datasets: files on disk -> (PIL image, label); images are opened lazily (header read, pixels not yet);
  2. subsets: the first round(frac * N) entries of one seeded permutation, so 10 % is inside 20 % is
     inside 50 %; written as a manifest (subset.txt) with a short hash;
  3. transforms: SimMIM's crop and flip, decoded the cheapest way the crop allows, to uint8 tensors that
     normalize() turns into the model's input on the device;
  4. the stream: position p is image perm_e[p % n] of pass e = p // n, augmented with a seed drawn from
     (seed, p), so step s gets the same global batch for any world size, accumulation or worker count,
     and a restart at step s continues exactly. An item is an `Item` of named fields, a batch too.

What pre-training on class folders does not need comes after: the packed name store and the readers of
ImageNet-22K file lists and iNaturalist json, then fine-tuning's augmentation (RandAugment). The official
zip layout and tar shards are read by archives.py, a folder of your own images by scan_folder with
--val_frac (open_splits); the synthetic image set of the demo and the tests lives in synthetic.py.
Read next: mim.py, which calls open_splits -> subset_indices -> TrainStream + StreamSampler -> make_loader.
"""
import array
import functools
import hashlib
import json
import math
import os
import signal
import sys
import warnings
from typing import NamedTuple, Optional

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from torchvision import transforms as T
from torchvision.transforms import functional as F  # on PIL images: PIL's own operations
from torchvision.transforms.v2 import functional as TF  # on uint8 tensors: its fast resize
from tqdm import tqdm

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
MAX_CLASSES = 1_000_000  # a file-list label at or above this is an error (ImageNet-22K has 21,841 classes)
MAX_BAD = 100  # this many unreadable files in a row means the data path is broken, not one file

# ----------------------------------------------------------------------------- 1. datasets
# Every dataset has __len__, .classes, .names (a Names: the image names, used by manifests), .name(i),
# .targets, and .open(i) -> (PIL image, label). Files are opened lazily: header read, pixels not yet decoded.

class ImageFiles:
    """Images at root/names[i] with integer labels; built by scanning class folders, from a file list or
    from a COCO-style json."""
    def __init__(self, root, names, targets, classes):
        self.root, self.names, self.targets, self.classes = root, names, np.asarray(targets, np.int64), classes

    def __len__(self):
        return len(self.names)

    def name(self, i):
        return self.names[i]

    def open(self, i):
        return Image.open(os.path.join(self.root, self.names[i])), int(self.targets[i])


def scan_folder(root):
    """Every image under root, in any nesting, in a sorted order that does not depend on the file system.
    ImageFolder's layout, root/<class>/**/<image>, gives labels: classes sorted by name are 0, 1, ...;
    an image outside a class folder (a flat folder of your own images) has label -1 (unlabelled)."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    label_of = {c: k for k, c in enumerate(classes)}
    names, targets = [], []
    for d, subdirs, files in os.walk(root, followlinks=True):
        subdirs.sort()  # os.walk order is file-system dependent; the manifest must not be
        rel = os.path.relpath(d, root)
        label = -1 if rel == "." else label_of[rel.split(os.sep)[0]]
        names += [os.path.normpath(os.path.join(rel, f)) for f in sorted(files) if f.lower().endswith(IMG_EXTS)]
        targets += [label] * (len(names) - len(targets))
    return ImageFiles(root, Names.from_list(names), targets, classes)


def split_path(path, split):
    """Where a folder keeps one split: path/<split>/, the official zip layout's <split>.zip (with
    <split>_map.txt), or its one <split>*.json (iNaturalist's train2018.json, val2018.json). None if it has
    none of them: then the folder itself is the data."""
    if os.path.isdir(os.path.join(path, split)):
        return os.path.join(path, split)
    if os.path.isfile(os.path.join(path, split + ".zip")):
        return os.path.join(path, split + ".zip")
    found = (sorted(f for f in os.listdir(path) if f.startswith(split) and f.endswith(".json"))
             if os.path.isdir(path) else [])
    if len(found) > 1:
        raise ValueError(f"data path {path!r} has several {split}*.json files ({', '.join(found)}): "
                         f"pass the one to use")
    return os.path.join(path, found[0]) if found else None


def open_dataset(path, split="train"):
    """'synthetic[:N]' | a folder (with a `split` subfolder, `split`.zip or `split`*.json; of class folders;
    of images in any nesting; of .tar shards) | a .txt file list | a COCO-style .json (iNaturalist) | a
    .zip with its _map.txt | .tar shards as a brace pattern (shards/in22k-{000000..001399}.tar)."""
    if path == "synthetic" or path.startswith("synthetic:"):
        n = path.partition(":")[2]
        if split not in ("train", "val") or not (n.isdigit() and int(n) > 0 or n == ""):
            raise ValueError(f"data path {path!r}: use 'synthetic' or 'synthetic:N' with N > 0, split train|val")
        import synthetic  # the demo's image set (imported here: it imports this file)
        return synthetic.SyntheticImages(split, synthetic.VAL_IMAGES if split == "val"
                                         else int(n or synthetic.TRAIN_IMAGES))
    import archives  # the zip and tar readers (imported here: they import this file)
    shards = (archives.shard_paths(path) if "{" in path and not os.path.exists(path)  # a brace pattern
              else [path] if path.endswith(".tar") and os.path.isfile(path) else None)
    if shards is None:
        if not (os.path.isdir(path) or path.endswith((".txt", ".json", ".zip")) and os.path.isfile(path)):
            raise FileNotFoundError(f"data path {path!r} is not an existing folder, .txt file list, .json, .zip, "
                                    f".tar shards or 'synthetic'")
        path = split_path(path, split) or path
        folder = os.path.isdir(path)
        shards = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".tar")) if folder else None
    ds = (archives.read_shards(shards) if shards else read_file_list(path) if path.endswith(".txt")
          else read_coco_json(path) if path.endswith(".json") else archives.read_zip(path) if path.endswith(".zip")
          else scan_folder(path))
    if len(ds) == 0:
        raise FileNotFoundError(f"no images found in data path {path!r} (want images{IMG_EXTS[0]} in any nesting, "
                                f"'relative/path label' lines, a json with images, a zip or .tar shards)")
    return ds


def open_splits(data_path, val_path=None, val_frac=None):
    """(train, held-out) datasets of --data / --val_data / --val_frac. Without --val_data the held-out
    images are --data's val split (val/, val.zip or val*.json), or with --val_frac F a fixed part of
    --data: round(F * N) images drawn with seed 0 (the same for every run, so validation losses compare),
    the training images being the rest. A path without a val split is refused otherwise, since its 'val'
    would be the training set."""
    train_set = open_dataset(data_path, "train")
    if val_frac is not None:
        if val_path is not None:
            raise ValueError("--val_frac holds out part of --data, --val_data names other images: pass one of them")
        held = subset_indices(len(train_set), val_frac, 0, flag="--val_frac")
        if len(held) == len(train_set):
            raise ValueError(f"--val_frac {val_frac} of {len(train_set)} images leaves no image for training")
        return Part(train_set, np.setdiff1d(np.arange(len(train_set)), held)), Part(train_set, held)
    if val_path is None and not data_path.startswith("synthetic") and split_path(data_path, "val") is None:
        raise ValueError(f"--data {data_path} has no val/ folder, val.zip or val*.json: pass held-out images "
                         f"with --val_data, or hold out a part with --val_frac")
    return train_set, open_dataset(val_path or data_path, "val")


class Part:
    """Images `indices` of a dataset, as a dataset of their own (--val_frac's held-out part and the rest):
    its names are the dataset's, so a manifest names the same files."""
    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, np.asarray(indices, np.int64)
        self.names, self.classes = dataset.names.take(self.indices), dataset.classes
        self.targets = np.asarray(dataset.targets)[self.indices]

    def __len__(self):
        return len(self.indices)

    def name(self, i):
        return self.names[i]

    def open(self, i):
        return self.dataset.open(int(self.indices[i]))

    def path(self, i):
        return where(self.dataset, int(self.indices[i]))


# ----------------------------------------------------------------------------- 2. subsets and manifests

def subset_indices(n, frac, seed, flag="--frac"):
    """The first round(frac*n) entries of one permutation drawn from `seed`, sorted: uniformly random
    (not class-balanced), nested across frac, and independent of rank, world size and global RNGs."""
    if not 0 < frac <= 1:  # also rejects NaN
        raise ValueError(f"{flag} must be in (0, 1], got {frac}")
    if round(frac * n) == 0:
        raise ValueError(f"{flag} {frac} of a dataset of {n} images selects no image")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[:round(frac * n)]).astype(np.int64)


def subset_hash(names, indices):
    """Short sha1 (10 hex chars) of the selected names (a Names) in order, newline-separated: logged and
    saved with checkpoints. Fed in chunks of 64K names, so a 14M-image subset needs no 14M-name string."""
    h, newline = hashlib.sha1(), b""
    for k in range(0, len(indices), 1 << 16):
        chunk = names.joined(indices[k:k + (1 << 16)])  # every name followed by a newline
        h.update(newline + chunk[:-1])  # the newline after the last name is not hashed: '\n'.join(...)
        newline = b"\n"
    return h.hexdigest()[:10]


def write_manifest(path, names, indices):
    """Write subset.txt: a '#' header with size and hash, then one name per line. Atomic (tmp + rename),
    so a crash never leaves half a manifest behind. Returns the hash."""
    h = subset_hash(names, indices)
    with open(path + ".tmp", "wb") as f:
        f.write(f"# {len(indices)} images, sha1 {h}\n".encode())
        for k in range(0, len(indices), 1 << 16):
            f.write(names.joined(indices[k:k + (1 << 16)]))
    os.replace(path + ".tmp", path)
    return h


def read_manifest(path, names):
    """Indices (in file order) of the names listed in a manifest; every name must exist in the dataset."""
    with open(path, "rb") as f:
        wanted = [os.fsdecode(line.rstrip(b"\n")) for line in f if line.strip() and not line.startswith(b"#")]
    where = dict.fromkeys(wanted)  # name -> dataset index, filled in one pass over the dataset's names
    for i, name in enumerate(names):
        if name in where:
            where[name] = i
    missing = [w for w in wanted if where[w] is None]
    if missing:
        raise ValueError(f"manifest {path}: {missing[0]!r} is not in the dataset")
    return np.array([where[w] for w in wanted], dtype=np.int64)


# ----------------------------------------------------------------------------- 3. decoding and transforms
# The transforms return uint8 (3, H, W) tensors: a batch crosses the data loader's shared memory at a
# quarter of float32's size, and normalize() makes the model's float input on the device.

def to_rgb(img):
    """Decode to 3-channel RGB. L, P, CMYK convert as PIL defines; alpha is composited onto the ImageNet
    mean colour, so transparent pixels normalise to ~0 instead of to whatever colour they hide."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        bg = Image.new("RGBA", img.size, tuple(round(255 * m) for m in IMAGENET_MEAN) + (255,))
        return Image.alpha_composite(bg, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")


def normalize(x):
    """uint8 images (B, 3, H, W), on any device -> the model's float32 input, ImageNet-normalised: the same
    numbers as ToTensor + Normalize in a worker. A float batch is already normalised (fine-tuning's
    training view, see finetune_transform) and passes through."""
    if x.is_floating_point():
        return x
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(3, 1, 1)
    return x.float().div(255).sub(mean).div(std)


# torchvision.io's image decoders are deprecated since torchvision 0.29 (for TorchCodec, not a dependency
# of ours); once they are gone, every JPEG takes the PIL path below
HAS_DECODE_JPEG = hasattr(torchvision.io, "decode_jpeg")


def decode_jpeg(img):
    """The JPEG file behind a lazily opened PIL image, decoded by torchvision.io (libjpeg-turbo) into a
    uint8 (3, H, W) tensor; its errors become OSError, as PIL's are."""
    img.fp.seek(0)
    raw = torch.frombuffer(bytearray(img.fp.read()), dtype=torch.uint8)
    try:
        with warnings.catch_warnings():  # the deprecation, once per call
            warnings.simplefilter("ignore", DeprecationWarning)
            return torchvision.io.decode_jpeg(raw, mode=torchvision.io.ImageReadMode.RGB)
    except RuntimeError as e:
        raise OSError(f"decode_jpeg: {str(e).splitlines()[-1]}") from None


class PretrainTransform:
    """SimMIM's augmentation: RandomResizedCrop(scale 0.67-1, ratio 3/4-4/3, bilinear) and flip, to a
    uint8 tensor. The crop box is drawn on the undecoded image's size (PIL has read only the header); the
    image is then decoded the cheapest way that keeps >= img_size pixels on each side of the box:
      - a JPEG whose box is >= 2 x img_size wide and high: PIL decodes it at the smallest DCT scale (1/2,
        1/4, 1/8) that allows it, and the box is rescaled to cover the same region; e.g. a 2000x1500
        photo cropped to 192 decodes at 1/4 scale: 16x fewer pixels (torchvision.io has no such mode);
      - any other RGB or grey JPEG (ImageNet's typical 500x375): torchvision.io.decode_jpeg, then crop
        and resize the uint8 tensor (more images per CPU-second than the plain PIL pipeline: bench.py
        compares them);
      - the rest (PNG, CMYK, in-memory images): PIL, at full size.
    fast=False decodes every image at full size with PIL: the reference the fast paths are tested against.
    The same box on the same image gives the same crop whichever path runs (to a uint8 level or two, and
    at the box's edge, where PIL's filter reads the pixels just outside the box and a tensor crop cannot)."""
    def __init__(self, img_size, fast=True):
        self.img_size, self.fast = img_size, fast

    def __call__(self, img):
        S = self.img_size
        top, left, h, w = T.RandomResizedCrop.get_params(img, [0.67, 1.0], [3 / 4, 4 / 3])  # reads .size only
        f = next((f for f in (8, 4, 2) if min(h, w) >= f * S), 1)
        jpeg = self.fast and img.format == "JPEG"
        if jpeg and f == 1 and img.mode in ("RGB", "L") and HAS_DECODE_JPEG:
            x = TF.resized_crop(decode_jpeg(img), top, left, h, w, [S, S], antialias=True)  # bilinear
        else:
            W, H = img.size
            reduced = jpeg and f > 1 and img.draft("RGB", (W // f, H // f))
            # draft returns (mode, (0, 0, W/s, H/s)): a reduced pixel is s original pixels, exactly s = f here
            scale = reduced[1][2] / W if reduced else 1.0
            box = (left * scale, top * scale, (left + w) * scale, (top + h) * scale)
            x = TF.pil_to_tensor(to_rgb(img).resize((S, S), Image.BILINEAR, box=box))
        if torch.rand(1) < 0.5:
            x = x.flip(-1)
        return x


def pretrain_transform(img_size, fast=True):
    return PretrainTransform(img_size, fast)


def val_transform(img_size):
    """Deterministic view for the pre-training validation loss: shorter side to img_size, centre crop."""
    return T.Compose([to_rgb, T.Resize(img_size, T.InterpolationMode.BILINEAR), T.CenterCrop(img_size),
                      T.PILToTensor()])


# ----------------------------------------------------------------------------- 4. the stream
# A sample is an Item of named fields, and so is a batch (collate batches each field): code reads
# batch.image, batch.mask, batch.pos, never a position in a tuple.

class Item(NamedTuple):
    image: torch.Tensor  # uint8 (3, H, W); float (normalised) for fine-tuning's training view (finetune_transform)
    label: int  # class index; -1 where a dataset has none (ADE20K)
    pos: int  # where it came from: its stream position (TrainStream) or its dataset index (EvalSet)
    bad: int  # TrainStream: unreadable files skipped to get it (each replaced by the next); EvalSet: 1 = left out
    mask: Optional[torch.Tensor] = None  # SimMIM's mask of the image (mim.py), made in the data-loader worker
    target: object = None  # a dense task's target: segment.py's label map, detect.py's boxes and masks


def collate(items):
    """A list of Items -> one Item whose fields are batched (default_collate); a field that is None stays None."""
    return Item(*(None if field[0] is None else default_collate(list(field)) for field in zip(*items)))


READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)  # PIL's failures


def load(dataset, i, transform):
    """Dataset image i through transform -> (image, label, target), or None if the file cannot be read or
    decoded. A transform returns the image, or (image, target) for a dense task (segment.py's label map).
    Silent: it runs in a data-loader worker; the training process names the file (see failure)."""
    try:
        img, label = dataset.open(i)
        with img:  # closes the file handle even when decoding fails halfway
            out = transform(img)
    except READ_ERRORS:
        return None
    image, target = out if isinstance(out, tuple) else (out, None)
    return image, label, target


def unreadable(dataset, i):
    """The reason dataset image i cannot be decoded ('OSError: ...'), or None if it decodes."""
    try:
        with dataset.open(i)[0] as img:
            img.load()
    except READ_ERRORS as e:
        return f"{type(e).__name__}: {e}"
    return None


def where(dataset, i):
    """Where dataset image i lives, for a message: its file, or archive:member (a dataset's path(i))."""
    return dataset.path(i) if hasattr(dataset, "path") else os.path.join(getattr(dataset, "root", ""), dataset.name(i))


def failure(dataset, i):
    """'path (why)' for an image that load() could not read: the training process's warning."""
    return f"{where(dataset, i)} ({unreadable(dataset, i) or 'failed in a transform'})"


def check_readable(dataset, indices, what):
    """Refuse a data set whose first images all fail to decode (a wrong folder, a broken copy) in one line,
    before a run directory is made: `what` names the flag and path, then the first few files and why. On
    good data the first image ends the check; a few bad files among good ones are the stream's to skip."""
    bad = []
    for i in list(indices[:MAX_BAD]):
        if unreadable(dataset, int(i)) is None:
            return
        bad.append(failure(dataset, int(i)))
    raise ValueError(f"{what}: none of its first {len(bad)} images can be read: {'; '.join(bad[:3])}"
                     + (" ..." if len(bad) > 3 else ""))



@functools.lru_cache(maxsize=2)  # a batch may straddle two passes; 14M entries (IN-22K) are 112 MB each
def pass_permutation(seed, e, n):
    """The visiting order of pass e over a subset of n images: (n,) int64, a pure function of (seed, e)."""
    return np.random.default_rng([seed, 0, e]).permutation(n)


class TrainStream(Dataset):
    """Map-style over stream positions p = 0, 1, 2, ... (endless). Position p is subset entry
    perm_e[p % n] of pass e = p // n, with perm_e drawn from (seed, e), and its augmentation is drawn
    from (seed, p): a sample is a pure function of its position, whichever worker or rank loads it.
    Item p has pos = p, and mask = masks(p) if `masks` is given: mim.py's mask is made in the worker too,
    so the training process stays free."""
    def __init__(self, dataset, indices, transform, seed, masks=None):
        self.dataset, self.indices, self.transform, self.seed = dataset, np.asarray(indices), transform, seed
        self.masks = masks

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
                image, label, target = out
                return Item(image, label, pos, bad, self.masks(pos) if self.masks else None, target)
        raise RuntimeError(f"{MAX_BAD} unreadable images in a row from stream position {pos}: check the data path")

    def skipped(self, pos, bad):
        """Dataset indices of the `bad` unreadable files skipped for the item at position pos."""
        return [self.index(pos + j) for j in range(bad)]


class EvalSet(Dataset):
    """Fixed images with a deterministic transform; item i is dataset image indices[i], its pos that index,
    its mask masks(index) if `masks` is given (mim.py: the image's fixed mask). An unreadable image is left
    out of the scores, never replaced (it would count another image twice): its item carries the next
    readable image only as a stand-in, so a batch keeps its shape, with bad = 1. Evaluations score the
    items that `scored` keeps and count the others."""
    def __init__(self, dataset, indices, transform, masks=None):
        self.dataset, self.indices, self.transform, self.masks = dataset, np.asarray(indices), transform, masks

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        index = int(self.indices[i])
        for k in range(min(MAX_BAD, len(self))):
            out = load(self.dataset, int(self.indices[(i + k) % len(self)]), self.transform)
            if out is not None:
                image, label, target = out
                return Item(image, label, index, int(k > 0), self.masks(index) if self.masks else None, target)
        raise RuntimeError(f"no readable image near evaluation item {i}: check the data path")


def scored(batch, eval_set):
    """Which items of an EvalSet batch to score: a bool (B,) tensor. Each one left out is named on stderr."""
    keep = torch.as_tensor(batch.bad) == 0
    for index in torch.as_tensor(batch.pos)[~keep].tolist():
        tqdm.write(f"unreadable evaluation image {failure(eval_set.dataset, index)}: left out", file=sys.stderr)
    return keep


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


def make_loader(dataset, batch_size, sampler=None, workers=0, shuffle=False, collate_fn=collate):
    """A DataLoader of Items (or of what collate_fn makes) with the throughput settings. It gets its own
    generator (so `shuffle` is seeded by 0): DataLoader draws a base seed on every iter(), and from the
    global RNG that would shift a resumed run.
    Each worker keeps 2 batches ready: enough to hide a slow file, and shared memory stays small."""
    extra = dict(persistent_workers=True, prefetch_factor=2, worker_init_fn=quiet_worker) if workers > 0 else {}
    return DataLoader(dataset, batch_size, shuffle=shuffle and sampler is None, sampler=sampler, num_workers=workers,
                      pin_memory=torch.cuda.is_available(), drop_last=False, generator=torch.Generator().manual_seed(0),
                      collate_fn=collate_fn, **extra)


# ----------------------------------------------------------------------------- beyond class folders
# ImageNet-22K's 14M names as file lists, iNaturalist 2018's json: names packed into one byte array.

class Names:
    """Image names (paths relative to the dataset root) packed into one byte array: name i is
    blob[offsets[i]:offsets[i + 1] - 1], each name followed by a newline. A Python list of str costs
    ~100 bytes per name and, as every worker touches the objects' reference counts, is copied page by
    page into each forked data-loader worker; this costs the name's UTF-8 bytes + 9, and reads do not
    write to it, so the workers share its pages with the training process."""
    def __init__(self, blob, offsets):
        self.blob, self.offsets = blob, offsets  # (total bytes,) uint8, (n + 1,) int64

    @classmethod
    def from_list(cls, names):
        encoded = [os.fsencode(n) + b"\n" for n in names]  # fsencode: any file name round-trips, even invalid UTF-8
        newline = [n for n, e in zip(names, encoded) if e.count(b"\n") > 1]
        if newline:
            raise ValueError(f"an image name contains a newline: {newline[0]!r}")
        offsets = np.zeros(len(encoded) + 1, np.int64)
        np.cumsum([len(e) for e in encoded], out=offsets[1:])
        return cls(np.frombuffer(b"".join(encoded), np.uint8), offsets)

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, i):
        return os.fsdecode(self.blob[self.offsets[i]:self.offsets[i + 1] - 1].tobytes())

    def __iter__(self):
        for k in range(0, len(self), 1 << 16):  # 64K names at a time: one split, no per-name slicing
            yield from map(os.fsdecode, self.joined(range(k, min(k + (1 << 16), len(self)))).split(b"\n")[:-1])

    def take(self, indices):
        """The names at `indices`, as a Names of their own."""
        blob = np.frombuffer(self.joined(indices), np.uint8)
        offsets = np.zeros(len(indices) + 1, np.int64)
        np.cumsum(self.offsets[1:][indices] - self.offsets[:-1][indices], out=offsets[1:])
        return Names(blob, offsets)

    @classmethod
    def concatenate(cls, parts):
        lengths = [p.offsets[-1] for p in parts]
        offsets = np.concatenate([[0]] + [p.offsets[1:] + s for p, s in zip(parts, np.cumsum([0] + lengths[:-1]))])
        return cls(np.concatenate([p.blob for p in parts]), offsets.astype(np.int64))

    def joined(self, indices):
        """b''.join(name + newline for the names at `indices`), gathered without a Python loop over names."""
        idx = np.asarray(indices, np.int64)
        start, length = self.offsets[idx], self.offsets[idx + 1] - self.offsets[idx]
        # byte j of the result, inside name k, is blob[start[k] + j - (bytes of the names before k)]
        first = np.cumsum(length) - length
        return self.blob[np.repeat(start - first, length) + np.arange(length.sum())].tobytes()



def read_file_list(path):
    """Lines 'relative/path label' (paths relative to the list's folder; a path may contain spaces, the
    label is the last word): ImageNet-22K's usual format, because scanning 14M files on every start takes
    longer than reading one text file. One pass that appends each name to one byte array and each label
    to one int64 array: no Python object per line survives the loop."""
    blob, ends, labels = bytearray(), array.array("q", [0]), array.array("q")
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            parts = line.rsplit(None, 1)  # [path, label]; rsplit strips the line's end (and \r\n)
            if not parts:
                continue  # a blank line
            if len(parts) != 2 or not parts[1].isdigit():
                raise ValueError(f"{path}:{n}: expected 'relative/path label', "
                                 f"got {line.strip().decode(errors='replace')!r}")
            label = int(parts[1]) if len(parts[1]) <= 12 else MAX_CLASSES  # a longer number is too large anyway
            if label >= MAX_CLASSES:  # a malformed list, whose classes would exhaust the memory
                raise ValueError(f"{path}:{n}: labels are class indices below {MAX_CLASSES:,}, "
                                 f"got {parts[1].decode()[:40]}")
            blob += parts[0].lstrip() + b"\n"
            ends.append(len(blob))
            labels.append(label)
    names = Names(np.frombuffer(blob, np.uint8), np.frombuffer(ends, np.int64))  # views, no copies
    labels = np.frombuffer(labels, np.int64)
    return ImageFiles(os.path.dirname(os.path.abspath(path)), names, labels, classes_of(labels))


def classes_of(labels):
    """The classes of integer labels 0..K-1 (a file list's, a zip map's, tar shards' .cls): '0' .. 'K-1'."""
    return [str(k) for k in range(int(np.max(labels, initial=-1)) + 1)]


def read_coco_json(path):
    """A classification set in COCO-style json, as iNaturalist 2018 ships (train2018.json, val2018.json):
    `images` {id, file_name relative to the json's folder}, `annotations` {image_id, category_id}, one per
    image, and `categories` {id}. Labels are the category ids mapped to 0..K-1 in sorted order (iNat18's
    ids 0..8141 map to themselves); `classes` holds the original ids, as strings, in label order: the
    mapping a run records. The per-image dicts of the json live only while this function runs."""
    with open(path, "rb") as f:
        d = json.load(f)
    if not isinstance(d, dict) or "images" not in d or "annotations" not in d:
        raise ValueError(f"{path}: not a COCO-style json with 'images' and 'annotations'")
    try:
        names = Names.from_list([im["file_name"] for im in d["images"]])
        image_ids = np.array([im["id"] for im in d["images"]], np.int64)
        ann_image = np.array([a["image_id"] for a in d["annotations"]], np.int64)
        ann_category = np.array([a["category_id"] for a in d["annotations"]], np.int64)
        categories = [c["id"] for c in d.get("categories", [])]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: an image needs 'id' and 'file_name', an annotation 'image_id' and "
                         f"'category_id' ({e!r})") from None
    del d
    if len(ann_image) != len(image_ids) or len(np.unique(ann_image)) != len(ann_image):
        raise ValueError(f"{path}: {len(ann_image)} annotations for {len(image_ids)} images; "
                         f"a classification set has one per image")
    order = np.argsort(ann_image)  # image k's annotation: look its id up among the sorted annotation ids
    ann = order[np.searchsorted(ann_image, image_ids, sorter=order).clip(max=len(order) - 1)]
    if np.any(ann_image[ann] != image_ids):
        raise ValueError(f"{path}: image id {image_ids[ann_image[ann] != image_ids][0]} has no annotation")
    category_ids = np.unique(categories if categories else ann_category)  # sorted: label = position
    label = np.searchsorted(category_ids, ann_category[ann]).clip(max=len(category_ids) - 1)
    if np.any(category_ids[label] != ann_category[ann]):
        raise ValueError(f"{path}: category_id {ann_category[ann][category_ids[label] != ann_category[ann]][0]} "
                         f"is not among its categories")
    return ImageFiles(os.path.dirname(os.path.abspath(path)), names, label, [str(c) for c in category_ids])



# ----------------------------------------------------------------------------- fine-tuning augmentation
# RandAugment as the official fine-tuning runs it: timm's 'rand-m9-mstd0.5-inc1' (the RandAugment of
# Cubuk et al. 2020 as timm implements it), built here from torchvision's functional ops on PIL images,
# which give timm's pixels (exactly; shear and translate to a rare uint8 rounding). Per image: 2 ops
# drawn (with replacement) from the 15 below; each is applied with probability 0.5, at a magnitude
# m ~ N(9, 0.5) clipped to [0, 10], which the op receives as t = m / 10 of its strongest setting; s = +1
# or -1 (probability 0.5 each) picks the direction of the ops that have one. 'inc1': ops whose effect
# grows with t (Posterize keeps fewer bits, Solarize inverts from a lower threshold). Geometric ops
# resample bicubic and fill with the ImageNet mean colour.
# (torchvision's RandAugment(2, 9) applies both ops always, at 9 of 31 bins: Rotate 9 degrees, not 27.)
FILL = [round(255 * m) for m in IMAGENET_MEAN]  # (124, 116, 104)
BICUBIC = T.InterpolationMode.BICUBIC


def _posterize(img, bits):
    """Keep the top `bits` bits of each value; 0 bits is black, as the Pillow of the official runs gave
    (Pillow 13 refuses bits=0; it happens at m >= 10, 2.3 % of the draws)."""
    return F.posterize(img, bits) if bits else Image.new(img.mode, img.size)


def _solarize_add(img, add):
    """Add `add` to every value below 128, clipped at 255 (not in torchvision)."""
    return img.point([min(255, v + add) if v < 128 else v for v in range(256)] * len(img.getbands()))


def _shear(img, x, y):
    """Shear by the factors x, y about the top-left corner (torchvision takes the angle atan(factor))."""
    return F.affine(img, 0, [0, 0], 1, [math.degrees(math.atan(x)), math.degrees(math.atan(y))], BICUBIC, FILL,
                    center=[0, 0])


RAND_OPS = {  # name: f(PIL image, t in [0, 1], s = +-1), the strongest setting at t = 1
    "AutoContrast": lambda img, t, s: F.autocontrast(img),
    "Equalize": lambda img, t, s: F.equalize(img),
    "Invert": lambda img, t, s: F.invert(img),
    "Rotate": lambda img, t, s: F.rotate(img, s * 30 * t, BICUBIC, fill=FILL),  # +-30 degrees
    "PosterizeIncreasing": lambda img, t, s: _posterize(img, 4 - int(4 * t)),  # keep 4 .. 0 bits
    "SolarizeIncreasing": lambda img, t, s: F.solarize(img, 256 - int(256 * t)),  # invert values >= 256 .. 0
    "SolarizeAdd": lambda img, t, s: _solarize_add(img, int(110 * t)),  # +0 .. +110 below 128
    "ColorIncreasing": lambda img, t, s: F.adjust_saturation(img, 1 + s * 0.9 * t),  # factor 0.1 .. 1.9
    "ContrastIncreasing": lambda img, t, s: F.adjust_contrast(img, 1 + s * 0.9 * t),
    "BrightnessIncreasing": lambda img, t, s: F.adjust_brightness(img, 1 + s * 0.9 * t),
    "SharpnessIncreasing": lambda img, t, s: F.adjust_sharpness(img, 1 + s * 0.9 * t),
    "ShearX": lambda img, t, s: _shear(img, s * 0.3 * t, 0),  # factor +-0.3
    "ShearY": lambda img, t, s: _shear(img, 0, s * 0.3 * t),
    # the two translations: +-45 % of the image's width, of its height
    "TranslateXRel": lambda img, t, s: F.affine(img, 0, [-s * 0.45 * t * img.width, 0], 1, [0, 0], BICUBIC, FILL),
    "TranslateYRel": lambda img, t, s: F.affine(img, 0, [0, -s * 0.45 * t * img.height], 1, [0, 0], BICUBIC, FILL),
}


class RandAugment:
    """timm's rand-m9-mstd0.5-inc1 with the defaults; `ops` restricts the op list (the tests use it)."""
    def __init__(self, layers=2, magnitude=9.0, magnitude_std=0.5, prob=0.5, ops=tuple(RAND_OPS)):
        self.layers, self.magnitude, self.magnitude_std = layers, magnitude, magnitude_std
        self.prob, self.ops = prob, list(ops)

    def __call__(self, img):
        for k in torch.randint(len(self.ops), (self.layers,)).tolist():
            if torch.rand(1) < self.prob:
                m = min(max(self.magnitude + self.magnitude_std * torch.randn(1).item(), 0.0), 10.0)
                s = 1 if torch.rand(1) < 0.5 else -1
                img = RAND_OPS[self.ops[k]](img, m / 10, s)
        return img


def finetune_transform(img_size, train, aug="paper"):
    """The official fine-tuning data (timm's create_transform as the official Swin code calls it):
    RandomResizedCrop(scale 0.08-1, bicubic), flip, RandAugment (above), normalise, RandomErasing (p 0.25,
    one box of 2-33 % of the image, aspect 0.3-3.3, filled with per-pixel N(0, 1) noise: timm's 'pixel'
    mode). Eval: resize to 256/224 x img_size (bicubic), centre crop. aug='light' (crop 35-100 % and flip)
    is for short CPU runs on the synthetic set. The training view of aug='paper' returns a *normalised float*
    tensor: the erasing noise lives in normalised space (values of +-3 std are pixels outside 0..255), so it
    cannot travel as uint8; every other view returns uint8, normalised on the device by normalize()."""
    if not train:
        return T.Compose([to_rgb, T.Resize(int(256 / 224 * img_size), BICUBIC), T.CenterCrop(img_size),
                          T.PILToTensor()])
    if aug == "light":
        return T.Compose([to_rgb, T.RandomResizedCrop(img_size, (0.35, 1.0), interpolation=BICUBIC),
                          T.RandomHorizontalFlip(), T.PILToTensor()])
    return T.Compose([to_rgb, T.RandomResizedCrop(img_size, (0.08, 1.0), interpolation=BICUBIC),
                      T.RandomHorizontalFlip(), RandAugment(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
                      T.RandomErasing(p=0.25, scale=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3), value="random")])

