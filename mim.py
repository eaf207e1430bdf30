"""
SimMIM pre-training (Xie et al., "SimMIM", arXiv 2111.09886) of a SwinV2 encoder, as in "On Data
Scaling in Masked Image Modeling" (arXiv 2206.04664): the model, then the training script.

SimMIM in four lines (sec. 3 of the SimMIM paper): mask random 32x32 patches of the image, replace
their patch embeddings by a learnt mask token, run the encoder on all tokens, and regress the raw
pixels of the masked patches with a linear decoder and an L1 loss. The data-scaling paper varies
the data (--frac), the model (--model) and the length (--iters), and measures a validation loss.

    python mim.py --model tiny --data synthetic                        # CPU demo, about a minute
    torchrun --nproc_per_node 8 mim.py --model B --frac 0.5 --iters 125000      # one run of the paper
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 mim.py --model L
    python mim.py --model B --out_dir out/B_frac0.5_125k --eval_only   # re-measure a checkpoint

Randomness is a pure function of (seed, step, sample position): the data order and crops come from
data.py's stream, masks from the sample's stream position, drop path from (step, micro-batch). So a
run gives the same global batches whatever the world size or accumulation, and a resumed run
continues exactly where it stopped; checkpoints need no RNG state. How a step, a log row, a checkpoint
and a stop are made is train.py's, shared by every training script. Read next: train.py, then finetune.py.
"""
import math
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import swinv2
import train
from train import print0


# -----------------------------------------------------------------------------
# SimMIM: masks, target, model, loss


class MaskGenerator:
    """A random mask on a grid of `mask_patch` cells: ceil(ratio * cells) cells are masked (22 of 36
    at 192 px, 32 px cells, ratio 0.6, so 61.1 %), upsampled to the model's patch grid. 1 = masked.
    masks(p) is the mask of sample p (a stream position, or a validation image's index), a pure function
    of (seed, p): the data-loader workers make it, and a resumed run gets the same masks."""

    def __init__(self, img_size=192, mask_patch=32, model_patch=4, ratio=0.6, seed=0):
        if img_size % mask_patch:
            raise ValueError(f"--img_size {img_size} must be divisible by --mask_patch {mask_patch}")
        if mask_patch % model_patch:
            raise ValueError(f"--mask_patch {mask_patch} must be divisible by the model's patch size {model_patch}")
        if not 0 < ratio < 1:
            raise ValueError(f"--mask_ratio must be in (0, 1), got {ratio}")
        self.grid, self.scale = img_size // mask_patch, mask_patch // model_patch
        self.count, self.seed = math.ceil(self.grid**2 * ratio), seed

    def __call__(self, p):
        g = torch.Generator().manual_seed(self.seed * 2**40 + p)
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
        self.decoder = nn.Sequential(nn.Conv2d(encoder.num_features, self.stride**2 * 3, 1),
                                     nn.PixelShuffle(self.stride))

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
        m = mask.repeat_interleave(self.patch_size, 1).repeat_interleave(self.patch_size, 2)[:, None]  # (B, 1, H, W)
        return ((pred - target).abs() * m).sum(), m.sum()  # unmasked pixels contribute nothing

    def forward(self, x, mask):
        err, n = self.errors(x, mask)
        return err / (n + 1e-5) / x.shape[1]  # the official formula: / masked pixels / 3 channels

# -----------------------------------------------------------------------------
# the recipe and the command line: every flag checks its own value, before any work starts


