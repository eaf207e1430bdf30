"""finetune.py: loading mim.py and official checkpoints, layer-wise LR decay, the run directory and its
pairing info, refusing bad input, exact evaluation across world sizes, and resume after SIGTERM."""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import data
import finetune
import mim
import swinv2
import train
from conftest import write_inat18

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 16 training images, global batch 8 in micro-batches of 4: 2 steps per epoch, 4 steps in all
TINY = ["--model", "tiny", "--data", "synthetic:16", "--batch_size", "8", "--micro_batch", "4", "--epochs", "2",
        "--warmup_epochs", "1", "--val_images", "10", "--workers", "0", "--layer_decay", "0.75"]  # the official decay, to test it


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A mim.py run directory: the tiny model pre-trained for 4 steps."""
    out = tmp_path_factory.mktemp("pretrain")
    mim.main(["--model", "tiny", "--data", "synthetic", "--iters", "4", "--batch_size", "8", "--val_images", "8",
              "--workers", "0", "--out_dir", str(out)])
    return out


def resolved(argv, n_train=16):
    """finetune's run numbers for argv, as main derives them."""
    args = finetune.get_parser().parse_args(argv)
    return args, finetune.steps(finetune.resolve(args, 1), n_train)


def read_log(d):
    return [json.loads(line) for line in open(d / "log.jsonl")]


def test_finetune_from_a_mim_run_writes_the_pairing(pretrained, tmp_path):
    out = tmp_path / "ft"
    argv = TINY + ["--pretrained", str(pretrained), "--out_dir", str(out)]
    # the encoder is the pre-trained one, bit for bit; only the head is new
    args, r = resolved(argv)
    ckpt, info = finetune.read_pretrained(str(pretrained))
    model, missing = finetune.build_model(args, r, ckpt, 10)
    assert missing == ["head.weight", "head.bias"]
    own = model.state_dict()
    for k, v in ckpt["model"].items():
        if k.startswith("encoder.") and k != "encoder.mask_token":
            assert torch.equal(own[k[len("encoder."):]], v), k

    result = finetune.main(argv)
    summary = json.load(open(out / "summary.json"))
    pt = json.load(open(pretrained / "summary.json"))
    assert summary["kind"] == "finetune" and summary["task"] == "synthetic" and summary["epochs"] == 2
    assert summary["pretrained"] == dict(path=str(pretrained / "ckpt.pt"), run_dir=str(pretrained), model="tiny", frac=1.0,
                                         iters=4, data="synthetic", step=4, val_loss=pt["val_loss"])
    log = [l for l in read_log(out) if "top1" in l]  # the evaluations, one per epoch
    assert [(l["epoch"], l["step"]) for l in log] == [(1, 2), (2, 4)]
    assert all({"epoch", "step", "top1", "top5"} <= set(l) for l in log)
    assert all({"epoch", "step", "train_loss", "lr", "grad_norm"} <= set(l) for l in read_log(out) if "train_loss" in l)
    assert summary["best_top1"] == max(l["top1"] for l in log) and summary["last_top1"] == log[-1]["top1"] == result["top1"]
    assert (out / "args.json").exists()
    # the loop really sets each group's LR by the layer-decay rule (the last step is step 3)
    groups = torch.load(out / "ckpt.pt", weights_only=True)["optimizer"]["param_groups"]
    assert len({g["lr"] for g in groups}) == 10
    for g in groups:
        assert g["lr"] == pytest.approx(finetune.group_lr(3, g["lr_scale"], r), rel=1e-12)


def test_official_checkpoint_loads_with_the_expected_keys(pretrained, tmp_path):
    # the official format: a `model` wrapper, `encoder.` prefix, persistent shape buffers, rpe_mlp,
    # decoder and mask token, no model_config (so the pre-training windows are the preset's 4,4,4,2)
    ours = torch.load(pretrained / "ckpt.pt", weights_only=True)["model"]
    official = {k.replace("cpb_mlp", "rpe_mlp"): v for k, v in ours.items()}
    for k, v in swinv2.create("tiny").named_buffers():
        if not k.endswith("k_bias"):
            official[f"encoder.{k}"] = v
    assert any("attn_mask" in k for k in official) and "decoder.0.weight" in official and "encoder.mask_token" in official
    torch.save({"model": official}, tmp_path / "official.pth")

    args, r = resolved(TINY + ["--pretrained", str(tmp_path / "official.pth"), "--window", "8"])
    ckpt, info = finetune.read_pretrained(args.pretrained)
    assert info["path"] == str(tmp_path / "official.pth") and info["run_dir"] is None and info["val_loss"] is None
    model, missing = finetune.build_model(args, r, ckpt, 10)
    assert set(missing) == {"head.weight", "head.bias"}
    assert set(swinv2.clean_state_dict(ckpt)) == set(model.state_dict()) - {"head.weight", "head.bias"}
    assert model.cfg.window_sizes == (8, 8, 4, 2) and model.cfg.pretrained_window_sizes == (4, 4, 4, 2)
    attn = model.layers[0].blocks[0].attn
    assert attn.relative_coords_table.shape == (15 * 15, 2)  # rebuilt for window 8, not loaded (7 * 7)
    assert torch.equal(attn.cpb_mlp[0].weight, ours["encoder.layers.0.blocks.0.attn.cpb_mlp.0.weight"])


