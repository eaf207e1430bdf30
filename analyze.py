"""analyze.py: the paper's section-5 questions, asked of a grid of runs (model x data x iterations).

Which runs overfit (a shorter run of the same model and data reached a lower validation loss)?
How does fine-tuning accuracy grow with data and training length? How well do the pre-training
train and validation losses predict it (Pearson r over all runs, the overfitting ones, the rest)?
Reads only files on disk, never torch: run directories of mim.py and of the downstream scripts
(finetune.py, detect.py, segment.py), a table (--csv), or the authors' 63 released runs (--paper,
paper_runs.csv). A downstream run is paired with its pre-training run through its summary.json and
gives one column per metric, {task}_{metric} in percent (in1k_top1, coco_box_ap, ade20k_miou, ...);
several downstream runs of one pre-training, e.g. seeds, give their mean. Those from scratch
(--pretrained none) are the baseline: a row of 0 pre-training iterations on "scratch" data, a
reference line in the figures, kept out of the correlations. Each source (ours, paper) gets its own
tables and figures.

    python analyze.py                        # every run in out/*, into analysis/
    python analyze.py 'out/B_*' --paper      # our B runs next to the paper's numbers
    python analyze.py --paper                # the paper's runs alone, into analysis/paper/
    python analyze.py --csv my_runs.csv --out analysis/csv

Prints markdown tables and writes them (tables.md), runs.csv, correlations.json and PNGs to --out,
with analysis.json naming its inputs and files: a folder that holds another analysis is refused,
a rerun of the same analysis replaces its own files.
"""
import argparse
import csv
import glob
import json
import math
import os
import shlex
import sys

import numpy as np
import matplotlib
matplotlib.use("Agg")  # figures go to files: no display needed, works over ssh and in CI
import matplotlib.pyplot as plt

PAPER_CSV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "paper_runs.csv")
MODELS = ["S", "B", "L", "H", "g"]  # the paper's sizes, smallest first; other names sort after
REQUIRED = ["model", "data", "iters", "train_loss", "val_loss"]
# runs.csv starts with these columns, then one per metric; --csv reads it back
CSV_COLS = ["source", "model", "data", "images", "iters", "train_loss", "val_loss", "overfit", "partial",
            "step"]
META = set(CSV_COLS) | {"frac", "run_dir", "curve"}  # any other key of a row is a metric


def note(msg):
    print(f"note: {msg}", file=sys.stderr)  # skipped inputs go to stderr, so stdout stays markdown


def num(x):
    """A finite float, or None for an empty cell, a missing key or garbage."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def pearson(x, y):
    """Pearson r over the pairs where both values exist: (r, n); r is None if n < 3 or no variance."""
    pairs = [(a, b) for a, b in zip(x, y) if a is not None and b is not None]
    if len(pairs) < 3:  # two points always lie on a line: r = +-1 says nothing
        return None, len(pairs)
    a, b = np.array(pairs, dtype=float).T
    if np.ptp(a) == 0 or np.ptp(b) == 0:  # ptp, not std: the float mean of equal values can wobble
        return None, len(pairs)
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / math.sqrt((a * a).sum() * (b * b).sum())), len(pairs)


# ------------------------------------------------------------------------------------ reading runs

def read_json(path):
    """The object in a JSON file; None when it is absent (silently) or unreadable (reported)."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError):  # ValueError: bad JSON or bad UTF-8, say a half-written file
        obj = None
    if not isinstance(obj, dict):
        note(f"{path}: unreadable, ignored")
    return obj if isinstance(obj, dict) else None


def read_log(path):
    """The objects of a log.jsonl. A broken line (a run killed mid-write) is reported and skipped."""
    lines = []
    if os.path.exists(path):
        with open(path, errors="replace") as f:
            for i, line in enumerate(f, 1):
                try:
                    obj = json.loads(line)
                except ValueError:
                    obj = None
                if isinstance(obj, dict):
                    lines.append(obj)
                elif line.strip():
                    note(f"{path}:{i}: malformed log line skipped")
    return lines


def data_label(name, frac):
    """'imagenet 10%' for a 10 % subset of data/imagenet, 'imagenet' for all of it."""
    name = os.path.basename(str(name).rstrip("/")) or str(name)
    return name if frac is None or frac >= 1 else f"{name} {frac * 100:g}%"


