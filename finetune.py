"""
Fine-tuning a SimMIM-pre-trained SwinV2 for classification, the second half of "On Data Scaling in
Masked Image Modeling" (arXiv 2206.04664, sec. 3: every pre-trained model is fine-tuned on ImageNet-1K
or iNaturalist 2018, and its accuracy is related to the pre-training losses). We keep the encoder of a
mim.py (or official) checkpoint, add a fresh linear head, and train with the official SwinV2-B recipe
(SimMIM arXiv 2111.09886, appendix): 224 px, window 14 over pre-trained windows 12,12,12,6, 100 epochs,
layer-wise LR decay 0.75, RandAugment, mixup + cutmix, label smoothing, random erasing. The CPU
presets (nano, tiny) get a short plain recipe instead (RECIPES): 3 epochs, light crops, no mixing.

    python finetune.py --model tiny --data synthetic --pretrained out/tiny_frac1_0.15k     # CPU, a minute
    python finetune.py --model tiny --data synthetic --pretrained none                     # from scratch
    torchrun --nproc 8 finetune.py --model B --data data/imagenet --task in1k --pretrained out/B_frac0.5_125k
    torchrun --nproc 8 finetune.py --model B --data data/inat2018 --pretrained out/B_frac0.5_125k  # its train/val2018.json
    python finetune.py --model B --data data/imagenet --task in1k --pretrained out/B_frac0.5_125k --eval_only

The recipe counts epochs (of N // batch steps), but the loop runs steps on data.py's stream, so resume
and world-size invariance work as in mim.py, whose plumbing we import. Read next: analyze.py.
"""
import argparse
import contextlib
import json
import os
import pickle
import re
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision.transforms import v2
from tqdm import tqdm

import data
import mim
import swinv2
from mim import print0

# -----------------------------------------------------------------------------
# command line


def get_parser():
    p = argparse.ArgumentParser(description="Fine-tune a (SimMIM-pre-trained) SwinV2 for classification")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="B", help="SwinV2 size: S, B, L, H, g (the paper's) or nano, tiny; must match the checkpoint")
    g.add_argument("--pretrained", required=True, help="a mim.py run directory, its ckpt.pt, an official SimMIM checkpoint, or 'none' (from scratch)")
    g.add_argument("--img_size", type=int, default=None, help="input pixels; default 224 (official; tiny 64)")
    g.add_argument("--window", type=int, default=None, help="attention window; default 14 (official; tiny 4)")
    g.add_argument("--drop_path", type=float, default=0.1, help="stochastic depth rate (official B: 0.1)")
    g.add_argument("--grad_ckpt", action="store_true", help="activation checkpointing per block (for H and g)")
    g = p.add_argument_group("data and augmentation")
    g.add_argument("--data", default="data/imagenet", help="folder with train/ and val/ class folders, a file list, iNaturalist's "
                   "train2018.json (or a folder holding train2018.json and val2018.json), or 'synthetic'")
    g.add_argument("--val_data", default=None, help="evaluation images (e.g. val2018.json); default: the val split of --data")
    g.add_argument("--val_images", type=int, default=0, help="evaluate a fixed subset of this many images; 0 = all (paper)")
    g.add_argument("--task", default=None, help="name of the dataset in summary.json (analyze.py's column {task}_top1), e.g. in1k; "
                   "default: inat18 for iNaturalist 2018 (the IN-1K recipe with an 8,142-way head: no SwinV2/SimMIM iNat18 "
                   "recipe is published), else the basename of --data")
    g.add_argument("--aug", default=None, choices=["paper", "light"], help="paper: RandomResizedCrop 0.08-1, RandAugment, random erasing (official); light: crop 0.35-1 and flip only; default paper (tiny light)")
    g.add_argument("--mixup", type=float, default=None, help="mixup alpha, 0 = off; default 0.8 (official; tiny 0)")
    g.add_argument("--cutmix", type=float, default=None, help="cutmix alpha, 0 = off; default 1.0 (official; tiny 0); with both on, one of them per batch")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing (official 0.1)")
    g.add_argument("--workers", type=int, default=None, help="data-loader processes per process; default 8 on CUDA, 0 on CPU")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=None, help="training epochs; default 100 (official; tiny 3)")
    g.add_argument("--warmup_epochs", type=int, default=None, help="linear warmup epochs; default 20 (official; tiny 1)")
    g.add_argument("--batch_size", type=int, default=None, help="global batch in images; default 2048 (paper; tiny 32)")
    g.add_argument("--micro_batch", type=int, default=None, help="images per GPU per forward; default batch_size / world size")
    g.add_argument("--lr", type=float, default=None, help="peak LR per 512 images, scaled by batch/512; default 1.25e-3 (official; tiny 3.2e-2)")
    g.add_argument("--warmup_lr", type=float, default=2.5e-7, help="LR at step 0 per 512 images, the same for every layer (official 2.5e-7)")
    g.add_argument("--min_lr", type=float, default=2.5e-7, help="final LR per 512 images, the same for every layer (official 2.5e-7)")
    g.add_argument("--layer_decay", type=float, default=None, help="layer-wise LR decay, 1 = off; default 0.75 (official B; tiny 1)")
    g.add_argument("--weight_decay", type=float, default=0.05, help="AdamW weight decay (official 0.05)")
    g.add_argument("--clip_grad", type=float, default=5.0, help="max gradient norm (official 5.0)")
    g.add_argument("--seed", type=int, default=0, help="seed of the head, data order, augmentation, mixing, drop path")
    g = p.add_argument_group("run")
    g.add_argument("--out_dir", default=None, help="run directory; default out/ft_{task}_{model}_{pretrained run}; resumes if it has ckpt.pt")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="autocast dtype; auto = bf16 on CUDA, fp32 on CPU")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--eval_only", action="store_true", help="evaluate --out_dir's checkpoint (or a --pretrained one with a head), write eval.json")
    return p


