"""ImageNet in a few big files (data.py, archives): the official zip layout (train.zip + train_map.txt) and
WebDataset tar shards hold the same images, labels and names as the class folders they were made from
(by the commands of docs/data.md, run here); members are read by offset; the index is cached outside the
data and rebuilt when an archive changes; every bad archive is refused in one line naming the file; a
folder of unlabelled images holds out --val_frac for the validation loss; pre-training and fine-tuning
run from each layout, a killed run on shards resumes exactly, and 2 processes equal 1 on the zip."""
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import archives
import data
import finetune
import mim
from test_run import assert_same_run, killed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["n01440764", "n01443537", "n01484850"]


def write_imagenet(root, n_train=4, n_val=2):
    """imagenet/{train,val}/<wnid>/<name>.JPEG, 72 px photos whose colour says their class."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for label, c in enumerate(CLASSES):
            os.makedirs(root / "imagenet" / split / c)
            for k in range(n):
                pixels = rng.integers(0, 80, (72, 72, 3)) + np.eye(3, dtype=np.int64)[label] * 170
                Image.fromarray(pixels.astype(np.uint8)).save(root / "imagenet" / split / c / f"{c}_{k}.JPEG")


def docs_blocks(lang):
    text = open(os.path.join(ROOT, "docs", "data.md")).read()
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """The class folders, and the zip and tar layouts made from them by docs/data.md's own commands."""
    root = tmp_path_factory.mktemp("layouts")
    write_imagenet(root)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        zip_commands = [b for b in docs_blocks("bash") if "zip -0" in b]
        assert len(zip_commands) == 1 and shutil.which("zip"), "docs/data.md's zip commands, and the zip tool"
        subprocess.run(["bash", "-c", "set -e\n" + zip_commands[0]], check=True)
        python = docs_blocks("python")
        assert len(python) == 2
        for block in python:  # the map files, then the tar shards
            exec(block, {})
    finally:
        os.chdir(cwd)
    return root


def test_zip_and_tar_shards_hold_the_class_folders_images_labels_and_order(layouts):
    for split in ("train", "val"):
        folder = data.open_dataset(str(layouts / "imagenet"), split)
        zipped = data.open_dataset(str(layouts / "imagenet-zip"), split)
        shards = data.open_dataset(str(layouts / "imagenet-tar"), split)
        assert len(folder) == len(zipped) == len(shards) == 3 * (4 if split == "train" else 2)
        assert list(zipped.names) == list(folder.names)  # the same manifest, the same subsets
        assert [n.split(":")[1] for n in shards.names] == [n.split("/")[1].replace(".JPEG", ".jpg") for n in folder.names]
        assert list(folder.targets) == list(zipped.targets) == list(shards.targets) == sorted(list(folder.targets))
        assert len(folder.classes) == len(zipped.classes) == len(shards.classes) == 3
        for i in range(len(folder)):
            pixels = [np.asarray(d.open(i)[0].convert("RGB")) for d in (folder, zipped, shards)]
            assert np.array_equal(pixels[0], pixels[1]) and np.array_equal(pixels[0], pixels[2]), i
    # a brace pattern names the same shards; a subset of a zip is the subset of its folder
    pattern = data.open_dataset(str(layouts / "imagenet-tar" / "train" / "in1k-{000000..000000}.tar"))
    assert list(pattern.names) == list(data.open_dataset(str(layouts / "imagenet-tar"), "train").names)
    assert data.open_dataset(str(layouts / "imagenet-zip" / "val.zip")).path(0).endswith("val.zip:n01440764/n01440764_0.JPEG")


def test_members_are_read_by_offset_stored_or_deflated_and_every_fd_is_reused(tmp_path):
    names = [f"d/{k}.png" for k in range(4)]
    with zipfile.ZipFile(tmp_path / "train.zip", "w") as zf:
        for k, n in enumerate(names):
            buf = io.BytesIO()
            Image.new("RGB", (20 + k, 10), (k * 60, 0, 0)).save(buf, "PNG")
            zf.writestr(zipfile.ZipInfo(n), buf.getvalue(), zipfile.ZIP_DEFLATED if k % 2 else zipfile.ZIP_STORED)
    ds = data.open_dataset(str(tmp_path / "train.zip"))  # no map: every image member, sorted, unlabelled
    assert list(ds.names) == names and list(ds.targets) == [-1] * 4 and ds.classes == []
    assert list(ds.method) == [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED] * 2
    assert [ds.open(k)[0].size for k in range(4)] == [(20 + k, 10) for k in range(4)]
    assert len(ds.fds) == 1  # one descriptor for the archive, not one per read


