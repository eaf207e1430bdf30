"""swinv2.py: sizes, exactness of the attention, gradients, parity with timm, checkpoint loading."""
import math

import pytest
import torch
import torch.nn.functional as F

import swinv2


def randomize(model, seed=0):
    """Give every parameter random values (the zero-init post-norms would hide most bugs). The position-bias
    MLP gets weights large enough that its output varies by a few units across positions: with small
    weights the bias is almost constant, the softmax cancels a constant, and a wrong 15 * sigmoid hides."""
    g = torch.Generator().manual_seed(seed)
    std = lambda name: 0.5 if "norm" in name else 1.0 if "cpb_mlp.0" in name else 0.1 if "cpb_mlp.2" in name else 0.05
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std(name) + (1.0 if name.endswith("norm1.weight") or name.endswith("norm2.weight") else 0.0))
    return model


@pytest.mark.parametrize("name,millions", [("S", 49.0), ("B", 86.9), ("L", 195.2), ("H", 655.2), ("g", 1061.0),
                                            ("tiny", 2.3), ("nano", 0.6)])
def test_parameter_counts(name, millions):
    with torch.device("meta"):  # no memory, no init cost
        model = swinv2.create(name)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == millions


def test_pretrain_and_finetune_shapes():
    with torch.device("meta"):
        pt = swinv2.create("B")
        ft = swinv2.create("B", img_size=224, window_size=14, pretrained_window_sizes=(12, 12, 12, 6), num_classes=1000)
        assert pt.forward_features(torch.empty(2, 3, 192, 192)).shape == (2, 36, 1024)
        assert pt(torch.empty(2, 3, 192, 192)).shape == (2, 1024)
        assert ft(torch.empty(2, 3, 224, 224)).shape == (2, 1000)
    assert pt.cfg.window_sizes == (12, 12, 12, 6) and ft.cfg.window_sizes == (14, 14, 14, 7)
    # shifts: odd blocks of stages 0-1 only (stage 2 is one 12x12 window, stage 3 one 6x6 window)
    assert [[b.shift for b in layer.blocks[:2]] for layer in pt.layers] == [[0, 6], [0, 6], [0, 0], [0, 0]]
    assert [[b.shift for b in layer.blocks[:2]] for layer in ft.layers] == [[0, 7], [0, 7], [0, 0], [0, 0]]
    # the log-spaced table at window 14 trained at 12 reaches just past 1 (official: 1.1287)
    table = swinv2.WindowAttention(64, 14, 2, pretrained_window_size=12).relative_coords_table
    assert abs(table.abs().max().item() - 1.1287) < 1e-4


def test_state_dict_keys_are_official():
    with torch.device("meta"):
        model = swinv2.create("B", num_classes=1000)
    keys = set(model.state_dict())
    assert len(keys) == 425  # official 475 minus the 50 shape-dependent buffers we recompute
    for k in ["patch_embed.proj.weight", "layers.0.blocks.0.attn.cpb_mlp.0.weight", "layers.0.blocks.0.attn.cpb_mlp.2.weight",
              "layers.2.blocks.17.attn.logit_scale", "layers.0.blocks.1.attn.q_bias", "layers.2.downsample.reduction.weight",
              "layers.2.downsample.norm.bias", "norm.weight", "head.weight"]:
        assert k in keys, k
    assert not any(k.startswith("layers.3.downsample") or k.endswith("qkv.bias") or "cpb_mlp.2.bias" in k for k in keys)
    assert model.layers[2].blocks[0].attn.logit_scale.shape == (16, 1, 1)