# The flags a preset decides: the paper's recipe for its sizes S..g (sec. 3), and a demo recipe of CPU
# minutes for the small sizes nano and tiny. The demo predicts plain (ImageNet-normalised) pixels: the
# 47 px local normalisation leaves only fine detail, which a 2M-parameter model does not learn in
# minutes (docs/differences.md). Its mask cells are 8 px (64 of them on a 64 px image): a model this
# small learns in minutes to continue a shape into an 8 px hole, not into a 16 px one, so the demo's
# reconstruction pictures show structure (docs/miniature.md uses 16 px cells).
RECIPES = {
    "paper": dict(iters=500000, batch_size=2048, lr=1e-4, mask_patch=32, norm_target=47, eval_every=5000, log_every=50,
                  save_every=1000),
    "demo": dict(iters=300, batch_size=64, lr=3.2e-2, mask_patch=8, norm_target=0, eval_every=100, log_every=10,
                 save_every=100),
}
# Flags that never change what a run computes (train.FREE): free to change when a run resumes.
FREE = train.FREE


def get_parser():
    p = train.Parser(prog="mim.py", description="SimMIM pre-training of SwinV2 (the data-scaling study)")
    g = p.add_argument_group("model")
    g.add_argument("--model", type=train.model_name, default="B",
                   help="SwinV2 size: S, B, L, H, g (the paper's) or the CPU sizes nano, tiny")
    g.add_argument("--img_size", type=train.count, default=None,
                   help="input pixels; default: the preset's (192; tiny 64)")
    g.add_argument("--window", type=train.count, default=None,
                   help="attention window; default: the preset's (12; tiny 4)")
    g.add_argument("--drop_path", type=train.number(float, 0, 1, hi_open=True), default=0.1,
                   help="stochastic depth rate, rising over blocks (paper 0.1)")
    g.add_argument("--grad_ckpt", action="store_true", help="activation checkpointing per block (for H and g)")
    g = p.add_argument_group("masking and loss")
    g.add_argument("--mask_patch", type=train.count, default=None, help="mask cell in pixels; default 32 (tiny 8)")
    g.add_argument("--mask_ratio", type=train.number(float, 0, 1, True, True), default=0.6,
                   help="fraction of cells masked, rounded up (paper 0.6)")
    g.add_argument("--norm_target", type=train.natural, default=None,
                   help="target normalisation window in pixels, odd, 0 = off; default 47 (official; tiny 0)")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="data/imagenet", help="folder with train/ and val/ (class folders) or "
                   "train.zip and val.zip, a folder of images, .tar shards, a file list, or 'synthetic' (the CPU demo)")
    g.add_argument("--val_data", default=None, help="validation images; default: the val split of --data")
    g.add_argument("--val_frac", type=train.number(float, 0, 0.5, lo_open=True), default=None,
                   help="hold out this fraction of --data for the validation loss, in (0, 0.5] (seed 0, every run)")
    g.add_argument("--frac", type=train.number(float, 0, 1, lo_open=True), default=1.0,
                   help="fraction of the training set, in (0, 1] (paper 0.1, 0.2, 0.5, 1)")
    g.add_argument("--subset_seed", type=train.natural, default=0,
                   help="seed of the subset permutation (nested across --frac)")
    g.add_argument("--val_images", type=train.count, default=50000,
                   help="held-out images for the validation loss (IN-1K val: 50000)")
    g.add_argument("--workers", type=train.natural, default=None,
                   help="data-loader processes per process; default 8 on CUDA, 0 on CPU (the CPU computes)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--iters", type=train.count, default=None,
                   help="optimizer steps; default 500000 (paper 125K/250K/500K; tiny 300)")
    g.add_argument("--batch_size", type=train.count, default=None,
                   help="global batch in images; default 2048 (paper; tiny 64)")
    g.add_argument("--micro_batch", type=train.count, default=None,
                   help="images per GPU per forward; default batch_size / world size")
    g.add_argument("--lr", type=train.positive, default=None,
                   help="peak LR per 512 images, scaled by batch/512; default 1e-4 (paper; tiny 3.2e-2)")
    g.add_argument("--warmup_lr", type=train.non_negative, default=5e-7,
                   help="LR at step 0 per 512 images (paper 5e-7)")
    g.add_argument("--warmup_iters", type=train.natural, default=None,
                   help="linear warmup steps; default iters/80 (6250 at 500K)")
    g.add_argument("--weight_decay", type=train.non_negative, default=0.05, help="AdamW weight decay (paper 0.05)")
    g.add_argument("--clip_grad", type=train.non_negative, default=5.0,
                   help="max gradient norm, 0 = no clipping (paper 5.0)")
    g.add_argument("--seed", type=train.natural, default=0, help="seed of init, data order, crops, masks, drop path")
    g = p.add_argument_group("run")
    g.add_argument("--out_dir", default=None,
                   help="run directory; default out/{model}_frac{frac}_{iters/1000}k; resumes if it has ckpt.pt")
    g.add_argument("--eval_every", type=train.count, default=None,
                   help="steps between validation losses; default 5000 (tiny 100)")
    g.add_argument("--log_every", type=train.count, default=None, help="steps between log lines; default 50 (tiny 10)")
    g.add_argument("--save_every", type=train.count, default=None,
                   help="steps between checkpoints; default 1000 (tiny 100)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="autocast dtype; auto = bf16 on CUDA, fp32 on CPU")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--eval_only", action="store_true",
                   help="measure the validation loss of --out_dir's checkpoint, write eval.json")
    g.add_argument("--tensorboard", action=train.TensorBoard,
                   help="also write the log's numbers as TensorBoard events in the run directory (optional package)")
    g.add_argument("--dist_timeout", type=train.count, default=60,
                   help="minutes a process waits for the others (rank 0 evaluating alone) before the run fails; "
                        "default 60")
    return p