def read_pretrain(d, summary, args, log):
    """One row from a mim.py run. Without summary.json the run is in progress: use its log."""
    s, a = summary or {}, args or {}
    frac, iters = num(s.get("frac", a.get("frac", 1.0))), num(s.get("iters", a.get("iters")))
    # the summary's train_loss is the mean over the last log window, and so is each logged
    # train_loss: the last one is the best an unfinished run can offer
    train = [num(l["train_loss"]) for l in log if num(l.get("train_loss")) is not None]
    curve = [(num(l["step"]), num(l["val_loss"])) for l in log
             if num(l.get("step")) is not None and num(l.get("val_loss")) is not None]
    row = dict(source="ours", model=str(s.get("model", a.get("model", "?"))), frac=frac,
               data=data_label(s.get("data", a.get("data", "?")), frac), images=num(s.get("subset_size")),
               iters=int(iters) if iters else None, run_dir=d, curve=curve, partial=summary is None,
               train_loss=num(s.get("train_loss", train[-1] if train else None)),
               val_loss=num(s.get("val_loss", curve[-1][1] if curve else None)),
               step=max([num(l.get("step")) or 0 for l in log] or [0]))
    if row["iters"] is None or (row["train_loss"] is None and row["val_loss"] is None):
        return note(f"{d}: no iterations or no losses logged yet, skipped")
    if row["partial"]:
        note(f"{d}: in progress (no summary.json), using its log up to step {row['step']:g}")
    return row


def downstream_metrics(s):
    """{column: value} of a downstream summary, all in percent and higher-is-better: {task}_{name} for
    each entry of its metrics dict (detect.py: box_ap, mask_ap; segment.py: miou, pixel_acc), else
    finetune.py's best_top1, best_top5 (the best epoch, as the paper reports)."""
    metrics = s.get("metrics")
    if not isinstance(metrics, dict):
        metrics = {k: s.get(f"best_{k}") for k in ("top1", "top5")}
    task = s.get("task") or s.get("kind") or "ft"
    return {f"{task}_{k}": num(v) for k, v in metrics.items() if num(v) is not None}


def pretraining_of(p, rows, by_dir):
    """The row of the pre-training run that a downstream summary's `pretrained` entry names, or None."""
    r = by_dir.get(os.path.realpath(str(p["run_dir"]))) if p.get("run_dir") else None
    if r is None:  # the run folder was moved or copied: match on (model, data, iters)
        want = dict(model=str(p.get("model")), iters=num(p.get("iters")), frac=num(p.get("frac", 1.0)))
        if "data" in p:
            want["data"] = data_label(p["data"], want["frac"])
        same = [r for r in rows if all(r[k] == v for k, v in want.items())]
        r = same[0] if len(same) == 1 else None  # two candidates: refuse to guess
    return r


def load_runs(paths):
    """Rows of the pre-training runs in paths (globs allowed), with their downstream metrics, and
    one row per model for the downstream runs from scratch."""
    rows, downstream = [], []
    for p in paths:
        if not any(os.path.isdir(d) for d in glob.glob(p)):
            note(f"{p}: no run directory there")
    dirs = [d for p in paths for d in sorted(glob.glob(p)) if os.path.isdir(d)]
    for d in dict.fromkeys(dirs):  # each run once, even if two patterns name it
        summary, args = read_json(f"{d}/summary.json"), read_json(f"{d}/args.json")
        log = read_log(f"{d}/log.jsonl")
        s = summary or args or {}  # a downstream run names its pre-training (pretrained) in both
        if "pretrained" in s and s.get("kind") != "pretrain":
            if summary is None:  # the metrics and the pairing are in the summary
                note(f"{d}: downstream run in progress (no summary.json), skipped")
            else:
                downstream.append((d, summary))
        elif summary or args or log:
            rows.append(read_pretrain(d, summary, args, log))
        else:
            note(f"{d}: no summary.json, args.json or log.jsonl, skipped")
    rows = [r for r in rows if r]
    by_dir = {os.path.realpath(r["run_dir"]): r for r in rows}
    scores, scratch = {}, {}  # (id of the row, column) -> (row, the runs' values); model -> row
    for d, s in downstream:
        p = s.get("pretrained") or {}
        if p.get("path"):
            r = pretraining_of(p, rows, by_dir)
        else:  # --pretrained none: the baseline, one row per model of 0 pre-training iterations
            model = str(s.get("model", "?"))
            r = scratch.setdefault(model, dict(source="ours", model=model, data="scratch", images=0, iters=0))
        if r is None:
            note(f"{d}: pre-training run {p.get('run_dir') or p['path']} not found, skipped")
            continue
        for col, v in downstream_metrics(s).items():
            scores.setdefault((id(r), col), (r, []))[1].append(v)
    # several fine-tunings of one pre-training (seeds): their mean. At small scale one fine-tuning's
    # seed moves top-1 by several points, and the best of n seeds would reward noise.
    for (_, col), (r, vs) in scores.items():
        r[col] = sum(vs) / len(vs)
    return rows + list(scratch.values())


