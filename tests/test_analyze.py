"""analyze.py: Pearson r, overfitting, the paper's 63 runs, run directories, figures, bad inputs, and the prediction
of a metric from the loss (t quantiles, a fit by hand, the interval's coverage, the paper's leave-one-out)."""
import csv
import json
import math
import shutil

import numpy as np
import pytest

import analyze


@pytest.fixture
def no_figures(monkeypatch):
    """Drawing is the slow part; only test_figures_and_outputs needs the PNGs."""
    monkeypatch.setattr(analyze, "figures", lambda *args: [])


def test_pearson_matches_numpy_and_gives_null_when_undefined():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=7), rng.normal(size=7)
    r, n = analyze.pearson(list(x), list(y))
    assert n == 7 and r == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    # a missing value drops its pair, not the whole column
    r, n = analyze.pearson([1.0, None, 2.0, 3.5, 4.0], [2.0, 9.0, 1.0, 0.5, 0.7])
    assert n == 4 and r == pytest.approx(np.corrcoef([1, 2, 3.5, 4], [2, 1, 0.5, 0.7])[0, 1])
    assert analyze.pearson([1.0, 2.0], [3.0, 4.0]) == (None, 2)  # too few runs
    assert analyze.pearson([0.1, 0.1, 0.1, 0.1], [80.0, 81.0, 82.0, 83.0]) == (None, 4)  # no variance
    assert analyze.pearson([None, None, 1.0], [1.0, 2.0, 3.0]) == (None, 1)


def test_find_overfitting_on_a_hand_made_grid():
    grid = {("B", "10%"): [0.50, 0.52, 0.51],   # 250K and 500K above 125K: both overfit
            ("B", "50%"): [0.50, 0.48, 0.49],   # only 500K is above a shorter run (250K)
            ("B", "100%"): [0.50, 0.48, 0.46],  # keeps improving
            ("L", "10%"): [0.46, None, 0.47]}   # 250K has no val loss: unknown, not overfitting
    rows = [dict(model=m, data=d, iters=i, val_loss=v) for (m, d), vs in grid.items()
            for i, v in zip((125000, 250000, 500000), vs)]
    rows.append(dict(model="L", data="50%", iters=500000, val_loss=0.60, partial=True))  # in progress
    found = analyze.find_overfitting(rows)
    assert found == {("", "B", "10%"): [250000, 500000], ("", "B", "50%"): [500000], ("", "L", "10%"): [500000]}
    flags = {(r["model"], r["data"], r["iters"]): r["overfit"] for r in rows}
    assert flags["B", "100%", 500000] is False and flags["B", "50%", 250000] is False
    assert flags["L", "10%", 250000] is None and flags["L", "50%", 500000] is None


def test_paper_runs(tmp_path, capsys, no_figures):
    rows = analyze.load_csv(analyze.PAPER_CSV, source="paper")
    assert len(rows) == 63
    first = rows[0]
    assert (first["model"], first["data"], first["iters"], first["val_loss"], first["in1k_top1"]) == \
        ("S", "IN-1K 10%", 125000, 0.4820, 82.69)
    assert {r["images"] for r in rows} == {128117, 256233, 640583, 1281167, 14197122}
    analyze.main(["--paper", "--out", str(tmp_path)])
    corr = json.loads((tmp_path / "correlations.json").read_text())
    assert corr["all"]["val_loss"]["in1k_top1"]["n"] == 63
    assert round(corr["all"]["val_loss"]["in1k_top1"]["r"], 2) == -0.79  # computed from the 63 runs of MODELHUB.md (microsoft/Swin-Transformer)
    assert corr["all"]["train_loss"]["in1k_top1"] == {"r": None, "n": 0}  # not released
    n_over = corr["overfit"]["val_loss"]["in1k_top1"]["n"]
    # the 21 shortest runs (one per model and data) have no shorter run to be compared with: unknown, in
    # neither subset (they used to count as not overfitting, 14 + 49 = 63)
    assert n_over == 14 and corr["non_overfit"]["val_loss"]["in1k_top1"]["n"] == 63 - 14 - 21
    with open(tmp_path / "runs.csv") as f:
        assert len(list(csv.DictReader(f))) == 63
    out = capsys.readouterr().out
    assert "| H | IN-1K 20% | 125K 0.4789, 250K 0.5038, 500K 0.5071 | 250K, 500K |" in out  # MODELHUB.md: val loss rises
    assert "| L | 83.69 (125K) | 84.71 (250K) | 85.80 (500K) | 85.91 (500K) | 85.81 (500K) |" in out  # MODELHUB.md: best of 3 lengths


def write_run(d, args=None, log=(), summary=None, bad_line=False):
    """A run directory as mim.py / finetune.py write it."""
    d.mkdir(parents=True)
    if args is not None:
        (d / "args.json").write_text(json.dumps(args))
    lines = [json.dumps(l) for l in log] + (['{"step": 30, "train_lo'] if bad_line else [])
    (d / "log.jsonl").write_text("\n".join(lines) + "\n")
    if summary is not None:
        (d / "summary.json").write_text(json.dumps(summary))


