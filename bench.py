"""
Benchmarks: throughput and peak memory of one training step, and of the data pipeline.
Speed lives here, never in the tests.

    python bench.py --model B --batch 128 --dtype bfloat16 --compile   # encoder fwd+bwd on a GPU
    python bench.py --what encoder --embed_dim 96 --depths 2,2,6,2 --batch 8 --timm  # vs timm, CPU
"""
import argparse
import time

import torch

import swinv2

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--what", default="encoder", choices=["encoder"], help="what to time")
parser.add_argument("--model", default="B", help="preset: S, B, L, H, g or tiny")
parser.add_argument("--embed_dim", type=int, default=None, help="override the preset's width C (e.g. 96 for a T-sized model)")
parser.add_argument("--depths", default=None, help="override the preset's depths, e.g. 2,2,6,2")
parser.add_argument("--img_size", type=int, default=None, help="pixels; default: the preset's (192)")
parser.add_argument("--window", type=int, default=None, help="window size; default: the preset's (12)")
parser.add_argument("--batch", type=int, default=8, help="images per step")
parser.add_argument("--steps", type=int, default=10, help="timed steps (after --warmup)")
parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="autocast dtype; auto: bf16 on CUDA, fp32 on CPU")
parser.add_argument("--compile", action="store_true", help="torch.compile the model")
parser.add_argument("--grad_ckpt", action="store_true", help="activation checkpointing per block")
parser.add_argument("--timm", action="store_true", help="also time timm's SwinTransformerV2 at the same config")


def build_encoder(args):
    kw = dict(swinv2.PRESETS[args.model])
    for key, value in (("embed_dim", args.embed_dim), ("img_size", args.img_size), ("window_size", args.window)):
        if value is not None:
            kw[key] = value
    if args.depths:
        kw["depths"] = tuple(int(d) for d in args.depths.split(","))
    return swinv2.SwinV2(swinv2.SwinV2Config(**kw))


def timm_twin(cfg):
    from timm.models.swin_transformer_v2 import SwinTransformerV2
    return SwinTransformerV2(img_size=cfg.img_size, patch_size=cfg.patch_size, window_size=cfg.window_size, embed_dim=cfg.embed_dim,
                             depths=cfg.depths, num_heads=[cfg.embed_dim * 2**i // cfg.head_dim for i in range(len(cfg.depths))],
                             num_classes=0)


def time_steps(step, args, device):
    """Run `step` warmup + steps times; returns seconds per step (synchronising only around timing)."""
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


def bench_encoder(model, args, device, dtype, label):
    model = model.to(device).train()
    if args.grad_ckpt and hasattr(model, "set_grad_ckpt"):
        model.set_grad_ckpt(True)
    run = torch.compile(model) if args.compile else model
    size = model.cfg.img_size if hasattr(model, "cfg") else args.img_size
    x = torch.randn(args.batch, 3, size, size, device=device)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = run(x)
        out.float().square().mean().backward()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sec = time_steps(step, args, device)
    mem = f", peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if device.type == "cuda" else ""
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{label:>8}: {params:.1f}M params, batch {args.batch}, {sec * 1000:.0f} ms/step, {args.batch / sec:.1f} img/s fwd+bwd{mem}")


def main(argv=None):
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    model = build_encoder(args)
    cfg = model.cfg
    print(f"{device.type}, {dtype}, {torch.get_num_threads()} threads, C={cfg.embed_dim} depths {cfg.depths} "
          f"at {cfg.img_size} px, windows {cfg.window_sizes}{', compiled' if args.compile else ''}")
    bench_encoder(model, args, device, dtype, "ours")
    if args.timm:
        args.img_size = cfg.img_size
        bench_encoder(timm_twin(cfg), args, device, dtype, "timm")


if __name__ == "__main__":
    main()
