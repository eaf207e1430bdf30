"""
ImageNet in a few big files: the official zip layout and WebDataset tar shards, read by random access.

Shared cluster file systems (Lustre, GPFS, NFS) serve millions of small files badly: every open is a
metadata request. The official code reads "zipped ImageNet" (train.zip + train_map.txt, microsoft/
Swin-Transformer get_started.md) and large image pipelines store tar shards (the WebDataset layout:
KEY.jpg, and KEY.cls holding the label). We read both by *random access*: an index records where each
member's bytes are, and image i is one os.pread at its offset. So everything data.py's stream guarantees
(the same global batch for any world size, nested subsets, exact resume, a manifest of names) holds as
for loose files, and no worker holds an archive object: only a few file descriptors and the index arrays,
which forked workers share with the training process (numpy arrays: reads do not copy their pages).

data.open_dataset calls read_zip (a folder with train.zip, or a .zip) and read_shards (a folder of .tar,
a .tar, or a brace pattern); the datasets they return have data.py's interface (len, names, name(i),
targets, classes, open(i)). The index is cached (index_cache). Layouts, conversion and speed: docs/data.md.
"""
import functools
import hashlib
import io
import os
import re
import socket
import struct
import sys
import tarfile
import zipfile
import zlib

import numpy as np
from PIL import Image

from data import IMG_EXTS, MAX_CLASSES, Names, classes_of, read_file_list

ZIP_LOCAL = struct.Struct("<4s22xHH")  # a zip member's local header: signature, ..., name length, extra length
TAR, ZIP_STORED, ZIP_DEFLATED = -1, zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED  # how a member's bytes are kept


class ArchiveImages:
    """Images stored as members of big files: member i is in file files[archive[i]], at byte offset
    start[i] (its data for tar, its local header for zip), size[i] bytes, kept as method[i]. Names are
    'member' for one zip, 'shard.tar:member' for shards, so a manifest names exactly its images."""
    def __init__(self, root, files, names, archive, start, size, method, targets, classes):
        self.root, self.files, self.names, self.classes = root, files, names, classes
        self.archive, self.start, self.size, self.method = archive, start, size, method
        self.targets = np.asarray(targets, np.int64)
        self.fds = {}  # archive -> open file descriptor, per process (a forked worker inherits its parent's)

    def __len__(self):
        return len(self.names)

    def name(self, i):
        return self.names[i]

    def path(self, i):
        """archive:member, for messages."""
        member = self.names[i].partition(":")[2] if self.method[i] == TAR else self.names[i]
        return f"{os.path.join(self.root, self.files[self.archive[i]])}:{member}"

    def __getstate__(self):  # a spawned worker opens its own files
        return dict(self.__dict__, fds={})

    def read(self, i):
        """The bytes of member i: one pread (zip: its local header, whose extra field we learn only here,
        and the data after it; a second read only if that header is unusually long)."""
        a, start, size, method = int(self.archive[i]), int(self.start[i]), int(self.size[i]), int(self.method[i])
        fd = self.fds.get(a)
        if fd is None:
            if len(self.fds) >= 256:  # 1,400 shards would exceed the usual limit of 1,024 open files
                for old in self.fds.values():
                    os.close(old)
                self.fds.clear()
            fd = self.fds[a] = os.open(os.path.join(self.root, self.files[a]), os.O_RDONLY)
        if method == TAR:
            raw = os.pread(fd, size, start)
        else:
            head = os.pread(fd, ZIP_LOCAL.size + 1024 + size, start)
            sig, n, extra = ZIP_LOCAL.unpack_from(head) if len(head) >= ZIP_LOCAL.size else (b"", 0, 0)
            if sig != b"PK\x03\x04":
                raise OSError(f"no zip member header at byte {start}: the archive changed since it was indexed")
            skip = ZIP_LOCAL.size + n + extra
            raw = head[skip:skip + size] if skip + size <= len(head) else os.pread(fd, size, start + skip)
        if len(raw) < size:
            raise OSError("the archive ends inside this member (truncated)")
        try:
            return zlib.decompress(raw, -15) if method == ZIP_DEFLATED else raw  # raw deflate: no zlib header
        except zlib.error as e:
            raise OSError(f"corrupt deflated data ({e})") from None

    def open(self, i):
        return Image.open(io.BytesIO(self.read(i))), int(self.targets[i])


