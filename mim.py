"""
SimMIM pre-training (Xie et al., "SimMIM", arXiv 2111.09886) of a SwinV2 encoder, as in "On Data
Scaling in Masked Image Modeling" (arXiv 2206.04664): the model, then the training script.

SimMIM in four lines (sec. 3 of the SimMIM paper): mask random 32x32 patches of the image, replace
their patch embeddings by a learnt mask token, run the encoder on all tokens, and regress the raw
pixels of the masked patches with a linear decoder and an L1 loss. The data-scaling paper varies
the data (--frac), the model (--model) and the length (--iters), and measures a validation loss.

    python mim.py --model tiny --data synthetic                        # CPU demo, about a minute
    torchrun --nproc 8 mim.py --model B --frac 0.5 --iters 125000      # one run of the paper
    torchrun --nnodes 2 --nproc 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 mim.py --model L
    python mim.py --model B --out_dir out/B_frac0.5_125k --eval_only   # re-measure a checkpoint

Randomness is a pure function of (seed, step, sample position): the data order and crops come from
data.py's stream, masks from the sample's stream position, drop path from (step, micro-batch). So a
run gives the same global batches whatever the world size or accumulation, and a resumed run
continues exactly where it stopped; checkpoints need no RNG state. Read next: finetune.py.
"""
import argparse
import contextlib
import json
import math
import os
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import swinv2

# -----------------------------------------------------------------------------
# SimMIM: masks, target, model, loss


class MaskGenerator:
    """A random mask on a grid of `mask_patch` cells: ceil(ratio * cells) cells are masked (22 of 36
    at 192 px, 32 px cells, ratio 0.6, so 61.1 %), upsampled to the model's patch grid.
    1 = masked. Seeded per sample, so a mask is a pure function of its seed."""

    def __init__(self, img_size=192, mask_patch=32, model_patch=4, ratio=0.6):
        if img_size % mask_patch:
            raise ValueError(f"--img_size {img_size} must be divisible by --mask_patch {mask_patch}")
        if mask_patch % model_patch:
            raise ValueError(f"--mask_patch {mask_patch} must be divisible by the model's patch size {model_patch}")
        if not 0 < ratio < 1:
            raise ValueError(f"--mask_ratio must be in (0, 1), got {ratio}")
        self.grid, self.scale = img_size // mask_patch, mask_patch // model_patch
        self.count = math.ceil(self.grid**2 * ratio)

    def __call__(self, seed):
        g = torch.Generator().manual_seed(seed)
        mask = torch.zeros(self.grid**2)
        mask[torch.randperm(self.grid**2, generator=g)[: self.count]] = 1
        mask = mask.view(self.grid, self.grid)
        return mask.repeat_interleave(self.scale, 0).repeat_interleave(self.scale, 1)  # (H/4, W/4)


def norm_targets(x, k=47):
    """Normalise every pixel and channel by the mean and (unbiased) variance of its k x k neighbourhood,
    as the official SwinV2 SimMIM config does (NORM_TARGET, 47). It removes low-frequency colour and
    brightness, so the loss measures structure. Pixels outside the image are not counted."""
    x64 = x.double()  # float64: window sums of squares minus squared sums cancel (see box_sum)
    n, s1, s2 = box_sum(torch.ones_like(x64[:1, :1]), k), box_sum(x64, k), box_sum(x64 * x64, k)
    var = ((s2 - s1 * s1 / n) / (n - 1)).clamp(min=0)  # unbiased: sum of squared deviations / (n - 1)
    return ((x64 - s1 / n) / (var + 1e-6).sqrt()).to(x.dtype)