def test_a_zip_made_by_the_zip_tool_matches_a_utf8_map_file(tmp_path):
    """Info-ZIP stores UTF-8 names without saying so (zipfile would decode them as cp437)."""
    if not shutil.which("zip"):
        pytest.skip("no zip tool")
    (tmp_path / "train" / "café").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "café" / "crème brûlée.png")
    subprocess.run(["zip", "-0", "-q", "-r", "../train.zip", "."], cwd=tmp_path / "train", check=True)
    (tmp_path / "train_map.txt").write_text("café/crème brûlée.png\t0\n", encoding="utf-8")
    ds = data.open_dataset(str(tmp_path / "train.zip"))
    assert list(ds.names) == ["café/crème brûlée.png"] and ds.open(0)[0].size == (8, 8)


def test_the_index_is_cached_outside_the_data_and_rebuilt_when_an_archive_changes(layouts, tmp_path, monkeypatch):
    monkeypatch.setenv("SIMMIM_INDEX_CACHE", str(tmp_path / "cache"))
    shard = layouts / "imagenet-tar" / "val"
    first = data.open_dataset(str(shard))
    files = os.listdir(tmp_path / "cache")
    assert len(files) == 1 and files[0].endswith(".npz")
    monkeypatch.setattr(archives, "index_tar", lambda path: pytest.fail("a cached shard was rescanned"))
    again = data.open_dataset(str(shard))
    assert list(again.names) == list(first.names) and np.array_equal(again.start, first.start)
    copy = tmp_path / "copy"
    shutil.copytree(shard, copy)
    tar = copy / os.listdir(copy)[0]
    with tarfile.open(tar, "a") as t:  # a changed archive: one more sample
        t.add(layouts / "imagenet" / "val" / CLASSES[0] / f"{CLASSES[0]}_0.JPEG", "extra.jpg")
        info = tarfile.TarInfo("extra.cls")
        info.size = 1
        t.addfile(info, io.BytesIO(b"0"))
    monkeypatch.undo()
    monkeypatch.setenv("SIMMIM_INDEX_CACHE", str(tmp_path / "cache"))
    assert len(data.open_dataset(str(copy))) == len(first) + 1
    assert data.subset_hash(first.names, np.arange(len(first))) == data.subset_hash(again.names, np.arange(len(again)))


