"""mim.py: masks, target normalisation, the loss, the LR schedule, and the training script end to end
(learning, checkpoints, validation determinism, resume, 2 processes = accumulation). Run integrity: test_run.py."""
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import mim
import swinv2
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "tiny", "--data", "synthetic", "--workers", "0", "--val_images", "12", "--batch_size", "8"]


def test_mask_generator_count_and_blocks():
    gen = mim.MaskGenerator(192, 32, 4, 0.6)
    mask = gen(0)
    assert mask.shape == (48, 48) and mask.sum() == 22 * 64  # ceil(0.6 * 36) = 22 cells of 8x8 tokens
    assert mim.MaskGenerator(224, 32, 4, 0.6).count == 30  # rounded up, as official: ceil(0.6 * 49 = 29.4)
    cells = mask.view(6, 8, 6, 8)
    assert (cells.amin((1, 3)) == cells.amax((1, 3))).all()  # constant over each 32 px cell
    assert torch.equal(gen(5), gen(5)) and not torch.equal(gen(5), gen(6))
    with pytest.raises(ValueError, match="--mask_patch"):
        mim.MaskGenerator(200, 32, 4, 0.6)
    with pytest.raises(ValueError, match="model's patch"):
        mim.MaskGenerator(180, 30, 4, 0.6)


def test_norm_targets_matches_direct_computation():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 9, 11, dtype=torch.float64)
    out = mim.norm_targets(x, 5)
    for c, i, j in [(0, 0, 0), (1, 4, 5), (0, 8, 10), (1, 2, 9)]:
        win = x[0, c, max(0, i - 2): i + 3, max(0, j - 2): j + 3].flatten()
        expect = (x[0, c, i, j] - win.mean()) / torch.sqrt(win.var(unbiased=True) + 1e-6)
        assert torch.allclose(out[0, c, i, j], expect), (c, i, j)