def box_sum(x, k):
    """Sum over the k x k window around each pixel, counting only pixels inside the image, (B, C, H, W)
    -> the same shape. By an integral image (prefix sums over rows and columns), so each window costs
    four look-ups whatever k (a 47-wide pooling costs 2 x 47 additions per pixel). The prefix sums grow to
    the sum over the whole image, so a window's sum is a difference of large numbers: callers work in
    float64, where the targets of 192 px images stay within ~1e-7 of a direct computation (in float32
    the variance of a flat, bright region is lost entirely)."""
    r = k // 2
    # zero padding: r pixels each side (outside the image counts 0), plus one leading zero so that
    # P[i] is the sum of the first i padded entries and window i is P[i + k] - P[i]
    P = F.pad(x, (r + 1, r, r + 1, r)).cumsum(-1).cumsum(-2)  # (B, C, H + k, W + k)
    return P[..., k:, k:] - P[..., :-k, k:] - P[..., k:, :-k] + P[..., :-k, :-k]  # (B, C, H, W)


def local_mean(x, k):
    """Mean over the k x k window around each pixel, counting only pixels inside the image."""
    x64 = x.double()
    return (box_sum(x64, k) / box_sum(torch.ones_like(x64[:1, :1]), k)).to(x.dtype)


class SimMIM(nn.Module):
    """encoder + mask token + linear decoder. forward(x, mask) returns the loss: L1 over masked pixels,
    summed over pixels and channels, divided by (masked pixels x 3): one ratio over the whole batch."""

    def __init__(self, encoder: swinv2.SwinV2, norm_target=47):
        super().__init__()
        self.encoder, self.norm_target = encoder, norm_target
        self.patch_size, self.stride = encoder.cfg.patch_size, 32  # the encoder downsamples by 32
        # the mask token lives on the encoder so the key is the official `encoder.mask_token`
        self.encoder.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.cfg.embed_dim))
        nn.init.trunc_normal_(self.encoder.mask_token, std=0.02, a=-2.0, b=2.0)
        # the decoder is one linear map per 32x32 output patch: a 1x1 conv to 32*32*3 values, then
        # PixelShuffle lays them out as pixels (SimMIM sec. 3.3: a heavier head does not help)
        self.decoder = nn.Sequential(nn.Conv2d(encoder.num_features, self.stride**2 * 3, 1), nn.PixelShuffle(self.stride))

    def predict(self, x, mask):
        """(B, 3, H, W), mask (B, H/4, W/4) -> predicted image (B, 3, H, W)."""
        tokens = self.encoder.patch_embed(x)  # (B, L, C), after the patch-embedding norm
        w = mask.flatten(1).unsqueeze(-1).type_as(tokens)  # (B, L, 1)
        tokens = tokens * (1 - w) + self.encoder.mask_token * w  # masked patches see only the mask token
        z = self.encoder.forward_tokens(tokens)  # (B, L/64, 8C)
        h = w_ = x.shape[-1] // self.stride
        z = z.transpose(1, 2).reshape(x.shape[0], -1, h, w_)  # (B, 8C, H/32, W/32)
        return self.decoder(z)  # (B, 3, H, W)

    def errors(self, x, mask):
        """Sum of |prediction - target| over masked pixels and channels, and the number of masked pixels."""
        pred = self.predict(x, mask).float()  # the loss is computed in fp32
        target = norm_targets(x.float(), self.norm_target) if self.norm_target else x.float()
        m = mask.repeat_interleave(self.patch_size, 1).repeat_interleave(self.patch_size, 2).unsqueeze(1)  # (B, 1, H, W)
        return ((pred - target).abs() * m).sum(), m.sum()  # unmasked pixels contribute nothing

    def forward(self, x, mask):
        err, n = self.errors(x, mask)
        return err / (n + 1e-5) / x.shape[1]  # the official formula: / masked pixels / 3 channels


# -----------------------------------------------------------------------------
# command line


