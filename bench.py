"""
Benchmarks: throughput and peak memory of a training step and of the data pipeline, and the GPU report.
Speed lives here, never in the tests. Each mode prints one line per measured configuration.

    python bench.py --what gpu --json gpu_report.json                  # one GPU, < 10 min: everything below
    python bench.py --what simmim --model B --batch 128 --compile      # SimMIM step on a GPU (bf16)
    python bench.py --what encoder --embed_dim 96 --depths 2,2,6,2 --batch 8 --timm   # ours vs timm
    python bench.py --what data --jpeg_size 500x375,2000x1500          # decode+crop img/s per CPU-second
    python bench.py --what archives --images 2000                      # zip / tar index and reading speed

Clocks: on a GPU, wall seconds between torch.cuda.synchronize() calls (the GPU runs asynchronously);
on a CPU, CPU seconds of this process (time.process_time: the other jobs of a shared machine do not
count, every thread of ours does), so "img/s" on a CPU is images per CPU-second. Threads that spin
while they wait count too, and on a busy machine they spin long: compare with OMP_NUM_THREADS=1.

The GPU report (--what gpu) measures, on one CUDA GPU, what docs/benchmarks.md needs and no test can: img/s
and peak memory of mim.py's training step for S, B, L (eager and torch.compile) and H, g (grad
checkpointing), the largest micro-batch of each size, model FLOPs and MFU, a training step of detect.py's
Mask R-CNN (1024 px) and segment.py's UPerNet (512 px) for S, B, L, bf16 vs fp32, a fine-tuning step, the
data pipeline, and last the SDPA kernel of our window attention and its bias-gradient memory.
It keeps to --budget seconds (a phase that would not fit is skipped, a long one stops between its
measurements, and both say so) and rewrites its JSON and markdown before and after every phase, so a run
cut short keeps what it measured and names the phase it was in. It is written to survive its first run:
an error other than memory in one measurement loses that measurement (a phase, at worst), and the thread
count and TF32 flags are put back after every phase. The test suite runs the same functions on a CPU at
tiny sizes.
"""
import argparse
import contextlib
import gc
import importlib
import io
import os
import shutil
import sys
import tempfile
import time
import traceback
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import data
import finetune
import mim
import swinv2
import synthetic
import train


def get_parser():
    p = argparse.ArgumentParser(description="throughput and peak memory of a training step or the data pipeline")
    p.add_argument("--what", default="simmim", choices=["simmim", "encoder", "data", "archives", "gpu"],
                   help="what to time; archives: the zip and tar layouts of data.py; gpu: the full GPU report")
    p.add_argument("--model", default="B", help="preset: S, B, L, H, g, nano or tiny")
    p.add_argument("--embed_dim", type=int, default=None,
                   help="override the preset's width C (e.g. 96 for a T-sized model)")
    p.add_argument("--depths", default=None, help="override the preset's depths, e.g. 2,2,6,2")
    p.add_argument("--img_size", type=int, default=None, help="pixels; default: the preset's (192)")
    p.add_argument("--window", type=int, default=None, help="window size; default: the preset's (12)")
    p.add_argument("--drop_path", type=float, default=0.1,
                   help="stochastic depth rate of our model and timm's (paper 0.1)")
    p.add_argument("--batch", type=int, default=8, help="images per step (per GPU)")
    p.add_argument("--steps", type=int, default=10, help="timed steps, after --warmup")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="autocast dtype; auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--grad_ckpt", action="store_true", help="activation checkpointing per block")
    p.add_argument("--timm", action="store_true",
                   help="encoder mode: also time timm's SwinTransformerV2 at the same config")
    p.add_argument("--data", default=None, help="data mode: a folder of images; default: JPEGs made in a temp folder")
    p.add_argument("--jpeg_size", default="500x375",
                   help="data mode: WxH of the made JPEGs, comma-separated (ImageNet is ~500x375)")
    p.add_argument("--images", type=int, default=200, help="data mode: images to decode per measurement")
    p.add_argument("--members", type=int, default=1_000_000, help="archives mode: members of the indexed archives")
    p.add_argument("--jpegs", type=int, default=10_000, help="archives mode: JPEGs read from each layout")
    p.add_argument("--budget", type=float, default=480,
                   help="gpu mode: seconds for the whole report (it skips what would not fit)")
    p.add_argument("--json", default="gpu_report.json",
                   help="gpu mode: where the results go (and the markdown, as .md)")
    return p


