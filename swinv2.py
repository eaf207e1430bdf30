"""
The SwinV2 encoder (Liu et al., "Swin Transformer V2", arXiv 2111.09883), exact to the official
microsoft/Swin-Transformer `models/swin_transformer_v2.py`, at nanoGPT's size.

What this file teaches, in reading order:
  window_partition / window_reverse -> WindowAttention (scaled cosine attention, log-spaced continuous
  position bias, SwinV2 sec. 3.2-3.3) -> Block (res-post-norm, sec. 3.1; shifted windows) ->
  PatchMerging -> Stage -> SwinV2 -> the size presets of the data-scaling paper (S/B/L/H/g + tiny)
  -> loading official checkpoints.

Layout choice: like Microsoft (and unlike timm), PatchMerging sits at the *end* of stages 0-2, so the
state-dict keys are the official ones (`layers.{0,1,2}.downsample.reduction.weight`) and official
checkpoints load as they are.

    import swinv2
    model = swinv2.create("B")                     # 192 px, window 12: the pre-training encoder
    model = swinv2.create("B", img_size=224, window_size=14, pretrained_window_sizes=(12, 12, 12, 6),
                          num_classes=1000)        # the fine-tuning model
    swinv2.load_pretrained(model, "ckpt.pt")       # ours or an official SimMIM checkpoint

Read next: mim.py (SimMIM on top of this encoder).
"""
import math
import re
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

# -----------------------------------------------------------------------------
# windows


def window_partition(x, ws):
    """(B, H, W, C) -> (B*nW, ws*ws, C), windows in row-major order, batch-major."""
    return rearrange(x, "b (h i) (w j) c -> (b h w) (i j) c", i=ws, j=ws)