def get_parser():
    p = argparse.ArgumentParser(description="SimMIM pre-training of SwinV2 (the data-scaling study)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="B", help="SwinV2 size: S, B, L, H, g (the paper's) or the CPU sizes nano, tiny")
    g.add_argument("--img_size", type=int, default=None, help="input pixels; default: the preset's (192; tiny 64)")
    g.add_argument("--window", type=int, default=None, help="attention window; default: the preset's (12; tiny 4)")
    g.add_argument("--drop_path", type=float, default=0.1, help="stochastic depth rate, rising over blocks (paper 0.1)")
    g.add_argument("--grad_ckpt", action="store_true", help="activation checkpointing per block (for H and g)")
    g = p.add_argument_group("masking and loss")
    g.add_argument("--mask_patch", type=int, default=None, help="mask cell in pixels; default 32 (tiny 16)")
    g.add_argument("--mask_ratio", type=float, default=0.6, help="fraction of cells masked, rounded up (paper 0.6)")
    g.add_argument("--norm_target", type=int, default=None, help="target normalisation window in pixels, odd, 0 = off; default 47 (official; tiny 0)")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="data/imagenet", help="folder with train/ and val/, a file list, or 'synthetic'")
    g.add_argument("--val_data", default=None, help="validation images; default: the val split of --data")
    g.add_argument("--frac", type=float, default=1.0, help="fraction of the training set, in (0, 1] (paper 0.1, 0.2, 0.5, 1)")
    g.add_argument("--subset_seed", type=int, default=0, help="seed of the subset permutation (nested across --frac)")
    g.add_argument("--val_images", type=int, default=50000, help="held-out images for the validation loss (IN-1K val: 50000)")
    g.add_argument("--workers", type=int, default=None, help="data-loader processes per process; default 8 on CUDA, 0 on CPU (the CPU computes)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--iters", type=int, default=None, help="optimizer steps; default 500000 (paper 125K/250K/500K; tiny 150)")
    g.add_argument("--batch_size", type=int, default=None, help="global batch in images; default 2048 (paper; tiny 64)")
    g.add_argument("--micro_batch", type=int, default=None, help="images per GPU per forward; default batch_size / world size")
    g.add_argument("--lr", type=float, default=None, help="peak LR per 512 images, scaled by batch/512; default 1e-4 (paper; tiny 3.2e-2)")
    g.add_argument("--warmup_lr", type=float, default=5e-7, help="LR at step 0 per 512 images (paper 5e-7)")
    g.add_argument("--warmup_iters", type=int, default=None, help="linear warmup steps; default iters/80 (6250 at 500K)")
    g.add_argument("--weight_decay", type=float, default=0.05, help="AdamW weight decay (paper 0.05)")
    g.add_argument("--clip_grad", type=float, default=5.0, help="max gradient norm (paper 5.0)")
    g.add_argument("--seed", type=int, default=0, help="seed of init, data order, crops, masks, drop path")
    g = p.add_argument_group("run")
    g.add_argument("--out_dir", default=None, help="run directory; default out/{model}_frac{frac}_{iters/1000}k; resumes if it has ckpt.pt")
    g.add_argument("--eval_every", type=int, default=None, help="steps between validation losses; default 5000 (tiny 50)")
    g.add_argument("--log_every", type=int, default=None, help="steps between log lines; default 50 (tiny 10)")
    g.add_argument("--save_every", type=int, default=None, help="steps between checkpoints; default 1000 (tiny 50)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="autocast dtype; auto = bf16 on CUDA, fp32 on CPU")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--eval_only", action="store_true", help="measure the validation loss of --out_dir's checkpoint, write eval.json")
    return p


# The flags a preset decides: the paper's recipe for S..g, a CPU-minute recipe for nano and tiny. These predict
# plain (ImageNet-normalised) pixels: the 47 px local normalisation leaves only fine detail, which a
# 2M-parameter model does not learn in minutes (measured: val loss 0.743 -> 0.740 in 200 steps with a
# 15 px window, 0.576 -> 0.547 without), so the demo would show nothing.
RECIPES = {
    "paper": dict(iters=500000, batch_size=2048, lr=1e-4, mask_patch=32, norm_target=47, eval_every=5000, log_every=50, save_every=1000),
    "cpu": dict(iters=150, batch_size=64, lr=3.2e-2, mask_patch=16, norm_target=0, eval_every=50, log_every=10, save_every=50),
}


def resolve(args, world_size):
    """Validate the flags and derive everything the run needs, in one visible place. Returns a dict;
    args itself is never modified. Raises ValueError with a one-line message naming the flag."""
    if args.model not in swinv2.PRESETS:
        raise ValueError(f"--model {args.model!r} is unknown; choose from {', '.join(swinv2.PRESETS)}")
    if not 0 < args.frac <= 1:
        raise ValueError(f"--frac must be in (0, 1], got {args.frac}")
    recipe = RECIPES["paper" if args.model in swinv2.PAPER_SIZES else "cpu"]
    r = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in recipe.items()}
    preset = swinv2.PRESETS[args.model]
    r["img_size"] = args.img_size or preset.get("img_size", 192)
    r["window"] = args.window or preset.get("window_size", 12)
    if r["norm_target"] and r["norm_target"] % 2 == 0:
        raise ValueError(f"--norm_target must be odd (or 0 to turn it off), got {r['norm_target']}")
    for flag in ("iters", "batch_size", "eval_every", "log_every", "save_every"):
        if r[flag] <= 0:
            raise ValueError(f"--{flag} must be positive, got {r[flag]}")
    B = r["batch_size"]
    r["micro_batch"] = args.micro_batch or B // world_size
    if B % (r["micro_batch"] * world_size):
        raise ValueError(f"--batch_size {B} is not divisible by --micro_batch {r['micro_batch']} x {world_size} processes")
    r["accum"] = B // (r["micro_batch"] * world_size)
    # linear scaling rule (SimMIM): LRs are given per 512 images
    r["peak_lr"], r["start_lr"] = r["lr"] * B / 512, args.warmup_lr * B / 512
    r["warmup_iters"] = args.warmup_iters if args.warmup_iters is not None else r["iters"] // 80
    r["milestone"] = r["iters"] * 7 // 8  # x0.1 after 7/8 of training (official: epoch 700 of 800)
    r["out_dir"] = args.out_dir or f"out/{args.model}_frac{args.frac:g}_{r['iters'] / 1000:g}k"
    MaskGenerator(r["img_size"], r["mask_patch"], 4, args.mask_ratio)  # checks the sizes
    try:  # checks that the windows tile every stage's feature map
        swinv2.SwinV2Config(**dict(preset, img_size=r["img_size"], window_size=r["window"]))
    except ValueError as e:
        raise ValueError(f"--img_size {r['img_size']} / --window {r['window']}: {e}") from None
    return r


