"""The paper's recipe, number by number. Each test reads the value the scripts derive for a real run,
where the scripts read it: `mim.py --model B` and `finetune.py --model B` with their defaults on 8 GPUs
(resolve(), then the model, masks, transforms and LR function built as main builds them), and, for what
only main itself builds (the AdamW settings, the weight-decay groups, the epoch length), the checkpoint
of a tiny run of main. Changing any number in the code fails the test named after it.
Sources: arXiv 2206.04664 and microsoft/Swin-Transformer (MODELHUB.md, "SimMIM Pretrained Swin-V2 Models"; the
official SwinV2-B SimMIM configs configs/simmim/simmim_pretrain__swinv2_base__img192_window12__800ep.yaml and
configs/simmim/simmim_finetune__swinv2_base__img224_window14__800ep.yaml; config.py, data/data_simmim_pt.py,
main_simmim_pt.py, main_simmim_ft.py, optimizer.py, lr_scheduler.py)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import v2

import data
import finetune
import mim
import swinv2
import train

# SwinV2-B pre-training: 500K iterations of 2048 images (paper), official 800-epoch config otherwise
PRETRAINING = dict(
    img_size=192, window=12, window_sizes=(12, 12, 12, 6),
    iters=500_000, batch_size=2048,
    lr_per_512=1e-4, peak_lr=4e-4, warmup_lr_per_512=5e-7, start_lr=2e-6,
    warmup_iters=6250,  # 1/80 of the iterations: 10 of 800 epochs
    milestone=437_500,  # 7/8 of the iterations: epoch 700 of 800
    lr_at_steps_0_6250_437499_437500=(2e-6, 4e-4, 4e-4, 4e-5),  # x0.1 at the milestone
    mask_patch=32, mask_ratio=0.6, mask_cells=36, masked_cells=22,  # ceil(0.6 * 36)
    mask_shape=(48, 48),  # on the 4 px patch grid
    norm_target=47,
    drop_path=0.1, drop_path_per_block=tuple(0.1 * k / 23 for k in range(24)),  # rising linearly over all 24 blocks
    weight_decay=0.05, clip_grad=5.0, val_images=50_000,
    adamw_betas=(0.9, 0.999), adamw_eps=1e-8,
    # the official quirk: its no-decay keywords never match, so logit_scale and cpb_mlp are decayed
    weight_decay_of={"encoder.layers.0.blocks.0.attn.logit_scale": 0.05, "encoder.layers.0.blocks.0.attn.cpb_mlp.0.weight": 0.05,
                     "encoder.layers.0.blocks.0.attn.cpb_mlp.2.weight": 0.05, "encoder.patch_embed.proj.weight": 0.05,
                     "encoder.layers.0.blocks.0.attn.qkv.weight": 0.05, "decoder.0.weight": 0.05,
                     "encoder.mask_token": 0.0, "encoder.layers.0.blocks.0.attn.q_bias": 0.0, "encoder.layers.0.blocks.0.norm1.weight": 0.0,
                     "encoder.layers.0.blocks.0.attn.cpb_mlp.0.bias": 0.0, "encoder.norm.weight": 0.0, "decoder.0.bias": 0.0},
)

# its fine-tuning on ImageNet-1K (official simmim_finetune__swinv2_base__img224_window14__800ep.yaml)
FINETUNING = dict(
    img_size=224, window=14, window_sizes=(14, 14, 14, 7), pretrained_window_sizes=(12, 12, 12, 6),
    epochs=100, warmup_epochs=20, batch_size=2048,
    lr_per_512=1.25e-3, peak_lr=5e-3, warmup_lr_per_512=2.5e-7, start_lr=1e-6, min_lr_per_512=2.5e-7, min_lr=1e-6,
    # 625 steps per epoch on ImageNet-1K's 1,281,167 images: warmup from the start LR to the peak, then a
    # cosine, half-way down at step 37,500, to the minimum at 62,500
    lr_at_steps_0_12500_37500_62500=(1e-6, 5e-3, (5e-3 + 1e-6) / 2, 1e-6),
    layer_decay=0.75, lr_scale_of={"patch_embed.proj.weight": 0.75**25, "layers.2.blocks.0.attn.qkv.weight": 0.75**20,
                                   "head.weight": 1.0},
    weight_decay_of={"layers.0.blocks.0.attn.logit_scale": 0.0, "layers.0.blocks.0.attn.cpb_mlp.0.weight": 0.0,
                     "layers.0.blocks.0.attn.qkv.weight": 0.05, "head.weight": 0.05, "head.bias": 0.0},
    drop_path=0.1, drop_path_per_block=tuple(0.1 * k / 23 for k in range(24)),
    weight_decay=0.05, clip_grad=5.0, adamw_betas=(0.9, 0.999), adamw_eps=1e-8,
    aug="paper", mixup=0.8, cutmix=1.0, mixup_alpha_in_MixUp=0.8, cutmix_alpha_in_CutMix=1.0, smoothing=0.1,
    train_crop_size=(224, 224), train_crop_scale=(0.08, 1.0), train_crop_ratio=(3 / 4, 4 / 3), train_flip_p=0.5,
    randaugment_ops=2, randaugment_magnitude=9, randaugment_magnitude_std=0.5, randaugment_prob=0.5,  # rand-m9-mstd0.5-inc1
    random_erasing_p=0.25, random_erasing_fill="random", random_erasing_scale=(0.02, 1 / 3), random_erasing_ratio=(0.3, 1 / 0.3),
    eval_resize=256, eval_crop=(224, 224),  # 256/224 x 224, then the centre
    interpolation_of_crop_eval=("bicubic", "bicubic"),
    steps_per_epoch_of_20_images_at_batch_8=2,  # the last partial batch is dropped (official drop_last)
)


def same(got, want):
    """Numbers (alone, in tuples or dicts) to 1e-9 relative: 4e-4 is 1e-4 * 2048 / 512 up to rounding; strings
    exactly (pytest.approx refuses strings, also inside a tuple, since pytest 8.4)."""
    if isinstance(want, (tuple, list)):
        return isinstance(got, (tuple, list)) and len(got) == len(want) and all(map(same, got, want))
    if isinstance(want, dict):
        return isinstance(got, dict) and got.keys() == want.keys() and all(same(got[k], want[k]) for k in want)
    if isinstance(want, (str, bool)) or want is None:
        return got == want
    return got == pytest.approx(want, rel=1e-9)


def tiny_run_checkpoint(script, argv, out):
    """Run `script`.main on the tiny model for a step or two and return its checkpoint, and its args.json as
    "args": what main itself built."""
    script.main(argv + ["--model", "tiny", "--workers", "0", "--out_dir", str(out)])
    return dict(torch.load(out / "ckpt.pt", weights_only=True), args=json.load(open(out / "args.json")))


def adamw_and_decay(ckpt):
    groups = ckpt["optimizer"]["param_groups"]
    return dict(adamw_betas=groups[0]["betas"], adamw_eps=groups[0]["eps"],
                weight_decay_of={n: g["weight_decay"] for g in groups for n in g["names"]})


def drop_path_per_block(model):
    return tuple(block.drop_path.p for layer in model.layers for block in layer.blocks)


@pytest.fixture(scope="module")
def pretraining(tmp_path_factory):
    args = mim.get_parser().parse_args(["--model", "B"])
    r = mim.resolve(args, 8)
    with torch.device("meta"):  # the encoder main builds, without memory
        encoder = swinv2.create(args.model, img_size=r["img_size"], window_size=r["window"], drop_path_rate=args.drop_path)
    masks = mim.MaskGenerator(r["img_size"], r["mask_patch"], 4, args.mask_ratio)  # as main builds it
    ckpt = tiny_run_checkpoint(mim, ["--data", "synthetic", "--iters", "1", "--batch_size", "4", "--val_images", "4"],
                               tmp_path_factory.mktemp("pretrain"))
    tiny = adamw_and_decay(ckpt)
    tiny["weight_decay_of"] = {n: tiny["weight_decay_of"][n] for n in PRETRAINING["weight_decay_of"]}
    lr = lambda s: train.get_lr(s, r["peak_lr"], r["start_lr"], r["warmup_iters"], r["iters"], r["milestone"])
    return dict(
        img_size=r["img_size"], window=r["window"], window_sizes=encoder.cfg.window_sizes, iters=r["iters"],
        batch_size=r["batch_size"], lr_per_512=r["lr"], peak_lr=r["peak_lr"], warmup_lr_per_512=args.warmup_lr,
        start_lr=r["start_lr"], warmup_iters=r["warmup_iters"], milestone=r["milestone"],
        lr_at_steps_0_6250_437499_437500=tuple(lr(s) for s in (0, 6250, 437499, 437500)),
        mask_patch=r["mask_patch"], mask_ratio=args.mask_ratio, mask_cells=masks.grid**2, masked_cells=masks.count,
        mask_shape=tuple(masks(0).shape), norm_target=r["norm_target"], drop_path=args.drop_path,
        drop_path_per_block=drop_path_per_block(encoder), weight_decay=args.weight_decay, clip_grad=args.clip_grad,
        val_images=args.val_images, **tiny)


@pytest.fixture(scope="module")
def finetuning(tmp_path_factory):
    args = finetune.get_parser().parse_args(["--model", "B", "--pretrained", "none"])
    r = finetune.resolve(args, 8)
    # a mim.py B checkpoint, as pre-training saves it (weights on the meta device: shapes only)
    pt_args = mim.get_parser().parse_args(["--model", "B"])
    pt = mim.resolve(pt_args, 8)
    with torch.device("meta"):
        encoder = swinv2.create("B", img_size=pt["img_size"], window_size=pt["window"])
        ckpt = dict(model=mim.SimMIM(encoder).state_dict(), model_config=swinv2.model_config(encoder))
        model, _ = finetune.build_model(args, r, ckpt, 1000)
    groups = finetune.param_groups(model, args.weight_decay, r["layer_decay"])
    where = {n: g for g in groups for n in g["names"]}
    finetune.steps(r, 1_281_167)  # main's steps per epoch on ImageNet-1K (N // B, checked on a real run below)
    mixers = {}  # the MixUp and CutMix objects make_mixer builds, to read the alphas they draw lambda with

    def record(cls):
        def make(**kw):
            mixers[cls.__name__] = cls(**kw)
            return mixers[cls.__name__]
        return make
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(v2, "MixUp", record(v2.MixUp))
        mp.setattr(v2, "CutMix", record(v2.CutMix))
        finetune.make_mixer(r["mixup"], r["cutmix"], args.smoothing, 1000)
    train = data.finetune_transform(r["img_size"], train=True, aug=r["aug"])
    crop, flip, randaug, erase = (next(t for t in train.transforms if isinstance(t, kind))
                                  for kind in (T.RandomResizedCrop, T.RandomHorizontalFlip, data.RandAugment, T.RandomErasing))
    val = data.finetune_transform(r["img_size"], train=False)
    resize, center = (next(t for t in val.transforms if isinstance(t, kind)) for kind in (T.Resize, T.CenterCrop))
    run = tiny_run_checkpoint(finetune, ["--data", "synthetic:20", "--batch_size", "8", "--epochs", "1", "--warmup_epochs", "0",
                                         "--val_images", "4", "--pretrained", "none"], tmp_path_factory.mktemp("finetune"))
    return dict(
        img_size=r["img_size"], window=r["window"], window_sizes=model.cfg.window_sizes,
        pretrained_window_sizes=model.cfg.pretrained_window_sizes, epochs=r["epochs"], warmup_epochs=r["warmup_epochs"],
        batch_size=r["batch_size"], lr_per_512=r["lr"], peak_lr=r["peak_lr"], warmup_lr_per_512=args.warmup_lr,
        start_lr=r["start_lr"], min_lr_per_512=args.min_lr, min_lr=r["min_lr"],
        lr_at_steps_0_12500_37500_62500=tuple(finetune.group_lr(s, 1.0, r) for s in (0, 12500, 37500, 62500)),
        layer_decay=r["layer_decay"], lr_scale_of={n: where[n]["lr_scale"] for n in FINETUNING["lr_scale_of"]},
        weight_decay_of={n: where[n]["weight_decay"] for n in FINETUNING["weight_decay_of"]},
        drop_path=args.drop_path, drop_path_per_block=drop_path_per_block(model), weight_decay=args.weight_decay,
        clip_grad=args.clip_grad, adamw_betas=adamw_and_decay(run)["adamw_betas"], adamw_eps=adamw_and_decay(run)["adamw_eps"],
        aug=r["aug"], mixup=r["mixup"], cutmix=r["cutmix"], mixup_alpha_in_MixUp=mixers["MixUp"].alpha,
        cutmix_alpha_in_CutMix=mixers["CutMix"].alpha, smoothing=args.smoothing,
        train_crop_size=tuple(crop.size), train_crop_scale=tuple(crop.scale), train_crop_ratio=tuple(crop.ratio),
        train_flip_p=flip.p, randaugment_ops=randaug.layers, randaugment_magnitude=randaug.magnitude,
        randaugment_magnitude_std=randaug.magnitude_std, randaugment_prob=randaug.prob,
        random_erasing_p=erase.p, random_erasing_fill=erase.value, random_erasing_scale=tuple(erase.scale),
        random_erasing_ratio=tuple(erase.ratio), eval_resize=resize.size, eval_crop=tuple(center.size),
        interpolation_of_crop_eval=tuple(t.interpolation.value for t in (crop, resize)),
        steps_per_epoch_of_20_images_at_batch_8=run["args"]["steps_per_epoch"])


@pytest.mark.parametrize("name", PRETRAINING)
def test_pretraining_recipe(pretraining, name):
    assert same(pretraining[name], PRETRAINING[name]), (name, pretraining[name], PRETRAINING[name])


@pytest.mark.parametrize("name", FINETUNING)
def test_finetuning_recipe(finetuning, name):
    assert same(finetuning[name], FINETUNING[name]), (name, finetuning[name], FINETUNING[name])


def test_pretraining_augmentation_is_simmims():
    """data.py's crop (drawn on the undecoded size, then a resize of the box) equals the official SimMIM transform:
    RandomResizedCrop(192, scale 0.67-1, ratio 3/4-4/3, bilinear), flip 0.5, ImageNet mean/std, with the same draws."""
    r = mim.resolve(mim.get_parser().parse_args(["--model", "B"]), 8)
    official = T.Compose([T.RandomResizedCrop(192, scale=(0.67, 1.0), ratio=(3 / 4, 4 / 3)), T.RandomHorizontalFlip(0.5),
                          T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    y, x = np.mgrid[:240, :320] / 320
    img = Image.fromarray((127.5 + 120 * np.sin(9 * x[..., None] + 7 * y[..., None] * np.arange(1, 4))).astype(np.uint8))
    ours = data.pretrain_transform(r["img_size"])
    for seed in range(20):  # 20 crops and flips
        torch.manual_seed(seed)
        a = data.normalize(ours(img))  # ours sends uint8 through the loader and normalises on the device
        torch.manual_seed(seed)
        b = official(img)
        # PIL's resize of a box reads the pixels just outside it, a crop does not: 2 grey levels at the border
        assert (a - b).abs().max() < 0.04, seed
