"""
Fine-tuning a SimMIM-pre-trained SwinV2 for classification, the second half of "On Data Scaling in
Masked Image Modeling" (arXiv 2206.04664, sec. 3: every pre-trained model is fine-tuned on ImageNet-1K
or iNaturalist 2018, and its accuracy is related to the pre-training losses). We keep the encoder of a
mim.py (or official) checkpoint, add a fresh linear head, and train with the official SwinV2-B recipe
(SimMIM arXiv 2111.09886, appendix): 224 px, window 14 over pre-trained windows 12,12,12,6, 100 epochs,
layer-wise LR decay 0.75, RandAugment, mixup + cutmix, label smoothing, random erasing. The CPU
presets (nano, tiny) get a short plain recipe instead (RECIPES): 3 epochs, light crops, no mixing.

    python finetune.py --model tiny --data synthetic --pretrained out/tiny_frac1_0.3k     # CPU, a minute
    python finetune.py --model tiny --data synthetic --pretrained none                     # from scratch
    torchrun --nproc_per_node 8 finetune.py --model B --data data/imagenet --task in1k --pretrained out/B_frac0.5_125k
    # iNaturalist 2018: data/inat2018 holds its train2018.json and val2018.json
    torchrun --nproc_per_node 8 finetune.py --model B --data data/inat2018 --pretrained out/B_frac0.5_125k
    python finetune.py --model B --data data/imagenet --task in1k --pretrained out/B_frac0.5_125k --eval_only

The recipe counts epochs (of N // batch steps), but the loop runs steps on data.py's stream, so resume
and world-size invariance work as in mim.py: the plumbing is train.py's. Read next: analyze.py.
"""
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2
from tqdm import tqdm

import data
import swinv2
import train
from train import print0

# -----------------------------------------------------------------------------
# the pieces: pre-trained weights, layer-wise LR decay, mixing, evaluation


def pretrained_name(path):
    """--pretrained -> the name of the pre-training in default run directories: its run directory's name,
    the checkpoint file's name, or 'scratch'."""
    src = path.rstrip("/")
    src = (os.path.basename(os.path.dirname(src) if src.endswith("ckpt.pt") else src) if src != "none"
           else "scratch")
    return src[: -len(".pth")] if src.endswith(".pth") else src  # a run dir name may hold dots (tiny_frac1_0.3k)


def print_pretrained(p, missing):
    """Two lines of every downstream script's start: where the encoder comes from, what starts fresh."""
    val_loss = "n/a" if p["val_loss"] is None else f"{p['val_loss']:.4f}"
    print0(f"{'pretrained':>14} " + (f"{p['path']}, SwinV2-{p['model']} frac {p['frac']:g} {p['iters']} iters "
                                     f"val_loss {val_loss}" if p["run_dir"] else
                                     p["path"] or "none: from scratch"))
    if missing:
        print0(f"{'new':>14} {', '.join(missing)} (freshly initialised)")


def read_pretrained(path, allow_unfinished=False):
    """--pretrained -> (checkpoint dict or None, pairing info for summary.json). A mim.py checkpoint names
    its run (model, frac, iters, data, step, val_loss: analyze.py pairs the two runs through it); of an
    official checkpoint only the path is known. A mim.py run that has not finished (no summary.json: it
    stopped, or its final evaluation has not run) is refused unless allow_unfinished: its numbers would
    enter the study as those of the run it names."""
    info = dict(path=None, run_dir=None, model=None, frac=None, iters=None, data=None, step=None, val_loss=None)
    if path == "none":
        return None, info
    path = os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--pretrained {path} does not exist "
                                "(want a ckpt.pt, a mim.py run directory or 'none')")
    ckpt = train.load_checkpoint(path)  # weights_only: a checkpoint cannot run code; ValueError names what is wrong
    info["path"] = os.path.abspath(path)
    if "identity" in ckpt:  # a mim.py checkpoint: its run is known
        run_dir, run = os.path.dirname(info["path"]), ckpt["identity"]
        info.update(run_dir=run_dir, model=run["model"], frac=run["frac"], iters=run["iters"], step=ckpt["step"],
                    data=os.path.basename(ckpt["args"]["data"].rstrip("/")), val_loss=ckpt.get("val_loss"))
        if not allow_unfinished and not os.path.exists(os.path.join(run_dir, "summary.json")):
            raise ValueError(f"--pretrained {run_dir} has not finished: its checkpoint is at step {ckpt['step']} "
                             f"of {run['iters']} and it has no summary.json; rerun its command to finish it, "
                             "or pass --allow_unfinished")
    return ckpt, info