def reference_position_bias(attn, pretrained_window=0):
    """(nH, N, N) from SwinV2 (arXiv 2111.09883) sec. 3.3 and WindowAttention in microsoft/Swin-Transformer
    models/swin_transformer_v2.py, without the module's table or index: token i of a W x W window sits at
    (i // W, i % W); the offset (dh, dw) of query i from key j, divided by (pretrained window - 1), times 8, mapped
    by t -> sign(t) log2(1 + |t|) / log2(8), goes through the MLP; bias = 16 sigmoid."""
    W = attn.ws
    pos = torch.tensor([(i // W, i % W) for i in range(W * W)], dtype=torch.float64)  # (N, 2): row, column
    t = (pos[:, None] - pos[None, :]) / ((pretrained_window or W) - 1) * 8  # (N, N, 2): query minus key
    coords = torch.sign(t) * torch.log2(1 + t.abs()) / math.log2(8)
    mlp = attn.cpb_mlp
    out = F.relu(coords @ mlp[0].weight.double().T + mlp[0].bias.double()) @ mlp[2].weight.double().T  # (N, N, nH)
    return 16 * torch.sigmoid(out).permute(2, 0, 1)


@pytest.mark.parametrize("window,pretrained", [(4, 0), (14, 12)])
def test_position_bias_is_16_sigmoid_of_the_mlp_of_log_spaced_offsets(window, pretrained):
    attn = randomize(swinv2.WindowAttention(64, window, 2, pretrained), seed=1)
    want = reference_position_bias(attn, pretrained)
    assert want.std() > 1.0  # the bias varies across positions, so a wrong scale or offset shows
    torch.testing.assert_close(attn.position_bias().double(), want, rtol=1e-5, atol=1e-5)


def reference_attention(attn, x, mask):
    """The official computation, written out: cos(q, k) * scale + 16 sigmoid(bias) (+ mask), softmax."""
    B_, N, C = x.shape
    qkv = F.linear(x, attn.qkv.weight, torch.cat((attn.q_bias, torch.zeros_like(attn.v_bias), attn.v_bias)))
    q, k, v = qkv.reshape(B_, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    scores = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
    scores = scores * torch.clamp(attn.logit_scale, max=math.log(100.0)).exp()
    scores = scores + attn.position_bias().unsqueeze(0)  # itself checked by the test above
    if mask is not None:
        nW = mask.shape[0]
        scores = (scores.view(B_ // nW, nW, attn.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)).view(-1, attn.num_heads, N, N)
    out = scores.softmax(-1) @ v
    return attn.proj(out.transpose(1, 2).reshape(B_, N, C))


@pytest.mark.parametrize("shifted", [False, True])
def test_sdpa_attention_equals_reference(shifted):
    torch.manual_seed(0)
    block = swinv2.Block(64, 8, 2, 4, 2 if shifted else 0, 0, 0.0).double()
    randomize(block)
    with torch.no_grad():
        block.attn.logit_scale[0] = 5.0  # above the clamp at ln 100: the clamp must act
    mask = block.attn_mask
    assert (mask is not None) == shifted
    x = torch.randn(3 * 4, 16, 64, dtype=torch.float64, requires_grad=True)  # 3 images x 4 windows
    inputs = [x] + list(block.attn.parameters())
    w = torch.randn(3 * 4, 16, 64, dtype=torch.float64)  # a random direction for the backward pass
    results = []
    for fn in (block.attn, lambda x, m: reference_attention(block.attn, x, m)):
        out = fn(x, mask)
        results.append((out, torch.autograd.grad((out * w).sum(), inputs)))
    (out, grads), (ref, ref_grads) = results
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for g, r in zip(grads, ref_grads):  # x, logit_scale, cpb_mlp, qkv, q_bias, v_bias, proj
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)


def test_initial_values_are_the_official_ones():
    """microsoft/Swin-Transformer models/swin_transformer_v2.py (_init_weights, WindowAttention): Linear weights
    trunc-normal std 0.02, biases 0, logit_scale ln 10 (temperature 0.1)."""
    torch.manual_seed(0)
    model = swinv2.create("tiny", num_classes=10)
    weights = torch.cat([m.weight.flatten() for m in model.modules() if isinstance(m, torch.nn.Linear)])  # 2.3M values
    assert abs(weights.std().item() - 0.02) < 2e-4 and abs(weights.mean().item()) < 1e-4
    assert all((m.bias == 0).all() for m in model.modules() if isinstance(m, torch.nn.Linear) and m.bias is not None)
    scales = [b.attn.logit_scale for layer in model.layers for b in layer.blocks]
    assert all(torch.equal(s, torch.full_like(s, math.log(10.0))) for s in scales)


def test_shift_mask_regions():
    mask = swinv2.shift_mask(8, 8, 4, 2)  # 4 windows of 16 tokens
    assert mask.shape == (4, 16, 16) and set(mask.unique().tolist()) == {0.0, -100.0}
    assert (mask[0] == 0).all()  # the top-left window holds only one region
    assert (mask[3] != 0).any() and (mask == mask.transpose(1, 2)).all()


def test_blocks_are_identity_at_init_and_all_parameters_get_gradients():
    torch.manual_seed(0)
    model = swinv2.create("tiny", num_classes=5)
    x = torch.randn(2, 256, 32)
    for block in model.layers[0].blocks:
        torch.testing.assert_close(block(x), x)
    randomize(model)
    model(torch.randn(2, 3, 64, 64)).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_grad_ckpt_gives_same_outputs_and_gradients():
    torch.manual_seed(0)
    a = randomize(swinv2.create("tiny", num_classes=3))
    b = randomize(swinv2.create("tiny", num_classes=3, grad_ckpt=True))
    x = torch.randn(2, 3, 64, 64)
    for m in (a, b):
        m.train()
        m(x).square().sum().backward()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="divisible by 32"):
        swinv2.create("B", img_size=200)
    with pytest.raises(ValueError, match="valid windows"):
        swinv2.create("B", window_size=7)
    with pytest.raises(ValueError, match="unknown model"):
        swinv2.create("X")


@pytest.mark.parametrize("name", list(swinv2.PRESETS))
def test_model_config_rebuilds_the_model(name):
    """The config written into every checkpoint rebuilds its model: pre-training and fine-tuning sizes."""
    finetune_size = dict(img_size=128, window_size=8) if name in ("tiny", "nano") else dict(img_size=224, window_size=14)
    for kw in (dict(), dict(finetune_size, pretrained_window_sizes=(12, 12, 12, 6), num_classes=7, drop_path_rate=0.1)):
        with torch.device("meta"):
            model = swinv2.create(name, **kw)
            config = swinv2.model_config(model)
            again = swinv2.SwinV2(swinv2.SwinV2Config(**config))
        assert again.cfg == model.cfg and swinv2.model_config(again) == config
        assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="window_sizes"):  # a config edited by hand must stay consistent
        swinv2.SwinV2Config(**dict(config, window_sizes=(7, 7, 7, 7)))


def test_layer_ids_follow_the_official_rule():
    with torch.device("meta"):
        model = swinv2.create("B", num_classes=10)
    ids = {n: model.layer_id(n) for n, _ in model.named_parameters()}
    assert ids["patch_embed.proj.weight"] == 0 and model.layer_id("mask_token") == 0
    assert ids["layers.0.blocks.0.attn.qkv.weight"] == 1
    assert ids["layers.2.blocks.0.norm1.weight"] == 5
    assert ids["layers.2.downsample.reduction.weight"] == 22 == ids["layers.2.blocks.17.mlp.fc2.bias"]
    assert ids["layers.3.blocks.1.mlp.fc1.weight"] == 24
    assert ids["norm.weight"] == ids["head.weight"] == 25


def official_checkpoint(model):
    """An official SimMIM pre-training checkpoint built from our encoder: `model` wrapper, `encoder.`
    prefix, persistent buffers, the legacy rpe_mlp name, mask token and decoder."""
    sd = {}
    for k, v in model.state_dict().items():
        sd["encoder." + k.replace("cpb_mlp", "rpe_mlp")] = v.clone()
    for name, m in model.named_modules():
        if isinstance(m, swinv2.WindowAttention):
            ws = m.ws
            sd[f"encoder.{name}.relative_coords_table"] = m.relative_coords_table.view(1, 2 * ws - 1, 2 * ws - 1, 2)
            sd[f"encoder.{name}.relative_position_index"] = m.relative_position_index
        if isinstance(m, swinv2.Block) and m.attn_mask is not None:
            sd[f"encoder.{name}.attn_mask"] = m.attn_mask
    sd["encoder.mask_token"] = torch.zeros(1, 1, model.cfg.embed_dim)
    sd["decoder.0.weight"] = torch.zeros(3 * 32 * 32, model.num_features, 1, 1)
    sd["decoder.0.bias"] = torch.zeros(3 * 32 * 32)
    return {"model": sd, "epoch": 10}


def test_load_official_checkpoint_reproduces_outputs():
    torch.manual_seed(0)
    src = randomize(swinv2.create("tiny")).eval()
    ckpt = official_checkpoint(src)
    assert any("rpe_mlp" in k for k in ckpt["model"]) and any(k.endswith("attn_mask") for k in ckpt["model"])
    dst = swinv2.create("tiny", num_classes=7).eval()
    missing = swinv2.load_pretrained(dst, ckpt)
    assert sorted(missing) == ["head.bias", "head.weight"]
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(dst.forward_features(x), src.forward_features(x))
    # at a larger window (fine-tuning), the same weights load and the buffers are rebuilt
    big = swinv2.create("tiny", img_size=96, window_size=6, pretrained_window_sizes=src.cfg.window_sizes)
    swinv2.load_pretrained(big, ckpt)
    assert torch.equal(big.layers[0].blocks[0].attn.cpb_mlp[0].weight, src.layers[0].blocks[0].attn.cpb_mlp[0].weight)
    assert torch.isfinite(big(torch.randn(1, 3, 96, 96))).all()


def test_load_refuses_other_size_and_unknown_keys():
    with torch.device("meta"):
        b = swinv2.create("B")
    s_ckpt = {"model": {"encoder." + k: v for k, v in swinv2.create("S").state_dict().items()}}
    with pytest.raises(ValueError, match=r"SwinV2-S .* model is SwinV2-B"):
        swinv2.load_pretrained(b, s_ckpt)
    tiny = swinv2.create("tiny")
    sd = dict(tiny.state_dict(), **{"layers.0.blocks.0.attn.extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="do not match"):
        swinv2.load_pretrained(tiny, sd)


def test_parity_with_timm():
    timm_v2 = pytest.importorskip("timm.models.swin_transformer_v2",
                                  reason="needs timm, the independent reference: pip install -r requirements-test.txt")
    torch.manual_seed(0)
    ours = randomize(swinv2.create("tiny", num_classes=10)).eval()
    theirs = timm_v2.SwinTransformerV2(img_size=64, patch_size=4, window_size=4, embed_dim=32, depths=(2, 2, 2, 2),
                                       num_heads=(1, 2, 4, 8), num_classes=10).eval()
    sd = {}
    for k, v in ours.state_dict().items():  # timm downsamples at the start of the next stage; head.fc
        if ".downsample." in k:
            i = int(k.split(".")[1])
            k = k.replace(f"layers.{i}.", f"layers.{i + 1}.", 1)
        sd[k.replace("head.", "head.fc.")] = v
    theirs.load_state_dict(sd, strict=True)
    assert min(b.attn.position_bias().std() for layer in ours.layers for b in layer.blocks) > 0.5  # not a constant
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    assert (a - b).abs().max() < 1e-5, f"max diff {(a - b).abs().max():.2e}, mean {(a - b).abs().mean():.2e}"


def test_pyramid_maps_are_the_stage_outputs_and_load_pretrained_weights():
    torch.manual_seed(0)
    enc = randomize(swinv2.create("tiny"))
    dense = swinv2.create("tiny", pyramid=True)
    missing = swinv2.load_pretrained(dense, {"model": {f"encoder.{k}": v for k, v in enc.state_dict().items()}})
    assert sorted(missing) == [f"pyramid_norms.{i}.{w}" for i in range(4) for w in ("bias", "weight")]
    assert "norm.weight" not in dense.state_dict() and not hasattr(dense, "head")
    x = torch.randn(2, 3, 64, 64)
    maps = dense.eval().forward_pyramid(x)
    assert [tuple(m.shape) for m in maps] == [(2, 32, 16, 16), (2, 64, 8, 8), (2, 128, 4, 4), (2, 256, 2, 2)]
    tokens, enc = enc.patch_embed(x), enc.eval()
    for i, layer in enumerate(enc.layers):  # stage i's tokens before merging, through a fresh (identity) LayerNorm
        tokens = layer.forward_blocks(tokens)
        want = F.layer_norm(tokens, tokens.shape[-1:]).transpose(1, 2).reshape(maps[i].shape)
        torch.testing.assert_close(maps[i], want)
        tokens = layer.downsample(tokens, layer.res) if layer.downsample is not None else tokens


def test_pyramid_of_a_model_without_pyramid_norms_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"pyramid=True"):
        swinv2.create("nano").forward_pyramid(torch.randn(1, 3, 64, 64))