def window_reverse(windows, ws, H, W):
    """(B*nW, ws*ws, C) -> (B, H, W, C), the inverse of window_partition."""
    return rearrange(windows, "(b h w) (i j) c -> b (h i) (w j) c", h=H // ws, w=W // ws, i=ws, j=ws)


# -----------------------------------------------------------------------------
# attention


class WindowAttention(nn.Module):
    """Multi-head self-attention inside a window, with SwinV2's two changes to Swin V1:

    1. Scaled cosine attention (sec. 3.2): sim(q, k) = cos(q, k) / tau with a learnable per-head
       temperature. Dot products of large models grow with depth and make a few heads dominate;
       cosines are bounded. We store logit_scale = log(1/tau), init ln 10, clamp at ln 100.
    2. Log-spaced continuous position bias (sec. 3.3): a small MLP maps relative coordinates
       (log-spaced, so a larger window at fine-tuning extrapolates only a little) to a bias per head.
    """

    def __init__(self, dim, window_size, num_heads, pretrained_window_size=0):
        super().__init__()
        self.ws, self.num_heads = window_size, num_heads
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 512), nn.ReLU(inplace=True), nn.Linear(512, num_heads, bias=False))
        # q and v get a learnt bias, k none (a k bias would cancel in the softmax); official key names
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
        self.proj = nn.Linear(dim, dim)

        # the coordinate table: relative offsets in [-(ws-1), ws-1], normalised to [-1, 1] by the
        # window the weights were trained at, times 8, then sign(t) * log2(1 + |t|) / log2(8)
        r = torch.arange(-(window_size - 1), window_size, dtype=torch.float32)
        table = torch.stack(torch.meshgrid(r, r, indexing="ij"), dim=-1)  # (2ws-1, 2ws-1, 2), [dh, dw]
        table = table / ((pretrained_window_size or window_size) - 1) * 8
        table = torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)
        # shape-dependent buffers are recomputed from the config, never loaded: non-persistent
        self.register_buffer("relative_coords_table", table.view(-1, 2), persistent=False)  # ((2ws-1)^2, 2)
        coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size),
                                            indexing="ij")).flatten(1)  # (2, N)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window_size - 1)  # (N, N, 2)
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * window_size - 1) + rel[..., 1],
                             persistent=False)  # (N, N)

    def position_bias(self):
        """(nH, N, N): 16 * sigmoid(MLP(coords)), so each bias lies in (0, 16)."""
        table = self.cpb_mlp(self.relative_coords_table)  # ((2ws-1)^2, nH)
        bias = table[self.relative_position_index]  # (N, N, nH)
        return 16 * torch.sigmoid(bias.permute(2, 0, 1))

    def forward(self, x, mask=None):
        """x: (B*nW, N, C), mask: (nW, N, N) with 0 / -100 or None -> (B*nW, N, C)."""
        B_, N, C = x.shape
        qkv = F.linear(x, self.qkv.weight, torch.cat((self.q_bias, self.k_bias, self.v_bias)))
        q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=self.num_heads)  # (B_, nH, N, hd)
        # cosine attention as plain scaled dot-product attention: fold the temperature into q.
        # The clamp uses a Python float: a max tensor created on the CPU fails on a GPU
        # (microsoft/Swin-Transformer issue #237).
        scale = torch.clamp(self.logit_scale, max=math.log(100.0)).exp()  # (nH, 1, 1)
        q = F.normalize(q, dim=-1) * scale
        k = F.normalize(k, dim=-1)
        bias = self.position_bias()  # (nH, N, N)
        if mask is not None:
            # fold the windows into the head axis so the (nW*nH, N, N) bias broadcasts over the
            # batch instead of being copied once per image
            nW = mask.shape[0]
            bias = (mask[:, None] + bias[None]).flatten(0, 1)  # (nW*nH, N, N)
            q, k, v = (t.reshape(B_ // nW, nW * self.num_heads, N, -1) for t in (q, k, v))  # (B, nW*nH, N, hd)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)
        out = out.reshape(B_, self.num_heads, N, -1)  # (B_, nH, N, hd)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


# -----------------------------------------------------------------------------
# blocks


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch of a sample, rescale the kept ones."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty(x.shape[0], *(1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Mlp(nn.Sequential):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)


def shift_mask(H, W, ws, shift):
    """(nW, N, N): -100 between tokens that the cyclic shift brought together from different
    regions of the image (9 regions), 0 elsewhere. -100 (not -inf) as in the official code."""
    label = torch.zeros(1, H, W, 1)
    cuts = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
    for n, (h, w) in enumerate((h, w) for h in cuts for w in cuts):
        label[:, h, w, :] = n
    label = window_partition(label, ws).squeeze(-1)  # (nW, N)
    return (label[:, None, :] != label[:, :, None]).float() * -100.0


class Block(nn.Module):
    """A SwinV2 block with res-post-norm (sec. 3.1): x + LN(attn(x)), then x + LN(mlp(x)). Normalising
    the branch output instead of its input keeps activations from growing with depth in large
    models. norm1/norm2 start at zero, so every block starts as the identity."""

    def __init__(self, dim, res, num_heads, window_size, shift, pretrained_window_size, drop_path):
        super().__init__()
        self.res, self.ws, self.shift = res, window_size, shift
        self.attn = WindowAttention(dim, window_size, num_heads, pretrained_window_size)
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)
        self.norm2 = nn.LayerNorm(dim)
        self.drop_path = DropPath(drop_path)
        self.register_buffer("attn_mask", shift_mask(res, res, window_size, shift) if shift else None, persistent=False)

    def forward(self, x):
        """x: (B, L, C) with L = res*res."""
        B, L, C = x.shape
        h = x.view(B, self.res, self.res, C)  # (B, H, W, C)
        if self.shift:
            h = torch.roll(h, shifts=(-self.shift, -self.shift), dims=(1, 2))
        h = self.attn(window_partition(h, self.ws), self.attn_mask)  # (B*nW, ws*ws, C)
        h = window_reverse(h, self.ws, self.res, self.res)  # (B, H, W, C)
        if self.shift:
            h = torch.roll(h, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + self.drop_path(self.norm1(h.reshape(B, L, C)))
        return x + self.drop_path(self.norm2(self.mlp(x)))


class PatchMerging(nn.Module):
    """Halve the resolution, double the width: concat each 2x2 neighbourhood (4C), Linear to 2C, then
    LayerNorm (SwinV2 normalises after the reduction; V1 did it before)."""

    def __init__(self, dim):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(2 * dim)

    def forward(self, x, res):
        x = x.view(x.shape[0], res, res, -1)  # (B, H, W, C)
        # channel order x0, x1, x2, x3 = (even h, even w), (odd h, even w), (even h, odd w), (odd h, odd w)
        x = rearrange(x, "b (h i) (w j) c -> b (h w) (j i c)", i=2, j=2)  # (B, L/4, 4C)
        return self.norm(self.reduction(x))


class Stage(nn.Module):
    def __init__(self, dim, res, depth, num_heads, window_size, pretrained_window_size, drop_paths, downsample):
        super().__init__()
        self.res, self.grad_ckpt = res, False
        # odd blocks shift the windows by half a window, so information crosses window borders; when one
        # window covers the whole map (stage 2 at 192 px / window 12) there is nothing to shift
        shift = window_size // 2 if window_size < res else 0
        self.blocks = nn.ModuleList(
            Block(dim, res, num_heads, window_size, shift if j % 2 else 0, pretrained_window_size, drop_paths[j])
            for j in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward_blocks(self, x):
        """(B, res*res, C) -> (B, res*res, C): the blocks, without the patch merging."""
        for block in self.blocks:
            # activation checkpointing: keep only block inputs, recompute the rest in backward (+1 forward)
            x = checkpoint(block, x, use_reentrant=False) if self.grad_ckpt and self.training else block(x)
        return x

    def forward(self, x):
        x = self.forward_blocks(x)
        return self.downsample(x, self.res) if self.downsample is not None else x


class PatchEmbed(nn.Module):
    """(B, 3, H, W) -> (B, H/4 * W/4, C): a 4x4 stride-4 conv, then LayerNorm."""

    def __init__(self, patch_size, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))  # (B, L, C)


# -----------------------------------------------------------------------------
# the encoder


@dataclass
class SwinV2Config:
    embed_dim: int = 128
    depths: tuple = (2, 2, 18, 2)
    head_dim: int = 32  # every stage uses 32-dim heads: heads = width / 32
    img_size: int = 192
    window_size: int = 12
    pretrained_window_sizes: tuple = (0, 0, 0, 0)  # 0: the weights were trained at this window
    patch_size: int = 4
    num_classes: int = 0  # 0: no head, forward returns pooled features
    drop_path_rate: float = 0.0
    pyramid: bool = False  # dense tasks: a LayerNorm per stage output (forward_pyramid) instead of norm + head
    # the effective per-stage windows, e.g. (12, 12, 12, 6): derived, but accepted back (equal) so that
    # SwinV2Config(**model_config(model)) rebuilds the model a checkpoint was written from
    window_sizes: tuple = None

    def __post_init__(self):
        self.depths, self.pretrained_window_sizes = tuple(self.depths), tuple(self.pretrained_window_sizes)
        stride = self.patch_size * 2 ** (len(self.depths) - 1)
        if self.img_size % stride:
            raise ValueError(f"image size {self.img_size} must be divisible by {stride} "
                             f"(patch {self.patch_size} x 3 merges)")
        resolutions = [self.img_size // self.patch_size // 2**i for i in range(len(self.depths))]
        for i, res in enumerate(resolutions):
            if res > self.window_size and res % self.window_size:
                valid = [w for w in range(2, res + 1) if res % w == 0]
                raise ValueError(f"window {self.window_size} does not divide the {res}x{res} feature map of stage {i} "
                                 f"(image {self.img_size}); valid windows: {valid}")
        # a window larger than the map is clamped to the map (official behaviour): 192 px / w12 -> 12,12,12,6
        derived = tuple(min(self.window_size, r) for r in resolutions)
        if self.window_sizes is not None and tuple(self.window_sizes) != derived:
            raise ValueError(f"window_sizes {tuple(self.window_sizes)} disagree with window {self.window_size} "
                             f"at image {self.img_size}: {derived}")
        self.window_sizes = derived


PAPER_SIZES = ("S", "B", "L", "H", "g")
PRESETS = {  # the data-scaling paper's sizes: depths 2,2,18,2, widths C; nano and tiny are CPU-sized
    "S": dict(embed_dim=96),
    "B": dict(embed_dim=128),
    "L": dict(embed_dim=192),
    "H": dict(embed_dim=352),
    "g": dict(embed_dim=448),
    "tiny": dict(embed_dim=32, depths=(2, 2, 2, 2), img_size=64, window_size=4),  # 2.3M: tests, CPU demo
    "nano": dict(embed_dim=16, head_dim=16, depths=(2, 2, 2, 2), img_size=64, window_size=4),  # 0.6M: the miniature
}


class SwinV2(nn.Module):
    def __init__(self, cfg: SwinV2Config):
        super().__init__()
        self.cfg = cfg
        n = len(cfg.depths)
        dims = [cfg.embed_dim * 2**i for i in range(n)]
        self.num_features = dims[-1]
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.embed_dim)
        nb = sum(cfg.depths)
        drop_paths = [cfg.drop_path_rate * j / max(nb - 1, 1) for j in range(nb)]  # rising linearly over all blocks
        res = cfg.img_size // cfg.patch_size
        self.layers = nn.ModuleList()
        for i in range(n):
            start = sum(cfg.depths[:i])
            self.layers.append(Stage(dims[i], res // 2**i, cfg.depths[i], dims[i] // cfg.head_dim,
                                     cfg.window_sizes[i], cfg.pretrained_window_sizes[i],
                                     drop_paths[start:start + cfg.depths[i]], i < n - 1))
        if cfg.pyramid:  # one norm per stage output, as the official Swin detection backbone; no final norm, no head
            self.pyramid_norms = nn.ModuleList(nn.LayerNorm(d) for d in dims)
        else:
            self.norm = nn.LayerNorm(self.num_features)
            self.head = nn.Linear(self.num_features, cfg.num_classes) if cfg.num_classes else nn.Identity()
        self.apply(self._init_weights)
        for layer in self.layers:  # res-post-norm starts at zero: each block is the identity at init
            for block in layer.blocks:
                for norm in (block.norm1, block.norm2):
                    nn.init.zeros_(norm.weight), nn.init.zeros_(norm.bias)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):  # the patch-embedding conv keeps PyTorch's default init, as official
            nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight), nn.init.zeros_(m.bias)

    def set_grad_ckpt(self, enabled=True):
        for layer in self.layers:
            layer.grad_ckpt = enabled

    def forward_tokens(self, x):
        """Patch-embedded tokens (B, L, C) -> the final normalised tokens (B, L/64, 8C)."""
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)

    def forward_features(self, x):
        """(B, 3, H, W) -> the final normalised token map (B, H/32 * W/32, 8C)."""
        return self.forward_tokens(self.patch_embed(x))

    def forward(self, x):
        """(B, 3, H, W) -> logits (B, classes), or pooled features (B, 8C) when num_classes=0."""
        return self.head(self.forward_features(x).mean(dim=1))

    def forward_pyramid(self, x):
        """(B, 3, H, W) -> four maps (B, C * 2^i, H / 2^(i+2), W / 2^(i+2)), strides 4, 8, 16, 32: each
        stage's tokens before its patch merging, through that stage's own LayerNorm (needs pyramid=True).
        Detection and segmentation heads (detect.py, segment.py) read these. Inputs are squares whose every
        stage map tiles with its window (a fixed crop size), so no padding is needed."""
        if not self.cfg.pyramid:
            raise ValueError("forward_pyramid needs the per-stage norms: create the model with pyramid=True "
                             "(swinv2.create(name, pyramid=True))")
        x, maps = self.patch_embed(x), []  # (B, L, C)
        for layer, norm in zip(self.layers, self.pyramid_norms):
            x = layer.forward_blocks(x)  # (B, res*res, C_i)
            maps.append(rearrange(norm(x), "b (h w) c -> b c h w", h=layer.res))  # (B, C_i, res, res)
            if layer.downsample is not None:
                x = layer.downsample(x, layer.res)
        return maps

    def layer_id(self, name):
        """Layer id of a parameter for layer-wise LR decay (official rule): the patch embedding (and
        mask token) 0, block j of stage i sum(depths[:i]) + j + 1, the downsample of stage i the id of
        that stage's last block, everything else (final norm, head) sum(depths) + 1."""
        depths = self.cfg.depths
        if name.startswith(("patch_embed", "mask_token")):
            return 0
        m = re.match(r"layers\.(\d+)\.(blocks\.(\d+)|downsample)\.", name)
        if m:
            i = int(m.group(1))
            return sum(depths[:i]) + int(m.group(3)) + 1 if m.group(3) is not None else sum(depths[:i + 1])
        return sum(depths) + 1