def broken(tmp_path, kind, layouts):
    """A data path broken in one way; returns (path, what the one-line error must say)."""
    z, t = layouts / "imagenet-zip", layouts / "imagenet-tar" / "val"
    if kind == "truncated zip":
        d = tmp_path / "z"
        shutil.copytree(z, d)
        raw = (d / "train.zip").read_bytes()
        (d / "train.zip").write_bytes(raw[:len(raw) // 2])
        return str(d), "train.zip: not a readable zip archive"
    if kind == "map names a missing member":
        d = tmp_path / "z"
        shutil.copytree(z, d)
        with open(d / "train_map.txt", "a") as f:
            f.write("n01440764/not_there.JPEG\t0\n")
        return str(d), "train_map.txt: line 13 names 'n01440764/not_there.JPEG', which is not in"
    if kind == "truncated tar":
        d = tmp_path / "t"
        shutil.copytree(t, d)
        shard = d / os.listdir(d)[0]
        raw = shard.read_bytes()
        cut = raw.rindex(b"\xff\xd8\xff")  # inside the last JPEG
        shard.write_bytes(raw[:cut + 100])
        return str(d), "not a readable uncompressed tar (the file ends inside member"
    if kind == "tar cut between members":  # an interrupted copy: whole 512-byte blocks, no end marker
        d = tmp_path / "t"
        shutil.copytree(t, d)
        shard = d / os.listdir(d)[0]
        with tarfile.open(shard) as tar:
            last = tar.getmembers()[-1]
        shard.write_bytes(shard.read_bytes()[:last.offset])  # up to the header of the last member
        return str(d), "ends before its end-of-archive marker: truncated"
    if kind == "nested braces":
        return str(tmp_path / "s-{a,{b,c}}.tar"), "nested braces are not supported"
    if kind == "garbage tar":
        (tmp_path / "x.tar").write_bytes(b"not a tar" * 300)
        return str(tmp_path / "x.tar"), "x.tar: not a readable uncompressed tar"
    if kind == "pattern matches nothing":
        return str(tmp_path / "s-{000000..000003}.tar"), "matches no file"
    if kind == "pattern misses shards":
        shutil.copy(t / os.listdir(t)[0], tmp_path / "s-000001.tar")
        return str(tmp_path / "s-{000000..000002}.tar"), "2 of its 3 shards do not exist, e.g. "
    if kind == "empty folder":
        (tmp_path / "empty").mkdir()
        return str(tmp_path / "empty"), "no images found in data path"


@pytest.mark.parametrize("kind", ["truncated zip", "map names a missing member", "truncated tar", "tar cut between members",
                                  "garbage tar", "pattern matches nothing", "pattern misses shards", "nested braces",
                                  "empty folder"])
def test_a_broken_archive_is_refused_in_one_line_naming_the_file(kind, layouts, tmp_path):
    path, message = broken(tmp_path, kind, layouts)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(SystemExit) as e:
        mim.main(["--model", "tiny", "--data", path, "--val_data", str(layouts / "imagenet" / "val"), "--workers", "0",
                  "--out_dir", str(tmp_path / "run")])
    err = str(e.value.code)
    assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert sorted(os.listdir(tmp_path)) == before  # no run directory, nothing written beside the data


def test_a_member_that_is_not_an_image_is_skipped_and_counted(layouts, tmp_path):
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for key, payload in (("a", (layouts / "imagenet/val" / CLASSES[0] / f"{CLASSES[0]}_0.JPEG").read_bytes()),
                             ("b", b"this is text, not a JPEG")):
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    ds = data.open_dataset(str(tmp_path / "s.tar"))
    assert len(ds) == 2 and data.unreadable(ds, 0) is None and "s.tar:b.jpg" in data.failure(ds, 1)
    stream = data.TrainStream(ds, [0, 1], data.pretrain_transform(32), seed=0)
    assert sum(stream[p].bad for p in range(8)) > 0  # position of b.jpg: replaced by the next, and counted


def test_a_folder_of_your_own_images_holds_out_val_frac(tmp_path, capsys):
    for k in range(40):  # any nesting, images at the top level too
        folder = tmp_path / "photos" / ("" if k % 3 == 0 else f"trip{k % 3}/day{k % 2}")
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (k, 0, 0)).save(folder / f"{k:03d}.png")
    path = str(tmp_path / "photos")
    with pytest.raises(ValueError, match="--val_frac"):  # no val split: say how to hold some out
        data.open_splits(path)
    train_set, val_set = data.open_splits(path, val_frac=0.1)
    assert (len(train_set), len(val_set)) == (36, 4)
    assert set(train_set.names).isdisjoint(val_set.names) and len(set(train_set.names) | set(val_set.names)) == 40
    again = data.open_splits(path, val_frac=0.1)[1]
    assert list(again.names) == list(val_set.names)  # fixed: seed 0, the same for every run
    for frac in (0.25, 0.5, 1.0):  # every --frac subset is drawn from the rest
        sub = data.subset_indices(len(train_set), frac, 0)
        assert set(train_set.names.take(sub)).isdisjoint(val_set.names)
    assert np.asarray(train_set.open(0)[0]).shape == (8, 8, 3)
    for bad in ("0", "0.6", "nan"):
        with pytest.raises(SystemExit):
            mim.get_parser().parse_args(["--val_frac", bad])
        assert "--val_frac" in capsys.readouterr().err
    with pytest.raises(ValueError, match="pass one of them"):
        data.open_splits(path, path, val_frac=0.1)
    with pytest.raises(SystemExit) as e:  # fine-tuning needs labels
        finetune.main(["--model", "tiny", "--data", path, "--val_data", path, "--pretrained", "none",
                       "--out_dir", str(tmp_path / "ft")])
    err = str(e.value.code)
    assert "has no label: fine-tuning needs class folders" in err and "\n" not in err, err


PRE = ["--model", "tiny", "--workers", "0", "--batch_size", "4", "--iters", "2", "--val_images", "3", "--eval_every", "2"]


def test_pretraining_and_finetuning_run_from_each_layout(layouts, tmp_path):
    """The same images from class folders, the zip and the shards: the same subset (names and hash for the
    zip), the same numbers of images and classes; a run's subset.txt names its images."""
    summaries, finetuned = {}, {}
    for layout in ("imagenet", "imagenet-zip", "imagenet-tar"):
        out = tmp_path / layout
        mim.main(PRE + ["--data", str(layouts / layout), "--frac", "0.5", "--out_dir", str(out / "pre")])
        summaries[layout] = json.load(open(out / "pre" / "summary.json"))
        names = [line.strip() for line in open(out / "pre" / "subset.txt") if not line.startswith("#")]
        assert len(names) == 6 and len(open(out / "pre" / "val.txt").read().splitlines()) == 1 + 3
        finetune.main(["--model", "tiny", "--data", str(layouts / layout), "--pretrained", str(out / "pre"),
                       "--allow_unfinished", "--epochs", "1", "--batch_size", "4", "--workers", "0",
                       "--out_dir", str(out / "ft")])
        finetuned[layout] = json.load(open(out / "ft" / "summary.json"))
        args = json.load(open(out / "ft" / "args.json"))
        assert args["identity"]["data_train_images"] == 12 and args["identity"]["data_classes"] == 3
    assert {s["subset_size"] for s in summaries.values()} == {6}
    assert summaries["imagenet"]["subset_hash"] == summaries["imagenet-zip"]["subset_hash"]
    assert {s["val_images"] for s in summaries.values()} == {3} and {s["val_unreadable"] for s in summaries.values()} == {0}
    assert {s["val_images"] for s in finetuned.values()} == {6}


def test_a_run_on_tar_shards_killed_mid_step_resumes_to_the_same_weights_and_log(layouts, tmp_path):
    argv = ["mim.py", "--data", str(layouts / "imagenet-tar"), "--iters", "6", "--save_every", "2", "--log_every", "1",
            "--eval_every", "3"] + PRE[:-6] + ["--val_images", "3"]
    mim.main(argv[1:] + ["--out_dir", str(tmp_path / "straight")])
    killed("mid_step", 5, argv, tmp_path / "resumed")  # inside step 5: the last checkpoint is step 4
    mim.main(argv[1:] + ["--out_dir", str(tmp_path / "resumed")])
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")


def test_two_processes_equal_one_process_with_accumulation_on_the_zip(layouts, tmp_path):
    args = PRE[:-6] + ["--data", str(layouts / "imagenet-zip"), "--batch_size", "4", "--micro_batch", "2",
                       "--iters", "2", "--val_images", "4", "--eval_every", "2"]
    mim.main(args + ["--out_dir", str(tmp_path / "one")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "mim.py")] + args + ["--out_dir", str(tmp_path / "two")]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.load(open(tmp_path / d / "summary.json")) for d in ("one", "two"))
    assert one["subset_hash"] == two["subset_hash"]
    assert abs(one["train_loss"] - two["train_loss"]) < 1e-5 and abs(one["val_loss"] - two["val_loss"]) < 1e-5
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True)["model"] for d in ("one", "two"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-4, msg=k)