# -----------------------------------------------------------------------------
# training plumbing, shared with finetune.py


def open_splits(data_path, val_path=None):
    """(train, held-out) datasets of --data / --val_data. Without --val_data the held-out images are
    --data's val split; a folder without val/ is refused, since its 'val' would be the training set."""
    train_set = data.open_dataset(data_path, "train")
    if val_path is None and not data_path.startswith("synthetic") and not os.path.isdir(os.path.join(data_path, "val")):
        raise ValueError(f"--data {data_path} has no val/ folder: pass held-out images with --val_data")
    return train_set, data.open_dataset(val_path or data_path, "val")


def setup_distributed():
    """The torchrun contract: RANK, LOCAL_RANK, WORLD_SIZE in the environment, else one process.
    Returns (rank, local_rank, world_size, device)."""
    if "RANK" not in os.environ:
        return 0, 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return rank, local_rank, world, device


def print0(*a, **kw):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **kw, flush=True)


def all_sum(*values, device):
    """Sum numbers over all processes (every rank must call this). Returns floats."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def get_lr(step, peak_lr, start_lr, warmup_iters, iters, milestone=None, min_lr=0.0, schedule="step"):
    """LR of optimizer step `step` (0-based). 1) linear warmup from start_lr to peak_lr over
    warmup_iters; 2) 'step': peak, x0.1 from `milestone` on (pre-training); 'cosine': half a cosine
    from peak to min_lr over the remaining steps (fine-tuning). (Official quirk we do not copy: its
    scheduler runs steps 0 and 1 both at the warmup LR.)"""
    if step < warmup_iters:
        return start_lr + (peak_lr - start_lr) * step / warmup_iters
    if schedule == "step":
        return peak_lr * (0.1 if step >= milestone else 1.0)
    t = (step - warmup_iters) / max(1, iters - warmup_iters)
    return min_lr + 0.5 * (peak_lr - min_lr) * (1 + math.cos(math.pi * t))


def param_groups(model, weight_decay, skip=("mask_token",), layer_scale=None):
    """AdamW groups: no weight decay on 1-D parameters, biases and names containing a `skip` entry.
    layer_scale(name) -> float adds layer-wise LR scales (fine-tuning); one group per (scale, decay)."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim == 1 or name.endswith(".bias") or any(s in name for s in skip)
        scale = layer_scale(name) if layer_scale else 1.0
        key = (scale, not no_decay)
        groups.setdefault(key, {"params": [], "names": [], "weight_decay": 0.0 if no_decay else weight_decay, "lr_scale": scale})
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return list(groups.values())