def pretrained_windows(ckpt, model_name):
    """The windows the weights were trained at: ours record them; official checkpoints get the preset's
    pre-training windows (12,12,12,6); from scratch (ckpt None) 0 = the model's own window."""
    if ckpt is None:
        return (0, 0, 0, 0)
    return tuple(ckpt.get("model_config", {}).get("window_sizes")
                 or swinv2.SwinV2Config(**swinv2.PRESETS[model_name]).window_sizes)


def build_model(args, r, ckpt, num_classes):
    """The classifier at the fine-tuning size and window, its encoder loaded from the checkpoint.
    swinv2.load_pretrained keeps `encoder.*` (dropping the decoder and the mask token), renames the
    legacy rpe_mlp, drops the shape-dependent buffers (rebuilt here for the new window: the position-bias
    MLP sees offsets normalised by the *pre-training* window, so 14 extrapolates a little past 12,
    SwinV2 sec. 3.3) and refuses another model size. The head keeps its trunc-normal init (official).
    Returns (model, missing keys)."""
    torch.manual_seed(args.seed)  # the same head on every rank
    model = swinv2.create(args.model, img_size=r["img_size"], window_size=r["window"],
                          pretrained_window_sizes=pretrained_windows(ckpt, args.model),
                          num_classes=num_classes, drop_path_rate=args.drop_path, grad_ckpt=args.grad_ckpt)
    try:
        missing = swinv2.load_pretrained(model, ckpt) if ckpt is not None else []
    except ValueError as e:
        raise ValueError(f"--pretrained {args.pretrained}: {e}") from None
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
    return train.param_groups(model, weight_decay, skip=("cpb_mlp", "logit_scale"),
                            layer_scale=lambda name: layer_decay ** (L + 1 - model.layer_id(name)))


def group_lr(step, scale, r):
    """LR of the group with layer scale `scale` at `step`. Only the peak is scaled, as in the official code
    (its timm scheduler ignores lr_scale): linear warmup from start_lr to peak_lr*scale, then a cosine
    from peak_lr*scale down to min_lr; start_lr and min_lr are the same for every layer."""
    return train.get_lr(step, r["peak_lr"] * scale, r["start_lr"], r["warmup_iters"], r["iters"], min_lr=r["min_lr"],
                        schedule="cosine")


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
    for batch in loader:
        with ctx:
            logits = model(data.normalize(batch.image.to(device, non_blocking=True)))
        hits = logits.float().topk(min(5, logits.shape[1]), dim=1).indices.cpu() == batch.label[:, None]  # (B, 5)
        hits = hits[data.scored(batch, loader.dataset)]  # an unreadable image is left out, not replaced
        c1, c5, n = c1 + int(hits[:, 0].sum()), c5 + int(hits.any(1).sum()), n + len(hits)
    model.train()
    c1, c5, n = train.all_sum(c1, c5, n, device=device)
    return 100 * c1 / max(n, 1), 100 * c5 / max(n, 1), int(n)


# -----------------------------------------------------------------------------
# command line