def resolve(args, world_size):
    """Check the flags together and derive everything the run needs, in one visible place. Returns a dict;
    args itself is never modified. Raises ValueError with a one-line message naming the flag."""
    recipe = RECIPES["paper" if args.model in swinv2.PAPER_SIZES else "demo"]
    r = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in recipe.items()}
    preset = swinv2.PRESETS[args.model]
    r["img_size"] = args.img_size if args.img_size is not None else preset.get("img_size", 192)
    r["window"] = args.window if args.window is not None else preset.get("window_size", 12)
    if r["norm_target"] % 2 == 0 and r["norm_target"]:
        raise ValueError(f"--norm_target must be odd (or 0 to turn it off), got {r['norm_target']}")
    B = r["batch_size"]
    r["micro_batch"], r["accum"] = train.batch_split(B, args.micro_batch, world_size)
    # linear scaling rule (SimMIM): LRs are given per 512 images
    r["peak_lr"], r["start_lr"] = r["lr"] * B / 512, args.warmup_lr * B / 512
    r["warmup_iters"] = args.warmup_iters if args.warmup_iters is not None else r["iters"] // 80
    if r["warmup_iters"] > r["iters"]:
        raise ValueError(f"--warmup_iters {r['warmup_iters']} is longer than --iters {r['iters']}")
    r["milestone"] = r["iters"] * 7 // 8  # x0.1 after 7/8 of training (official: epoch 700 of 800)
    r["out_dir"] = args.out_dir or f"out/{args.model}_frac{args.frac:g}_{r['iters'] / 1000:g}k"
    train.check_out_dir(r["out_dir"])
    MaskGenerator(r["img_size"], r["mask_patch"], 4, args.mask_ratio)  # checks the sizes
    try:  # checks that the windows tile every stage's feature map
        swinv2.SwinV2Config(**dict(preset, img_size=r["img_size"], window_size=r["window"]))
    except ValueError as e:
        raise ValueError(f"--img_size {r['img_size']} / --window {r['window']}: {e}") from None
    return r

# -----------------------------------------------------------------------------
# validation loss and pictures


def overfitting(val_losses):
    """The live sign of overfitting: the validation loss rose at each of the last two evaluations (one rise
    can be noise; the paper's small subsets keep rising once they start, Fig. 3)."""
    v = [x for x in val_losses if x is not None][-3:]
    return len(v) == 3 and v[0] < v[1] < v[2]