def test_bad_input_is_refused_in_one_line(pretrained, tmp_path):
    cases = [(["--model", "S"], "SwinV2-tiny"),
             (["--pretrained", str(tmp_path / "nothing.pt")], "does not exist"),
             (["--micro_batch", "3"], "not divisible"), (["--data", str(tmp_path / "no_data")], "data path")]
    for extra, words in cases:
        with pytest.raises(SystemExit) as e:
            finetune.main(TINY + ["--pretrained", str(pretrained), "--out_dir", str(tmp_path / "ft")] + extra)
        msg = str(e.value.code)
        assert msg.startswith("error:") and words in msg and "\n" not in msg, msg
        if extra[1] == "S":
            assert "SwinV2-S" in msg  # both sizes are named
    assert not (tmp_path / "ft").exists()  # refused before any work


def test_layer_decay_groups_and_their_learning_rates():
    model = swinv2.create("tiny", num_classes=10)
    groups = finetune.param_groups(model, 0.05, 0.75)
    # every parameter in exactly one group
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    where = {n: g for g in groups for n in g["names"]}
    # L = 8 blocks: patch embedding id 0, block j of stage i sum(depths[:i]) + j + 1, downsample = last
    # block of its stage, final norm and head L + 1 = 9; scale 0.75^(9 - id)
    for name, layer in [("patch_embed.proj.weight", 0), ("layers.0.blocks.0.attn.qkv.weight", 1),
                        ("layers.0.downsample.reduction.weight", 2), ("layers.2.blocks.1.mlp.fc1.bias", 6),
                        ("layers.3.blocks.1.attn.logit_scale", 8), ("norm.weight", 9), ("head.weight", 9)]:
        assert where[name]["lr_scale"] == pytest.approx(0.75 ** (9 - layer)), name
    for name in ["layers.1.blocks.0.attn.logit_scale", "layers.1.blocks.0.attn.cpb_mlp.0.weight", "head.bias",
                 "layers.1.blocks.0.norm1.weight", "layers.1.blocks.0.attn.q_bias"]:
        assert where[name]["weight_decay"] == 0, name
    assert where["head.weight"]["weight_decay"] == where["layers.1.blocks.0.attn.qkv.weight"]["weight_decay"] == 0.05
    # the LR of a group: warmup from the unscaled start, peak scaled, cosine to the unscaled minimum
    r = dict(peak_lr=1e-3, start_lr=1e-6, min_lr=2e-6, warmup_iters=10, iters=110)
    scales = sorted({g["lr_scale"] for g in groups})
    assert len(scales) == 10
    for s in scales:
        assert finetune.group_lr(0, s, r) == pytest.approx(1e-6)
        assert finetune.group_lr(5, s, r) == pytest.approx(1e-6 + (1e-3 * s - 1e-6) / 2)
        assert finetune.group_lr(10, s, r) == pytest.approx(1e-3 * s)
        assert finetune.group_lr(60, s, r) == pytest.approx((1e-3 * s + 2e-6) / 2)  # half-way down the cosine
        assert finetune.group_lr(110, s, r) == pytest.approx(2e-6)
    assert len({finetune.group_lr(10, s, r) for s in scales}) == 10


def test_inat18_as_released_fine_tunes_with_its_own_head(tmp_path):
    """iNat18's json files (three species with ids 3, 17, 42) for one epoch: a 3-way head, task inat18."""
    write_inat18(tmp_path)
    out = tmp_path / "ft"
    argv = ["--model", "tiny", "--data", str(tmp_path / "train2018.json"), "--val_data", str(tmp_path / "val2018.json"),
            "--pretrained", "none", "--epochs", "1", "--warmup_epochs", "0", "--batch_size", "4", "--workers", "0"]
    assert resolved(argv)[1]["task"] == resolved(argv[:2] + ["--data", str(tmp_path)] + argv[6:])[1]["task"] == "inat18"
    finetune.main(argv + ["--out_dir", str(out)])
    summary = json.load(open(out / "summary.json"))
    assert summary["task"] == "inat18" and summary["epochs"] == 1 and 0 <= summary["last_top1"] <= 100
    assert [(l["epoch"], l["step"]) for l in read_log(out) if "top1" in l] == [(1, 3)]  # 12 images / batch 4
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["model"]["head.weight"].shape == (3, 256) and ckpt["identity"]["data_classes"] == 3
    assert json.load(open(out / "args.json"))["classes"] == ["3", "17", "42"]  # label k is category id classes[k]