def get_parser():
    p = train.Parser(prog="finetune.py", description="Fine-tune a (SimMIM-pre-trained) SwinV2 for classification")
    g = p.add_argument_group("model")
    g.add_argument("--model", type=train.model_name, default="B", help="SwinV2 size: S, B, L, H, g (the paper's) "
                   "or nano, tiny; must match the checkpoint")
    g.add_argument("--pretrained", required=True, help="a mim.py run directory, its ckpt.pt, an official SimMIM "
                   "checkpoint, or 'none' (from scratch)")
    g.add_argument("--allow_unfinished", action="store_true", help="accept a --pretrained run that has not reached "
                   "its end (no summary.json)")
    g.add_argument("--img_size", type=train.count, default=None, help="input pixels; default 224 (official; tiny 64)")
    g.add_argument("--window", type=train.count, default=None, help="attention window; default 14 (official; tiny 4)")
    g.add_argument("--drop_path", type=train.number(float, 0, 1, hi_open=True), default=0.1,
                   help="stochastic depth rate (official B: 0.1)")
    g.add_argument("--grad_ckpt", action="store_true", help="activation checkpointing per block (for H and g)")
    g = p.add_argument_group("data and augmentation")
    g.add_argument("--data", default="data/imagenet", help="folder with train/ and val/ class folders (or "
                   "train.zip and val.zip with their _map.txt), .tar shards with KEY.cls, a file list, iNaturalist's "
                   "train2018.json (or a folder holding train2018.json and val2018.json), or 'synthetic'")
    g.add_argument("--val_data", default=None, help="evaluation images (e.g. val2018.json); default: the val split "
                   "of --data")
    g.add_argument("--val_images", type=train.natural, default=0, help="evaluate a fixed subset of this many images; "
                   "0 = all (paper)")
    g.add_argument("--task", default=None, help="name of the dataset in summary.json (analyze.py's column "
                   "{task}_top1), e.g. in1k; default: inat18 for iNaturalist 2018 (the IN-1K recipe with an 8,142-way "
                   "head: no SwinV2/SimMIM iNat18 recipe is published), else the basename of --data")
    g.add_argument("--aug", default=None, choices=["paper", "light"], help="paper: RandomResizedCrop 0.08-1, "
                   "RandAugment, random erasing (official); light: crop 0.35-1 and flip only; default paper "
                   "(tiny light)")
    g.add_argument("--mixup", type=train.non_negative, default=None, help="mixup alpha, 0 = off; default 0.8 "
                   "(official; tiny 0)")
    g.add_argument("--cutmix", type=train.non_negative, default=None, help="cutmix alpha, 0 = off; default 1.0 "
                   "(official; tiny 0); with both on, one of them per batch")
    g.add_argument("--smoothing", type=train.number(float, 0, 1, hi_open=True), default=0.1,
                   help="label smoothing (official 0.1)")
    g.add_argument("--workers", type=train.natural, default=None, help="data-loader processes per process; "
                   "default 8 on CUDA, 0 on CPU")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=train.count, default=None, help="training epochs; default 100 (official; tiny 3)")
    g.add_argument("--warmup_epochs", type=train.natural, default=None, help="linear warmup epochs; default 20 "
                   "(official; tiny 1)")
    g.add_argument("--batch_size", type=train.count, default=None, help="global batch in images; default 2048 "
                   "(paper; tiny 32)")
    g.add_argument("--micro_batch", type=train.count, default=None, help="images per GPU per forward; "
                   "default batch_size / world size")
    g.add_argument("--lr", type=train.positive, default=None, help="peak LR per 512 images, scaled by batch/512; "
                   "default 1.25e-3 (official; tiny 3.2e-2)")
    g.add_argument("--warmup_lr", type=train.non_negative, default=2.5e-7, help="LR at step 0 per 512 images, "
                   "the same for every layer (official 2.5e-7)")
    g.add_argument("--min_lr", type=train.non_negative, default=2.5e-7, help="final LR per 512 images, the same "
                   "for every layer (official 2.5e-7)")
    g.add_argument("--layer_decay", type=train.number(float, 0, 1, lo_open=True), default=None,
                   help="layer-wise LR decay, 1 = off; default 0.75 (official B; tiny 1)")
    g.add_argument("--weight_decay", type=train.non_negative, default=0.05, help="AdamW weight decay (official 0.05)")
    g.add_argument("--clip_grad", type=train.non_negative, default=5.0, help="max gradient norm, 0 = no clipping "
                   "(official 5.0)")
    g.add_argument("--seed", type=train.natural, default=0, help="seed of the head, data order, augmentation, "
                   "mixing, drop path")
    g = p.add_argument_group("run")
    g.add_argument("--out_dir", default=None, help="run directory; default out/ft_{task}_{model}_{pretrained run}; "
                   "resumes if it has ckpt.pt")
    g.add_argument("--log_every", type=train.count, default=None, help="steps between log lines; default 50 "
                   "(tiny 10); evaluation and checkpoints come once per epoch")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="autocast dtype; "
                   "auto = bf16 on CUDA, fp32 on CPU")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--eval_only", action="store_true", help="evaluate --out_dir's checkpoint (or a --pretrained one "
                   "with a head), write eval.json")
    g.add_argument("--tensorboard", action=train.TensorBoard,
                   help="also write the log's numbers as TensorBoard events in the run directory (optional package)")
    g.add_argument("--dist_timeout", type=train.count, default=60, help="minutes a process waits for the others "
                   "(rank 0 evaluating alone) before the run fails; default 60")
    return p