# The flags a preset decides: the official SwinV2 fine-tuning recipe for S..g, a CPU-minute recipe for
# nano and tiny on the synthetic set (a short, plain fine-tune that still tells pre-trainings apart).
RECIPES = {
    "paper": dict(epochs=100, warmup_epochs=20, batch_size=2048, lr=1.25e-3, img_size=224, window=14, aug="paper",
                  mixup=0.8, cutmix=1.0, layer_decay=0.75),
    # A 2M-parameter model sees ~200 steps: the ImageNet augmentation (crops down to 8 % of the image,
    # RandAugment, mixing) hides the one object a synthetic image holds, and the model learns nothing
    # (12-15 % top-1, chance 10 %). Layer decay 0.75 over 8 blocks leaves the lower blocks at 7 % of the
    # LR: after a 600-step pre-training, 4 epochs reach 24 % with it and 32 % without it (one seed).
    "cpu": dict(epochs=3, warmup_epochs=1, batch_size=32, lr=3.2e-2, img_size=64, window=4, aug="light",
                 mixup=0.0, cutmix=0.0, layer_decay=1.0),
}


def resolve(args, world_size):
    """Validate the flags and derive the run's numbers in one visible place; args is never modified.
    Raises ValueError with a one-line message naming the flag. (Steps per epoch need the data: main.)"""
    if args.model not in swinv2.PRESETS:
        raise ValueError(f"--model {args.model!r} is unknown; choose from {', '.join(swinv2.PRESETS)}")
    recipe = RECIPES["paper" if args.model in swinv2.PAPER_SIZES else "cpu"]
    r = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in recipe.items()}
    if r["epochs"] <= 0 or r["batch_size"] <= 0 or not 0 <= r["warmup_epochs"] <= r["epochs"]:
        raise ValueError(f"need --epochs > 0, --batch_size > 0, 0 <= --warmup_epochs <= --epochs; got {r['epochs']}, {r['batch_size']}, {r['warmup_epochs']}")
    B = r["batch_size"]
    r["micro_batch"] = args.micro_batch or B // world_size
    if r["micro_batch"] <= 0 or B % (r["micro_batch"] * world_size):
        raise ValueError(f"--batch_size {B} is not divisible by --micro_batch {r['micro_batch']} x {world_size} processes")
    r["accum"] = B // (r["micro_batch"] * world_size)
    # linear scaling rule: all three LRs are given per 512 images, as in the official code
    r["peak_lr"], r["start_lr"], r["min_lr"] = (v * B / 512 for v in (r["lr"], args.warmup_lr, args.min_lr))
    name = args.data.rstrip("/")
    inat18 = os.path.basename(name) in ("train2018.json", "val2018.json") or os.path.isfile(os.path.join(name, "train2018.json"))
    r["task"] = args.task or ("synthetic" if name.startswith("synthetic") else "inat18" if inat18 else
                              os.path.splitext(os.path.basename(name))[0])
    src = args.pretrained.rstrip("/")
    src = os.path.basename(os.path.dirname(src) if src.endswith("ckpt.pt") else src) if src != "none" else "scratch"
    src = src[: -len(".pth")] if src.endswith(".pth") else src  # a run dir name may hold dots (tiny_frac1_0.15k)
    r["out_dir"] = args.out_dir or f"out/ft_{r['task']}_{args.model}_{src}"
    swinv2.SwinV2Config(**dict(swinv2.PRESETS[args.model], img_size=r["img_size"], window_size=r["window"]))  # checks the window
    return r