def smoothed(labels, K, eps=0.1):
    """(B, K): label smoothing of one-hot labels, 1 - eps + eps/K on the class, eps/K elsewhere."""
    y = torch.full((len(labels), K), eps / K, dtype=torch.float64)
    y[range(len(labels)), labels] += 1 - eps
    return y


def test_soft_targets_without_mixing_are_smoothed_one_hot():
    x, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 3, 3, 9])
    out, y = finetune.make_mixer(0.0, 0.0, 0.1, 10)(x, labels)
    assert torch.equal(out, x)
    torch.testing.assert_close(y.double(), smoothed(labels, 10))  # 0.91 on the class, 0.01 elsewhere
    torch.testing.assert_close(y.sum(1), torch.ones(4))


def recover_mixing(x, mixed):
    """Read the mixing off the images: (kind, lambda, partner of each image). Cutmix pastes one box of the
    partner into every image (the rest keeps its own pixels, lambda = the kept area); mixup blends whole
    images, mixed = lambda x_i + (1 - lambda) x_j, and the partner j is the one that fits."""
    kept = (mixed == x).all(1)  # (B, H, W)
    B = len(x)
    if kept.any():
        box = ~kept[0]
        assert (kept == kept[0]).all()  # one box for the whole batch
        partner = [next(j for j in range(B) if torch.equal(mixed[i][:, box], x[j][:, box])) for i in range(B)]
        return "cutmix", kept[0].double().mean().item(), partner
    partner, lams = [], []
    for i in range(B):
        fits = []
        for j in range(B):
            d = x[i] - x[j]
            lam = ((mixed[i] - x[j]) * d).sum() / (d * d).sum() if j != i else torch.tensor(0.0)
            fits.append(((mixed[i] - lam * x[i] - (1 - lam) * x[j]).abs().max(), lam.item(), j))
        err, lam, j = min(fits)
        assert err < 1e-5, err
        partner.append(j), lams.append(lam)
    assert max(lams) - min(lams) < 1e-9  # one lambda for the whole batch
    return "mixup", lams[0], partner