def optimizer_step(raw_model, optimizer, clip_grad, skipped_in_row, step, ckpt_path):
    """Clip, then step, or skip a step whose gradient is not finite; 10 skipped in a row stop the run
    (the last checkpoint stays intact). The gradient is already all-reduced, so every rank sees the
    same norm and takes the same branch. Returns (grad norm, non-finite steps in a row)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), clip_grad)
    if torch.isfinite(grad_norm):
        optimizer.step()
        skipped_in_row = 0
    else:
        skipped_in_row += 1
        if skipped_in_row >= 10:
            sys.exit(f"error: 10 non-finite steps in a row at step {step}; the last good checkpoint is {ckpt_path}")
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, skipped_in_row


def checkpoint_boundary(master, save, preempted, ckpt_path, step):
    """A step boundary that saves: rank 0 writes the checkpoint (save()), every rank waits for it, so no
    rank starts the next step or exits before the file is complete; on SIGTERM all ranks then exit 0."""
    if master:
        save()
    if dist.is_initialized():
        dist.barrier()
    if preempted:
        print0(f"SIGTERM: saved {ckpt_path} at step {step}; run the same command again to resume")
        sys.exit(0)


def atomic_write(path, write):
    """Write via a temp file, fsync, rename: a reader (or a restart after a kill) sees the old file or
    the new one, never half of one."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_json(path, obj):
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=1) + "\n").encode()))


def save_checkpoint(path, raw_model, optimizer, step, **meta):
    """A plain dict, loadable with torch.load(weights_only=True): model (unwrapped, uncompiled, official
    key names), optimizer, step (completed optimizer steps), plus metadata."""
    state = dict(model=raw_model.state_dict(), optimizer=optimizer.state_dict(), step=step, **meta)
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path):
    # mmap: tensors are read from disk when used, so reading the encoder of a g checkpoint does not
    # load its 8 GB of AdamW state on every rank
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


class Log:
    """log.jsonl (one JSON object per line, appended, flushed) on rank 0; a no-op elsewhere."""

    def __init__(self, out_dir, master):
        self.path, self.master = os.path.join(out_dir, "log.jsonl"), master

    def __call__(self, **row):
        if self.master:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


class StopSignal:
    """SIGTERM (preemption) sets a flag; the loop checks it at step boundaries, on all ranks at once.
    The first SIGTERM puts the previous handler back, so a second one ends the process at once."""

    def __init__(self):
        self.flag, self.previous = False, signal.signal(signal.SIGTERM, self.handle)

    def handle(self, *_):
        self.flag = True
        self.restore()

    def restore(self):
        signal.signal(signal.SIGTERM, self.previous)

    def should_stop(self, device):
        return all_sum(self.flag, device=device)[0] > 0


def autocast(device, dtype_flag):
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_flag]
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()


# -----------------------------------------------------------------------------
# validation loss and pictures


def micro_seed(seed, step, chunk):
    """Seed of drop path for micro-batch `chunk` (= micro-step * world + rank) of a step."""
    return (seed * 1_000_003 + step) * 4096 + chunk