def avg_pool_norm_targets(x, k):
    """mim.norm_targets as it was before the box filter: 1-D average poolings, rows then columns."""
    def pool(t, include_pad):
        t = F.avg_pool2d(t, (k, 1), 1, (k // 2, 0), count_include_pad=include_pad)
        return F.avg_pool2d(t, (1, k), 1, (0, k // 2), count_include_pad=include_pad)
    mean, mean_sq = pool(x, False), pool(x * x, False)
    n = pool(torch.ones_like(x[:1, :1]), True) * k * k  # in-image pixels per window
    var = ((mean_sq - mean * mean) * n / (n - 1)).clamp(min=0)
    return (x - mean) / (var + 1e-6).sqrt()


def test_norm_targets_exact_at_192px_in_flat_bright_regions():
    """The worst case for prefix sums: large sums (a 192 px image of values near the top of the
    ImageNet-normalised range) and tiny local variance (flat regions with noise 1e-3), float32 input."""
    torch.manual_seed(0)
    x = torch.full((2, 3, 192, 192), 2.64) + 1e-3 * torch.randn(2, 3, 192, 192)
    x[:, :, 100:, 60:] = -2.1 + 1e-3 * torch.randn(2, 3, 92, 132)  # an edge: windows with large variance too
    out = mim.norm_targets(x, 47)
    assert out.dtype == torch.float32
    assert torch.allclose(out.double(), avg_pool_norm_targets(x.double(), 47), rtol=0, atol=1e-6)
    x64 = x.double()
    for b, c, i, j in [(0, 0, 0, 0), (1, 2, 191, 191), (0, 1, 100, 60), (1, 0, 120, 5), (0, 2, 30, 180), (1, 1, 191, 0)]:
        win = x64[b, c, max(0, i - 23): i + 24, max(0, j - 23): j + 24].flatten()
        expect = (x64[b, c, i, j] - win.mean()) / torch.sqrt(win.var(unbiased=True) + 1e-6)
        assert abs(out[b, c, i, j].item() - expect.item()) < 1e-6, (b, c, i, j)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # SimMIM calls it inside autocast: no bf16 sneaks in
        assert torch.equal(mim.norm_targets(x, 47), out)


def tiny_simmim(norm_target=0):
    torch.manual_seed(0)
    return mim.SimMIM(swinv2.create("tiny"), norm_target).double()


@pytest.mark.parametrize("norm_target", [0, 7])
def test_loss_ignores_unmasked_pixels_and_matches_hand_computation(norm_target):
    model = tiny_simmim(norm_target)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    mask = torch.stack([mim.MaskGenerator(64, 16, 4, 0.6)(s) for s in (1, 2)]).double()
    pred = model.predict(x, mask)
    target = mim.norm_targets(x, norm_target) if norm_target else x
    m = mask.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1)  # (B, 1, 64, 64)
    expect = ((pred - target).abs() * m).sum() / (m.sum() + 1e-5) / 3  # summed over the batch, one ratio
    assert torch.allclose(model(x, mask), expect)
    # change the prediction only where nothing is masked: the loss must not move
    original = model.decoder.forward
    model.decoder.forward = lambda z: original(z) + 7.0 * (1 - m)
    assert torch.allclose(model(x, mask), expect)
    model.decoder.forward = lambda z: original(z) + 7.0 * m  # ...and must move when masked pixels change
    assert not torch.allclose(model(x, mask), expect)


def test_masked_patches_see_only_the_mask_token():
    model = tiny_simmim()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    mask = torch.zeros(1, 16, 16, dtype=torch.float64)
    mask[:, :4, :4] = 1  # the top-left 16 px cell
    y = x.clone()
    y[..., :16, :16] = torch.randn(16, 16, dtype=torch.float64)  # new pixels under the mask
    assert torch.allclose(model.predict(x, mask), model.predict(y, mask))
    assert "encoder.mask_token" in model.state_dict() and "decoder.0.weight" in model.state_dict()


def test_mask_token_starts_trunc_normal_std_002():
    """microsoft/Swin-Transformer models/simmim.py: the mask token is trunc-normal with std 0.02 (the five paper
    sizes: 1216 values)."""
    torch.manual_seed(0)
    tokens = []
    for size in swinv2.PAPER_SIZES:
        with torch.device("meta"):  # the encoder on meta; the wrapper adds a real token
            encoder = swinv2.create(size)
        tokens.append(mim.SimMIM(encoder).encoder.mask_token.flatten())
    assert abs(torch.cat(tokens).std().item() - 0.02) < 0.0015


def test_get_lr_boundaries():
    lr = lambda s: train.get_lr(s, peak_lr=4e-4, start_lr=2e-6, warmup_iters=100, iters=800, milestone=700)
    assert lr(0) == 2e-6 and math.isclose(lr(50), (2e-6 + 4e-4) / 2)
    assert lr(99) < 4e-4 and lr(100) == 4e-4 and lr(699) == 4e-4
    assert math.isclose(lr(700), 4e-5) and math.isclose(lr(799), 4e-5)
    cos = lambda s: train.get_lr(s, 1.0, 0.0, 10, 110, min_lr=0.01, schedule="cosine")
    assert cos(10) == 1.0 and math.isclose(cos(60), 0.505) and math.isclose(cos(110), 0.01)


def run_dir_rows(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


def test_short_run_learns_and_writes_everything(tmp_path, capsys):
    out = str(tmp_path / "run")
    mim.main(TINY + ["--iters", "30", "--log_every", "5", "--eval_every", "15", "--save_every", "15", "--out_dir", out, "--lr", "2e-2"])
    printed = capsys.readouterr().out.splitlines()  # where it writes, at the start and at the end
    assert f"{'run directory':>14} {out}: log.jsonl, ckpt.pt, summary.json at the end" in printed
    assert printed[-1] == f"done: {os.path.join(out, 'summary.json')} (log.jsonl and ckpt.pt beside it)"
    rows = run_dir_rows(out)
    train = [r["train_loss"] for r in rows if "train_loss" in r]
    assert len(train) == 6 and train[-1] < train[0] - 0.02, train
    assert [r["step"] for r in rows if "val_loss" in r] == [15, 30]
    for name in ("args.json", "ckpt.pt", "subset.txt", "recon_0000030.png", "summary.json"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["step"] == 30 and ckpt["model_config"]["window_sizes"] == (4, 4, 4, 2)
    assert "encoder.mask_token" in ckpt["model"] and "encoder.layers.0.blocks.0.attn.cpb_mlp.0.weight" in ckpt["model"]
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["kind"] == "pretrain" and summary["subset_size"] == 2000 and summary["val_loss"] == ckpt["val_loss"]


def test_val_loss_does_not_depend_on_micro_batch(tmp_path):
    out = str(tmp_path / "run")
    mim.main(TINY + ["--iters", "2", "--out_dir", out])
    a = mim.main(TINY + ["--iters", "2", "--out_dir", out, "--eval_only", "--micro_batch", "2"])
    b = mim.main(TINY + ["--iters", "2", "--out_dir", out, "--eval_only", "--micro_batch", "4"])
    assert abs(a - b) < 1e-6 * a
    assert json.load(open(os.path.join(out, "eval.json")))["val_images"] == 12


def test_resume_after_sigterm_equals_straight_run(tmp_path, monkeypatch):
    args = TINY + ["--iters", "6", "--save_every", "100"]
    mim.main(args + ["--out_dir", str(tmp_path / "straight")])
    get_lr = train.get_lr

    def preempt_at_step_3(step, *a, **kw):  # SIGTERM arrives during step 3
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return get_lr(step, *a, **kw)

    monkeypatch.setattr(train, "get_lr", preempt_at_step_3)
    with pytest.raises(SystemExit) as stop:
        mim.main(args + ["--out_dir", str(tmp_path / "resumed")])
    assert stop.value.code == 143
    assert torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)["step"] == 4
    monkeypatch.setattr(train, "get_lr", get_lr)
    mim.main(args + ["--out_dir", str(tmp_path / "resumed")])
    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


@pytest.mark.parametrize("micro_batch", [2], ids=["2x2_vs_1x4"])
def test_two_processes_equal_one_process_with_accumulation(tmp_path, micro_batch):
    """Global batch 8 in micro-batches of 2: 2 processes x 2 micro-steps (DDP's no_sync on the first, the
    all-reduce on the last) vs 1 process x 4. (2 processes x 1 micro-step vs 1 process x 2 is
    tests/test_archives.py's, on the zip layout.)"""
    args = TINY + ["--iters", "3", "--drop_path", "0.1", "--micro_batch", str(micro_batch)]
    mim.main(args + ["--out_dir", str(tmp_path / "one")])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "mim.py")] + args + ["--out_dir", str(tmp_path / "two")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (run_dir_rows(tmp_path / d) for d in ("one", "two"))
    for r1, r2 in zip(one, two):
        for key in ("train_loss", "val_loss"):
            if key in r1:
                assert abs(r1[key] - r2[key]) < 1e-5, (key, r1, r2)
    a = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)["model"]
    # AdamW divides by sqrt(v): a gradient entry near zero turns the summation order's 1e-7 into up to
    # 2.3e-5 of weight after 3 steps (one entry of 2.3M on the synthetic set); a wrong accumulation moves
    # whole tensors by a fraction of the LR (5e-4) per step
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-4, msg=k)


@pytest.mark.parametrize("model,want", [("B", dict(img_size=192, iters=500000, norm_target=47, mask_patch=32)),
                                        ("nano", dict(img_size=64, iters=300, norm_target=0, mask_patch=8))])
def test_the_recipe_follows_the_preset(model, want):
    r = mim.resolve(mim.get_parser().parse_args(["--model", model, "--data", "synthetic"]), 1)
    assert {k: r[k] for k in want} == want


def test_a_paper_size_on_a_cpu_is_announced_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):  # the data path is refused after the warning, before any work
        mim.main(["--model", "B", "--data", str(tmp_path / "nothing"), "--out_dir", str(tmp_path / "run")])
    assert capsys.readouterr().out.startswith("warning: SwinV2-B on a CPU takes minutes per step")
    with pytest.raises(SystemExit):
        mim.main(["--model", "nano", "--data", str(tmp_path / "nothing"), "--out_dir", str(tmp_path / "run")])
    assert "warning" not in capsys.readouterr().out