def clock(device):
    """Seconds now: wall time after waiting for the GPU, or this process's CPU time on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def build_encoder(args):
    kw = dict(swinv2.PRESETS[args.model], drop_path_rate=args.drop_path)
    for key, value in (("embed_dim", args.embed_dim), ("img_size", args.img_size), ("window_size", args.window)):
        if value is not None:
            kw[key] = value
    if args.depths:
        kw["depths"] = tuple(int(d) for d in args.depths.split(","))
    model = swinv2.SwinV2(swinv2.SwinV2Config(**kw))
    model.set_grad_ckpt(args.grad_ckpt)
    return model


def timm_twin(cfg):
    """timm's SwinTransformerV2 at our config: same sizes, the same drop path (rising over the blocks the
    same way), no other dropout, res-post-norm gains at zero as ours, pooled features (no head)."""
    from timm.models.swin_transformer_v2 import SwinTransformerV2
    heads = [cfg.embed_dim * 2**i // cfg.head_dim for i in range(len(cfg.depths))]
    return SwinTransformerV2(img_size=cfg.img_size, patch_size=cfg.patch_size, window_size=cfg.window_size,
                             embed_dim=cfg.embed_dim, depths=cfg.depths, num_heads=heads, num_classes=0,
                             drop_path_rate=cfg.drop_path_rate)


def timed(step, args, device):
    """Seconds per call of step() after warmup (CPU seconds on a CPU, see clock)."""
    for _ in range(args.warmup):
        step()
    t0 = clock(device)
    for _ in range(args.steps):
        step()
    return (clock(device) - t0) / args.steps


def report(label, params, sec, args, device):
    mem = f", peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if device.type == "cuda" else ""
    unit = "ms/step" if device.type == "cuda" else "CPU-ms/step"
    rate = "img/s" if device.type == "cuda" else "img per CPU-s"
    print(f"{label:>8}: {params / 1e6:.1f}M params, batch {args.batch}, {sec * 1000:.0f} {unit}, "
          f"{args.batch / sec:.1f} {rate}{mem}", flush=True)


def encoder_step(model, size, args, device, ctx):
    """One forward + backward of the encoder alone (no optimizer), in training mode (drop path on)."""
    model = model.to(device).train()
    run = torch.compile(model) if args.compile else model
    x = torch.randn(args.batch, 3, size, size, device=device)

    def step():
        with ctx:
            out = run(x)
        out.float().square().mean().backward()
    return step


def interleaved(steps, args, device):
    """Median seconds per step of each named step(), timed in alternating order, so that a slow
    moment of a shared machine hits every contender alike (timing one after the other does not)."""
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times = {name: [] for name in steps}
    for r in range(args.steps):
        for name in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            t0 = clock(device)
            steps[name]()
            times[name].append(clock(device) - t0)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


# -----------------------------------------------------------------------------
# mim.py's training step, as the benchmarks run it


def simmim_parts(encoder, device):
    """SimMIM with the paper's target (47 px local normalisation) and AdamW, as mim.main builds them:
    weight-decay groups from train.param_groups, train.adamw (fused, which skips non-finite steps on the device)."""
    model = mim.SimMIM(encoder, mim.RECIPES["paper"]["norm_target"]).to(device).train()
    opt = train.adamw(train.param_groups(model, 0.05), 1e-4)
    return model, opt


def simmim_batch(cfg, b, device, seed=0):
    """b random images and their masks (the paper's 32 px cells, ratio 0.6), on device."""
    masks = mim.MaskGenerator(cfg.img_size, mim.RECIPES["paper"]["mask_patch"], cfg.patch_size, 0.6)
    x = torch.randn(b, 3, cfg.img_size, cfg.img_size, device=device)  # the values do not change the speed
    return x, torch.stack([masks(seed + i) for i in range(b)]).to(device)


def train_step(model, opt, ctx, compile_backend=None):
    """step(x, mask) -> (loss, grad norm): mim.py's step on one micro-batch: the masked forward and the
    loss under autocast, backward, then train.optimizer_step (clip at 5.0, skip a non-finite step, AdamW).
    Left out: loading the batch and building its masks (the data pipeline is measured on its own)."""
    run = torch.compile(model, backend=compile_backend) if compile_backend else model

    def step(x, mask):
        with ctx:
            loss = run(x, mask)
        loss.backward()
        _, grad_norm = train.optimizer_step(model, opt, 5.0)
        return loss.detach(), grad_norm
    return step


def bench_simmim(encoder, args, device, ctx):
    """One full pre-training step as mim.py runs it: masked forward, loss, backward, clip, AdamW."""
    model, opt = simmim_parts(encoder, device)
    x, mask = simmim_batch(encoder.cfg, args.batch, device)
    step = train_step(model, opt, ctx, "inductor" if args.compile else None)
    sec = timed(lambda: step(x, mask), args, device)
    report("simmim", sum(p.numel() for p in encoder.parameters()), sec, args, device)


def make_jpegs(folder, w, h, n=20):
    """n JPEGs of w x h at quality 90 in folder/a: a smooth random field plus a luminance grain, so the files
    are about as large as photos of that size (ImageNet's average is ~110 KB) and decode as slowly."""
    from PIL import Image
    os.makedirs(os.path.join(folder, "a"))
    rng = np.random.default_rng(0)
    for i in range(n):
        small = rng.integers(0, 255, (h // 16, w // 16, 3), dtype=np.uint8)
        img = (np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), np.float32)
               + rng.normal(0, 12, (h, w, 1)))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(os.path.join(folder, "a", f"{i}.jpg"), quality=90)


def bench_data(args):
    """Images per CPU-second of one process on one thread (= one data-loader worker) through the
    pre-training transform: ours (torchvision.io.decode_jpeg for small JPEGs, PIL's reduced-scale decode for
    large ones, uint8 out) against the plain PIL/torchvision pipeline as the official SimMIM code runs it
    (full PIL decode, RandomResizedCrop, flip, ToTensor, Normalize), and that pipeline ending in uint8.
    CPU time (time.process_time), not wall time: a shared machine's other jobs do not count; the pipelines
    run in alternating rounds, and the best round of each is kept. Made JPEGs are removed afterwards.
    Returns {pipeline: images per CPU-second} of the last size."""
    from torchvision import transforms as T
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    size = args.img_size or 192
    crop = [data.to_rgb, T.RandomResizedCrop(size, (0.67, 1.0), interpolation=T.InterpolationMode.BILINEAR),
            T.RandomHorizontalFlip()]
    # "plain" is SimMIM's own (microsoft/Swin-Transformer, data/data_simmim_pt.py)
    pipelines = {"plain": T.Compose(crop + [T.ToTensor(), T.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)]),
                 "plain uint8": T.Compose(crop + [T.PILToTensor()]), "ours": data.pretrain_transform(size)}
    for jpeg_size in ([None] if args.data else args.jpeg_size.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            folder = args.data or tmp
            if jpeg_size:
                make_jpegs(folder, *(int(v) for v in jpeg_size.split("x")))
            dataset = data.open_dataset(folder)
            kb = np.mean([os.path.getsize(os.path.join(dataset.root, name)) for name in dataset.names]) / 1000
            streams = {name: data.TrainStream(dataset, np.arange(len(dataset)), t, seed=0)
                       for name, t in pipelines.items()}
            best = {name: 0.0 for name in streams}
            for r in range(max(1, args.steps // 2)):
                for name, stream in (list(streams.items()) if r % 2 == 0 else list(streams.items())[::-1]):
                    t0 = time.process_time()
                    for pos in range(args.images):
                        stream[pos]
                    best[name] = max(best[name], args.images / (time.process_time() - t0))
            print(f"data: {len(dataset)} JPEGs of {jpeg_size or folder} ({kb:.0f} KB), crop {size}, "
                  "img per CPU-second: "
                  + ", ".join(f"{name} {rate:.0f}" for name, rate in best.items())
                  + f"; ours / plain {best['ours'] / best['plain']:.2f}x "
                    f"(/ plain uint8 {best['ours'] / best['plain uint8']:.2f}x)", flush=True)
    torch.set_num_threads(threads)
    return best


# -----------------------------------------------------------------------------
# archives (data.py): the index of a 1M-member zip and of tar shards, and reading speed per layout

def private_mb(pid):
    """Private (not shared with any other process) resident memory of process pid in MB (Linux)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith("Private_")) / 1024


def write_layouts(folder, contents, n, shard_size, labels=True):
    """The same n images (contents[i % len(contents)]) as loose files (if labels), the official zip layout
    (train.zip + train_map.txt) and tar shards of shard_size images (with KEY.cls if labels)."""
    import io
    import tarfile
    import zipfile
    names = [f"n{k % 1000:08d}/img_{k:07d}.jpg" for k in range(n)]
    if labels:
        for k, name in enumerate(names):
            os.makedirs(os.path.join(folder, "loose", os.path.dirname(name)), exist_ok=True)
            with open(os.path.join(folder, "loose", name), "wb") as f:
                f.write(contents[k % len(contents)])
    os.makedirs(os.path.join(folder, "zip"))
    with zipfile.ZipFile(os.path.join(folder, "zip", "train.zip"), "w", zipfile.ZIP_STORED) as z:
        for k, name in enumerate(names):
            z.writestr(name, contents[k % len(contents)])
    with open(os.path.join(folder, "zip", "train_map.txt"), "w") as f:
        f.writelines(f"{name}\t{k % 1000}\n" for k, name in enumerate(names))
    os.makedirs(os.path.join(folder, "tar"))
    for s in range(0, n, shard_size):
        with tarfile.open(os.path.join(folder, "tar", f"shard-{s // shard_size:06d}.tar"), "w") as t:
            for k in range(s, min(s + shard_size, n)):
                members = [(f"{k:07d}.jpg", contents[k % len(contents)])]
                members += [(f"{k:07d}.cls", str(k % 1000).encode())] if labels else []
                for name, raw in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(raw)
                    t.addfile(info, io.BytesIO(raw))


def in_child(fn, *a):
    """fn(*a) in a forked process, so its memory and the cache it finds are measured from a clean start."""
    import multiprocessing
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=lambda: send.send(fn(*a)))  # not a Pool's daemon: it may start loader workers
    child.start()
    out = receive.recv()
    child.join()
    return out


def open_index(path):
    """(seconds to open the data set, index bytes per image besides its name, name bytes per image, resident
    MB it added, images)."""
    def rss_mb():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
    before, t0 = rss_mb(), time.perf_counter()
    ds = data.open_dataset(path)
    sec, grown = time.perf_counter() - t0, rss_mb() - before
    arrays = (ds.names.offsets, ds.archive, ds.start, ds.size, ds.method, ds.targets)  # and the names' bytes
    return sec, sum(a.nbytes for a in arrays) / len(ds), ds.names.blob.nbytes / len(ds), grown, len(ds)


def worker_memory(path, samples, workers=2):
    """Private MB of each data-loader worker after `samples` samples of the pre-training stream."""
    ds = data.open_dataset(path)
    stream = data.TrainStream(ds, np.arange(len(ds)), data.pretrain_transform(32), seed=0)
    it = iter(data.make_loader(stream, 32, sampler=data.StreamSampler(32, 32), workers=workers))
    for _ in range(samples // 32):
        next(it)
    return [private_mb(w.pid) for w in it._workers]


def bench_archives(args):
    """The data layouts of data.py: (1) index of --members members, as one zip and as tar shards of 10K:
    build time (cold: no cache), load time (cached), bytes per image, memory; the private memory of each of
    2 data-loader workers after 8,000 samples; (2) images per CPU-second of one thread (= one worker)
    through the pre-training transform, from the same --jpegs JPEGs as loose files, the zip and tar shards.
    Files are read from the page cache (written just before): this measures the CPU cost of each layout,
    not a cluster file system's metadata cost, which is why the archives exist."""
    from PIL import Image
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows, cache = {}, os.environ.get("SIMMIM_INDEX_CACHE")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["SIMMIM_INDEX_CACHE"] = os.path.join(tmp, "cache")  # cold, then cached, and removed after
        buf = io.BytesIO()
        Image.new("RGB", (48, 48), (90, 120, 30)).save(buf, "JPEG")
        t0 = time.perf_counter()
        write_layouts(os.path.join(tmp, "big"), [buf.getvalue()], args.members, 10000, labels=False)
        print(f"archives: {args.members:,} members of {len(buf.getvalue())} bytes written in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        for layout in ("zip", "tar"):
            path = os.path.join(tmp, "big", layout)
            cold, per_image, name, grown, n = in_child(open_index, path)
            warm, _, _, grown_warm, _ = in_child(open_index, path)
            samples = min(8000, args.members)
            private = in_child(worker_memory, path, samples)
            rows[f"index {layout}"] = dict(build_s=cold, cached_s=warm, bytes_per_image=per_image, name_bytes=name,
                                           build_rss_mb=grown, cached_rss_mb=grown_warm, worker_private_mb=private)
            print(f"index {layout}: {n:,} images, built in {cold:.1f} s (+{grown:.0f} MB resident), cached "
                  f"{warm:.2f} s (+{grown_warm:.0f} MB), {per_image:.0f} bytes per image + its name ({name:.0f}); "
                  f"private MB per worker after {samples:,} samples: {', '.join(f'{m:.0f}' for m in private)}",
                  flush=True)
        shutil.rmtree(os.path.join(tmp, "big"))
        make_jpegs(os.path.join(tmp, "distinct"), 500, 375, n=100)
        contents = [open(os.path.join(tmp, "distinct", "a", f"{i}.jpg"), "rb").read() for i in range(100)]
        write_layouts(os.path.join(tmp, "jpegs"), contents, args.jpegs, 1000)
        streams = {layout: data.TrainStream(data.open_dataset(os.path.join(tmp, "jpegs", layout)),
                                            np.arange(args.jpegs), data.pretrain_transform(192), seed=0)
                   for layout in ("loose", "zip", "tar")}
        best = dict.fromkeys(streams, 0.0)
        for r in range(3):
            for layout, stream in (list(streams.items()) if r % 2 == 0 else list(streams.items())[::-1]):
                t0 = time.process_time()
                for pos in range(r * args.images, (r + 1) * args.images):
                    stream[pos]
                best[layout] = max(best[layout], args.images / (time.process_time() - t0))
        rows["read"] = best
        print(f"read: {args.jpegs:,} JPEGs of 500x375 ({np.mean([len(c) for c in contents]) / 1000:.0f} KB), crop "
              f"192, img per CPU-second of one thread: " + ", ".join(f"{k} {v:.0f}" for k, v in best.items()),
              flush=True)
    os.environ.pop("SIMMIM_INDEX_CACHE")
    if cache is not None:
        os.environ["SIMMIM_INDEX_CACHE"] = cache
    torch.set_num_threads(threads)
    return rows


# -----------------------------------------------------------------------------
# the GPU report: its pieces take a device and a preset name, so the tests run each on a CPU at tiny size

# dense bf16 tensor-core peaks (NVIDIA datasheets; the "with sparsity" figures are twice these), matched
# in order against the device name; NVL boards have other clocks, so no guess for them
PEAK_TFLOPS = (("NVL", None), ("H100 PCIe", 756), ("H100", 989), ("H200", 989), ("A100", 312))
GPU_PLAN = dict(
    micro=128,                  # micro-batch of the img/s rows (2048 over 8 GPUs is 2 x 128)
    cap=512,                    # the largest-micro-batch search stops here
    sizes=("B", "S", "L", "H", "g"),
    ckpt=("H", "g"),            # measured with --grad_ckpt
    dense=("S", "B", "L"),      # detect.py's Mask R-CNN at 1024 px, segment.py's UPerNet at 512 px ...
    dense_micro=2,              # ... at 2 images per GPU, their recipes' 16 over 8 GPUs
    compile=("B", "S", "L"),    # near the end: a compilation's length is the least predictable part of the report
    sdpa=("B", 256),            # its window attention at micro-batch 256: ~0.7 GB of bias gradient per block
    numerics=("B", 16), tiny=(300, 64), finetune=("B", 224, 14),  # tiny: steps, batch
    data=dict(jpeg_size="500x375", images=100),
    timing=dict(warmup=2, seconds=2.0, min_steps=3),  # per img/s row: untimed steps, then ~2 s of timed ones
    search_s=60,                # seconds for one size's micro-batch searches (x1.5 with grad_ckpt)
    compile_backend="inductor")


def free(device):
    """Drop what nothing refers to any more, give cached blocks back, and start a new peak (on a GPU: a CPU
    has no cache to give back, and a full collection is slow in a process that has imported torch)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def error_line(e):
    """An exception in one line for the report: its type and the first line of its message."""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300].replace("|", "/")


def attempt(fn, device, opt=None):
    """fn(), or None when the GPU runs out of memory (cuBLAS and cuDNN say so as RuntimeErrors); the
    half-made gradients and the cache are then freed (after the except clause, whose traceback holds the
    failed step's tensors). Any other error is cleaned up the same way, then raised again without its
    frames (its last lines go to stderr first): the caller loses that probe, not the memory."""
    error = None
    try:
        return fn()
    except Exception as e:
        if not (isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e) or "ALLOC_FAILED" in str(e)):
            print("\n".join(traceback.format_exc().splitlines()[-6:]), file=sys.stderr, flush=True)
            error = e.with_traceback(None)
    if opt is not None:
        opt.zero_grad(set_to_none=True)
    try:
        free(device)
    finally:
        if error is not None:
            raise error  # the first error, also when a broken CUDA context makes the clean-up fail too
    return None


def measure(step, device, seconds=2.0, warmup=2, min_steps=3, max_steps=20):
    """Seconds per step(): `warmup` untimed steps (the allocator, cuBLAS heuristics, the AdamW state of the
    first step, a compilation), then as many timed steps as fill about `seconds`."""
    t0 = clock(device)
    for _ in range(warmup):
        step()
    per_step = (clock(device) - t0) / max(warmup, 1)
    n = int(min(max_steps, max(min_steps, seconds / max(per_step, 1e-9))))
    t0 = clock(device)
    for _ in range(n):
        step()
    return (clock(device) - t0) / n


def largest_batch(probe, start, cap, time_left):
    """The largest micro-batch start * 2^k <= cap that fits: probe(b) -> seconds per step, or None when
    out of memory. Doubles from `start` (halves first if start does not fit); stops at the cap, or when
    the next probe (two steps at twice the batch, ~4x the last step) would not fit in time_left().
    An error other than running out of memory ends the search at the last batch that ran.
    Returns (batch or 0, why it stopped: 'oom' | 'cap' | 'time' | 'none fits' | 'error at b: ...')."""
    b, fits = start, 0
    try:
        while (last := probe(b)) is None:
            if b == 1:
                return 0, "none fits"
            b //= 2
        fits = b
        if b < start:
            return b, "oom"  # 2b was probed first and did not fit
        while b * 2 <= cap:
            if 4 * last > time_left():
                return b, "time"
            if (last := probe(b * 2)) is None:
                return b, "oom"
            b = fits = b * 2
        return b, "cap"
    except Exception as e:  # e.g. a kernel's int32 indexing at a large batch: keep what the smaller ones measured
        return fits, f"error at {b if fits < b else 2 * b}: {error_line(e)}"


def flops_per_image(model, x, mask, ctx):
    """Model FLOPs of one training step per image: the SimMIM forward and backward, counted by
    FlopCounterMode (matmuls, convolutions, attention kernels; elementwise work is not counted, and
    a checkpointed forward is not counted twice: MFU counts the model's FLOPs, not the recomputation)."""
    with FlopCounterMode(display=False) as counter:
        with ctx:
            loss = model(x, mask)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / x.shape[0]


def size_report(name, device, ctx, plan, time_left):
    """One preset: parameters, FLOPs per image, img/s and peak memory at the plan's micro-batch (halved
    until it fits; grad checkpointing for plan['ckpt'] sizes), and the largest micro-batch without and
    with grad checkpointing, with a linear fit of peak memory = fixed + per image x batch."""
    free(device)
    with torch.device(device):  # built on the device: initialising a 1B-parameter model on a CPU is slow
        encoder = swinv2.create(name, drop_path_rate=0.1)
    model, opt = simmim_parts(encoder, device)
    out = dict(params_m=sum(p.numel() for p in encoder.parameters()) / 1e6, img_size=encoder.cfg.img_size)
    x, mask = simmim_batch(encoder.cfg, 2, device)
    try:
        out["gflop_per_img"] = flops_per_image(model, x, mask, ctx) / 1e9
    except Exception as e:  # no MFU then, but the rows below still run
        out.update(gflop_per_img=None, flop_error=error_line(e))
        model.zero_grad(set_to_none=True)
    step = train_step(model, opt, ctx)
    peaks = {}  # (grad_ckpt, batch) -> peak GiB of the probes that fit

    def run(b, ckpt, timing=dict(warmup=1, min_steps=1, max_steps=1)):  # default: a probe of 2 steps
        nonlocal x, mask
        encoder.set_grad_ckpt(ckpt)
        x = mask = None
        free(device)
        x, mask = simmim_batch(encoder.cfg, b, device)
        sec = attempt(lambda: measure(lambda: step(x, mask), device, **timing), device, opt)
        if sec is not None:
            peaks[ckpt, b] = peak_gib(device)
        return sec

    ckpt = name in plan["ckpt"]
    b = plan["micro"]
    try:  # an error other than memory loses this row only: the searches below still run
        while b >= 1 and (sec := run(b, ckpt, plan["timing"])) is None:
            b //= 2
        out["eager"] = (dict(grad_ckpt=ckpt, batch=b, img_s=b / sec, ms=1000 * sec, peak_gib=peaks[ckpt, b]) if b
                        else dict(batch=0))
    except Exception as e:
        out["eager"] = dict(grad_ckpt=ckpt, batch=0, error=error_line(e))
    for ckpt in (False, True):  # largest_batch keeps what ran before an error
        b, why = largest_batch(lambda b: run(b, ckpt), plan["micro"], plan["cap"], time_left)
        row = dict(batch=b, stop=why, peak_gib=peaks.get((ckpt, b)))
        row.update(memory_line({b: p for (c, b), p in peaks.items() if c == ckpt and p is not None}))
        out["grad_ckpt" if ckpt else "no_ckpt"] = row
    return out


def memory_line(peaks):
    """{batch: peak GiB} -> {gib_fixed, gib_per_img}: the line through the two largest batches (weights,
    gradients and AdamW state are the fixed part, activations grow with the batch), or {} for fewer
    than two. It tells what fits on a card with other memory: (memory - fixed) / per image."""
    if len(peaks) < 2:
        return {}
    (b1, p1), (b2, p2) = sorted(peaks.items())[-2:]
    per_img = (p2 - p1) / (b2 - b1)
    return dict(gib_fixed=p1 - per_img * b1, gib_per_img=per_img)


def compiled_report(name, b, device, ctx, plan):
    """img/s and peak memory of the torch.compile'd step at micro-batch b, and the compile time (the
    first step, which compiles forward and backward; part of the report's time budget)."""
    free(device)
    with torch.device(device):
        encoder = swinv2.create(name, drop_path_rate=0.1)
    model, opt = simmim_parts(encoder, device)
    step = train_step(model, opt, ctx, plan["compile_backend"])
    x, mask = simmim_batch(encoder.cfg, b, device)
    try:
        t0 = time.perf_counter()
        if attempt(lambda: step(x, mask), device, opt) is None:
            return dict(batch=b, oom=True)
        out = dict(batch=b, compile_s=time.perf_counter() - t0)
        sec = attempt(lambda: measure(lambda: step(x, mask), device, **plan["timing"]), device, opt)
        return (dict(out, oom=True) if sec is None
                else dict(out, img_s=b / sec, ms=1000 * sec, peak_gib=peak_gib(device)))
    finally:
        del step, model, opt  # the compiled graphs refer to the model
        torch.compiler.reset()


def attention_ops(counter):
    """The attention ops a FlopCounterMode saw: an SDPA kernel's own op, or aten.bmm for the math path."""
    return sorted(str(op) for op in counter.get_flop_counts()["Global"]
                  if "attention" in str(op) or str(op) == "aten.bmm")


def sdpa_report(name, b, device, ctx):
    """Which kernel of F.scaled_dot_product_attention runs our window attention (a float bias that needs
    a gradient) in forward and backward: by default (the attention ops FlopCounterMode sees), and with
    each backend forced alone (sdpa_kernel), on a shifted block of stage 0 at micro-batch b; and the
    memory the bias gradient costs: peak of that attention's forward + backward with the position-bias
    MLP trainable vs frozen (a frozen MLP gives a bias that needs no gradient)."""
    free(device)
    with torch.device(device):
        encoder = swinv2.create(name)
    stage = encoder.layers[0]
    block = stage.blocks[1] if len(stage.blocks) > 1 else stage.blocks[0]
    attn, ws, nH = block.attn, block.ws, block.attn.num_heads
    nW = (stage.res // ws) ** 2
    x = torch.randn(b * nW, ws * ws, encoder.cfg.embed_dim, device=device, requires_grad=True)  # (B*nW, N, C)

    def fwd_bwd():
        with ctx:
            out = attn(x, block.attn_mask)
        out.float().square().mean().backward()
        x.grad = None
        attn.zero_grad(set_to_none=True)

    fwd_bwd()  # warm up
    with FlopCounterMode(display=False) as counter:
        fwd_bwd()
    res = dict(block=f"stage 0, block {list(stage.blocks).index(block)}, window {ws}, {nH} heads, micro-batch {b}",
               default_ops=attention_ops(counter))
    for trainable, key in ((True, "bias_grad"), (False, "no_bias_grad")):
        attn.cpb_mlp.requires_grad_(trainable)
        free(device)
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        fwd_bwd()
        res[f"peak_gib_{key}"] = peak_gib(device) - base / 2**30 if device.type == "cuda" else None
    with FlopCounterMode(display=False) as counter:  # the kernel may change when the bias needs no gradient
        fwd_bwd()
    res["ops_no_bias_grad"] = attention_ops(counter)
    attn.cpb_mlp.requires_grad_(True)
    res["forced"] = {}
    for backend in (SDPBackend.MATH, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION,
                    SDPBackend.CUDNN_ATTENTION):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with sdpa_kernel(backend):
                    fwd_bwd()
                verdict = "runs"
            except RuntimeError as e:  # "No available kernel"; the warnings say why
                why = ([str(w.message).split("(Triggered internally")[0].strip() for w in caught]
                       + [str(e).splitlines()[0]])
                verdict = "fails: " + "; ".join(dict.fromkeys(w for w in why if w))[:300]
        res["forced"][backend.name.lower()] = verdict
    res["bias_grad_gib_expected"] = b * nW * nH * (ws * ws) ** 2 * 2 / 2**30  # (B*nW, nH, N, N) in bf16
    return res


def numerics_report(name, b, tiny_steps, tiny_batch, device, ctx, time_left=lambda: float("inf")):
    """(1) bf16 autocast vs fp32 (no TF32) on the same images and weights: relative difference of the
    loss and of the gradient. The res-post-norm gains start at 0 (every block the identity), so they are
    set to 1 here, as a trained model's are about. (2) tiny_steps steps of tiny in the report's autocast
    (micro-batch tiny_batch) with the CPU recipe's LR and the paper's 47 px target: how many losses or
    gradient norms were not finite (fewer steps if time_left() runs out: the result says so)."""
    free(device)
    torch.manual_seed(0)  # the same weights in every report
    with torch.device(device):
        encoder = swinv2.create(name)
        for layer in encoder.layers:
            for blk in layer.blocks:
                torch.nn.init.ones_(blk.norm1.weight), torch.nn.init.ones_(blk.norm2.weight)
    model, _ = simmim_parts(encoder, device)
    size = encoder.cfg.img_size
    stream = data.TrainStream(data.open_dataset("synthetic"), np.arange(synthetic.TRAIN_IMAGES),
                              data.pretrain_transform(size), seed=0)
    x = data.normalize(torch.stack([stream[i].image for i in range(b)]).to(device))
    _, mask = simmim_batch(encoder.cfg, b, device)
    results = {}
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    for label, precision in (("fp32", contextlib.nullcontext()),
                             ("bf16", torch.autocast(device.type, dtype=torch.bfloat16))):
        with precision:
            loss = model(x, mask)
        loss.backward()
        results[label] = loss.item(), torch.cat([p.grad.flatten().float() for p in model.parameters()
                                                 if p.grad is not None])
        model.zero_grad(set_to_none=True)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    (l32, g32), (l16, g16) = results["fp32"], results["bf16"]
    out = dict(model=name, batch=b, loss_fp32=l32, loss_bf16=l16, loss_rel_diff=abs(l16 - l32) / abs(l32),
               grad_rel_diff=((g16 - g32).norm() / g32.norm()).item())
    del model, encoder, results, g32, g16, x, mask

    # (2) a short run of tiny: random batches from 4 x batch synthetic images at 64 px
    free(device)
    torch.manual_seed(0)
    with torch.device(device):
        encoder = swinv2.create("tiny", drop_path_rate=0.1)
    model, opt = simmim_parts(encoder, device)
    step = train_step(model, opt, ctx)
    size, recipe, B = encoder.cfg.img_size, mim.RECIPES["demo"], tiny_batch
    stream = data.TrainStream(data.open_dataset("synthetic"), np.arange(synthetic.TRAIN_IMAGES),
                              data.pretrain_transform(size), seed=0)
    masks = mim.MaskGenerator(size, recipe["mask_patch"], 4, 0.6)
    n = 4 * B  # a pool of images to draw the batches from
    pool = data.normalize(torch.stack([stream[i].image for i in range(n)]).to(device))
    pool_masks = torch.stack([masks(i) for i in range(n)]).to(device)
    g = torch.Generator().manual_seed(0)
    bad, losses = 0, []
    for s in range(tiny_steps):
        if s and time_left() < 0:
            out["stopped"] = f"time up after {s} of {tiny_steps} tiny steps"
            break
        lr = train.get_lr(s, recipe["lr"] * B / 512, 5e-7 * B / 512, tiny_steps // 10, tiny_steps, tiny_steps * 7 // 8)
        for group in opt.param_groups:
            group["lr"] = lr * group["lr_scale"]
        idx = torch.randint(n, (B,), generator=g).to(device)
        loss, grad_norm = step(pool[idx], pool_masks[idx])
        bad += int(not (torch.isfinite(loss) and torch.isfinite(grad_norm)))
        losses.append(loss.item())
    k = max(1, min(10, len(losses) // 2))
    out.update(tiny_steps=len(losses), tiny_batch=B, tiny_nonfinite=bad, tiny_loss_first=sum(losses[:k]) / k,
               tiny_loss_last=sum(losses[-k:]) / k)
    return out


def finetune_report(name, img_size, window, b, device, ctx, plan):
    """img/s and peak memory of finetune.py's step (mixup/cutmix, soft-target cross-entropy, layer-decay
    AdamW groups, train.optimizer_step) at img_size / window over the pre-training windows, micro-batch b
    halved until it fits."""
    free(device)
    pretrained_windows = swinv2.SwinV2Config(**swinv2.PRESETS[name]).window_sizes  # e.g. 12,12,12,6
    with torch.device(device):
        model = swinv2.create(name, img_size=img_size, window_size=window, pretrained_window_sizes=pretrained_windows,
                              num_classes=1000, drop_path_rate=0.1)
    opt = train.adamw(finetune.param_groups(model, 0.05, 0.75), 1e-4)
    mix = finetune.make_mixer(0.8, 1.0, 0.1, 1000)

    def step(x, labels):
        x, target = mix(x, labels)
        with ctx:
            logits = model(x)
        loss = torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()  # finetune.main's loss
        loss.backward()
        train.optimizer_step(model, opt, 5.0)

    while b >= 1:
        free(device)
        x, labels = torch.randn(b, 3, img_size, img_size, device=device), torch.randint(1000, (b,), device=device)
        sec = attempt(lambda: measure(lambda: step(x, labels), device, **plan["timing"]), device, opt)
        if sec is not None:
            return dict(model=name, img_size=img_size, window=window, batch=b, img_s=b / sec, ms=1000 * sec,
                        peak_gib=peak_gib(device))
        x = labels = None
        b //= 2
    return dict(model=name, img_size=img_size, window=window, batch=0)


def boxes_and_masks(S, n, K, g):
    """A detection target of n random boxes (XYXY, sides 1/16 to 1/2 of the S px square), each with its
    box filled as its instance mask, and labels in 1..K: torchvision's format, as detect.py's data gives it."""
    wh = torch.empty(n, 2).uniform_(S / 16, S / 2, generator=g)
    xy = torch.rand(n, 2, generator=g) * (S - wh)
    boxes = torch.cat([xy, xy + wh], 1).round()
    masks = torch.zeros(n, S, S, dtype=torch.uint8)
    for m, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
        m[y0:y1, x0:x1] = 1
    return dict(boxes=boxes, labels=torch.randint(1, K + 1, (n,), generator=g), masks=masks)


def dense_step(task, name, b, device, ctx, grad_ckpt):
    """One training step of detect.py ('detect': Mask R-CNN, 80 COCO classes) or segment.py ('segment':
    UPerNet, 150 ADE20K classes) for preset `name`, built by the script's build_model at its recipe (the
    paper's for S..g: 1024 px squares, 512 px crops, window 16; the CPU one for nano and tiny) from scratch
    (weights do not change the speed), on b synthetic images: forward with targets and the script's loss
    (3 boxes with masks per image; a label map whose top eighth is ignored), backward, train.optimizer_step
    with the script's layer-decay AdamW groups (both recipes clip nothing). Mixed precision as the scripts:
    the detector's backbone only (its heads stay fp32), the whole segmenter.
    Returns (step() -> loss, optimizer, side in pixels, window)."""
    script = importlib.import_module(task)  # detect or segment: imported here, so nothing else needs them
    r = dict(script.RECIPES["paper" if name in swinv2.PAPER_SIZES else "demo"])
    K = dict(detect=80, segment=150)[task]
    # the script's defaults (detect: --heads gn)
    args = script.get_parser().parse_args(["--model", name, "--pretrained", "none"])
    args.grad_ckpt = grad_ckpt
    model, _ = script.build_model(args, r, None, K)
    model = model.to(device).train()
    opt = train.adamw(finetune.param_groups(model, 0.05, r["layer_decay"]), r["lr"])
    S, g = r["img_size" if task == "detect" else "crop"], torch.Generator().manual_seed(0)
    if task == "detect":
        if not hasattr(model.backbone, "autocast"):  # setting it would pass silently, and the row be fp32
            raise AttributeError("detect.py's backbone has no `autocast`: "
                                 "see how detect.detect sets its mixed precision")
        model.backbone.autocast = ctx  # as detect.py: bf16 in the encoder and FPN, fp32 box regression
        images = [torch.rand(3, S, S, generator=g).to(device) for _ in range(b)]
        targets = [{k: v.to(device) for k, v in boxes_and_masks(S, 3, K, g).items()} for _ in range(b)]
        loss_fn = lambda: sum(model(images, targets).values())
    else:
        x, y = torch.randn(b, 3, S, S, generator=g).to(device), torch.randint(K, (b, S, S), generator=g)
        y[:, :S // 8] = script.IGNORE
        y = y.to(device)

        def loss_fn():
            with ctx:
                logits, aux = model(x)
            return script.seg_loss(logits, aux, y)[0]

    def step():
        loss = loss_fn()
        loss.backward()
        train.optimizer_step(model, opt, 0.0)
        return loss.detach()
    return step, opt, S, r["window"]


def dense_probe(task, name, b, device, ctx, timing):
    """img/s, ms/step and peak memory of dense_step at micro-batch b; if it runs out of memory, again with
    grad checkpointing; marked oom if that does too."""
    for ckpt in (False, True):
        free(device)
        step, opt, S, window = dense_step(task, name, b, device, ctx, ckpt)
        row = dict(task=task, model=name, img_size=S, window=window, batch=b, grad_ckpt=ckpt)
        sec = attempt(lambda: measure(step, device, **timing), device, opt)
        if sec is not None:
            return dict(row, img_s=b / sec, ms=1000 * sec, peak_gib=peak_gib(device))
        step = opt = None
    return dict(row, oom=True)


def dense_report(name, b, device, ctx, plan, time_left):
    """The detection and the segmentation row of preset `name`. An error other than memory loses that
    row only; the second runs only if the time the first took is still left, else the result says so."""
    out, need = {}, 0.0
    for task in ("detect", "segment"):
        if time_left() < need:
            out["stopped"] = f"time up before {task}: it needs ~{need:.0f} s, {max(time_left(), 0):.0f} s left"
            break
        t0 = time.perf_counter()
        try:
            out[task] = dense_probe(task, name, b, device, ctx, plan["timing"])
        except Exception as e:
            out[task] = dict(task=task, model=name, batch=b, error=error_line(e))
        need = time.perf_counter() - t0
    return out


def peak_tflops(device):
    """(dense bf16 peak in TFLOPS or None, the line saying which)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    for key, tflops in PEAK_TFLOPS:
        if key in name:
            if tflops:
                return tflops, f"{name}: {tflops} TFLOPS dense bf16 ({key} in bench.PEAK_TFLOPS)"
            break
    return None, f"{name}: no dense bf16 peak in bench.PEAK_TFLOPS, so no MFU"


def fmt(v, spec=".0f"):
    return "–" if v is None else format(v, spec)


def markdown(R):
    """The report as markdown: a table of training steps, one of micro-batches, then the other checks.
    A phase that failed or was skipped shows as such, never as a number."""
    env, sizes = R["env"], {k[5:]: v for k, v in R.items() if k.startswith("size ") and "error" not in v}
    lines = [f"GPU report: {env['device']}, {fmt(env['memory_gib'])} GiB, torch {env['torch']}, CUDA {env['cuda']}, "
             f"autocast {env['autocast']}, {R['elapsed_s']:.0f} s. Peak memory is torch.cuda.max_memory_allocated. "
             f"MFU: {env['peak_line']}.", "",
             "| training step (bf16 on a GPU) | micro-batch | img/s | ms/step | peak GiB | GFLOP/img | MFU "
             "| compile s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]

    def row(label, r, gflop):
        mfu = r.get("img_s") and gflop and env["peak_tflops"] and r["img_s"] * gflop / (env["peak_tflops"] * 1e3)
        label += " (out of memory)" if r.get("oom") else f" (error: {r['error']})" if r.get("error") else ""
        return (f"| {label} | {r.get('batch') or ('–' if r.get('error') else 'none fits')} | {fmt(r.get('img_s'))} "
                f"| {fmt(r.get('ms'))} | {fmt(r.get('peak_gib'), '.1f')} | {fmt(gflop, '.1f')} "
                f"| {fmt(mfu and 100 * mfu, '.1f')}{' %' if mfu else ''} | {fmt(r.get('compile_s'))} |")
    for name, s in sizes.items():
        lines.append(row(f"{name} SimMIM, {s['img_size']} px, eager"
                         f"{', grad_ckpt' if s['eager'].get('grad_ckpt') else ''}",
                         s["eager"], s["gflop_per_img"]))
        if "error" not in R.get(f"compiled {name}", {"error": 0}):
            lines.append(row(f"{name} SimMIM, {s['img_size']} px, torch.compile", R[f"compiled {name}"],
                             s["gflop_per_img"]))
    for name, d in [(k[6:], v) for k, v in R.items() if k.startswith("dense ")]:  # Mask R-CNN and UPerNet
        for task, what in (("detect", "Mask R-CNN (bf16 backbone)"), ("segment", "UPerNet")):
            if r := d.get(task):
                where = f", {r['img_size']} px, window {r['window']}" if "img_size" in r else ""
                lines.append(row(f"{name} {what}{where}{', grad_ckpt' if r.get('grad_ckpt') else ''}", r, None))
    if "error" not in R.get("finetune", {"error": 0}):
        ft = R["finetune"]
        lines.append(row(f"{ft['model']} fine-tuning, {ft['img_size']} px, window {ft['window']}, eager", ft, None))
    lines += ["", "| largest micro-batch (eager) | params | no grad_ckpt | grad_ckpt "
                  "| peak GiB ≈ fixed + per image × b: no ckpt; ckpt |",
              "|---|---:|---:|---:|---|"]

    def most(r):
        return f"{r['batch']}{dict(cap=' (cap)', time=' (time up)', oom='').get(r['stop'], ' (' + r['stop'] + ')')}"

    def linear(r):
        return f"{r['gib_fixed']:.1f} + {r['gib_per_img']:.3f} b" if "gib_per_img" in r else "–"
    for name, s in sizes.items():
        lines.append(f"| {name}, {s['img_size']} px | {s['params_m']:.0f}M | {most(s['no_ckpt'])} "
                     f"| {most(s['grad_ckpt'])} | {linear(s['no_ckpt'])}; {linear(s['grad_ckpt'])} |")
    lines.append("")
    if "error" not in (n := R.get("numerics", {"error": 0})):
        lines.append(f"- bf16 vs fp32 (no TF32), SwinV2-{n['model']} at batch {n['batch']}, the same images and "
                     f"weights (post-norm gains set to 1): loss {n['loss_fp32']:.5f} vs {n['loss_bf16']:.5f}, "
                     f"relative difference {n['loss_rel_diff']:.1e}; gradient {n['grad_rel_diff']:.1e}. "
                     f"tiny, {n['tiny_steps']} steps of {n['tiny_batch']} in {env['autocast']}: "
                     f"{n['tiny_nonfinite']} non-finite; loss {n['tiny_loss_first']:.3f} -> {n['tiny_loss_last']:.3f}")
    if "error" not in (a := R.get("sdpa", {"error": 0})):
        lines.append(f"- SDPA on our window attention ({a['block']}; a float bias that needs a gradient): ops run "
                     f"{', '.join(a['default_ops'])}; forced alone: "
                     + "; ".join(f"{k} {v}" for k, v in a["forced"].items()))
        lines.append(f"- attention-bias gradient: that attention's forward + backward peaks "
                     f"{fmt(a['peak_gib_bias_grad'], '.2f')} GiB above its inputs with the bias trainable, "
                     f"{fmt(a['peak_gib_no_bias_grad'], '.2f')} GiB with it frozen "
                     f"(ops {', '.join(a['ops_no_bias_grad'])}); a (B*nW, nH, N, N) bf16 tensor is "
                     f"{a['bias_grad_gib_expected']:.2f} GiB")
    if "error" not in (d := R.get("data", {"error": 0})):
        lines.append(f"- data pipeline, one worker, pre-training transform of {R['plan']['data']['jpeg_size']} JPEGs: "
                     + ", ".join(f"{k} {v:.0f} img/s" for k, v in d.items()))
    lines += [f"- {k}: {v[e]}" for k, v in R.items() for e in ("error", "flop_error", "stopped")
              if isinstance(v, dict) and e in v]
    lines += [f"- {k}: {v}" for k, v in R["phases"].items() if isinstance(v, str)]  # skipped
    if "in_progress" in R:  # a report that ends with this line stopped there: killed, or its process died
        lines.append(f"- {R['in_progress']}: in progress")
    return "\n".join(lines) + "\n"


def gpu_report(device, plan=GPU_PLAN, budget=480.0, json_path="gpu_report.json", dtype="auto"):
    """Run the report's phases in order of importance, each only if its time estimate fits in what is
    left of `budget` seconds; an exception in one phase is recorded and the next runs. Rewrites
    json_path and its .md after every phase. Returns the results dict."""
    start = time.perf_counter()
    left = lambda: budget - (time.perf_counter() - start)
    ctx = train.autocast(device, train.amp_dtype(device, dtype))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as mim.main
    peak, peak_line = peak_tflops(device)
    R = dict(env=dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
                      memory_gib=(torch.cuda.get_device_properties(device).total_memory / 2**30
                                  if device.type == "cuda" else None),
                      torch=torch.__version__, cuda=torch.version.cuda,
                      autocast=str(ctx.fast_dtype if hasattr(ctx, "fast_dtype") else "float32"),
                      peak_tflops=peak, peak_line=peak_line),
             plan=plan, budget_s=budget, phases={}, elapsed_s=0.0)

    def save():
        R["elapsed_s"] = time.perf_counter() - start
        train.save_json(json_path, R)
        try:
            md = markdown(R)
        except Exception as e:  # a row the tables did not foresee costs the markdown, not the JSON or the run
            md = f"GPU report: no markdown ({error_line(e)}); the results are in {json_path}\n"
        train.atomic_write(os.path.splitext(json_path)[0] + ".md", lambda f: f.write(md.encode()))
        return md

    def phase(name, need, fn):
        """fn() -> dict, stored as R[name], if `need` seconds are left; its time (or why not) goes to R['phases'].
        The files name it before it starts (a run that dies in it says where); the thread count and TF32 flags
        it found are put back, whatever it did."""
        if left() < need:
            R["phases"][name] = f"skipped: needs ~{need:.0f} s, {max(left(), 0):.0f} s left"
            print(f"[{time.perf_counter() - start:4.0f} s] {name}: {R['phases'][name]}", flush=True)
            return
        R["in_progress"] = name
        save()
        print(f"[{time.perf_counter() - start:4.0f} s] {name}: starting, {left():.0f} s left", flush=True)
        t0 = time.perf_counter()
        threads, tf32 = torch.get_num_threads(), (torch.backends.cuda.matmul.allow_tf32,
                                                  torch.backends.cudnn.allow_tf32)
        try:
            R[name] = fn()
        except Exception as e:  # a failing phase must not cost the others: record it, show where, go on
            R[name] = dict(error=error_line(e))
            print("\n".join(traceback.format_exc().splitlines()[-8:]), file=sys.stderr, flush=True)
        finally:
            torch.set_num_threads(threads)
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        with contextlib.suppress(Exception):  # a broken CUDA context raises here too; the next phase records it
            free(device)
        del R["in_progress"]
        R["phases"][name] = round(time.perf_counter() - t0, 1)
        save()
        print(f"[{time.perf_counter() - start:4.0f} s] {name}: {R['phases'][name]} s {R[name].get('error', '')}",
              flush=True)

    def size(name):  # a size's micro-batch searches get at most `allow` s, leaving ~100 s for what follows
        allow = plan["search_s"] * (1.5 if name in plan["ckpt"] else 1)
        deadline = time.perf_counter() + min(allow, left() - 100)
        return size_report(name, device, ctx, plan, lambda: deadline - time.perf_counter())

    def compiled(name):  # at the micro-batch of its eager row
        if not (b := R.get(f"size {name}", {}).get("eager", {}).get("batch")):
            raise ValueError(f"no eager row of {name} to compare with")
        return compiled_report(name, b, device, ctx, plan)

    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    save()  # an unwritable --json fails here, before any work
    print(f"{R['env']}\ntime budget {budget:.0f} s (--budget): a phase runs only if its estimate fits in the time "
          f"left; {json_path} and its .md are rewritten after every phase", flush=True)
    for name in plan["sizes"]:
        phase(f"size {name}", plan["search_s"] * (0.75 if name in plan["ckpt"] else 0.5), lambda: size(name))
    for name in plan["dense"]:  # Mask R-CNN and UPerNet: the detection and segmentation scripts' steps
        phase(f"dense {name}", 30, lambda: dense_report(name, plan["dense_micro"], device, ctx, plan, left))
    phase("numerics", 40, lambda: numerics_report(*plan["numerics"], *plan["tiny"], device, ctx, left))
    phase("finetune", 30, lambda: finetune_report(*plan["finetune"], plan["micro"], device, ctx, plan))
    data_args = get_parser().parse_args(["--what", "data", "--jpeg_size", plan["data"]["jpeg_size"],
                                         "--images", str(plan["data"]["images"])])
    phase("data", 20, lambda: bench_data(data_args))
    compile_need = 240  # until the first compilation says how long one takes; + 20 s kept for sdpa
    for name in plan["compile"]:
        phase(f"compiled {name}", compile_need + 20, lambda: compiled(name))
        compile_need = 1.5 * R.get(f"compiled {name}", {}).get("compile_s", 160) + 20
    # last: forcing each SDPA backend is the one thing here that could break the CUDA context for what follows
    phase("sdpa", 20, lambda: sdpa_report(*plan["sdpa"], device, ctx))
    md = save()
    print(md, flush=True)
    print(f"written: {json_path} and {os.path.splitext(json_path)[0]}.md ({R['elapsed_s']:.0f} s)", flush=True)
    return R


def main(argv=None):
    args = get_parser().parse_args(argv)
    if args.timm:  # before any work: timm is optional, only this comparison needs it
        try:
            import timm  # noqa: F401
        except ImportError:
            sys.exit("error: --timm compares with timm's SwinTransformerV2, and timm is not installed: "
                     "pip install timm")
    if args.what == "data":
        return bench_data(args)
    if args.what == "archives":
        return bench_archives(args)
    if args.what == "gpu":
        if not torch.cuda.is_available():
            sys.exit("error: bench.py --what gpu needs a CUDA GPU (torch.cuda.is_available() is False); "
                     "nothing measured")
        return gpu_report(torch.device("cuda"), budget=args.budget, json_path=args.json, dtype=args.dtype)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ctx = train.autocast(device, train.amp_dtype(device, args.dtype))
    torch.manual_seed(0)
    encoder = build_encoder(args)
    cfg = encoder.cfg
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} threads, CPU time"
    print(f"{device.type} ({where}), autocast {args.dtype}, C={cfg.embed_dim} depths {cfg.depths} "
          f"at {cfg.img_size} px, windows {cfg.window_sizes}, drop path {cfg.drop_path_rate}"
          f"{', compiled' if args.compile else ''}{', grad_ckpt' if args.grad_ckpt else ''}", flush=True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats()
    if args.what == "simmim":
        return bench_simmim(encoder, args, device, ctx)
    models = {"ours": encoder, **({"timm": timm_twin(cfg)} if args.timm else {})}
    steps = {name: encoder_step(m, cfg.img_size, args, device, ctx) for name, m in models.items()}
    for name, sec in interleaved(steps, args, device).items():  # peak memory: of all models together
        report(name, sum(p.numel() for p in models[name].parameters()), sec, args, device)


if __name__ == "__main__":
    main()