@torch.no_grad()
def estimate_val_loss(model, loader, masks, device, ctx):
    """The validation loss is a measurement: fixed images, a deterministic transform, the mask of an
    image seeded by its index, and (sum, count) reduced over ranks, so a checkpoint gives the same
    number whatever the world size or micro-batch."""
    model.eval()
    err, count = 0.0, 0.0
    for x, _, idx, _ in loader:
        mask = torch.stack([masks(int(i)) for i in idx]).to(device)
        with ctx:
            e, n = model.errors(x.to(device), mask)
        err, count = err + e.item(), count + n.item() * x.shape[1]
    model.train()
    err, count = all_sum(err, count, device=device)
    return err / count


@torch.no_grad()
def save_pictures(path, model, val_set, masks, device, n=4):
    """A grid, one row per image: input, masked input, reconstruction, reconstruction pasted into the
    visible part. Outputs at unmasked positions are never trained, so only the masked part means
    anything. With --norm_target the model predicts locally normalised pixels; we map them back
    with the local statistics of the full image (a picture, not a measurement)."""
    import torchvision.utils

    model.eval()
    x = torch.stack([val_set[i][0] for i in range(n)]).to(device)
    mask = torch.stack([masks(int(val_set[i][2])) for i in range(n)]).to(device)
    pred = model.predict(x, mask).float()
    if model.norm_target:
        mean = local_mean(x, model.norm_target)
        std = (local_mean(x * x, model.norm_target) - mean**2).clamp(min=0).add(1e-6).sqrt()
        pred = pred * std + mean
    m = mask.repeat_interleave(model.patch_size, 1).repeat_interleave(model.patch_size, 2).unsqueeze(1)
    mean, std = torch.tensor(data.IMAGENET_MEAN, device=device).view(3, 1, 1), torch.tensor(data.IMAGENET_STD, device=device).view(3, 1, 1)
    rows = [x, x * (1 - m) + (-mean / std) * m, pred, x * (1 - m) + pred * m]  # masked part shown black
    grid = torch.stack(rows, 1).flatten(0, 1) * std + mean  # (n*4, 3, H, W), back to [0, 1]
    atomic_write(path, lambda f: torchvision.utils.save_image(grid.clamp(0, 1).cpu(), f, nrow=4, format="png"))
    model.train()


# -----------------------------------------------------------------------------
# the script