def test_an_unreadable_evaluation_image_is_left_out_and_counted_never_replaced(layouts, tmp_path, capsys):
    """The validation loss and top-1 of [good, broken, good] are those of [good, good] on 2 images: the
    broken image's stand-in (the next readable image, which keeps the batch's shape) is not scored."""
    val = tmp_path / "val" / CLASSES[0]
    shutil.copytree(layouts / "imagenet" / "val" / CLASSES[0], val)
    shutil.copy(val / f"{CLASSES[0]}_1.JPEG", val / f"{CLASSES[0]}_2.JPEG")
    (val / f"{CLASSES[0]}_1.JPEG").write_bytes(b"broken")
    ds = data.open_dataset(str(tmp_path / "val"))  # _0 good, _1 broken, _2 good
    masks = mim.MaskGenerator(64, 8, 4, 0.6, seed=0)
    sets = [data.EvalSet(ds, idx, data.val_transform(64), masks=masks) for idx in ([0, 1, 2], [0, 2])]
    assert [sets[0][i].bad for i in range(3)] == [0, 1, 0]
    torch.manual_seed(0)
    model = mim.SimMIM(mim.swinv2.create("tiny", img_size=64, window_size=4), 0)
    ctx, cpu = torch.autocast("cpu", enabled=False), torch.device("cpu")
    losses = [mim.estimate_val_loss(model, data.make_loader(s, 3), cpu, ctx) for s in sets]
    assert losses[0][1] == losses[1][1] == 2 and abs(losses[0][0] - losses[1][0]) < 1e-6
    assert "unreadable evaluation image" in capsys.readouterr().err
    head = mim.swinv2.create("tiny", img_size=64, window_size=4, num_classes=3)
    sets = [data.EvalSet(ds, idx, data.val_transform(64)) for idx in ([0, 1, 2], [0, 2])]
    scores = [finetune.evaluate(head, data.make_loader(s, 3), cpu, ctx) for s in sets]
    assert scores[0] == scores[1] and scores[0][2] == 2