def test_soft_targets_with_mixing_mix_the_two_label_distributions():
    K, labels = 10, torch.tensor([1, 4, 7, 2, 9, 0])
    x = torch.rand(6, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mix = finetune.make_mixer(0.8, 1.0, 0.1, K)
    kinds = []
    for seed in range(12):
        torch.manual_seed(seed)
        mixed, y = mix(x, labels)
        kind, lam, partner = recover_mixing(x, mixed)
        kinds.append(kind)
        assert 0 < lam < 1, (seed, kind, lam)
        # lambda of the image's own smoothed labels plus (1 - lambda) of its partner's
        want = lam * smoothed(labels, K) + (1 - lam) * smoothed(labels[partner], K)
        torch.testing.assert_close(y.double(), want, rtol=1e-6, atol=1e-6, msg=f"seed {seed}, {kind}")
        torch.testing.assert_close(y.sum(1).double(), torch.ones(6, dtype=torch.float64))
    assert 3 <= kinds.count("cutmix") <= 9, kinds  # one of the two per batch, with probability 0.5 each


def test_evaluation_is_exact_for_one_and_two_processes(tmp_path):
    # 51 images (odd): two ranks get 26 and 25, none padded or repeated
    out = tmp_path / "ft"
    argv = TINY + ["--data", "synthetic:8", "--epochs", "1", "--val_images", "51", "--pretrained", "none", "--out_dir", str(out)]
    one = finetune.main(argv)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "finetune.py", *argv, "--eval_only"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.load(open(out / "eval.json"))
    assert two["images"] == 51 and two["step"] == 1
    assert (two["top1"], two["top5"]) == (one["top1"], one["top5"]) == (read_log(out)[-1]["top1"], read_log(out)[-1]["top5"])


def test_resume_after_sigterm_gives_the_same_weights(tmp_path, monkeypatch):
    # one epoch of 4 steps, stopped after step 2 of 4 (mid-epoch), then resumed
    argv = TINY + ["--data", "synthetic:32", "--epochs", "1", "--warmup_epochs", "0", "--pretrained", "none", "--out_dir"]

    class PreemptedAtStep2(train.StopSignal):  # SIGTERM arrives during step 2
        def requested(self):
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().requested()

    handler = signal.getsignal(signal.SIGTERM)  # StopSignal replaces it; give pytest its own back
    try:
        finetune.main(argv + [str(tmp_path / "straight")])
        monkeypatch.setattr(train, "StopSignal", PreemptedAtStep2)
        with pytest.raises(SystemExit) as e:
            finetune.main(argv + [str(tmp_path / "resumed")])
        assert e.value.code == 143
        assert torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)["step"] == 2
        monkeypatch.undo()
        finetune.main(argv + [str(tmp_path / "resumed")])  # the same command again: it resumes
    finally:
        signal.signal(signal.SIGTERM, handler)
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("straight", "resumed"))
    assert a["step"] == b["step"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, s in a["optimizer"]["state"].items():
        assert torch.equal(s["exp_avg_sq"], b["optimizer"]["state"][i]["exp_avg_sq"]), i
    assert read_log(tmp_path / "straight")[-1]["top1"] == read_log(tmp_path / "resumed")[-1]["top1"]
    assert [{k: v for k, v in row.items() if k not in ("img_per_s", "data_wait")} for row in read_log(tmp_path / "straight")] == \
        [{k: v for k, v in row.items() if k not in ("img_per_s", "data_wait")} for row in read_log(tmp_path / "resumed")]


@pytest.mark.parametrize("model,recipe", [("B", dict(aug="paper", mixup=0.8, cutmix=1.0, layer_decay=0.75, epochs=100)),
                                          ("tiny", dict(aug="light", mixup=0.0, cutmix=0.0, layer_decay=1.0, epochs=3)),
                                          ("nano", dict(aug="light", mixup=0.0, cutmix=0.0, layer_decay=1.0, epochs=3))])
def test_the_recipe_follows_the_preset_and_flags_override_it(model, recipe):
    _, r = resolved(["--model", model, "--data", "synthetic", "--pretrained", "none", "--batch_size", "8"])
    assert {k: r[k] for k in recipe} == recipe
    _, r = resolved(["--model", model, "--data", "synthetic", "--pretrained", "none", "--batch_size", "8",
                     "--aug", "light", "--mixup", "0.2", "--layer_decay", "0.9"])
    assert (r["aug"], r["mixup"], r["layer_decay"]) == ("light", 0.2, 0.9)


def test_an_unfinished_pretraining_is_refused_unless_allowed(pretrained, tmp_path):
    os.makedirs(tmp_path / "pre")
    shutil.copy(pretrained / "ckpt.pt", tmp_path / "pre" / "ckpt.pt")  # as after a kill: a checkpoint, no summary.json
    with pytest.raises(SystemExit) as e:
        finetune.main(TINY + ["--pretrained", str(tmp_path / "pre"), "--out_dir", str(tmp_path / "ft")])
    msg = str(e.value.code)
    assert msg == (f"error: --pretrained {tmp_path / 'pre'} has not finished: its checkpoint is at step 4 of 4 and it has no "
                   "summary.json; rerun its command to finish it, or pass --allow_unfinished") and not (tmp_path / "ft").exists()
    ckpt, info = finetune.read_pretrained(str(tmp_path / "pre"), allow_unfinished=True)
    assert info["step"] == 4 and info["run_dir"] == str(tmp_path / "pre")


class FixedLogits(torch.nn.Module):
    """Logits that rank the true class (of labels 0..3) 1st, 3rd, 6th and 5th of 10 classes."""

    def forward(self, x):
        ranks = [[0, 5, 6, 7, 8, 9, 1, 2, 3, 4], [2, 3, 1, 5, 6, 7, 8, 9, 0, 4], [3, 4, 5, 6, 7, 2, 8, 9, 0, 1],
                 [4, 5, 6, 7, 3, 8, 9, 0, 1, 2]]  # row i: classes from best to worst
        logits = torch.zeros(len(x), 10)
        for i, order in enumerate(ranks):
            logits[i, order] = torch.arange(10, 0, -1.0)
        return logits


def test_top5_counts_a_true_class_ranked_second_to_fifth():
    class Loader(list):  # evaluate reads its batches and, to name a left-out image, loader.dataset
        dataset = None
    loader = Loader([data.Item(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.arange(4), torch.arange(4), torch.zeros(4))])
    assert finetune.evaluate(FixedLogits(), loader, torch.device("cpu"), contextlib.nullcontext()) == (25.0, 75.0, 4)
