"""
Benchmarks: throughput and peak memory of a training step, and of the data pipeline. Speed lives
here, never in the tests. Each mode prints one line per measured configuration.

    python bench.py --what simmim --model B --batch 128 --compile      # SimMIM step on a GPU (bf16)
    python bench.py --what encoder --embed_dim 96 --depths 2,2,6,2 --batch 8 --timm   # ours vs timm
    python bench.py --what data --jpeg_size 500x375,2000x1500          # decode+crop img/s per worker
"""
import argparse
import os
import tempfile
import time

import numpy as np
import torch

import data
import mim
import swinv2


def get_parser():
    p = argparse.ArgumentParser(description="throughput and peak memory of a training step or the data pipeline")
    p.add_argument("--what", default="simmim", choices=["simmim", "encoder", "data"], help="what to time")
    p.add_argument("--model", default="B", help="preset: S, B, L, H, g, nano or tiny")
    p.add_argument("--embed_dim", type=int, default=None, help="override the preset's width C (e.g. 96 for a T-sized model)")
    p.add_argument("--depths", default=None, help="override the preset's depths, e.g. 2,2,6,2")
    p.add_argument("--img_size", type=int, default=None, help="pixels; default: the preset's (192)")
    p.add_argument("--window", type=int, default=None, help="window size; default: the preset's (12)")
    p.add_argument("--batch", type=int, default=8, help="images per step (per GPU)")
    p.add_argument("--steps", type=int, default=10, help="timed steps, after --warmup")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="autocast dtype; auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--grad_ckpt", action="store_true", help="activation checkpointing per block")
    p.add_argument("--timm", action="store_true", help="encoder mode: also time timm's SwinTransformerV2 at the same config")
    p.add_argument("--data", default=None, help="data mode: a folder of images; default: JPEGs made in a temp folder")
    p.add_argument("--jpeg_size", default="500x375", help="data mode: WxH of the made JPEGs, comma-separated (ImageNet is ~500x375)")
    p.add_argument("--images", type=int, default=200, help="data mode: images to decode per measurement")
    return p


def build_encoder(args):
    kw = dict(swinv2.PRESETS[args.model])
    for key, value in (("embed_dim", args.embed_dim), ("img_size", args.img_size), ("window_size", args.window)):
        if value is not None:
            kw[key] = value
    if args.depths:
        kw["depths"] = tuple(int(d) for d in args.depths.split(","))
    model = swinv2.SwinV2(swinv2.SwinV2Config(**kw))
    model.set_grad_ckpt(args.grad_ckpt)
    return model