def load_csv(path, source="ours"):
    """Rows from a table with columns model, data, iters, train_loss, val_loss and one per metric.
    Lines starting with # are comments (paper_runs.csv names its source that way); cells may be empty."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader([l for l in f if not l.lstrip().startswith("#")])
    except (OSError, ValueError) as e:
        raise SystemExit(f"--csv {path}: cannot read it ({getattr(e, 'strerror', None) or e})")
    cols = [c.strip() for c in reader.fieldnames or []]
    missing = [c for c in REQUIRED if c not in cols]
    if missing:
        raise SystemExit(f"--csv {path}: missing column(s) {', '.join(missing)}; "
                         f"need {', '.join(REQUIRED)} plus one column per metric")
    rows = []
    for i, rec in enumerate(reader, 1):
        rec = {k.strip(): (v or "").strip() for k, v in rec.items() if isinstance(k, str)}
        if not rec["model"] or not rec["data"] or num(rec["iters"]) is None:
            note(f"{path}: data row {i} has no model, data or iters, skipped")
            continue
        row = {c: num(rec[c]) for c in cols if c not in META}  # the metrics
        row.update(source=rec.get("source") or source, model=rec["model"], data=rec["data"],
                   images=num(rec.get("images")), iters=int(num(rec["iters"])), step=num(rec.get("step")),
                   train_loss=num(rec["train_loss"]), val_loss=num(rec["val_loss"]),
                   partial=rec.get("partial") == "1")
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------ analysis

def find_overfitting(rows):
    """Set r['overfit'] (None when unknown): a shorter run of the same model and data had a lower
    validation loss, the paper's sign of too little data. Returns {(source, model, data): [iters]}."""
    groups, found = {}, {}
    for r in rows:
        r["overfit"] = None
        if not r.get("partial") and r.get("val_loss") is not None:
            groups.setdefault((r.get("source", ""), r["model"], r["data"]), []).append(r)
    # "shorter run", not "previous length": 125K 0.47, 250K 0.50, 500K 0.49 overfits twice
    for key, runs in groups.items():
        for r in sorted(runs, key=lambda r: r["iters"]):
            r["overfit"] = any(s["iters"] < r["iters"] and s["val_loss"] < r["val_loss"] for s in runs)
            if r["overfit"]:
                found.setdefault(key, []).append(r["iters"])
    return found


def correlations(rows, metrics):
    """{'all'|'overfit'|'non_overfit': {loss: {metric: {'r', 'n'}}}} over the finished runs.
    The paper's point: train loss flips sign on overfitting runs, val loss does not."""
    done = [r for r in rows if not r.get("partial")]
    subsets = {"all": done, "overfit": [r for r in done if r.get("overfit") is True],
               "non_overfit": [r for r in done if r.get("overfit") is False]}

    def cell(sub, loss, m):
        r, n = pearson([row.get(loss) for row in sub], [row.get(m) for row in sub])
        return {"r": r, "n": n}  # n stays even when r is None: it says why there is no r
    return {name: {loss: {m: cell(sub, loss, m) for m in metrics} for loss in ("train_loss", "val_loss")}
            for name, sub in subsets.items()}


def ordered(rows):
    """Sort rows: models by size, data by number of images (the data-size axis), then iterations."""
    size = {}
    for r in rows:  # an in-progress run may not know its subset size yet: borrow it from its peers
        size[r["data"]] = size.get(r["data"]) or r.get("images")
    for r in rows:
        r["images"] = r.get("images") or size[r["data"]]
    datas = sorted(size, key=lambda d: (size[d] is None, size[d] or 0, d))
    model_key = lambda m: (MODELS.index(m) if m in MODELS else len(MODELS), m)
    rows.sort(key=lambda r: (model_key(r["model"]), datas.index(r["data"]), r["iters"]))
    return sorted({r["model"] for r in rows}, key=model_key), datas