# -----------------------------------------------------------------------------
# the pieces: pre-trained weights, layer-wise LR decay, mixing, evaluation


def read_pretrained(path):
    """--pretrained -> (checkpoint dict or None, pairing info for summary.json). A mim.py checkpoint names
    its run (model, frac, iters, val_loss: analyze.py pairs the two runs through it, and a run directory's
    summary.json fills what the checkpoint lacks); of an official checkpoint only the path is known."""
    info = dict(path=None, run_dir=None, model=None, frac=None, iters=None, data=None, step=None, val_loss=None)
    if path == "none":
        return None, info
    path = os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--pretrained {path} does not exist (want a ckpt.pt, a mim.py run directory or 'none')")
    try:
        ckpt = mim.load_checkpoint(path)  # weights_only: a checkpoint cannot run code
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:  # e.g. a pickled yacs config in the file
        what = re.search(r"GLOBAL ([\w.]+)", str(e))
        raise ValueError(f"--pretrained {path} is not a plain-tensor checkpoint ({what[1] + ' pickled in it' if what else type(e).__name__}); "
                         f"if you trust it: python -c \"import torch; torch.save({{'model': torch.load('{path}', weights_only=False)"
                         f"['model']}}, 'weights.pt')\" and pass weights.pt") from None
    info["path"] = os.path.abspath(path)
    if "run" in ckpt:
        run_dir = os.path.dirname(info["path"])
        summary_path = os.path.join(run_dir, "summary.json")
        summary = json.load(open(summary_path)) if os.path.isfile(summary_path) else {}
        run = dict(summary, **{k: v for k, v in ckpt["run"].items() if v is not None})
        info.update({k: run.get(k) for k in ("model", "frac", "iters", "data")}, run_dir=run_dir, step=ckpt.get("step"),
                    val_loss=ckpt.get("val_loss", summary.get("val_loss")))
    return ckpt, info


def build_model(args, r, ckpt, num_classes):
    """The classifier at the fine-tuning size and window, its encoder loaded from the checkpoint.
    swinv2.load_pretrained keeps `encoder.*` (dropping the decoder and the mask token), renames the
    legacy rpe_mlp, drops the shape-dependent buffers (rebuilt here for the new window: the position-bias
    MLP sees offsets normalised by the *pre-training* window, so 14 extrapolates a little past 12,
    SwinV2 sec. 3.3) and refuses another model size. The head keeps its trunc-normal init (official).
    Returns (model, missing keys)."""
    # the windows the weights were trained at: ours record them; official checkpoints get the preset's
    # pre-training windows (12,12,12,6); from scratch 0 = this window
    windows = (0, 0, 0, 0) if ckpt is None else ckpt.get("model_config", {}).get("window_sizes") or \
        swinv2.SwinV2Config(**swinv2.PRESETS[args.model]).window_sizes
    torch.manual_seed(args.seed)  # the same head on every rank
    model = swinv2.create(args.model, img_size=r["img_size"], window_size=r["window"], pretrained_window_sizes=tuple(windows),
                          num_classes=num_classes, drop_path_rate=args.drop_path, grad_ckpt=args.grad_ckpt)
    missing = swinv2.load_pretrained(model, ckpt) if ckpt is not None else []
    # MAE's handshake: only the head may be missing, so a wrong prefix cannot silently load nothing
    if set(missing) not in (set(), {"head.weight", "head.bias"}):
        raise ValueError(f"--pretrained: expected only the head to be missing, got {missing}")
    return model, missing