@torch.no_grad()
def estimate_val_loss(model, loader, device, ctx):
    """The validation loss is a measurement: fixed images, a deterministic transform, the mask of an
    image seeded by its index, and (sum, count) reduced over ranks, so a checkpoint gives the same
    number whatever the world size or micro-batch."""
    model.eval()
    err, count, images = 0.0, 0.0, 0
    for batch in loader:
        x = data.normalize(batch.image.to(device, non_blocking=True))
        keep = data.scored(batch, loader.dataset)  # an unreadable image is left out: its mask is emptied
        with ctx:
            e, n = model.errors(x, (batch.mask * keep[:, None, None]).to(device, non_blocking=True))
        err, count, images = err + e.item(), count + n.item() * x.shape[1], images + int(keep.sum())
    model.train()
    err, count, images = train.all_sum(err, count, images, device=device)
    return err / count, int(images)


@torch.no_grad()
def save_pictures(path, model, val_set, device, step, n=4):
    """A labelled grid, one row per validation image: the input, the masked input (masked cells grey), the
    prediction, and the prediction pasted into the visible part. Outputs at unmasked positions are never
    trained, so only the masked part means anything. With --norm_target the model predicts locally
    normalised pixels; we map them back with the local statistics of the full image (a picture, not a
    measurement)."""
    import torchvision.utils
    from PIL import Image, ImageDraw

    model.eval()
    batch = data.collate([val_set[i] for i in range(min(n, len(val_set)))])
    x, mask = data.normalize(batch.image.to(device)), batch.mask.to(device)
    pred = model.predict(x, mask).float()
    if model.norm_target:
        mean = local_mean(x, model.norm_target)
        std = (local_mean(x * x, model.norm_target) - mean**2).clamp(min=0).add(1e-6).sqrt()
        pred = pred * std + mean
    m = mask.repeat_interleave(model.patch_size, 1).repeat_interleave(model.patch_size, 2).unsqueeze(1)
    mean, std = (torch.tensor(v, device=device).view(3, 1, 1) for v in (data.IMAGENET_MEAN, data.IMAGENET_STD))
    rows = [x, x * (1 - m) + ((0.5 - mean) / std) * m, pred, x * (1 - m) + pred * m]
    grid = torch.stack(rows, 1).flatten(0, 1) * std + mean  # (n*4, 3, H, W), back to [0, 1]
    scale = max(1, 128 // x.shape[-1])  # small presets are enlarged (64 px -> 128), pixel for pixel
    grid = grid.repeat_interleave(scale, -2).repeat_interleave(scale, -1)
    img = torchvision.utils.make_grid(grid.clamp(0, 1).cpu(), nrow=4, padding=2, pad_value=1.0)  # (3, H', W')
    size = grid.shape[-1] + 2
    canvas = Image.new("RGB", (img.shape[2], img.shape[1] + 16), "white")
    canvas.paste(Image.fromarray((img * 255).round().byte().permute(1, 2, 0).numpy()), (0, 16))
    draw = ImageDraw.Draw(canvas)
    for col, label in enumerate([f"input (step {step})", "masked", "prediction", "pasted in"]):
        draw.text((col * size + 4, 2), label, fill="black")
    train.atomic_write(path, lambda f: canvas.save(f, format="png"))
    model.train()

# -----------------------------------------------------------------------------
# the script


def eval_only(run, model, args, val_loader, device, ctx, master):
    """--eval_only: the validation loss of the run directory's checkpoint, written to eval.json. A
    measurement: no lock is taken and nothing else is written."""
    ckpt = train.load_for_eval(run.ckpt, model, model.encoder, args.model, master)
    val_loss, images = estimate_val_loss(model, val_loader, device, ctx)
    print0(f"step {ckpt['step']}: val_loss {val_loss:.4f} on {images} images -> {run.file('eval.json')}")
    if master:
        train.save_json(run.file("eval.json"), dict(step=ckpt["step"], val_loss=val_loss, val_images=images))
    return val_loss


def main(argv=None):
    # ---- flags and data: every bad flag or path is refused in one line, before any work starts
    args = get_parser().parse_args(argv)
    train.warn_cpu(args.model)
    try:
        r = resolve(args, int(os.environ.get("WORLD_SIZE", 1)))
        train_set, val_set = data.open_splits(args.data, args.val_data, args.val_frac)
        subset = data.subset_indices(len(train_set), args.frac, args.subset_seed)
        val_idx = np.sort(np.random.default_rng(0).permutation(len(val_set))[: args.val_images])  # fixed for all runs
        data.check_readable(train_set, subset, f"--data {args.data}")
        data.check_readable(val_set, val_idx, f"--val_data {args.val_data or args.data}")
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}" + ("; for the CPU demo use --data synthetic" if args.data == "data/imagenet" else ""))
    n_train, B = len(subset), r["batch_size"]
    subset_hash = data.subset_hash(train_set.names, subset)
    # the training stream: sample p is an augmented image and its mask, both pure functions of (seed, p)
    masks = MaskGenerator(r["img_size"], r["mask_patch"], 4, args.mask_ratio, seed=args.seed)
    stream = data.TrainStream(train_set, subset, data.pretrain_transform(r["img_size"]), args.seed, masks=masks)
    # the validation images: a fixed set whatever the run, deterministic views, image i always with mask i
    val_masks = MaskGenerator(r["img_size"], r["mask_patch"], 4, args.mask_ratio, seed=0)
    val_stream = data.EvalSet(val_set, val_idx, data.val_transform(r["img_size"]), masks=val_masks)
    r.update(clip_grad=args.clip_grad, seed=args.seed, epoch_steps=n_train / B)

    # ---- processes and the run directory (let go however this block ends)
    with train.session(r["out_dir"], args.dist_timeout, args.tensorboard) as (run, device, rank, world):
        master = rank == 0
        dtype, ctx, workers = train.device_setup(device, args.dtype, args.workers)
        print0(f"{'model':>14} SwinV2-{args.model}, {r['img_size']} px, window {r['window']}, "
               f"mask {r['mask_patch']} px x {args.mask_ratio}")
        print0(f"{'data':>14} {args.data}: {n_train} of {len(train_set)} images (frac {args.frac:g}), "
               f"{r['iters'] * B / n_train:.1f} epochs")
        print0(f"{'global batch':>14} {B} = {r['micro_batch']} per process x {world} processes x "
               f"{r['accum']} accumulation")
        print0(f"{'LR':>14} {r['lr']:g} per 512 -> {r['peak_lr']:.3g}, warmup {r['warmup_iters']} steps from "
               f"{r['start_lr']:.3g}, x0.1 from step {r['milestone']} of {r['iters']}")
        val_loader = data.make_loader(val_stream, r["micro_batch"], sampler=data.shard(len(val_stream), rank, world),
                                      workers=workers)

        # ---- model and optimizer
        torch.manual_seed(args.seed)  # the same initial weights on every rank
        encoder = swinv2.create(args.model, img_size=r["img_size"], window_size=r["window"],
                                drop_path_rate=args.drop_path, grad_ckpt=args.grad_ckpt)
        model = raw_model = SimMIM(encoder, r["norm_target"]).to(device)
        # Official quirk, kept: its no-decay keywords get an `encoder.` prefix and never match, so the
        # pre-training decays logit_scale and the cpb_mlp weights. Only 1-D params, biases and the mask
        # token are exempt. (Fine-tuning exempts cpb_mlp and logit_scale too.)
        optimizer = train.adamw(train.param_groups(model, args.weight_decay), r["peak_lr"])
        print0(f"{'parameters':>14} {sum(p.numel() for p in encoder.parameters()) / 1e6:.1f}M encoder, "
               f"{sum(p.numel() for p in model.decoder.parameters()) / 1e6:.1f}M decoder")
        if args.eval_only:
            return eval_only(run, raw_model, args, val_loader, device, ctx, master)

        # ---- the run directory: lock, resume (another run's checkpoint is refused)
        identity = train.identity_of(args, r, FREE, data_train_images=len(train_set), data_subset_hash=subset_hash,
                                     data_val_images=len(val_stream), dtype=str(dtype))
        state, done = run.start(identity, raw_model, optimizer, master, r["iters"])
        if done:
            return done["val_loss"]
        if master:
            data.write_manifest(run.file("subset.txt"), train_set.names, subset)
            data.write_manifest(run.file("val.txt"), val_set.names, val_idx)  # the images of the validation loss
            train.save_json(run.file("args.json"), dict(vars(args), identity=identity, world_size=world,
                                                        micro_batch=r["micro_batch"], accum=r["accum"],
                                                        peak_lr=r["peak_lr"], warmup_iters=r["warmup_iters"],
                                                        milestone=r["milestone"], torch=str(torch.__version__)))

        # ---- the loop: train.loop runs the steps; a step's forward is loss_fn, an evaluation is evaluate
        sampler = data.StreamSampler(B, r["micro_batch"], rank, world, state["step"])
        batches = iter(data.make_loader(stream, r["micro_batch"], sampler=sampler, workers=workers))
        if args.compile:
            model = torch.compile(model)
        if world > 1:
            model = train.ddp(model, device)

        def loss_fn(batch):
            x = data.normalize(batch.image.to(device, non_blocking=True))  # uint8 -> the model's float input
            mask = batch.mask.to(device, non_blocking=True)
            with ctx:
                return model(x, mask), {}

        # the validation losses so far (rank 0 keeps the log; a resumed run reads them back from it)
        history = [row["val_loss"] for _, row in run.rows() if "val_loss" in row] if master else []

        def evaluate(step):
            val_loss, images = estimate_val_loss(raw_model, val_loader, device, ctx)
            if not master:
                return dict(val_loss=val_loss, val_images=images)
            tqdm.write(f"step {step}: val_loss {val_loss:.4f}")
            save_pictures(run.file(f"recon_{step:07d}.png"), raw_model, val_stream, device, step)
            history.append(val_loss)
            if overfitting(history):  # the paper's sign (sec. 4): more steps make a small subset's held-out loss worse
                tqdm.write(f"warning: val_loss rose at two evaluations in a row "
                           f"({' -> '.join(f'{v:.4f}' for v in history[-3:])}): "
                           f"SwinV2-{args.model} may be overfitting its {n_train} images")
                return dict(val_loss=val_loss, val_images=images, overfitting=True)
            return dict(val_loss=val_loss, val_images=images)

        def lr_at(step, scale):
            lr = train.get_lr(step, r["peak_lr"], r["start_lr"], r["warmup_iters"], r["iters"], r["milestone"])
            return scale * lr

        keep = dict(identity=identity, args=vars(args), model_config=swinv2.model_config(encoder),
                    subset=dict(size=n_train, hash=subset_hash), val_loss=None)
        train.loop(run, r, state, device, model=model, raw_model=raw_model, optimizer=optimizer, stream=stream,
                   batches=batches, loss_fn=loss_fn, lr_at=lr_at, evaluate=evaluate, keep=keep)

        # ---- the summary, from the log (which a resume keeps identical to an uninterrupted run's)
        if not master:
            return None
        rows = [row for _, row in run.rows()]
        last = lambda key: next((row[key] for row in reversed(rows) if key in row), None)
        summary = dict(kind="pretrain", model=args.model, data=os.path.basename(args.data.rstrip("/")), frac=args.frac,
                       iters=r["iters"], subset_size=n_train, subset_hash=subset_hash, step=r["iters"],
                       train_loss=last("train_loss"), val_loss=last("val_loss"), val_images=last("val_images"),
                       val_unreadable=len(val_stream) - last("val_images"), **run.counters())
        run.finish(summary)
        return summary["val_loss"]


if __name__ == "__main__":
    main()