def kilo(i):
    return f"{i // 1000}K" if i >= 1000 and i % 1000 == 0 else str(i)


def fmt(v, digits):
    return "—" if v is None else f"{v:.{digits}f}"


def md_table(header, body):
    return "\n".join("| " + " | ".join(map(str, l)) + " |" for l in [header, ["---"] * len(header)] + body)


def tables(rows, models, datas, metrics, overfit, corr):
    """The markdown report: results grid, best metric (from scratch beside it), overfitting, correlations."""
    done = [r for r in rows if not r.get("partial")]
    iters = sorted({r["iters"] for r in rows if r["iters"]})  # 0: from scratch, no pre-training to show
    # the grid, one line per (model, data), cells "val loss / metric" as in the paper's table
    losses = [l for l in ("train_loss", "val_loss") if any(r.get(l) is not None for r in rows)]
    cell = {(r["model"], r["data"], r["iters"]): r for r in rows}
    show = lambda r: " / ".join([fmt(r.get(l), 4) for l in losses] + [fmt(r.get(m), 2) for m in metrics]) \
        + ("*" if r.get("partial") else "")
    grid = [[m, d] + [show(cell[m, d, i]) if (m, d, i) in cell else "" for i in iters]
            for m in models for d in datas if any((m, d, i) in cell for i in iters)]
    out = [f"### Results: {' / '.join(losses + metrics)}",
           md_table(["model", "data"] + list(map(kilo, iters)), grid)]
    if len(done) < len(rows):
        out.append("\n\\* in progress: last logged values, left out of the tables below")
    # the paper's "best fine-tuning performance": the max over training lengths; the baseline from
    # scratch (0 images, so the first column) is the one value of its model
    best_cell = lambda r, m: f"{r[m]:.2f}" + (f" ({kilo(r['iters'])})" if r["iters"] else "")
    for m in metrics:
        best = {}
        for r in done:
            if r.get(m) is not None and r[m] > best.get((r["model"], r["data"]), {}).get(m, -math.inf):
                best[r["model"], r["data"]] = r
        cols = [d for d in datas if any((mo, d) in best for mo in models)]
        body = [[mo] + [best_cell(best[mo, d], m) if (mo, d) in best else "—" for d in cols]
                for mo in models if any((mo, d) in best for d in cols)]
        out += [f"\n### Best {m} per model and data (iterations)", md_table(["model"] + cols, body)]
    # overfitting groups with their val loss by length, so a reader sees the rise (paper.md 5c)
    body = [[mo, d, ", ".join(f"{kilo(r['iters'])} {r['val_loss']:.4f}" for r in done
                              if (r["model"], r["data"]) == (mo, d) and r.get("val_loss") is not None),
             ", ".join(map(kilo, its))] for (_, mo, d), its in overfit.items()]
    out += ["\n### Overfitting: the val loss is above that of a shorter run of the same model and data",
            md_table(["model", "data", "val loss by iterations", "overfitting runs"], body) if body
            else "none found (it takes two or more lengths of the same model and data)"]
    # n in every cell: an r from 4 runs and an r from 63 runs are not the same evidence
    body = [[sub, loss] + [f"{fmt(c['r'], 3)} (n={c['n']})" for c in per_metric.values()]
            for sub, per_loss in corr.items() for loss, per_metric in per_loss.items()]
    out += ["\n### Pearson r of the pre-training loss with each fine-tuning metric (n = runs)",
            md_table(["runs", "loss"] + metrics, body) if metrics else "no fine-tuning metrics yet"]
    return "\n".join(out)