# The flags a preset decides: the official SwinV2 fine-tuning recipe for S..g, a CPU-minute recipe for
# nano and tiny on the synthetic set (a short, plain fine-tune that still tells pre-trainings apart).
RECIPES = {
    "paper": dict(epochs=100, warmup_epochs=20, batch_size=2048, lr=1.25e-3, img_size=224, window=14, aug="paper",
                  mixup=0.8, cutmix=1.0, layer_decay=0.75, log_every=50),
    # A 2M-parameter model sees ~200 steps: the ImageNet augmentation (crops down to 8 % of the image,
    # RandAugment, mixing) hides the one object a synthetic image holds, and the model learns little more
    # than chance. Layer decay 0.75 over 8 blocks leaves the lower blocks at 7 % of the LR: in so few steps
    # they barely move from a short pre-training, and the fine-tune gains from turning it off.
    "demo": dict(epochs=3, warmup_epochs=1, batch_size=32, lr=3.2e-2, img_size=64, window=4, aug="light",
                 mixup=0.0, cutmix=0.0, layer_decay=1.0, log_every=10),
}
# fine-tuning's evaluation subset is a measurement choice, not part of training
FREE = train.FREE | {"allow_unfinished", "val_images"}


def resolve(args, world_size):
    """Check the flags together and derive the run's numbers in one visible place; args is never modified.
    Raises ValueError with a one-line message naming the flag. (Steps per epoch need the data: see steps.)"""
    recipe = RECIPES["paper" if args.model in swinv2.PAPER_SIZES else "demo"]
    r = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in recipe.items()}
    if r["warmup_epochs"] > r["epochs"]:
        raise ValueError(f"--warmup_epochs {r['warmup_epochs']} is longer than --epochs {r['epochs']}")
    B = r["batch_size"]
    r["micro_batch"], r["accum"] = train.batch_split(B, args.micro_batch, world_size)
    # linear scaling rule: all three LRs are given per 512 images, as in the official code
    r["peak_lr"], r["start_lr"], r["min_lr"] = (v * B / 512 for v in (r["lr"], args.warmup_lr, args.min_lr))
    name = args.data.rstrip("/")
    inat18 = (os.path.basename(name) in ("train2018.json", "val2018.json")
              or os.path.isfile(os.path.join(name, "train2018.json")))
    r["task"] = args.task or ("synthetic" if name.startswith("synthetic") else "inat18" if inat18 else
                              os.path.splitext(os.path.basename(name))[0])
    r["out_dir"] = args.out_dir or f"out/ft_{r['task']}_{args.model}_{pretrained_name(args.pretrained)}"
    train.check_out_dir(r["out_dir"])
    try:  # checks that the windows tile every stage's feature map
        swinv2.SwinV2Config(**dict(swinv2.PRESETS[args.model], img_size=r["img_size"], window_size=r["window"]))
    except ValueError as e:
        raise ValueError(f"--img_size {r['img_size']} / --window {r['window']}: {e}") from None
    r.update(clip_grad=args.clip_grad, seed=args.seed)
    return r


def steps(r, n_train):
    """Epochs become steps on data.py's stream: an epoch is n_train // batch steps (the last partial batch
    is dropped, as the official loader does). Evaluation and checkpoints come at the end of each epoch."""
    if r["batch_size"] > n_train:
        raise ValueError(f"--batch_size {r['batch_size']} is larger than the {n_train} training images")
    spe = n_train // r["batch_size"]
    r.update(epoch_steps=spe, iters=r["epochs"] * spe, warmup_iters=r["warmup_epochs"] * spe, eval_every=spe,
             save_every=spe)
    return r

# -----------------------------------------------------------------------------
# the script