def create(name, img_size=None, window_size=None, pretrained_window_sizes=None, num_classes=0,
           drop_path_rate=0.0, grad_ckpt=False, pyramid=False) -> SwinV2:
    """Build a preset by the paper's letter (S, B, L, H, g) or `nano`, `tiny`; None keeps the preset's own value."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(PRESETS)}")
    kw = dict(PRESETS[name], num_classes=num_classes, drop_path_rate=drop_path_rate, pyramid=pyramid)
    for key, value in (("img_size", img_size), ("window_size", window_size),
                       ("pretrained_window_sizes", pretrained_window_sizes)):
        if value is not None:
            kw[key] = value
    model = SwinV2(SwinV2Config(**kw))
    model.set_grad_ckpt(grad_ckpt)
    return model


def model_config(model: SwinV2) -> dict:
    """The encoder's architecture as a plain dict (stored in checkpoints)."""
    return asdict(model.cfg)


# -----------------------------------------------------------------------------
# loading checkpoints: ours and the official ones


def describe(embed_dim, depths):
    """Name a size the way users know it: 'SwinV2-B (C=128, depths 2,2,18,2)'."""
    letter = next((k for k, v in PRESETS.items() if v["embed_dim"] == embed_dim
                   and tuple(v.get("depths", (2, 2, 18, 2))) == tuple(depths)), None)
    return f"SwinV2-{letter or '?'} (C={embed_dim}, depths {','.join(map(str, depths))})"