def figures(rows, models, datas, metrics, corr, out, suffix):
    """Val loss vs iterations; each metric vs data size and vs the two losses, with the baseline from
    scratch as a horizontal line. Returns the PNG paths."""
    paths, iters = [], sorted({r["iters"] for r in rows if r["iters"]})
    scratch = {r["model"]: r for r in rows if r["iters"] == 0}  # no pre-training: no loss, no data size
    datas = [d for d in datas if any(r["data"] == d and r["iters"] for r in rows)]
    panels = lambda n: plt.subplots(1, n, figsize=(4.2 * n, 3.8), squeeze=False, layout="constrained")

    def baseline(ax, m, mos, label):
        for mo, style in zip(mos, ["--", ":", "-.", (0, (5, 2, 1, 2, 1, 2))] * len(mos)):
            if scratch.get(mo, {}).get(m) is not None:
                ax.axhline(scratch[mo][m], color="gray", ls=style, label=label.format(mo))

    def save(fig, axes, name):
        for ax in axes[0]:  # a legend only where something was drawn, or matplotlib warns
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        paths.append(os.path.join(out, f"{name}{suffix}.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    fig, axes = panels(len(models))  # 1. one panel per model, one line per data size
    for ax, mo in zip(axes[0], models):
        for d in datas:
            runs = [r for r in rows if (r["model"], r["data"]) == (mo, d) and r.get("val_loss") is not None]
            if not runs:
                continue
            # solid: the final val loss of each finished run, at its length (one point per run,
            # as the paper has: a 125K run is not the first 125K steps of a 500K run, because the
            # LR drops at 7/8 of each run's own length)
            final = [r for r in runs if not r.get("partial")]
            line, = ax.plot([r["iters"] for r in final], [r["val_loss"] for r in final], "o-", label=d)
            for r in runs:  # dotted: the val loss each run logged along the way, unfinished ones too
                if r.get("curve"):
                    ax.plot(*zip(*r["curve"]), ":.", color=line.get_color())
        bad = [r for r in rows if r["model"] == mo and r.get("overfit")]
        ax.scatter([r["iters"] for r in bad], [r["val_loss"] for r in bad], s=100, facecolors="none",
                   edgecolors="red", label="overfitting" if bad else None, zorder=3)
        ax.set_xticks(iters, list(map(kilo, iters)))
        ax.set(title=f"SwinV2-{mo}", xlabel="pre-training iterations", ylabel="validation loss")
    save(fig, axes, "val_loss_vs_iters")
    for m in [m for m in metrics if any(r.get(m) is not None for r in rows)]:
        fig, axes = panels(len(models))  # 2. one panel per model, one line per training length
        for ax, mo in zip(axes[0], models):
            for i in iters:
                xy = [(datas.index(r["data"]), r[m]) for r in rows if (r["model"], r["iters"]) == (mo, i)
                      and r.get(m) is not None and not r.get("partial")]
                if xy:
                    ax.plot(*zip(*xy), "o-", label=f"{kilo(i)} iters")
            baseline(ax, m, [mo], "from scratch")
            ax.set_xticks(range(len(datas)), datas, rotation=30, ha="right", fontsize=8)
            ax.set(title=f"SwinV2-{mo}", xlabel="pre-training data (by number of images)", ylabel=m)
        save(fig, axes, f"{m}_vs_data")
        fig, axes = panels(2)  # 3. the paper's correlation figure: green and red circles
        for ax, loss in zip(axes[0], ("val_loss", "train_loss")):
            for flag, color, label in ((False, "green", "not overfitting"), (True, "red", "overfitting")):
                xy = [(r[loss], r[m]) for r in rows
                      if r.get("overfit") is flag and r.get(loss) is not None and r.get(m) is not None]
                if xy:
                    ax.scatter(*zip(*xy), c=color, alpha=0.7, label=label)
            baseline(ax, m, models, "SwinV2-{} from scratch")
            if not ax.collections:  # the paper released no training losses, for one
                ax.text(0.5, 0.5, f"no runs with a {loss}", ha="center", transform=ax.transAxes)
            c = corr["all"][loss][m]
            ax.set(xlabel=f"pre-training {loss.replace('_', ' ')}", ylabel=m,
                   title=f"all runs: r = {fmt(c['r'], 3)}, n = {c['n']}")
        save(fig, axes, f"{m}_vs_loss")
    return paths


# ------------------------------------------------------------------------------------ the output folder

def own_files(out, inputs):
    """The files an earlier run of this same analysis wrote into `out` ([] for a new or empty folder).
    A folder holding anything else is refused: two analyses written into one folder leave a mix of
    both, with nothing to tell which table came from where. Subfolders (analysis/paper) are ignored."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise SystemExit(f"--out {out}: is a file, not a folder")
    present = [f for f in (os.listdir(out) if os.path.isdir(out) else [])
               if os.path.isfile(os.path.join(out, f)) and not f.startswith(".") and f != "analysis.json"]
    old = read_json(os.path.join(out, "analysis.json")) or {}
    if present and old.get("inputs") != inputs:
        what = f"the analysis of `{old['command']}`" if "command" in old else \
            f"{len(present)} file(s) but no analysis.json"
        raise SystemExit(f"--out {out}: holds {what}; pass another --out, or delete it to replace it")
    return [f for f in old.get("files", []) if f == os.path.basename(str(f))]  # names in out, nothing else


def write_manifest(out, command, inputs, files):
    """analysis.json: what made this folder (the command, and its inputs relative to the folder, so
    that the folder and the runs can move together) and the files it wrote."""
    with open(os.path.join(out, "analysis.json"), "w") as f:
        json.dump(dict(command=command, inputs=inputs, files=sorted(files)), f, indent=1)


def get_parser():
    p = argparse.ArgumentParser(description="Tables, overfitting, correlations and figures from runs.")
    p.add_argument("runs", nargs="*", help="run dirs of mim.py and of the downstream scripts; globs allowed "
                   "(default out/*)")
    p.add_argument("--csv", help="a table: model,data,iters,train_loss,val_loss and one column per metric")
    p.add_argument("--paper", action="store_true", help="add the authors' 63 released runs (paper_runs.csv)")
    p.add_argument("--out", help="folder for tables.md, runs.csv, correlations.json, PNGs (default analysis, "
                   "analysis/paper for --paper alone); refused if it holds another analysis")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    patterns = args.runs or ([] if args.csv or args.paper else ["out/*"])  # out/* only by default
    out = args.out or ("analysis/paper" if args.paper and not patterns and not args.csv else "analysis")
    rel = lambda p: os.path.relpath(os.path.abspath(p), os.path.abspath(out))
    inputs = dict(runs=sorted({rel(p) for p in patterns}), csv=args.csv and rel(args.csv), paper=args.paper)
    command = shlex.join(["analyze.py"] + (sys.argv[1:] if argv is None else argv))
    old_files = own_files(out, inputs)
    rows = load_runs(patterns) + (load_csv(args.csv) if args.csv else [])
    rows += load_csv(PAPER_CSV, source="paper") if args.paper else []
    if not rows:
        raise SystemExit(f"analyze.py: no runs found in {' '.join(patterns) or args.csv}; "
                         "pass run directories, --csv FILE or --paper")
    os.makedirs(out, exist_ok=True)
    write_manifest(out, command, inputs, old_files)  # claims the folder before writing into it
    written = ["tables.md", "runs.csv"]
    sources = sorted({r["source"] for r in rows}, key=lambda s: (s == "paper", s))
    report, in_order = [], []
    # ours and the paper's side by side, never mixed in one statistic: our losses come from
    # another validation protocol (and maybe tiny models), so a pooled r would mean nothing
    for src in sources:
        sub = [r for r in rows if r["source"] == src]
        models, datas = ordered(sub)
        metrics = sorted({k for r in sub for k in r if k not in META})
        pre = [r for r in sub if r["iters"]]  # from scratch (0 iterations): no pre-training loss to judge
        overfit = find_overfitting(pre)  # flags the rows; the correlation subsets need it first
        corr = correlations(pre, metrics)
        suffix = "" if src == sources[0] else f"_{src}"  # the first source gets the plain file names
        written.append(f"correlations{suffix}.json")
        with open(os.path.join(out, written[-1]), "w") as f:
            json.dump(corr, f, indent=1)
        pngs = figures(sub, models, datas, metrics, corr, out, suffix)
        written += [os.path.basename(p) for p in pngs]
        report.append(f"## {src} runs ({len(sub)})\n\n" + tables(sub, models, datas, metrics, overfit, corr)
                      + "\n\nFigures: " + ", ".join(pngs) + "\n")
        in_order += sub
    print("\n".join(report))
    with open(os.path.join(out, "tables.md"), "w") as f:
        f.write("\n".join(report))
    metrics = sorted({k for r in in_order for k in r if k not in META})
    # flags as 0/1, 500000.0 as 500000, a missing value as an empty cell
    whole = lambda v: isinstance(v, bool) or (isinstance(v, float) and v.is_integer())
    cell = lambda v: "" if v is None else int(v) if whole(v) else v
    with open(os.path.join(out, "runs.csv"), "w", newline="") as f:
        csv.writer(f).writerows([CSV_COLS + metrics] + [[cell(r.get(c)) for c in CSV_COLS + metrics]
                                                        for r in in_order])
    for f in set(old_files) - set(written):  # e.g. the figures of a metric that is gone since
        if os.path.isfile(os.path.join(out, f)):
            os.remove(os.path.join(out, f))
    write_manifest(out, command, inputs, written)


if __name__ == "__main__":
    main()