def param_groups(model, weight_decay, layer_decay):
    """AdamW groups with layer-wise LR decay (official rule): a parameter of layer id i (swinv2's layer_id:
    0 patch embedding, 1..L the blocks, L+1 the final norm and head) gets the LR scale layer_decay^(L+1-i).
    The head learns at the full LR and the patch embedding at 0.75^25 = 0.00075 of it for B: the lower
    layers, whose general features pre-training already made good, move least. No weight decay on 1-D
    parameters, biases, logit_scale and cpb_mlp (fine-tuning's keywords; pre-training decays the last two)."""
    L = sum(model.cfg.depths)
    return mim.param_groups(model, weight_decay, skip=("cpb_mlp", "logit_scale"),
                            layer_scale=lambda name: layer_decay ** (L + 1 - model.layer_id(name)))


def group_lr(step, scale, r):
    """LR of the group with layer scale `scale` at `step`. Only the peak is scaled, as in the official code
    (its timm scheduler ignores lr_scale): linear warmup from start_lr to peak_lr*scale, then a cosine
    from peak_lr*scale down to min_lr; start_lr and min_lr are the same for every layer."""
    return mim.get_lr(step, r["peak_lr"] * scale, r["start_lr"], r["warmup_iters"], r["iters"], min_lr=r["min_lr"], schedule="cosine")


def make_mixer(mixup, cutmix, smoothing, num_classes):
    """f(x, labels) -> (x, soft targets (B, K)): mixup or cutmix, one of the two per micro-batch (p 0.5
    each, the official switch probability) with one lambda for the whole micro-batch (timm's 'batch'
    mode), then label smoothing y(1-eps) + eps/K. Smoothing is affine and mixing is a convex
    combination, so this equals timm's smoothing-then-mixing."""
    mixers = [m(alpha=a, num_classes=num_classes) for a, m in ((mixup, v2.MixUp), (cutmix, v2.CutMix)) if a > 0]
    mix = v2.RandomChoice(mixers) if mixers else None

    def apply(x, labels):
        x, y = mix(x, labels) if mix else (x, F.one_hot(labels, num_classes).float())
        return x, y * (1 - smoothing) + smoothing / num_classes
    return apply


@torch.no_grad()
def evaluate(model, loader, device, ctx):
    """Top-1 and top-5 accuracy in percent, and the image count. Each rank evaluates a disjoint shard
    (data.shard: no padding, no duplicates, unlike the official DistributedSampler) and we sum
    (correct, count) over ranks, so the numbers are exact and the same for any world size."""
    model.eval()
    c1 = c5 = n = 0
    for x, y, _, _ in loader:
        x = data.normalize(x.to(device, non_blocking=True))
        with ctx:
            logits = model(x)
        hits = logits.float().topk(min(5, logits.shape[1]), dim=1).indices.cpu() == y[:, None]  # (B, 5)
        c1, c5, n = c1 + int(hits[:, 0].sum()), c5 + int(hits.any(1).sum()), n + len(y)
    model.train()
    c1, c5, n = mim.all_sum(c1, c5, n, device=device)
    return 100 * c1 / max(n, 1), 100 * c5 / max(n, 1), int(n)


# -----------------------------------------------------------------------------
# the script