def fake_runs(root, run_dir, **pretrained):
    """Three pre-training runs (B on imagenet 10 %, its twin on synthetic data, one in progress)
    and a fine-tuning run of the first."""
    args = {"model": "B", "data": "data/imagenet", "frac": 0.1, "iters": 100}
    log = [{"step": 10, "lr": 1e-4, "train_loss": 0.9, "grad_norm": 1.0, "img_per_s": 50.0},
           {"step": 50, "val_loss": 0.80},
           {"step": 90, "lr": 1e-5, "train_loss": 0.6, "grad_norm": 1.0, "img_per_s": 50.0},
           {"step": 100, "val_loss": 0.70}]
    write_run(root / "B_frac0.1", args, log, bad_line=True, summary=dict(
        kind="pretrain", model="B", data="imagenet", frac=0.1, iters=100, subset_size=128117,
        subset_hash="abc", step=100, train_loss=0.65, val_loss=0.70))
    # validated on the same images as its twin, so the two may be pooled in one r (the same recipe)
    write_run(root / "B_synthetic", dict(args, data="synthetic", val_data="data/imagenet/val"), log, summary=dict(
        kind="pretrain", model="B", data="synthetic", frac=0.1, iters=100, subset_size=1000,
        subset_hash="def", step=100, train_loss=0.30, val_loss=0.90))
    write_run(root / "B_frac0.5", dict(args, frac=0.5, iters=200), log[:2])  # no summary: in progress
    write_run(root / "ft_B", {"task": "in1k"}, [{"epoch": 0, "step": 5, "top1": 60.0, "top5": 80.0}], dict(
        kind="finetune", task="in1k", best_top1=61.5, best_top5=85.0, last_top1=61.0, last_top5=84.0,
        pretrained=dict(path=f"{run_dir}/ckpt.pt", run_dir=run_dir, model="B", frac=0.1, iters=100, step=100,
                        val_loss=0.70, **pretrained)))


@pytest.mark.parametrize("case", ["path", "moved", "ambiguous"])
def test_run_directories_are_read_and_paired(tmp_path, capsys, case):
    # pairing goes by pretrained.run_dir; when that folder is gone, by (model, data, iters); the
    # synthetic twin has the same model, frac and iters, so only the path or the data name decide
    run_dir = str(tmp_path / "out" / "B_frac0.1") if case == "path" else "/gone/out/B_frac0.1"
    fake_runs(tmp_path / "out", run_dir, **({"data": "imagenet"} if case == "moved" else {}))
    rows = {r["data"]: r for r in analyze.load_runs([str(tmp_path / "out" / "*")])}
    err = capsys.readouterr().err
    assert "malformed log line" in err and "in progress" in err
    assert set(rows) == {"imagenet 10%", "imagenet 50%", "synthetic 10%"}
    assert "in1k_top1" not in rows["synthetic 10%"]
    if case == "ambiguous":  # two candidates: reported, not guessed
        assert "not found" in err and "in1k_top1" not in rows["imagenet 10%"]
        return
    done, partial = rows["imagenet 10%"], rows["imagenet 50%"]
    assert (done["model"], done["iters"], done["images"], done["partial"]) == ("B", 100, 128117, False)
    assert (done["train_loss"], done["val_loss"], done["in1k_top1"], done["in1k_top5"]) == (0.65, 0.70, 61.5, 85.0)
    assert done["curve"] == [(50, 0.80), (100, 0.70)]
    assert partial["partial"] and (partial["iters"], partial["train_loss"], partial["val_loss"]) == (200, 0.9, 0.80)
    assert "in1k_top1" not in partial


def test_several_fine_tunings_of_one_run_give_their_mean(tmp_path):
    run_dir = str(tmp_path / "out" / "B_frac0.1")
    fake_runs(tmp_path / "out", run_dir)  # ft_B: 61.5 / 85.0
    for seed, (top1, top5) in enumerate([(58.0, 83.0), (64.0, 90.0)], start=1):
        write_run(tmp_path / "out" / f"ft_B_s{seed}", {"task": "in1k"}, [], dict(
            kind="finetune", task="in1k", best_top1=top1, best_top5=top5, pretrained=dict(
                path=f"{run_dir}/ckpt.pt", run_dir=run_dir, model="B", frac=0.1, iters=100, step=100)))
    rows = {r["data"]: r for r in analyze.load_runs([str(tmp_path / "out" / "*")])}
    r = rows["imagenet 10%"]
    assert r["in1k_top1"] == pytest.approx((61.5 + 58.0 + 64.0) / 3) and r["in1k_top5"] == pytest.approx(86.0)
    assert "in1k_top1" not in rows["synthetic 10%"]