def test_a_validation_loss_rising_twice_in_a_row_is_logged_as_overfitting(tmp_path, monkeypatch, capsys):
    assert mim.overfitting([0.6, 0.5, 0.55, 0.58]) and not mim.overfitting([0.6, 0.5, 0.55]) and not mim.overfitting([0.5, 0.6, 0.6])
    losses = iter([0.50, 0.52, 0.51, 0.53, 0.55])  # rises at the 2nd and the 5th evaluation: twice in a row only at the 5th
    monkeypatch.setattr(mim, "estimate_val_loss", lambda *a: (next(losses), 4))
    mim.main(TINY + ["--iters", "5", "--eval_every", "1", "--log_every", "5", "--out_dir", str(tmp_path / "run")])
    rows = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert [r.get("overfitting", False) for r in rows if "val_loss" in r] == [False, False, False, False, True]
    assert "warning: val_loss rose at two evaluations in a row (0.5100 -> 0.5300 -> 0.5500)" in capsys.readouterr().out


def test_a_data_set_with_nothing_readable_is_refused_in_one_line_before_a_run_folder(tmp_path, capsys):
    """Every image of the folder is broken: the run stops before any work, naming the path and the first few
    files with the reason, and makes no run directory (the stream would give up only after 100 files)."""
    for split in ("train", "val"):
        for k in range(5):
            (tmp_path / "data" / split / "c").mkdir(parents=True, exist_ok=True)
            (tmp_path / "data" / split / "c" / f"{k}.jpg").write_bytes(b"not a jpeg" * k)
    with pytest.raises(SystemExit) as stop:
        mim.main(["--model", "tiny", "--data", str(tmp_path / "data"), "--out_dir", str(tmp_path / "run")])
    message = str(stop.value)
    assert message.count("\n") == 0 and message.startswith(f"error: --data {tmp_path / 'data'}: none of its first 5 images")
    assert str(tmp_path / "data" / "train" / "c" / "0.jpg") in message and "Error" in message and message.endswith("...")
    assert not (tmp_path / "run").exists()
    # one readable training image is enough to start; the validation images are checked too
    Image.new("RGB", (64, 64), (200, 30, 90)).save(tmp_path / "data" / "train" / "c" / "9.png")
    with pytest.raises(SystemExit) as stop:
        mim.main(["--model", "tiny", "--data", str(tmp_path / "data"), "--out_dir", str(tmp_path / "run")])
    assert str(stop.value).startswith(f"error: --val_data {tmp_path / 'data'}: none of its first 5 images")
    assert not (tmp_path / "run").exists()