def main(argv=None):
    args = get_parser().parse_args(argv)
    try:  # every bad flag, path or checkpoint is refused before any work starts
        r = resolve(args, int(os.environ.get("WORLD_SIZE", 1)))
        train_set, val_set = mim.open_splits(args.data, args.val_data)
        K = len(train_set.classes)
        if list(val_set.classes) != list(train_set.classes)[:len(val_set.classes)]:
            raise ValueError(f"the classes of --val_data {args.val_data or args.data} are not those of --data {args.data}")
        ckpt, pretrained = read_pretrained(args.pretrained)
        model, missing = build_model(args, r, ckpt, K)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    del ckpt  # the encoder is in the model now
    rank, local_rank, world, device = mim.setup_distributed()
    master, out_dir = rank == 0, r["out_dir"]
    os.makedirs(out_dir, exist_ok=True)
    ctx = mim.autocast(device, args.dtype)
    workers = args.workers if args.workers is not None else 8 if device.type == "cuda" else 0  # on a CPU, the CPU computes
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # ---- the numbers of this run: epochs become steps (at least one per epoch), derived once and printed
    N, B = len(train_set), r["batch_size"]
    spe = max(1, N // B)
    r.update(steps_per_epoch=spe, iters=r["epochs"] * spe, warmup_iters=r["warmup_epochs"] * spe)
    p = pretrained
    print0(f"{'model':>14} SwinV2-{args.model}, {r['img_size']} px, windows {model.cfg.window_sizes} over pre-trained "
           f"{model.cfg.pretrained_window_sizes}, {K} classes")
    print0(f"{'pretrained':>14} " + (f"{p['path']}, SwinV2-{p['model']} frac {p['frac']} {p['iters']} iters val_loss {p['val_loss']}"
                                    if p["run_dir"] else p["path"] or "none: from scratch"))
    if missing:
        print0(f"{'new':>14} {', '.join(missing)} (freshly initialised)")
    print0(f"{'global batch':>14} {B} = {r['micro_batch']} per process x {world} processes x {r['accum']} accumulation")
    print0(f"{'schedule':>14} {r['epochs']} epochs x {spe} steps ({N} images, task {r['task']}) = {r['iters']} steps, "
           f"warmup {r['warmup_iters']}")
    print0(f"{'LR':>14} {r['lr']:g} per 512 -> peak {r['peak_lr']:.3g} x layer scale (decay {r['layer_decay']}); "
           f"warmup from {r['start_lr']:.3g} and cosine to {r['min_lr']:.3g}, both unscaled")

    # ---- data: fixed evaluation images, sharded over ranks (the training stream comes with the loop)
    val_idx = np.arange(len(val_set))
    if 0 < args.val_images < len(val_set):
        val_idx = np.sort(np.random.default_rng(0).permutation(len(val_set))[:args.val_images])
    val_stream = data.EvalSet(val_set, val_idx, data.finetune_transform(r["img_size"], train=False))
    val_loader = data.make_loader(val_stream, r["micro_batch"], sampler=data.shard(len(val_stream), rank, world), workers=workers)

    # ---- optimizer; the table shows layer decay at work
    model = raw_model = model.to(device)
    groups = param_groups(model, args.weight_decay, r["layer_decay"])
    optimizer = torch.optim.AdamW(groups, lr=r["peak_lr"], betas=(0.9, 0.999), eps=1e-8, fused=device.type == "cuda" or None)
    print0(f"{'layer id':>14} {'LR scale':>9} {'wd':>5} {'tensors':>7}")
    for g in sorted(groups, key=lambda g: (model.layer_id(g["names"][0]), -g["weight_decay"])):
        ids = sorted({model.layer_id(n) for n in g["names"]})  # one id per group, unless layer_decay is 1
        print0(f"{ids[0] if len(ids) == 1 else f'{ids[0]}-{ids[-1]}':>14} {g['lr_scale']:9.2e} {g['weight_decay']:5g} {len(g['params']):7d}")

    # ---- resume from the run directory's checkpoint, if any
    ckpt_path, start_step = os.path.join(out_dir, "ckpt.pt"), 0
    state = dict(best_top1=None, best_top5=None, last_top1=None, last_top5=None, skipped_steps=0, bad_images=0)
    identity = dict(model=args.model, batch_size=B, iters=r["iters"], img_size=r["img_size"], window=r["window"], num_classes=K)
    if os.path.exists(ckpt_path):
        ckpt = mim.load_checkpoint(ckpt_path)
        if {k: ckpt["run"].get(k) for k in identity} != identity:
            sys.exit(f"error: {ckpt_path} belongs to another run ({ckpt['run']}); this one is {identity}. Use another --out_dir")
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_step, state = ckpt["step"], ckpt["state"]
        print0(f"resumed from {ckpt_path} at step {start_step}")
        del ckpt
    elif args.eval_only and missing:
        sys.exit(f"error: --eval_only needs a {K}-class head: {ckpt_path} does not exist and --pretrained has no head")

    if args.eval_only:
        top1, top5, n = evaluate(raw_model, val_loader, device, ctx)
        print0(f"step {start_step}: top-1 {top1:.2f} %, top-5 {top5:.2f} % on {n} images")
        if master:
            mim.save_json(os.path.join(out_dir, "eval.json"), dict(step=start_step, top1=top1, top5=top5, images=n))
        if dist.is_initialized():
            dist.destroy_process_group()
        return dict(top1=top1, top5=top5)

    if args.compile:
        model = torch.compile(model)
    if world > 1:
        model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None, broadcast_buffers=False)
    run_info = dict(identity, data=args.data, task=r["task"], train_images=N, steps_per_epoch=spe, epochs=r["epochs"],
                    warmup_iters=r["warmup_iters"], peak_lr=r["peak_lr"], layer_decay=r["layer_decay"], aug=r["aug"],
                    mixup=r["mixup"], cutmix=r["cutmix"], seed=args.seed,
                    world_size=world, micro_batch=r["micro_batch"], accum=r["accum"], torch=str(torch.__version__))
    if master:
        mim.save_json(os.path.join(out_dir, "args.json"), dict(vars(args), run=run_info, pretrained=pretrained))
    log = mim.Log(out_dir, master)

    # ---- the loop
    stream = data.TrainStream(train_set, np.arange(N), data.finetune_transform(r["img_size"], train=True, aug=r["aug"]), args.seed)
    sampler = data.StreamSampler(B, r["micro_batch"], rank, world, start_step)
    batches = iter(data.make_loader(stream, r["micro_batch"], sampler=sampler, workers=workers))
    mix = make_mixer(r["mixup"], r["cutmix"], args.smoothing, K)
    stop, skipped_in_row, loss_sum, loss_n, bad, t0 = mim.StopSignal(), 0, 0.0, 0, 0, time.time()
    bar = tqdm(total=r["iters"], initial=start_step, disable=not master, dynamic_ncols=True)
    for step in range(start_step, r["iters"]):
        for group in optimizer.param_groups:
            group["lr"] = group_lr(step, group["lr_scale"], r)
        loss_acc = torch.zeros((), device=device)
        for micro in range(r["accum"]):
            x, labels, _, n_bad = next(batches)
            bad += int(n_bad.sum())
            # mixing and drop path are seeded by (seed, step, micro-batch): a resumed run repeats them
            torch.manual_seed(mim.micro_seed(args.seed, step, micro * world + rank))
            x = data.normalize(x.to(device, non_blocking=True))
            x, target = mix(x, labels.to(device, non_blocking=True))
            # gradients are all-reduced only on the last micro-step
            with model.no_sync() if world > 1 and micro < r["accum"] - 1 else contextlib.nullcontext():
                with ctx:
                    logits = model(x)
                loss = torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()  # soft-target CE, fp32
                (loss / r["accum"]).backward()  # gradients add up over micro-steps: their sum is the batch mean
            loss_acc += loss.detach() / r["accum"]
        _, skipped_in_row = mim.optimizer_step(raw_model, optimizer, args.clip_grad, skipped_in_row, step, ckpt_path)
        state["skipped_steps"] += skipped_in_row > 0
        loss_sum, loss_n, done = loss_sum + loss_acc, loss_n + 1, step + 1
        bar.update(1)

        end_of_epoch = done % spe == 0 or done == r["iters"]
        if end_of_epoch:  # .item() and all_reduce only here: they are sync points
            top1, top5, _ = evaluate(raw_model, val_loader, device, ctx)
            tot, n_bad_all = mim.all_sum(float(loss_sum), bad, device=device)
            state["bad_images"] += int(n_bad_all)
            row = dict(epoch=done / spe, step=done, train_loss=tot / (loss_n * world), lr=group_lr(step, 1.0, r),
                       top1=top1, top5=top5, img_per_s=loss_n * B / (time.time() - t0), bad_images=state["bad_images"])
            log(**row)
            if master:
                bar.write(f"epoch {done / spe:g} (step {done}): train_loss {row['train_loss']:.4f}, top-1 {top1:.2f} %, top-5 {top5:.2f} %")
            # the best of each over the epochs, as the official max_accuracy (and the paper) report
            state.update(last_top1=top1, last_top5=top5, best_top1=max(top1, state["best_top1"] or 0.0),
                         best_top5=max(top5, state["best_top5"] or 0.0))
            loss_sum, loss_n, bad, t0 = 0.0, 0, 0, time.time()
        preempted = stop.should_stop(device)
        if end_of_epoch or preempted:
            mim.checkpoint_boundary(master, lambda: mim.save_checkpoint(
                ckpt_path, raw_model, optimizer, done, args=vars(args), run=run_info, pretrained=pretrained,
                model_config=swinv2.model_config(raw_model), state=state), preempted, ckpt_path, done)
    bar.close()
    stop.restore()

    if master and start_step < r["iters"]:
        mim.save_json(os.path.join(out_dir, "summary.json"), dict(
            kind="finetune", task=r["task"], model=args.model, epochs=r["epochs"], data=args.data, pretrained=pretrained,
            **{k: state[k] for k in ("best_top1", "best_top5", "last_top1", "last_top5", "skipped_steps", "bad_images")}))
    if dist.is_initialized():
        dist.destroy_process_group()
    return dict(top1=state["last_top1"], top5=state["last_top5"])


if __name__ == "__main__":
    main()