def main(argv=None):
    args = get_parser().parse_args(argv)
    world_hint = int(os.environ.get("WORLD_SIZE", 1))
    try:  # every bad flag is refused before any work starts
        r = resolve(args, world_hint)
        train_set, val_set = open_splits(args.data, args.val_data)
        subset = data.subset_indices(len(train_set), args.frac, args.subset_seed)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    rank, local_rank, world, device = setup_distributed()
    master = rank == 0
    out_dir = r["out_dir"]
    os.makedirs(out_dir, exist_ok=True)
    ctx = autocast(device, args.dtype)
    workers = args.workers if args.workers is not None else 8 if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # ---- the numbers of this run, derived once and printed
    n_train = len(subset)
    print0(f"{'model':>14} SwinV2-{args.model}, {r['img_size']} px, window {r['window']}, mask {r['mask_patch']} px x {args.mask_ratio}")
    print0(f"{'data':>14} {args.data}: {n_train} of {len(train_set)} images (frac {args.frac:g}), "
           f"{r['iters'] * r['batch_size'] / n_train:.1f} epochs")
    print0(f"{'global batch':>14} {r['batch_size']} = {r['micro_batch']} per process x {world} processes x {r['accum']} accumulation")
    print0(f"{'LR':>14} {r['lr']:g} per 512 -> {r['peak_lr']:.3g}, warmup {r['warmup_iters']} steps from {r['start_lr']:.3g}, "
           f"x0.1 from step {r['milestone']} of {r['iters']}")

    # ---- data: subset manifest, train stream, fixed validation images
    if master:
        data.write_manifest(os.path.join(out_dir, "subset.txt"), train_set.names, subset)
    subset_hash = data.subset_hash(train_set.names, subset)
    masks = MaskGenerator(r["img_size"], r["mask_patch"], 4, args.mask_ratio)
    val_idx = np.sort(np.random.default_rng(0).permutation(len(val_set))[: args.val_images])  # fixed, whatever the run
    val_stream = data.EvalSet(val_set, val_idx, data.val_transform(r["img_size"]))
    val_loader = data.make_loader(val_stream, r["micro_batch"], sampler=data.shard(len(val_stream), rank, world), workers=workers)

    # ---- model and optimizer
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    encoder = swinv2.create(args.model, img_size=r["img_size"], window_size=r["window"], drop_path_rate=args.drop_path,
                            grad_ckpt=args.grad_ckpt)
    model = SimMIM(encoder, r["norm_target"]).to(device)
    raw_model = model
    # Official quirk, kept: its no-decay keywords get an `encoder.` prefix and never match, so the
    # pre-training decays logit_scale and the cpb_mlp weights. Only 1-D params, biases and the mask
    # token are exempt. (Fine-tuning exempts cpb_mlp and logit_scale too.)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=r["peak_lr"], betas=(0.9, 0.999), eps=1e-8,
                                  fused=device.type == "cuda" or None)  # None: the fast foreach path on CPU
    print0(f"{'parameters':>14} {sum(p.numel() for p in encoder.parameters()) / 1e6:.1f}M encoder, "
           f"{sum(p.numel() for p in model.decoder.parameters()) / 1e6:.1f}M decoder")

    # ---- resume from the run directory's checkpoint, if any
    ckpt_path, start_step, skipped_total, bad_total = os.path.join(out_dir, "ckpt.pt"), 0, 0, 0
    identity = dict(model=args.model, batch_size=r["batch_size"], iters=r["iters"], img_size=r["img_size"], window=r["window"])
    if os.path.exists(ckpt_path):
        ckpt = load_checkpoint(ckpt_path)
        theirs = {k: ckpt["run"][k] for k in identity}
        if theirs != identity:
            sys.exit(f"error: {ckpt_path} belongs to another run ({theirs}); this one is {identity}. Use another --out_dir")
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_step, skipped_total, bad_total = ckpt["step"], ckpt["skipped_steps"], ckpt["bad_images"]
        print0(f"resumed from {ckpt_path} at step {start_step}")
        del ckpt
    elif args.eval_only:
        sys.exit(f"error: --eval_only needs a checkpoint, and {ckpt_path} does not exist")

    if args.eval_only:
        val_loss = estimate_val_loss(raw_model, val_loader, masks, device, ctx)
        print0(f"step {start_step}: val_loss {val_loss:.4f} on {len(val_stream)} images")
        if master:
            save_json(os.path.join(out_dir, "eval.json"), dict(step=start_step, val_loss=val_loss, val_images=len(val_stream)))
        if dist.is_initialized():
            dist.destroy_process_group()
        return val_loss

    if args.compile:
        model = torch.compile(model)
    if world > 1:
        model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None, broadcast_buffers=False)

    run_info = dict(identity, frac=args.frac, data=args.data, subset_size=n_train, subset_hash=subset_hash, seed=args.seed,
                    world_size=world, micro_batch=r["micro_batch"], accum=r["accum"], peak_lr=r["peak_lr"],
                    warmup_iters=r["warmup_iters"], milestone=r["milestone"], torch=str(torch.__version__))
    if master:
        save_json(os.path.join(out_dir, "args.json"), dict(vars(args), run=run_info))
    log = Log(out_dir, master)
    meta = lambda: dict(args=vars(args), run=run_info, model_config=swinv2.model_config(encoder),
                        subset=dict(size=n_train, hash=subset_hash), skipped_steps=skipped_total, bad_images=bad_total,
                        val_loss=val_loss)

    # ---- the loop
    stream = data.TrainStream(train_set, subset, data.pretrain_transform(r["img_size"]), args.seed)
    sampler = data.StreamSampler(r["batch_size"], r["micro_batch"], rank, world, start_step)
    batches = iter(data.make_loader(stream, r["micro_batch"], sampler=sampler, workers=workers))
    stop, val_loss, train_loss, skipped_in_row = StopSignal(), None, None, 0
    loss_sum, loss_n, skipped, bad, wait, t0 = 0.0, 0, 0, 0, 0.0, time.time()
    bar = tqdm(total=r["iters"], initial=start_step, disable=not master, dynamic_ncols=True)
    for step in range(start_step, r["iters"]):
        lr = get_lr(step, r["peak_lr"], r["start_lr"], r["warmup_iters"], r["iters"], r["milestone"])
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        loss_acc = torch.zeros((), device=device)
        for micro in range(r["accum"]):
            tw = time.time()
            x, _, pos, n_bad = next(batches)
            wait, bad = wait + time.time() - tw, bad + int(n_bad.sum())
            mask = torch.stack([masks(args.seed * 2**40 + int(p)) for p in pos]).to(device, non_blocking=True)
            torch.manual_seed(micro_seed(args.seed, step, micro * world + rank))  # drop path
            # gradients are all-reduced only on the last micro-step
            with model.no_sync() if world > 1 and micro < r["accum"] - 1 else contextlib.nullcontext():
                with ctx:
                    loss = model(x.to(device, non_blocking=True), mask)
                # gradients add up over micro-steps: divide so their sum is the mean over the global batch
                (loss / r["accum"]).backward()
            loss_acc += loss.detach() / r["accum"]
        grad_norm, skipped_in_row = optimizer_step(raw_model, optimizer, args.clip_grad, skipped_in_row, step, ckpt_path)
        skipped += skipped_in_row > 0
        loss_sum, loss_n = loss_sum + loss_acc, loss_n + 1
        done, last = step + 1, step + 1 == r["iters"]
        bar.update(1)

        if done % r["log_every"] == 0 or last:
            # .item() / all_reduce here only: they are sync points
            tot, n_bad_all, skip_all, wait_all = all_sum(float(loss_sum), bad, skipped, wait, device=device)
            dt = time.time() - t0
            skipped_total, bad_total = skipped_total + int(skip_all), bad_total + int(n_bad_all)
            row = dict(step=done, lr=lr, train_loss=tot / (loss_n * world), grad_norm=float(grad_norm),
                       img_per_s=loss_n * r["batch_size"] / dt, data_wait=wait_all / world / dt, bad_images=bad_total,
                       skipped_steps=skipped_total, epoch=done * r["batch_size"] / n_train)
            log(**row)
            train_loss = row["train_loss"]
            bar.set_postfix(loss=f"{row['train_loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{row['img_per_s']:.0f}")
            loss_sum, loss_n, skipped, bad, wait, t0 = 0.0, 0, 0, 0, 0.0, time.time()
        if done % r["eval_every"] == 0 or last:
            val_loss = estimate_val_loss(raw_model, val_loader, masks, device, ctx)
            log(step=done, val_loss=val_loss)
            if master:
                bar.write(f"step {done}: val_loss {val_loss:.4f}")
                save_pictures(os.path.join(out_dir, f"recon_{done:07d}.png"), raw_model, val_stream, masks, device)
        preempted = stop.should_stop(device)
        if done % r["save_every"] == 0 or last or preempted:
            checkpoint_boundary(master, lambda: save_checkpoint(ckpt_path, raw_model, optimizer, done, **meta()),
                                preempted, ckpt_path, done)
    bar.close()
    stop.restore()

    if master and start_step < r["iters"]:
        save_json(os.path.join(out_dir, "summary.json"), dict(kind="pretrain", model=args.model, data=os.path.basename(args.data.rstrip("/")),
                  frac=args.frac, iters=r["iters"], subset_size=n_train, subset_hash=subset_hash, step=r["iters"],
                  train_loss=train_loss, val_loss=val_loss, skipped_steps=skipped_total, bad_images=bad_total))
    if dist.is_initialized():
        dist.destroy_process_group()
    return val_loss


if __name__ == "__main__":
    main()