def eval_only(run, model, missing, K, val_loader, device, ctx, model_name, master):
    """--eval_only: top-1 and top-5 of the run directory's checkpoint, else of --pretrained's own head,
    written to eval.json. A measurement: no lock is taken and nothing else is written."""
    if os.path.exists(run.ckpt):
        step = train.load_for_eval(run.ckpt, model, model, model_name, master, classes=K)["step"]
    elif missing:
        train.fail(f"--eval_only needs a {K}-class head: {run.ckpt} does not exist and --pretrained has no head",
                   master)
    else:
        step = 0
    top1, top5, n = evaluate(model, val_loader, device, ctx)
    print0(f"step {step}: top-1 {top1:.2f} %, top-5 {top5:.2f} % on {n} images -> {run.file('eval.json')}")
    if master:
        os.makedirs(run.path, exist_ok=True)
        train.save_json(run.file("eval.json"), dict(step=step, top1=top1, top5=top5, images=n))
    return dict(top1=top1, top5=top5)


def main(argv=None):
    # ---- flags, checkpoint, data: every bad flag, path or file is refused in one line, before any work
    args = get_parser().parse_args(argv)
    train.warn_cpu(args.model)
    try:
        r = resolve(args, int(os.environ.get("WORLD_SIZE", 1)))
        ckpt, pretrained = read_pretrained(args.pretrained, args.allow_unfinished)
        train_set, val_set = data.open_splits(args.data, args.val_data)
        K = len(train_set.classes)
        unlabelled = [d for d in (train_set, val_set) if (np.asarray(d.targets) < 0).any()]
        if unlabelled:  # a folder of images outside class folders, a zip without its map, shards without .cls
            raise ValueError(f"{data.where(unlabelled[0], int(np.argmax(np.asarray(unlabelled[0].targets) < 0)))} "
                             f"has no label: fine-tuning needs class folders, a map file or KEY.cls members")
        if list(val_set.classes) != list(train_set.classes)[:len(val_set.classes)]:
            raise ValueError(f"the classes of --val_data {args.val_data or args.data} are not those of "
                             f"--data {args.data}")
        steps(r, len(train_set))
        data.check_readable(train_set, range(len(train_set)), f"--data {args.data}")
        data.check_readable(val_set, range(len(val_set)), f"--val_data {args.val_data or args.data}")
        model, missing = build_model(args, r, ckpt, K)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    del ckpt  # the encoder is in the model now
    N, B, p = len(train_set), r["batch_size"], pretrained
    # fixed evaluation images (sharded over ranks below); the training stream is data.py's, as in mim.py
    val_idx = np.arange(len(val_set))
    if 0 < args.val_images < len(val_set):
        val_idx = np.sort(np.random.default_rng(0).permutation(len(val_set))[:args.val_images])
    val_stream = data.EvalSet(val_set, val_idx, data.finetune_transform(r["img_size"], train=False))
    stream = data.TrainStream(train_set, np.arange(N), data.finetune_transform(r["img_size"], train=True, aug=r["aug"]),
                              args.seed)

    # ---- processes and the run directory (let go however this block ends)
    with train.session(r["out_dir"], args.dist_timeout, args.tensorboard) as (run, device, rank, world):
        master = rank == 0
        dtype, ctx, workers = train.device_setup(device, args.dtype, args.workers)
        print0(f"{'model':>14} SwinV2-{args.model}, {r['img_size']} px, windows {model.cfg.window_sizes} over "
               f"pre-trained {model.cfg.pretrained_window_sizes}, {K} classes")
        print_pretrained(p, missing)
        print0(f"{'global batch':>14} {B} = {r['micro_batch']} per process x {world} processes x "
               f"{r['accum']} accumulation")
        print0(f"{'schedule':>14} {r['epochs']} epochs x {r['epoch_steps']} steps ({N} images, task {r['task']}) = "
               f"{r['iters']} steps, warmup {r['warmup_iters']}")
        print0(f"{'LR':>14} {r['lr']:g} per 512 -> peak {r['peak_lr']:.3g} x layer scale (decay {r['layer_decay']}); "
               f"warmup from {r['start_lr']:.3g} and cosine to {r['min_lr']:.3g}, both unscaled")
        val_loader = data.make_loader(val_stream, r["micro_batch"], sampler=data.shard(len(val_stream), rank, world),
                                      workers=workers)

        # ---- model and optimizer; the table shows layer decay at work
        model = raw_model = model.to(device)
        groups = param_groups(model, args.weight_decay, r["layer_decay"])
        optimizer = train.adamw(groups, r["peak_lr"])
        print0(f"{'layer id':>14} {'LR scale':>9} {'wd':>5} {'tensors':>7}")
        for g in sorted(groups, key=lambda g: (model.layer_id(g["names"][0]), -g["weight_decay"])):
            ids = sorted({model.layer_id(n) for n in g["names"]})  # one id per group, unless layer_decay is 1
            layers = ids[0] if len(ids) == 1 else f"{ids[0]}-{ids[-1]}"
            print0(f"{layers:>14} {g['lr_scale']:9.2e} {g['weight_decay']:5g} {len(g['params']):7d}")
        if args.eval_only:
            return eval_only(run, raw_model, missing, K, val_loader, device, ctx, args.model, master)

        # ---- the run directory: lock, resume (another run's checkpoint is refused)
        origin = f"{os.path.basename(p['run_dir'] or p['path'] or 'none')} step {p['step']}"  # what it starts from
        identity = train.identity_of(args, r, FREE, pretrained=origin, data_train_images=N, data_classes=K,
                                     dtype=str(dtype))
        state, done = run.start(identity, raw_model, optimizer, master, r["iters"])
        if done:
            return dict(top1=done["last_top1"], top5=done["last_top5"])
        if master:
            train.save_json(run.file("args.json"), dict(vars(args), identity=identity, pretrained=pretrained,
                                                        world_size=world, micro_batch=r["micro_batch"],
                                                        accum=r["accum"], task=r["task"],
                                                        steps_per_epoch=r["epoch_steps"], iters=r["iters"],
                                                        classes=list(train_set.classes),
                                                        torch=str(torch.__version__)))

        # ---- the loop: train.loop runs the steps; a step's forward is loss_fn, an evaluation is accuracy
        sampler = data.StreamSampler(B, r["micro_batch"], rank, world, state["step"])
        batches = iter(data.make_loader(stream, r["micro_batch"], sampler=sampler, workers=workers))
        mix = make_mixer(r["mixup"], r["cutmix"], args.smoothing, K)
        if args.compile:
            model = torch.compile(model)
        if world > 1:
            model = train.ddp(model, device)

        def loss_fn(batch):
            x, labels = batch.image.to(device, non_blocking=True), batch.label.to(device, non_blocking=True)
            x, target = mix(data.normalize(x), labels)  # seeded by the loop, per micro-batch
            with ctx:
                logits = model(x)
            return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean(), {}  # soft-target CE, fp32

        def accuracy(step):
            top1, top5, n = evaluate(raw_model, val_loader, device, ctx)
            if master:
                tqdm.write(f"epoch {step / r['epoch_steps']:g} (step {step}): top-1 {top1:.2f} %, top-5 {top5:.2f} %")
            return dict(epoch=step / r["epoch_steps"], top1=top1, top5=top5, val_images=n)

        keep = dict(identity=identity, args=vars(args), pretrained=pretrained,
                    model_config=swinv2.model_config(raw_model))
        train.loop(run, r, state, device, model=model, raw_model=raw_model, optimizer=optimizer, stream=stream,
                   batches=batches, loss_fn=loss_fn, lr_at=lambda step, scale: group_lr(step, scale, r),
                   evaluate=accuracy, keep=keep)

        # ---- the summary, from the log: the best epoch, as the official max_accuracy (and the paper) report,
        # and the last
        if not master:
            return {}
        evals = [row for _, row in run.rows() if "top1" in row]
        summary = dict(kind="finetune", task=r["task"], model=args.model, epochs=r["epochs"], data=args.data,
                       pretrained=pretrained, best_top1=max(row["top1"] for row in evals),
                       best_top5=max(row["top5"] for row in evals), last_top1=evals[-1]["top1"],
                       last_top5=evals[-1]["top5"], val_images=evals[-1]["val_images"],
                       val_unreadable=len(val_stream) - evals[-1]["val_images"], **run.counters())
        run.finish(summary)
        return dict(top1=summary["last_top1"], top5=summary["last_top5"])


if __name__ == "__main__":
    main()