def timm_twin(cfg):
    from timm.models.swin_transformer_v2 import SwinTransformerV2
    heads = [cfg.embed_dim * 2**i // cfg.head_dim for i in range(len(cfg.depths))]
    return SwinTransformerV2(img_size=cfg.img_size, patch_size=cfg.patch_size, window_size=cfg.window_size,
                             embed_dim=cfg.embed_dim, depths=cfg.depths, num_heads=heads, num_classes=0)


def timed(step, args, device):
    """Seconds per call of step(), after warmup; synchronises only around the timed region."""
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / args.steps


def report(label, params, sec, args, device):
    mem = f", peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if device.type == "cuda" else ""
    print(f"{label:>8}: {params / 1e6:.1f}M params, batch {args.batch}, {sec * 1000:.0f} ms/step, {args.batch / sec:.1f} img/s{mem}", flush=True)


def encoder_step(model, size, args, device, ctx):
    """One forward + backward of the encoder alone (no optimizer)."""
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
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            steps[name]()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def bench_simmim(encoder, args, device, ctx):
    """One full pre-training step as mim.py runs it: masked forward, loss, backward, clip, AdamW."""
    size = encoder.cfg.img_size
    model = mim.SimMIM(encoder, norm_target=47).to(device).train()
    run = torch.compile(model) if args.compile else model
    opt = torch.optim.AdamW(mim.param_groups(model, 0.05), lr=1e-4, fused=device.type == "cuda")
    masks = mim.MaskGenerator(size, 32 if size % 32 == 0 else 16, 4, 0.6)
    x = torch.randn(args.batch, 3, size, size, device=device)
    mask = torch.stack([masks(i) for i in range(args.batch)]).to(device)

    def step():
        with ctx:
            loss = run(x, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    sec = timed(step, args, device)
    report("simmim", sum(p.numel() for p in encoder.parameters()), sec, args, device)


def make_jpegs(folder, w, h, n=20):
    """n JPEGs of w x h at quality 90 in folder/a: a smooth random field plus a luminance grain, so the files
    are about as large as photos (500x375: ~95 KB, ImageNet's average is ~110 KB) and decode as slowly."""
    from PIL import Image
    os.makedirs(os.path.join(folder, "a"))
    rng = np.random.default_rng(0)
    for i in range(n):
        small = rng.integers(0, 255, (h // 16, w // 16, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), np.float32) + rng.normal(0, 12, (h, w, 1))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(os.path.join(folder, "a", f"{i}.jpg"), quality=90)


def bench_data(args):
    """Images per CPU-second of one process on one thread (= one data-loader worker) through the
    pre-training transform: ours (torchvision.io.decode_jpeg for small JPEGs, PIL's reduced-scale decode for
    large ones, uint8 out) against the plain PIL/torchvision pipeline as the official SimMIM code runs it
    (full PIL decode, RandomResizedCrop, flip, ToTensor, Normalize), and that pipeline ending in uint8.
    CPU time (time.process_time), not wall time: a shared machine's other jobs do not count; the pipelines
    run in alternating rounds, and the best round of each is kept."""
    from torchvision import transforms as T
    torch.set_num_threads(1)  # as in a DataLoader worker
    size = args.img_size or 192
    crop = [data.to_rgb, T.RandomResizedCrop(size, (0.67, 1.0), interpolation=T.InterpolationMode.BILINEAR), T.RandomHorizontalFlip()]
    pipelines = {"plain": T.Compose(crop + [T.ToTensor(), T.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)]),  # SimMIM's
                 "plain uint8": T.Compose(crop + [T.PILToTensor()]), "ours": data.pretrain_transform(size)}
    for jpeg_size in ([None] if args.data else args.jpeg_size.split(",")):
        folder = args.data or tempfile.mkdtemp()
        if jpeg_size:
            make_jpegs(folder, *(int(v) for v in jpeg_size.split("x")))
        dataset = data.open_dataset(folder)
        kb = np.mean([os.path.getsize(os.path.join(dataset.root, name)) for name in dataset.names]) / 1000
        streams = {name: data.TrainStream(dataset, np.arange(len(dataset)), t, seed=0) for name, t in pipelines.items()}
        best = {name: 0.0 for name in streams}
        for r in range(max(1, args.steps // 2)):
            for name, stream in (list(streams.items()) if r % 2 == 0 else list(streams.items())[::-1]):
                t0 = time.process_time()
                for pos in range(args.images):
                    stream[pos]
                best[name] = max(best[name], args.images / (time.process_time() - t0))
        print(f"data: {len(dataset)} JPEGs of {jpeg_size or folder} ({kb:.0f} KB), crop {size}, img per CPU-second: "
              + ", ".join(f"{name} {rate:.0f}" for name, rate in best.items())
              + f"; ours / plain {best['ours'] / best['plain']:.2f}x (/ plain uint8 {best['ours'] / best['plain uint8']:.2f}x)", flush=True)


def main(argv=None):
    args = get_parser().parse_args(argv)
    if args.what == "data":
        return bench_data(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ctx = mim.autocast(device, args.dtype)
    torch.manual_seed(0)
    encoder = build_encoder(args)
    cfg = encoder.cfg
    print(f"{device.type} ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
          f"autocast {args.dtype}, C={cfg.embed_dim} depths {cfg.depths} at {cfg.img_size} px, windows {cfg.window_sizes}"
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