def index_cache(files, build):
    """The arrays build() makes for these archive files, cached: a restart (or another rank) reads them
    instead of rescanning. The cache lives in $SIMMIM_INDEX_CACHE, else ~/.cache/simmim-scaling/index (never
    in the data's folder, often read-only), one .npz per key; the key hashes each file's absolute path,
    size and modification time, so a changed archive gets a new index."""
    stats = [(os.path.abspath(f), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    folder = os.environ.get("SIMMIM_INDEX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "simmim-scaling",
                                                                  "index")
    path = os.path.join(folder, hashlib.sha1(repr(stats).encode()).hexdigest()[:20] + ".npz")
    try:
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        pass  # not cached yet (or a cache file cut short): build it
    arrays = build()
    try:
        os.makedirs(folder, exist_ok=True)
        tmp = f"{path}.tmp.{socket.gethostname()}.{os.getpid()}"  # unique across nodes sharing the cache
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)  # atomic: ranks building at once each write a whole file
    except OSError as e:
        print(f"warning: cannot cache the archive index in {folder} ({e}); it is rebuilt at every start",
              file=sys.stderr)
    return arrays


def packed(names):
    """A Names as arrays (for the cache) and back."""
    return dict(blob=names.blob, offsets=names.offsets)


def read_zip(path):
    """The official zip layout: `path` (train.zip) with `path`_map.txt beside it (train_map.txt), lines
    'member<TAB>label' naming the zip's members (n01440764/n01440764_10026.JPEG<TAB>0). Without a map file
    every image member is read, sorted by name, unlabelled. Members stored (zip -0, the usual choice for
    JPEGs) or deflated; the index comes from the zip's central directory, read once."""
    map_path = path[:-len(".zip")] + "_map.txt"
    files = [path, map_path] if os.path.isfile(map_path) else [path]

    def build():
        try:
            with zipfile.ZipFile(path) as zf:
                members = {utf8_name(z): z for z in zf.infolist()}  # the central directory
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise ValueError(f"{path}: not a readable zip archive ({e}); a truncated copy loses its directory, "
                             f"which is at the end") from None
        if len(files) == 1:
            names = Names.from_list(sorted(n for n in members if n.lower().endswith(IMG_EXTS)))
            labels = np.full(len(names), -1, np.int64)
        else:
            lines = read_file_list(map_path)  # its names are packed already, as the index keeps them
            names, labels = lines.names, lines.targets
        wanted = list(names)
        missing = next((k for k, n in enumerate(wanted) if n not in members), None)
        if missing is not None:
            raise ValueError(f"{map_path}: line {missing + 1} names {wanted[missing]!r}, which is not in {path}")
        infos = [members[n] for n in wanted]
        bad = next((z for z in infos if z.compress_type not in (ZIP_STORED, ZIP_DEFLATED)), None)
        if bad is not None:
            raise ValueError(f"{path}: member {bad.filename} uses compression method {bad.compress_type}; "
                             f"store images (zip -0) or deflate them")
        return dict(packed(names), labels=labels,
                    start=np.array([z.header_offset for z in infos], np.int64),
                    size=np.array([z.compress_size for z in infos], np.int64),
                    method=np.array([z.compress_type for z in infos], np.int8))

    ix = index_cache(files, build)
    return ArchiveImages(os.path.dirname(os.path.abspath(path)), [os.path.basename(path)],
                         Names(ix["blob"], ix["offsets"]), np.zeros(len(ix["start"]), np.int32), ix["start"],
                         ix["size"], ix["method"], ix["labels"], classes_of(ix["labels"]))


def utf8_name(info):
    """A zip member's name. Info-ZIP's `zip` stores UTF-8 names without the flag that says so, and zipfile
    then decodes them as cp437 (the zip format's default): undo that, so they match a UTF-8 map file."""
    if info.flag_bits & 0x800:
        return info.filename
    try:
        return info.filename.encode("cp437").decode("utf-8")
    except UnicodeError:
        return info.filename


def shard_paths(pattern):
    """The tar shards a --data value names: one .tar, or a brace pattern (shards/in22k-{000000..001399}.tar,
    {a,b} lists too; not nested), expanded as WebDataset does (numbers keep the first bound's width). Every
    shard must exist: a missing one would silently shrink the data."""
    def expand(p):
        m = re.search(r"\{([^{}]*)\}", p)
        if not m:
            return [p]
        if "{" in p[:m.start()] and "}" in p[m.end():]:
            raise ValueError(f"data path {pattern!r}: nested braces are not supported")
        r = re.fullmatch(r"(\d+)\.\.(\d+)", m.group(1))
        items = ([str(k).zfill(len(r.group(1))) for k in range(int(r.group(1)), int(r.group(2)) + 1)] if r
                 else m.group(1).split(","))
        return [q for item in items for q in expand(p[:m.start()] + item + p[m.end():])]
    paths = expand(pattern)
    missing = [p for p in paths if not os.path.isfile(p)]
    if len(missing) == len(paths):
        raise FileNotFoundError(f"data path {pattern!r}: matches no file")
    if missing:
        raise FileNotFoundError(f"data path {pattern!r}: {len(missing)} of its {len(paths)} shards do not exist, "
                                f"e.g. {missing[0]}")
    return paths


def index_tar(path):
    """One uncompressed tar shard -> the arrays of its images: WebDataset's layout, where files sharing a
    key (the name up to the first '.' of its base name) are one sample; the image is KEY.jpg (or another
    image extension) and KEY.cls, if present, holds its label as text."""
    images, labels = [], {}
    try:
        size = os.path.getsize(path)
        with tarfile.open(path, "r:") as tf:  # "r:": uncompressed only, the one kind that allows random access
            for m in tf:
                if not m.isfile():
                    continue
                if m.offset_data + m.size > size:
                    raise tarfile.ReadError(f"the file ends inside member {m.name}")
                head, base = os.path.split(m.name)
                key, _, ext = base.partition(".")
                if ext.lower() == "cls":
                    text = tf.extractfile(m).read().strip()
                    if not text.isdigit() or int(text) >= MAX_CLASSES:
                        raise ValueError(f"{path}: {m.name} holds {text[:20]!r}, not a class index")
                    labels[os.path.join(head, key)] = int(text)
                elif ("." + ext.lower()).endswith(IMG_EXTS):
                    images.append((os.path.join(head, key), m.name, m.offset_data, m.size))
            if size - tf.offset < 1024:  # a tar ends in two zero blocks; a copy cut between members has none
                raise tarfile.ReadError("the file ends before its end-of-archive marker: truncated")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable uncompressed tar ({e})") from None
    return dict(packed(Names.from_list([f"{os.path.basename(path)}:{name}" for _, name, _, _ in images])),
                start=np.array([s for *_, s, _ in images], np.int64), size=np.array([n for *_, n in images], np.int64),
                labels=np.array([labels.get(key, -1) for key, *_ in images], np.int64))


def read_shards(paths):
    """Tar shards in the WebDataset layout, each indexed once (and cached: index_cache), in the order given
    (a brace pattern's, or sorted file names). Labels from KEY.cls: every image has one, or none has."""
    if not paths:
        raise FileNotFoundError("no .tar shards given")
    root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    bases = [os.path.basename(p) for p in paths]
    if len(set(bases)) < len(bases):  # image names are shard:member, so shard names must be unique
        twin = next(b for b in bases if bases.count(b) > 1)
        raise ValueError(f"two shards are named {twin}: rename one (image names are shard:member)")
    parts = [index_cache([p], functools.partial(index_tar, p)) for p in paths]
    names = Names.concatenate([Names(ix["blob"], ix["offsets"]) for ix in parts])
    labels = np.concatenate([ix["labels"] for ix in parts])
    if 0 < (labels >= 0).sum() < len(labels):
        raise ValueError(f"{names[int(np.argmax(labels < 0))]} has no .cls label but other images have one")
    archive = np.repeat(np.arange(len(paths), dtype=np.int32), [len(ix["start"]) for ix in parts])
    return ArchiveImages(root, [os.path.relpath(os.path.abspath(p), root) for p in paths], names, archive,
                         np.concatenate([ix["start"] for ix in parts]), np.concatenate([ix["size"] for ix in parts]),
                         np.full(len(labels), TAR, np.int8), labels, classes_of(labels))