def clean_state_dict(sd):
    """Bring any checkpoint to our encoder's key names: unwrap {'model': ...}, strip `module.`,
    `_orig_mod.` and SimMIM's `encoder.` prefixes, drop the SimMIM decoder and mask token and the
    shape-dependent buffers (recomputed for the new window), rename the legacy `rpe_mlp` to `cpb_mlp`."""
    sd = sd.get("model", sd.get("state_dict", sd))
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^(module\.|_orig_mod\.)+", "", k)
        if any(key.startswith("encoder.") for key in sd):  # a SimMIM checkpoint: keep the encoder only
            if not k.startswith("encoder."):
                continue
            k = k[len("encoder."):]
        if k == "mask_token" or k.endswith(("relative_coords_table", "relative_position_index", "attn_mask", "k_bias")):
            continue
        out[k.replace("rpe_mlp", "cpb_mlp")] = v
    return out


def load_pretrained(model: SwinV2, checkpoint, strict_head=False):
    """Load our or an official checkpoint (a path or a dict) into `model`. A head whose shape differs
    is left at its fresh init (fine-tuning to new classes). Raises on a checkpoint of another size,
    or on any missing or unexpected key outside that allow-list. Returns the missing keys."""
    if isinstance(checkpoint, str):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    sd = clean_state_dict(checkpoint)
    if "patch_embed.proj.weight" not in sd:
        raise ValueError("checkpoint has no SwinV2 encoder weights (no patch_embed.proj.weight under any known prefix)")
    blocks = {}  # stage -> number of blocks, read off the key names
    for k in sd:
        if m := re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", k):
            blocks[int(m[1])] = max(blocks.get(int(m[1]), 0), int(m[2]) + 1)
    depths = [blocks[i] for i in sorted(blocks)]
    theirs, ours = (describe(sd["patch_embed.proj.weight"].shape[0], depths),
                    describe(model.cfg.embed_dim, model.cfg.depths))
    if theirs != ours:
        raise ValueError(f"checkpoint is {theirs} but the model is {ours}; pick the matching --model")
    own = model.state_dict()
    for k in [k for k in sd if k.startswith(("head.", "norm."))]:
        if k not in own or own[k].shape != sd[k].shape:
            del sd[k]  # a head for other classes, or a pyramid model (no final norm): the new model keeps its init
    missing, unexpected = model.load_state_dict(sd, strict=False)
    new = ("pyramid_norms.",) if strict_head else ("head.", "pyramid_norms.")  # what pre-training never had
    bad = [k for k in missing if not k.startswith(new)] + list(unexpected)
    if bad:
        raise ValueError(f"checkpoint keys do not match the model: {bad[:10]}{' ...' if len(bad) > 10 else ''}")
    return missing  # the caller reports them (on rank 0)