def test_figures_and_outputs_with_the_paper_alongside(tmp_path, capsys):
    fake_runs(tmp_path / "out", str(tmp_path / "out" / "B_frac0.1"))
    out = tmp_path / "analysis"
    analyze.main([str(tmp_path / "out" / "*"), "--paper", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "## ours runs (3)" in printed and "## paper runs (63)" in printed
    assert "0.7000 / 0.6500" not in printed and "0.6500 / 0.7000 / 61.50 (n=1) / 85.00 (n=1)" in printed
    for name in ["val_loss_vs_iters", "in1k_top1_vs_data", "in1k_top1_vs_loss", "in1k_top5_vs_loss",
                 "val_loss_vs_iters_paper", "in1k_top1_vs_loss_paper"]:
        png = (out / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 5000, name
    ours = json.loads((out / "correlations.json").read_text())  # our runs: one finished, so no r
    assert ours["all"]["val_loss"]["in1k_top1"] == {"r": None, "n": 1}
    assert json.loads((out / "correlations_paper.json").read_text())["all"]["val_loss"]["in1k_top1"]["n"] == 63
    with open(out / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    # ours first, data ordered by number of images (unknown last), then the paper's
    assert [r["data"] for r in rows[:4]] == ["synthetic 10%", "imagenet 10%", "imagenet 50%", "IN-1K 10%"]
    assert len(rows) == 66 and rows[1]["in1k_top1"] == "61.5" and rows[2]["partial"] == "1"
    # runs.csv reads back through --csv: same rows, same numbers, same sources
    again = analyze.load_csv(out / "runs.csv")
    assert [r["source"] for r in again] == ["ours"] * 3 + ["paper"] * 63
    assert again[1]["in1k_top1"] == 61.5 and again[2]["partial"] and again[-1]["val_loss"] == 0.4416


def test_csv_with_several_metrics_and_empty_cells(tmp_path, no_figures):
    table = tmp_path / "runs.csv"
    table.write_text("model,data,iters,train_loss,val_loss,in1k_top1,inat_top1\n"
                     "S,10%,125000,0.40,0.50,80.0,60.0\nS,10%,250000,0.38,0.52,80.5,\n"
                     "S,50%,125000,0.41,0.48,81.0,61.0\nS,50%,250000,0.39,0.46,,62.0\n,10%,1,,,,\n")
    analyze.main(["--csv", str(table), "--out", str(tmp_path / "a")])
    corr = json.loads((tmp_path / "a" / "correlations.json").read_text())
    assert corr["all"]["val_loss"]["in1k_top1"]["n"] == 3 and corr["all"]["val_loss"]["inat_top1"]["n"] == 3
    x, y = [0.50, 0.52, 0.48], [80.0, 80.5, 81.0]
    assert corr["all"]["val_loss"]["in1k_top1"]["r"] == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert corr["overfit"]["train_loss"]["in1k_top1"] == {"r": None, "n": 1}  # S 10% 250K


def test_bad_inputs_give_one_line_messages(tmp_path, capsys):
    with pytest.raises(SystemExit, match="no runs found"):
        analyze.main([str(tmp_path / "nothing*"), "--out", str(tmp_path / "a")])
    assert "nothing*: no run directory" in capsys.readouterr().err
    (tmp_path / "empty_run").mkdir()
    (tmp_path / "half_run").mkdir()
    (tmp_path / "half_run" / "args.json").write_text('{"model": "B", "iter')  # unreadable, no log
    with pytest.raises(SystemExit, match="no runs found"):
        analyze.main([str(tmp_path / "*_run"), "--out", str(tmp_path / "a")])
    assert "empty_run: no summary.json" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("model,data,iters,val_loss\nB,10%,125000,0.5\n")
    with pytest.raises(SystemExit, match="missing column.*train_loss"):
        analyze.main(["--csv", str(bad), "--out", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match="cannot read"):
        analyze.main(["--csv", str(tmp_path / "absent.csv"), "--out", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match="--out .* is a file"):
        analyze.main(["--paper", "--out", str(bad)])


def downstream_run(d, kind, task, model="B", run_dir=None, **metrics):
    """A summary.json of finetune.py (best_top1/best_top5, or a metrics dict), detect.py or segment.py;
    run_dir None: from scratch (--pretrained none)."""
    pretrained = dict(path=run_dir and f"{run_dir}/ckpt.pt", run_dir=run_dir, model=run_dir and model,
                      step=run_dir and 100)  # the final step of fake_runs' runs
    summary = dict(kind=kind, task=task, model=model, pretrained=pretrained)
    summary.update(metrics if kind == "finetune" and "best_top1" in metrics else dict(metrics=metrics))
    write_run(d, dict(task=task, pretrained=pretrained), [], summary)


def test_downstream_metrics_of_each_kind_and_the_baseline_from_scratch(tmp_path, no_figures):
    out, run_dir = tmp_path / "out", str(tmp_path / "out" / "B_frac0.1")
    fake_runs(out, run_dir)  # ft_B: in1k 61.5 / 85.0, from B on imagenet 10 %
    downstream_run(out / "det_B", "detect", "coco", run_dir=run_dir, box_ap=40.5, mask_ap=36.0)
    downstream_run(out / "seg_B", "segment", "ade20k", run_dir=run_dir, miou=45.0, pixel_acc=80.0)
    downstream_run(out / "inat_B", "finetune", "inat", run_dir=run_dir, top1=70.0)  # finetune with a metrics dict
    for seed, top1 in enumerate([50.0, 53.0]):  # two seeds from scratch: their mean
        downstream_run(out / f"scratch_B_s{seed}", "finetune", "in1k", best_top1=top1, best_top5=75.0 + seed)
    downstream_run(out / "scratch_B_det", "detect", "coco", box_ap=30.0, mask_ap=27.0)
    downstream_run(out / "scratch_L", "finetune", "in1k", model="L", best_top1=55.0, best_top5=None)
    rows = {(r["model"], r["data"]): r for r in analyze.load_runs([str(out / "*")])}
    ours = rows["B", "imagenet 10%"]
    assert {k: ours[k] for k in ("in1k_top1", "in1k_top5", "coco_box_ap", "coco_mask_ap", "ade20k_miou",
                                 "ade20k_pixel_acc", "inat_top1")} == \
        dict(in1k_top1=61.5, in1k_top5=85.0, coco_box_ap=40.5, coco_mask_ap=36.0, ade20k_miou=45.0,
             ade20k_pixel_acc=80.0, inat_top1=70.0)
    scratch = rows["B", "scratch"]
    assert (scratch["iters"], scratch["images"], scratch.get("val_loss")) == (0, 0, None)
    assert (scratch["in1k_top1"], scratch["in1k_top5"], scratch["coco_box_ap"]) == (51.5, 75.5, 30.0)
    assert rows["L", "scratch"]["in1k_top1"] == 55.0 and "in1k_top5" not in rows["L", "scratch"]

    analyze.main([str(out / "*"), "--out", str(tmp_path / "a")])
    tables = (tmp_path / "a" / "tables.md").read_text()
    # the baseline is the first column of each "best" table (0 pre-training images), one value per model
    assert "### Best in1k_top1 per model and data (iterations)\n| model | scratch | imagenet 10% |" in tables
    assert "| B | 51.50 | 61.50 (100) |" in tables and "| L | 55.00 | — |" in tables
    assert "| B | 30.00 | 40.50 (100) |" in tables  # coco_box_ap: scratch, imagenet 10 %
    assert "| B | scratch |" not in tables  # no line in the grid of pre-training runs (no loss, no length)
    # out of the correlations and the overfitting flags: n counts the finished pre-training runs only
    corr = json.loads((tmp_path / "a" / "correlations.json").read_text())
    assert corr["all"]["val_loss"]["in1k_top1"]["n"] == 1 and corr["all"]["val_loss"]["coco_box_ap"]["n"] == 1
    with open(tmp_path / "a" / "runs.csv") as f:
        csv_rows = [r for r in csv.DictReader(f) if r["data"] == "scratch"]
    assert [(r["model"], r["iters"], r["images"], r["val_loss"], r["overfit"], r["in1k_top1"], r["coco_box_ap"])
            for r in csv_rows] == [("B", "0", "0", "", "", "51.5", "30"), ("L", "0", "0", "", "", "55", "")]
    # runs.csv reads back with --csv: the same baseline, the same tables
    analyze.main(["--csv", str(tmp_path / "a" / "runs.csv"), "--out", str(tmp_path / "b")])
    assert (tmp_path / "b" / "tables.md").read_text().split("\n### Pearson")[0] == tables.split("\n### Pearson")[0]


def test_an_analysis_owns_its_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default folders are relative: analysis/, analysis/paper/
    run_dir = str(tmp_path / "out" / "B_frac0.1")
    fake_runs(tmp_path / "out", run_dir)
    downstream_run(tmp_path / "out" / "seg_B", "segment", "ade20k", run_dir=run_dir, miou=45.0)
    downstream_run(tmp_path / "out" / "scratch_B", "finetune", "in1k", best_top1=50.0, best_top5=75.0)
    analyze.main([])  # out/* into analysis/
    ours = tmp_path / "analysis"
    assert (ours / "ade20k_miou_vs_data.png").exists() and (ours / "in1k_top1_vs_loss.png").exists()
    before = {f.name: f.read_bytes() for f in ours.iterdir() if f.is_file()}
    manifest = json.loads(before["analysis.json"])
    assert manifest["inputs"] == dict(runs=["../out/*"], csv=None, paper=False)
    assert set(manifest["files"]) == set(before) - {"analysis.json"}
    figures = analyze.figures
    monkeypatch.setattr(analyze, "figures", lambda *args: [])  # the paper's: its tables suffice here
    analyze.main(["--paper"])  # the paper alone: its own folder, ours untouched
    assert "## paper runs (63)" in (ours / "paper" / "tables.md").read_text()
    assert {f.name: f.read_bytes() for f in ours.iterdir() if f.is_file()} == before
    with pytest.raises(SystemExit, match=r"--out analysis: holds the analysis of `analyze.py`; pass another"):
        analyze.main(["--paper", "--out", "analysis"])
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(SystemExit, match="--out notes: holds 1 file.* but no analysis.json"):
        analyze.main(["--out", "notes"])
    monkeypatch.setattr(analyze, "figures", figures)
    # the same analysis again replaces its own files, the PNGs of a metric gone since included, and
    # leaves what is not its own
    (ours / "todo.txt").write_text("mine")
    shutil.rmtree(tmp_path / "out" / "seg_B")
    analyze.main(["out/*"])
    assert not (ours / "ade20k_miou_vs_data.png").exists() and (ours / "in1k_top1_vs_data.png").exists()
    assert (ours / "todo.txt").read_text() == "mine" and (ours / "paper" / "tables.md").exists()
    assert "ade20k" not in (ours / "tables.md").read_text()


# ---------------------------------------------------------------------- issue 27: what may enter an r

def pretrain_run(d, model="B", data="data/imagenet", frac=0.1, iters=100, step=None, val=0.70, train=0.60,
                 log=None, finished=True, **recipe):
    """A mim.py run directory: summary.json at `step` (default: its last step) unless unfinished;
    recipe fields go into args.json's identity, as mim.py writes them (resolved values)."""
    args = dict(model=model, data=data, frac=frac, iters=iters, identity=dict(model=model, **recipe))
    log = log if log is not None else [{"step": iters, "train_loss": train}, {"step": iters, "val_loss": val}]
    write_run(d, args, log, dict(kind="pretrain", model=model, data=data.split("/")[-1], frac=frac, iters=iters,
                                 subset_size=1000, subset_hash="h", step=iters if step is None else step,
                                 train_loss=train, val_loss=val) if finished else None)
    return str(d)


def finetune_run(d, run_dir, top1, step, model="B", val_loss=0.70, task="in1k", data="data/imagenet", **identity):
    """A finetune.py run directory started from step `step` of run_dir (None: an official checkpoint)."""
    pretrained = dict(path=f"{run_dir or '/ckpts/official'}/ckpt.pt", run_dir=run_dir, model=model, frac=0.1,
                      iters=100, data="imagenet", step=step, val_loss=val_loss)
    write_run(d, dict(task=task, pretrained=pretrained, identity=dict(identity, seed=0)), [], dict(
        kind="finetune", task=task, model=model, data=data, best_top1=top1, best_top5=90.0, pretrained=pretrained))


def test_a_fine_tune_counts_only_from_the_final_checkpoint_of_its_own_run(tmp_path, capsys, no_figures):
    out = tmp_path / "out"
    run = pretrain_run(out / "B", iters=10, val=0.5)  # 10 steps
    finetune_run(out / "ft_final", run, 13.2, step=10, val_loss=0.5)
    finetune_run(out / "ft_step5", run, 0.0, step=5, val_loss=0.9)  # an intermediate checkpoint: listed, not averaged
    finetune_run(out / "ft_moved", "/gone/B", 13.2, step=10, val_loss=0.5)  # the folder moved: same val loss
    finetune_run(out / "ft_other", "/gone/B2", 70.0, step=10, val_loss=0.61)  # another run of the same cell
    finetune_run(out / "ft_official", None, 80.0, step=None)
    for d in ("ft_moved", "ft_other"):  # the moved ones name a 10-step run too
        s = json.loads((out / d / "summary.json").read_text())
        s["pretrained"]["iters"] = 10
        (out / d / "summary.json").write_text(json.dumps(s))
    analyze.main([str(out / "*"), "--out", str(tmp_path / "a")])
    printed, err = capsys.readouterr()
    with open(tmp_path / "a" / "runs.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert (row["in1k_top1"], row["in1k_top1_seeds"]) == ("13.2", "2")  # final and moved; not (13.2 + 0) / 2 = 6.6
    assert "/gone/B (not among the inputs) taken to be" in err
    left = printed.split("## Left out (3)")[1]
    assert "ft_step5 | started from step 5 of" in left and "not its final checkpoint | in1k_top1 0.00" in left
    assert "ft_other | pre-training run /gone/B2 not found;" in left and "another final val loss" in left
    assert "ft_official | /ckpts/official/ckpt.pt is not a mim.py run directory" in left
    assert "ft_step5: started from step 5" in err  # every one named on stderr too


def test_one_row_per_run_and_a_finished_run_beats_an_unfinished_one(tmp_path, capsys, no_figures):
    analyze.main(["--paper", "--out", str(tmp_path / "p")])
    analyze.main(["--csv", str(tmp_path / "p" / "runs.csv"), "--paper", "--out", str(tmp_path / "twice")])
    corr = json.loads((tmp_path / "twice" / "correlations.json").read_text())
    assert corr["all"]["val_loss"]["in1k_top1"]["n"] == 63  # not 126
    printed, err = capsys.readouterr()
    assert "63 duplicate run(s) left out" in err and "| paper S IN-1K 10% 125K | a duplicate of paper S IN-1K 10% " \
        "125K (same losses) |" in printed
    out = tmp_path / "out"
    pretrain_run(out / "B_a", val=0.9, finished=False, log=[{"step": 40, "train_loss": 0.95}, {"step": 40, "val_loss": 0.9}])
    pretrain_run(out / "B_b", val=0.7, train=0.6)  # the same model, data and length, finished
    analyze.main([str(out / "*"), "--out", str(tmp_path / "a")])
    printed = capsys.readouterr().out
    assert "| B | imagenet 10% | 0.6000 / 0.7000 |" in printed and "0.9000" not in printed.split("## Left out")[0]
    assert f"| {out / 'B_a'} | a duplicate of {out / 'B_b'} |" in printed


def test_the_overfitting_rule_tolerance_unknowns_and_alternatives(tmp_path):
    # the noise estimate: 0 on a straight line, the noise's deviation on a noisy one
    line = [(s, 0.5 - 1e-5 * s) for s in range(20)]
    assert analyze.curve_noise(line) == pytest.approx(0, abs=1e-12) and analyze.curve_noise(line[:2]) is None
    noisy = [(s, 0.5 - 1e-5 * s + e) for s, e in enumerate(np.random.default_rng(0).normal(0, 0.002, 4001))]
    assert analyze.curve_noise(noisy) == pytest.approx(0.002, rel=0.05)
    # +0.0010 within a spread of 0.001 per loss is no rise; +0.02 is. The shortest runs are unknown
    rows = [dict(source="ours", model="B", data=d, iters=i, val_loss=v, val_noise=0.001, in1k_top1=t)
            for d, vs in (("10%", [(0.5000, 80.0), (0.5010, 80.5)]), ("20%", [(0.50, 81.0), (0.52, 80.0)]))
            for i, (v, t) in zip((125000, 250000), vs)]
    tol, why = analyze.tolerance(rows)
    assert tol == pytest.approx(2 * np.sqrt(2) * 0.001) and "median noise" in why
    assert analyze.find_overfitting(rows, tol) == {("ours", "B", "20%"): [250000]}
    assert [r["overfit"] for r in rows] == [None, False, None, True]
    assert analyze.find_overfitting(rows, 0.0) == {("ours", "B", "10%"): [250000], ("ours", "B", "20%"): [250000]}
    rules = analyze.overfit_rules(rows, ["in1k_top1"], tol)
    whole = rules["whole model-data groups with a rise"]["val_loss"]["in1k_top1"]
    assert (whole["overfit"]["n"], whole["non_overfit"]["n"]) == (2, 2)
    # the paper's losses have 4 decimals: a tolerance of 0.0001, and the rule is stated in --help
    assert analyze.tolerance(analyze.load_csv(analyze.PAPER_CSV, source="paper"))[0] == pytest.approx(1e-4)
    assert "The shortest run of a model and data has nothing to be compared with: unknown" in \
        " ".join(analyze.get_parser().format_help().split())


def test_unfinished_runs_are_marked_and_left_out_of_the_correlations(tmp_path, capsys, no_figures):
    out = tmp_path / "out"
    for i, (v, t) in enumerate([(0.60, 70.0), (0.55, 72.0), (0.50, 75.0)]):
        run = pretrain_run(out / f"B_{i}", frac=0.1 * (i + 1), val=v)
        finetune_run(out / f"ft_{i}", run, t, step=100, val_loss=v)
    # a run that wrote its summary.json at step 50 of 100 (issue 22: it entered the table as a normal row),
    # its own log flagged overfitting (mim.py's live check)
    log = [{"step": 50, "train_loss": 0.3}, {"step": 50, "val_loss": 0.4, "overfitting": True}]
    pretrain_run(out / "B_cut", frac=0.5, step=50, val=0.4, train=0.3, log=log)
    analyze.main([str(out / "*"), "--out", str(tmp_path / "a")])
    printed, err = capsys.readouterr()
    assert "B_cut: unfinished (summary.json at step 50 of 100)" in err
    assert "1 unfinished ours run(s) left out of the correlations" in err
    assert "| B | imagenet 50% | 0.3000 / 0.4000 / — / —* |" in printed
    corr = json.loads((tmp_path / "a" / "correlations.json").read_text())
    assert corr["all"]["val_loss"]["in1k_top1"] == {"r": pytest.approx(np.corrcoef([.6, .55, .5], [70, 72, 75])[0, 1]), "n": 3}
    with open(tmp_path / "a" / "runs.csv") as f:
        live = {r["data"]: (r["overfitting_live"], r["partial"]) for r in csv.DictReader(f)}
    assert live["imagenet 50%"] == ("1", "1") and live["imagenet 10%"] == ("", "0")
    assert "Flagged by their own log (the val loss rose at two evaluations in a row): B imagenet 50% 100" in printed


def test_pooling_per_model_within_models_recipes_and_sources(tmp_path, capsys, no_figures):
    table = tmp_path / "mine.csv"  # no source column: its own source, never "ours"
    grid = [("S", 0.50, 80.0), ("S", 0.48, 81.0), ("S", 0.47, 80.5), ("L", 0.45, 84.0), ("L", 0.44, 84.5),
            ("L", 0.46, 84.6)]
    table.write_text("model,data,iters,train_loss,val_loss,in1k_top1\n" + "".join(
        f"{m},d{i},100,,{v},{t}\n" for i, (m, v, t) in enumerate(grid)))
    out = tmp_path / "out"
    pretrain_run(out / "B_64", img_size=64, window=4)
    analyze.main([str(out / "*"), "--csv", str(table), "--out", str(tmp_path / "a")])
    printed = capsys.readouterr().out
    assert "## ours runs (1)" in printed and "## mine runs (6)" in printed
    corr = json.loads((tmp_path / "a" / "correlations_mine.json").read_text())  # ours first, plain names
    x, y = np.array([[v, t] for _, v, t in grid]).T
    assert corr["all"]["val_loss"]["in1k_top1"]["r"] == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert corr["model S"]["val_loss"]["in1k_top1"]["r"] == pytest.approx(np.corrcoef(x[:3], y[:3])[0, 1])
    dx = np.r_[x[:3] - x[:3].mean(), x[3:] - x[3:].mean()]
    dy = np.r_[y[:3] - y[:3].mean(), y[3:] - y[3:].mean()]
    within = corr["within_model"]["val_loss"]["in1k_top1"]
    assert within["r"] == pytest.approx(np.corrcoef(dx, dy)[0, 1]) and (within["n"], within["models"]) == (6, 2)
    assert "| within models | val_loss |" in printed
    # another image size in the same source: refused before anything is written, unless asked
    pretrain_run(out / "B_192", frac=0.5, img_size=192, window=12)
    with pytest.raises(SystemExit, match=r"2 pre-training recipes .*img_size 192 vs 64, .*window 12 vs 4.*--pool_recipes"):
        analyze.main([str(out / "*"), "--out", str(tmp_path / "b")])
    assert not (tmp_path / "b").exists()
    analyze.main([str(out / "*"), "--pool_recipes", "--out", str(tmp_path / "b")])


def test_seeds_are_counted_and_other_recipes_not_averaged(tmp_path, capsys, no_figures):
    out = tmp_path / "out"
    run = pretrain_run(out / "B")
    for seed, top1 in enumerate([61.5, 58.0, 64.0]):
        finetune_run(out / f"ft_s{seed}", run, top1, step=100, epochs=100)
    finetune_run(out / "ft_short", run, 40.0, step=100, epochs=3)  # another recipe: never in the mean
    analyze.main([str(out / "*"), "--out", str(tmp_path / "a")])
    printed = capsys.readouterr().out
    sd = np.std([61.5, 58.0, 64.0], ddof=1)
    assert f"| B | imagenet 10% | 0.6000 / 0.7000 / 61.17 (n=3, sd {sd:.2f}) / 90.00 (n=3, sd 0.00) |" in printed
    assert "ft_short | another in1k recipe (finetune, model B) than 3 other run(s): epochs 3 vs 100 | in1k_top1 40.00" in printed
    with open(tmp_path / "a" / "runs.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert (row["in1k_top1_seeds"], float(row["in1k_top1_sd"])) == ("3", pytest.approx(sd))
    again = analyze.load_csv(tmp_path / "a" / "runs.csv")  # and they read back
    assert again[0]["seeds"]["in1k_top1"] == (3, pytest.approx(sd))


def test_recipes_are_compared_per_model_and_per_script(tmp_path):
    """nano's and tiny's fine-tunes (identities that name their model) and detect.py's runs on the same task
    (the synthetic set) are not rival recipes: each is averaged on its own and none is left out."""
    out = tmp_path / "out"

    def downstream(d, run, model, kind, **metrics):
        pretrained = dict(path=f"{run}/ckpt.pt", run_dir=run, model=model, frac=1.0, iters=100, data="synthetic",
                          step=100, val_loss=0.7)
        write_run(d, dict(task="synthetic", pretrained=pretrained, identity=dict(model=model, kind=kind, seed=0)), [],
                  dict(kind=kind, task="synthetic", model=model, data="synthetic", pretrained=pretrained, **metrics))
    for model, top1 in (("nano", 20.0), ("tiny", 30.0)):
        run = pretrain_run(out / model, model=model, data="synthetic", frac=1.0)
        for seed in (0, 1):
            downstream(out / f"{model}_ft_s{seed}", run, model, "finetune", best_top1=top1 + seed, best_top5=90.0)
    downstream(out / "tiny_det_s0", str(out / "tiny"), "tiny", "detect", metrics=dict(box_ap=40.0, mask_ap=41.0))
    left_out = []
    rows = {r["model"]: r for r in analyze.load_runs([str(out / "*")], left_out)}
    assert left_out == []
    assert (rows["nano"]["synthetic_top1"], rows["tiny"]["synthetic_top1"], rows["tiny"]["synthetic_box_ap"]) == (20.5, 30.5, 40.0)


def test_metric_columns_are_named_by_the_dataset_kind(tmp_path, capsys):
    out = tmp_path / "out"
    run = pretrain_run(out / "B")
    finetune_run(out / "ft_imagenet", run, 61.0, step=100, task="imagenet", data_classes=1000)  # finetune.py's default: the folder
    finetune_run(out / "ft_ilsvrc", run, 62.0, step=100, task="ilsvrc_sub", data="/x/ilsvrc_sub/", data_classes=1000)
    finetune_run(out / "ft_mine", run, 30.0, step=100, task="mytask", data="data/foo", data_classes=1000)  # --task
    rows = analyze.load_runs([str(out / "*")])
    assert rows[0]["in1k_top1"] == 61.5 and rows[0]["mytask_top1"] == 30.0 and "imagenet_top1" not in rows[0]
    assert "task names as in the paper: ilsvrc_sub -> in1k, imagenet -> in1k" in capsys.readouterr().err


def test_figures_say_what_the_tables_say(tmp_path, monkeypatch):
    figs, close = [], analyze.plt.close
    monkeypatch.setattr(analyze.plt, "close", figs.append)  # keep them open to look inside
    analyze.main(["--paper", "--out", str(tmp_path)])
    monkeypatch.undo()
    val, data, loss = figs
    a = val.axes
    assert a[0].get_shared_y_axes().joined(a[0], a[4])  # one y scale for the five models
    assert data.axes[0].get_xscale() == "log" and "images (log scale)" in data.axes[0].get_xlabel()
    assert data.axes[0].get_shared_y_axes().joined(data.axes[0], data.axes[3])
    ax = loss.axes[0]
    assert ax.get_title() == "all: r = -0.786, n = 63\nwithin models: r = -0.852"
    assert sum(len(c.get_offsets()) for c in ax.collections) == 63  # every run counted is drawn
    labels = ax.get_legend_handles_labels()[1]
    assert labels == ["not overfitting: r = -0.958, n = 28", "overfitting: r = -0.799, n = 14",
                      "unknown (shortest run), n = 21"]
    for f in figs:
        close(f)


# ---------------------------------------------------------------------- issue 34: predicting a metric from the loss

def test_t_quantiles_match_the_table():
    """Student's t at 95 % (the two-sided 90 % interval), as any table prints it: odd, even and infinite dof."""
    for dof, t in ((1, 6.314), (2, 2.920), (3, 2.353), (5, 2.015), (10, 1.812), (30, 1.697), (math.inf, 1.645)):
        assert analyze.t_quantile(0.95, dof) == pytest.approx(t, abs=1e-3), dof
    assert analyze.t_quantile(0.975, 10) == pytest.approx(2.228, abs=1e-3)


def test_the_fit_on_a_hand_computed_example():
    """Two models, three runs each, the same shape around different means:
    A: loss 0.40 0.50 0.60, top-1 80 79 77 (means 0.5, 236/3);  B: loss 0.30 0.40 0.50, top-1 85 84 82.
    Within each model the loss deviates by -0.1, 0, +0.1 and top-1 by 4/3, 1/3, -5/3, so the shared slope is
    sum(dx dy) / sum(dx^2) = 2 x (-0.3) / (2 x 0.02) = -15, and A's intercept 236/3 + 15 x 0.5 = 86.1667.
    Residuals -1/6, +1/3, -1/6 in each model: RSS = 2 x 1/6 = 1/3 on 6 - 3 = 3 dof, s = 1/3.
    At A with loss 0.45: 86.1667 - 6.75 = 953/12; leverage 1/3 (A's 3 runs) + (0.45 - 0.5)^2 / 0.04 = 19/48,
    so the 90 % half width is t(0.95, 3) x 1/3 x sqrt(1 + 19/48) = 2.35336 x sqrt(67/48) / 3.
    The model-mean baseline: A's mean 236/3; squared deviations 14/3 per model, s^2 = 28/3 / (6 - 2) = 7/3,
    half width t(0.95, 4) x sqrt(7/3) x sqrt(1 + 1/3) = 2.13185 x sqrt(28/9)."""
    models, x, y = list("AAABBB"), [0.40, 0.50, 0.60, 0.30, 0.40, 0.50], [80, 79, 77, 85, 84, 82]
    value, half = analyze.ols(models, x, y)("A", 0.45)
    assert value == pytest.approx(953 / 12) and half == pytest.approx(2.35336 * math.sqrt(67 / 48) / 3, rel=1e-5)
    value, half = analyze.ols(models, None, y)("A")
    assert value == pytest.approx(236 / 3) and half == pytest.approx(2.13185 * math.sqrt(28 / 9), rel=1e-5)
    assert analyze.ols(["A", "A"], [0.4, 0.5], [80, 79]) is None  # a line through two points: no residual
    assert analyze.ols(list("AABB"), [0.4, 0.4, 0.5, 0.5], [80, 79, 78, 77]) is None  # no loss varies within a model


def test_the_90_percent_interval_covers_90_percent_of_new_runs():
    """2,000 small grids drawn from a known line (2 models, 3 runs each: 3 residual dof, where a normal quantile
    instead of t, or no leverage term, would cover about 80 %): a new run of a random model falls inside."""
    rng, inside = np.random.default_rng(0), []
    for _ in range(2000):
        models = ["A", "A", "A", "B", "B", "B"]
        x = rng.uniform(0.4, 0.6, 6)
        y = np.where(np.array(models) == "A", 80.0, 84.0) - 20 * x + rng.normal(0, 0.3, 6)
        mo, x0 = rng.choice(["A", "B"]), rng.uniform(0.35, 0.65)
        y0 = (80.0 if mo == "A" else 84.0) - 20 * x0 + rng.normal(0, 0.3)
        value, half = analyze.ols(models, list(x), list(y))(mo, x0)
        inside.append(abs(y0 - value) <= half)
    assert np.mean(inside) == pytest.approx(0.90, abs=0.03)


def test_predict_on_the_paper_runs_beats_each_models_mean(tmp_path, no_figures):
    """Done when (issue 34): leave-one-out, the val-loss fit misses IN-1K top-1 by less than each model's mean
    does, and its 90 % intervals hold 80-97 % of the held-out runs. No training losses were released: n/a."""
    analyze.main(["--paper", "--predict", "--out", str(tmp_path)])
    pred = json.loads((tmp_path / "predictions.json").read_text())
    loo = pred["loo"]["in1k_top1"]
    assert loo["val_loss"]["n"] == loo["model_mean"]["n"] == 63 and loo["train_loss"] is None
    assert round(loo["val_loss"]["mae"], 2) == 0.31 and round(loo["model_mean"]["mae"], 2) == 0.57
    assert 0.80 <= loo["val_loss"]["coverage90"] <= 0.97
    assert pred["predictions"] == [] and pred["cannot"] == []  # every released run was fine-tuned
    assert (tmp_path / "in1k_top1_predicted.png").read_bytes().startswith(b"\x89PNG")
    tables = (tmp_path / "tables.md").read_text()
    assert "| in1k_top1 | 0.31 (94 % of 63) | n/a | 0.57 (89 % of 63) |" in tables


def test_predict_on_run_folders_ranks_the_runs_to_fine_tune_and_names_the_rest(tmp_path, capsys, no_figures):
    """B: four fine-tuned pre-trainings and two that are not (one without a validation loss); L: one fine-tuned
    run (a fit needs two) and one that is not. Only B's run with a val loss can be predicted."""
    out = tmp_path / "out"
    for i, (val, top1) in enumerate([(0.50, 80.0), (0.48, 81.1), (0.46, 81.9), (0.44, 83.2)]):
        run = pretrain_run(out / f"B_{i}", frac=0.1 * (i + 1), val=val, train=0.6 - 0.01 * i)
        finetune_run(out / f"ft_B_{i}", run, top1, step=100, val_loss=val)
    new = pretrain_run(out / "B_new", frac=0.05, val=0.45)
    pretrain_run(out / "B_noval", frac=0.06, val=None, log=[{"step": 100, "train_loss": 0.6}])
    finetune_run(out / "ft_L", pretrain_run(out / "L_0", model="L", val=0.40), 85.0, step=100, model="L", val_loss=0.40)
    pretrain_run(out / "L_new", model="L", frac=0.5, val=0.39)
    analyze.main([str(out / "*"), "--predict", "--out", str(tmp_path / "a")])
    printed, err = capsys.readouterr()
    assert "in1k_top1: model L: 1 fine-tuned run(s) with a val_loss, a fit needs 2; skipped" in err
    pred = json.loads((tmp_path / "a" / "predictions.json").read_text())
    assert set(pred["loo"]["in1k_top1"]) == {"val_loss", "train_loss", "model_mean"}
    assert set(pred["loo"]["in1k_top1"]["val_loss"]) == {"mae", "coverage90", "n"}
    assert pred["loo"]["in1k_top1"]["val_loss"]["n"] == pred["loo"]["in1k_top1"]["train_loss"]["n"] == 4
    [p] = [p for p in pred["predictions"] if p["metric"] == "in1k_top1"]
    value, half = analyze.ols(["B"] * 4, [0.50, 0.48, 0.46, 0.44], [80.0, 81.1, 81.9, 83.2])("B", 0.45)
    assert (p["run"], p["model"]) == (new, "B") and p["predicted"] == pytest.approx(value)
    assert (p["lo90"], p["hi90"]) == (pytest.approx(value - half), pytest.approx(value + half))
    cannot = {(c["run"].split("/")[-1], c["metric"]): c["why"] for c in pred["cannot"]}
    assert cannot["B_noval", "in1k_top1"] == "no validation loss"
    assert cannot["L_new", "in1k_top1"] == "model L: 1 fine-tuned run(s) with a val_loss, a fit needs 2"
    assert f"| in1k_top1 | {new} | B | {value:.2f} | {value - half:.2f} to {value + half:.2f} |" in printed
    assert "- in1k_top1, no validation loss: " in printed
    assert (tmp_path / "a" / "in1k_top1_predicted.png").exists()
    assert "predictions.json" in json.loads((tmp_path / "a" / "analysis.json").read_text())["files"]
