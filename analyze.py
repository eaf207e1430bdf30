"""analyze.py: the paper's section-5 questions, asked of a grid of runs (model x data x iterations).

Which runs overfit? How does fine-tuning accuracy grow with data and training length? How well do the
pre-training train and validation losses predict it (Pearson r over all runs, per model, within models,
over the overfitting runs and over the rest)? Reads only files on disk, never torch: run directories of
mim.py and of the downstream scripts (finetune.py, detect.py, segment.py), a table (--csv), or the
authors' 63 released runs (--paper, paper_runs.csv).

    python analyze.py                        # every run in out/*, into analysis/
    python analyze.py 'out/B_*' --paper      # our B runs next to the paper's numbers
    python analyze.py --paper                # the paper's runs alone, into analysis/paper/
    python analyze.py --csv my_runs.csv --out analysis/csv
    python analyze.py --paper --predict      # + top-1 predicted from the val loss, leave-one-out

Every r it prints is a claim about the paper, so these are the rules that decide what enters one:
- Pairing. A downstream run counts for a pre-training run's metric only if its summary.json names that
  run directory and its final step (pretrained.run_dir, pretrained.step = the run's iterations). A run
  folder that moved is found by model, data, frac and length, if exactly one run has them and its final
  validation loss is the one the downstream run recorded. Every downstream run left out is named with the
  reason (an intermediate checkpoint, another recipe, no such run).
- Seeds. The downstream runs of one pre-training (seeds) give their mean, shown with their number n and
  standard deviation sd; only runs of one recipe per task are averaged (the recipe most runs share).
- Columns. One per metric, {task}_{metric} in percent, the task named by the dataset kind as in the
  paper (in1k, inat18, coco, ade20k) whatever the data folder is called.
- Unfinished runs (no summary.json, or one whose step is below its iterations) are marked * and kept out
  of the correlations and of the overfitting rule. One row per (source, model, data, iterations): the
  duplicates are named; a finished run beats an unfinished one, then the first given wins.
- Overfitting. A run overfits when its validation loss is above the lowest of the shorter runs of the same
  model and data by more than a tolerance: the larger of one unit of the last digit the losses were
  written with (0.0001 for the paper's 0.4820) and two standard deviations of a difference of two
  validation losses, 2*sqrt(2)*s, where s is the median over the runs of their val_noise (how much a
  logged validation loss wobbles about its trend). --overfit_tol sets it. The shortest run of a model and
  data has nothing to be compared with: unknown, in neither subset. The r of both subsets is also printed
  under the reasonable other rules (shortest run as not overfitting, no tolerance, the smallest counted
  rise not counted, whole model-data groups flagged), so a reader sees what they depend on.
- Pooling. Sources (ours, the paper, a --csv) are never pooled. Runs of different pre-training recipes
  (image size, window, mask, target normalisation, validation set) are refused unless --pool_recipes.
  Runs of different models are pooled, with r also per model and within models (each model's mean loss
  and mean metric removed): model size alone moves both the loss and the accuracy.
Downstream runs from scratch (--pretrained none) are the baseline: a row of 0 pre-training iterations on
"scratch" data, a reference line in the figures, kept out of the correlations.

--predict turns the paper's Finding 3 (sec. 4: the validation loss predicts fine-tuning) into predictions.
Each metric is fitted on the validation loss by ordinary least squares with one intercept per model and one
slope shared by the models, with a 90 % prediction interval from Student's t on the fit's residual degrees
of freedom (n - models - 1) and its leverage. Each fine-tuned run is predicted by the fit on all the others
(leave-one-out), against the same fit on the training loss and each model's mean (its interval from the
residual sd pooled over the models): mean absolute error, share inside the interval, n. Then every finished
pre-training without the metric is predicted, best first, and the runs that cannot be are named with why:
a model with fewer than two fine-tuned runs is left out of the fit, a run without a val loss has no input.

Prints markdown tables and writes them (tables.md), runs.csv, correlations.json (and predictions.json) and
PNGs to --out, with analysis.json naming its inputs and files: a folder that holds another analysis is refused,
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
from typing import NamedTuple

import numpy as np
import matplotlib
matplotlib.use("Agg")  # figures go to files: no display needed, works over ssh and in CI
import matplotlib.pyplot as plt

PAPER_CSV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "paper_runs.csv")
MODELS = ["S", "B", "L", "H", "g"]  # the paper's sizes, smallest first; other names sort after
REQUIRED = ["model", "data", "iters", "train_loss", "val_loss"]
# runs.csv starts with these columns, then per metric its mean, {metric}_seeds and {metric}_sd; --csv reads it back
CSV_COLS = ["source", "model", "data", "images", "iters", "train_loss", "val_loss", "val_noise", "overfit",
            "overfitting_live", "partial", "step"]
SEED_COLS = ("_seeds", "_sd")
META = set(CSV_COLS) | {"frac", "run_dir", "curve", "recipe", "seeds"}  # any other key of a row is a metric
# the paper's names of the downstream datasets, and the names a data folder of them often has
KINDS = {"in1k": "in1k", "imagenet": "in1k", "imagenet1k": "in1k", "imagenet-1k": "in1k", "ilsvrc2012": "in1k",
         "inat18": "inat18", "inat2018": "inat18", "inaturalist2018": "inat18", "coco": "coco",
         "coco2017": "coco", "ade20k": "ade20k", "adechallengedata2016": "ade20k"}
CLASSES = {1000: "in1k", 8142: "inat18"}  # a classification folder of any other name, told by its classes
# what a pre-training's losses depend on besides model and data (with the validation set: pretrain_recipe)
RECIPE = ["img_size", "window", "mask_patch", "mask_ratio", "norm_target"]


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


def pretrain_recipe(a):
    """What a pre-training's losses depend on besides model and data: image size, window, mask, target
    normalisation, and the validation set (its folder and image count). None without args.json. The
    identity in args.json holds the resolved values (the preset's 64 where the flag says null)."""
    if not a:
        return None
    ident = a.get("identity") or {}
    val = os.path.normpath(str(a.get("val_data") or a.get("data") or "?"))
    if os.path.basename(val) == "val":  # data/imagenet/val is data/imagenet's val split
        val = os.path.dirname(val)
    return dict({k: ident.get(k, a.get(k)) for k in RECIPE}, val_data=os.path.basename(val),
                val_images=ident.get("data_val_images", a.get("val_images")))


def curve_noise(curve):
    """How much one logged validation loss wobbles about the run's trend (a standard deviation), from the
    second differences of the last half of its curve: a trend that is locally straight cancels out, and
    noise of deviation s gives second differences of deviation s*sqrt(6). None below 3 evaluations. The
    bends of a real curve count as noise too, so this errs on the side of a larger tolerance."""
    v = np.array([loss for step, loss in curve[(len(curve) - 1) // 2:]], dtype=float)
    return float(np.sqrt(np.mean(np.diff(v, 2) ** 2) / 6)) if len(v) >= 3 else None


def read_pretrain(d, summary, args, log):
    """One row from a mim.py run. Without summary.json the run is in progress: use its log."""
    s, a = summary or {}, args or {}
    frac, iters = num(s.get("frac", a.get("frac", 1.0))), num(s.get("iters", a.get("iters")))
    # the summary's train_loss is the mean over the last log window, and so is each logged
    # train_loss: the last one is the best an unfinished run can offer
    train = [num(l["train_loss"]) for l in log if num(l.get("train_loss")) is not None]
    curve = [(num(l["step"]), num(l["val_loss"])) for l in log
             if num(l.get("step")) is not None and num(l.get("val_loss")) is not None]
    step = num(s.get("step")) if summary else max([num(l.get("step")) or 0 for l in log] or [0])
    row = dict(source="ours", model=str(s.get("model", a.get("model", "?"))), frac=frac,
               data=data_label(s.get("data", a.get("data", "?")), frac), images=num(s.get("subset_size")),
               iters=int(iters) if iters else None, run_dir=d, curve=curve, step=step,
               # unfinished: no summary yet, or one written before the last step (a run cut short)
               partial=summary is None or (step is not None and iters is not None and step < iters),
               train_loss=num(s.get("train_loss", train[-1] if train else None)),
               val_loss=num(s.get("val_loss", curve[-1][1] if curve else None)),
               recipe=pretrain_recipe(args), val_noise=curve_noise(curve),
               # mim.py's own check during the run (the val loss rose at two evaluations in a row)
               overfitting_live=True if any(l.get("overfitting") is True for l in log) else None)
    if row["iters"] is None or (row["train_loss"] is None and row["val_loss"] is None):
        return note(f"{d}: no iterations or no losses logged yet, skipped")
    if summary is None:
        note(f"{d}: in progress (no summary.json), using its log up to step {row['step']:g}")
    elif row["partial"]:
        note(f"{d}: unfinished (summary.json at step {step:g} of {iters:g})")
    return row


def task_of(s, a):
    """The dataset kind of a downstream run (in1k, inat18, coco, ade20k), so columns line up with the
    paper's: finetune.py names the task after the data folder (imagenet) unless --task is given. A name
    not in KINDS stays, unless it is the data folder's own and the classes tell the dataset."""
    task = str(s.get("task") or s.get("kind") or "ft")
    kind = KINDS.get(task.lower())
    folder = os.path.splitext(os.path.basename(str(s.get("data", "")).rstrip("/")))[0]
    if kind is None and task == folder and s.get("kind") == "finetune":
        kind = CLASSES.get(((a or {}).get("identity") or {}).get("data_classes"))
    return kind or task


def downstream_metrics(s, task):
    """{column: value} of a downstream summary, all in percent and higher-is-better: {task}_{name} for
    each entry of its metrics dict (detect.py: box_ap, mask_ap; segment.py: miou, pixel_acc), else
    finetune.py's best_top1, best_top5 (the best epoch, as the paper reports)."""
    metrics = s.get("metrics")
    if not isinstance(metrics, dict):
        metrics = {k: s.get(f"best_{k}") for k in ("top1", "top5")}
    return {f"{task}_{k}": num(v) for k, v in metrics.items() if num(v) is not None}


def downstream_recipe(a):
    """Everything a downstream run computed with but its seed and its starting point: the identity in
    its args.json, as a comparable string ('' when unknown). Runs of different recipes are not averaged."""
    ident = {k: v for k, v in ((a or {}).get("identity") or {}).items() if k not in ("seed", "pretrained")}
    return json.dumps(ident, sort_keys=True) if ident else ""


def differ(a, b):
    """'epochs 3 vs 100, lr ...': the fields where two recipes (dicts or downstream_recipe strings) differ."""
    a, b = [json.loads(x or "{}") if isinstance(x, str) else x or {} for x in (a, b)]
    return ", ".join(f"{k} {a.get(k)} vs {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))


def pretraining_of(p, rows, by_dir):
    """(row, None): the pre-training run whose final checkpoint a downstream run started from, as its
    summary's `pretrained` entry names it; or (None, why not)."""
    if not p.get("run_dir"):
        return None, f"{p.get('path')} is not a mim.py run directory (an official checkpoint?)"
    r = by_dir.get(os.path.realpath(str(p["run_dir"])))
    if r is None:  # the run folder was moved or copied: the same model, data, frac and length...
        want = dict(model=str(p.get("model")), iters=num(p.get("iters")), frac=num(p.get("frac", 1.0)))
        if "data" in p:
            want["data"] = data_label(p["data"], want["frac"])
        same = [r for r in rows if all(r[k] == v for k, v in want.items())]
        if len(same) != 1:  # two candidates: refuse to guess
            return None, f"pre-training run {p['run_dir']} not found ({len(same)} runs of its model, data and length)"
        r = same[0]
        # ...and the same final validation loss, which another run of that cell would not have to the last digit
        if num(p.get("val_loss")) is None or num(p.get("val_loss")) != r.get("val_loss"):
            return None, (f"pre-training run {p['run_dir']} not found; {r['run_dir']} has its model, data and "
                          f"length but another final val loss ({r.get('val_loss')} vs {p.get('val_loss')})")
        note(f"{p['run_dir']} (not among the inputs) taken to be {r['run_dir']}: same model, data, length, val loss")
    step = num(p.get("step"))
    if step is None or step != r["iters"] or r.get("partial"):
        at = "an unknown step" if step is None else f"step {step:g}"
        return None, f"started from {at} of {r['run_dir']} ({r['iters']} iterations): not its final checkpoint"
    return r, None


class Entry(NamedTuple):
    """A downstream run that counts for a pre-training row, as load_runs collects them."""
    row: dict  # the row of the pre-training run it started from, or its model's baseline from scratch
    run_dir: str  # the downstream run's own directory
    group: tuple  # (task, kind, model): a script's runs on one task from one model size
    recipe: str  # downstream_recipe: only the runs of one recipe per group are averaged
    values: dict  # {column: value}: its metrics


def load_runs(paths, left_out=None):
    """Rows of the pre-training runs in paths (globs allowed), with their downstream metrics, and one row
    per model for the downstream runs from scratch. Downstream runs that count for no row are appended
    to left_out as (run dir, why, their metrics)."""
    left_out = [] if left_out is None else left_out
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
                left_out.append((d, "a downstream run in progress (no summary.json)", {}))
                note(f"{d}: downstream run in progress (no summary.json), skipped")
            else:
                downstream.append((d, summary, args))
        elif summary or args or log:
            rows.append(read_pretrain(d, summary, args, log))
        else:
            note(f"{d}: no summary.json, args.json or log.jsonl, skipped")
    rows = [r for r in rows if r]
    by_dir = {os.path.realpath(r["run_dir"]): r for r in rows}

    def leave(d, why, values):
        left_out.append((d, why, values))
        note(f"{d}: {why}; left out")
    entries, scratch, renamed = [], {}, set()  # entries: Entry, one per downstream run that counts
    for d, s, a in downstream:
        task, p = task_of(s, a), s.get("pretrained") or {}
        if s.get("task") and task != s["task"]:
            renamed.add(f"{s.get('task')} -> {task}")
        if p.get("path"):
            r, why = pretraining_of(p, rows, by_dir)
        else:  # --pretrained none: the baseline, one row per model of 0 pre-training iterations
            model, why = str(s.get("model", "?")), None
            r = scratch.setdefault(model, dict(source="ours", model=model, data="scratch", images=0, iters=0))
        if r is None:
            leave(d, why, downstream_metrics(s, task))
        else:
            group = (task, str(s.get("kind")), str(s.get("model")))  # a script's runs on one task from one model size
            entries.append(Entry(r, d, group, downstream_recipe(a), downstream_metrics(s, task)))
    if renamed:
        note(f"task names as in the paper: {', '.join(sorted(renamed))}")
    # one recipe per task, script and model size: a mean over a 3-epoch and a 100-epoch fine-tune, or a
    # column mixing them, measures neither (model sizes have recipes of their own, and detect.py and
    # segment.py on the synthetic set share its task name). The recipe most runs share wins (the first on a tie)
    count, best = {}, {}
    for e in entries:
        count[e.group, e.recipe] = count.get((e.group, e.recipe), 0) + 1
    for (group, recipe), n in count.items():
        best[group] = recipe if n > count.get((group, best.get(group)), 0) else best[group]
    scores = {}  # (id of the row, column) -> (row, the runs' values)
    for r, d, group, recipe, values in entries:
        if recipe != best[group]:
            task, kind, model = group
            leave(d, f"another {task} recipe ({kind}, model {model}) than {count[group, best[group]]} other run(s): "
                     f"{differ(recipe, best[group])}", values)
            continue
        for col, v in values.items():
            scores.setdefault((id(r), col), (r, []))[1].append(v)
    # several fine-tunings of one pre-training (seeds): their mean, with how many and how far apart. At
    # small scale one fine-tuning's seed moves top-1 by several points, and the best of n would reward noise.
    for (row_id, col), (r, vs) in scores.items():
        r[col] = sum(vs) / len(vs)
        r.setdefault("seeds", {})[col] = (len(vs), float(np.std(vs, ddof=1)) if len(vs) > 1 else None)
    return rows + list(scratch.values())


def load_csv(path, source=None):
    """Rows from a table with columns model, data, iters, train_loss, val_loss and one per metric.
    Lines starting with # are comments (paper_runs.csv names its source that way); cells may be empty.
    The source is the table's source column, else `source`, else the file's name: never 'ours'."""
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
    metrics = [c for c in cols if c not in META and not c.endswith(SEED_COLS)]
    rows = []
    for i, rec in enumerate(reader, 1):
        rec = {k.strip(): (v or "").strip() for k, v in rec.items() if isinstance(k, str)}
        if not rec["model"] or not rec["data"] or num(rec["iters"]) is None:
            note(f"{path}: data row {i} has no model, data or iters, skipped")
            continue
        row = {c: num(rec[c]) for c in metrics}
        seeds = {m: (int(num(rec.get(m + "_seeds"))), num(rec.get(m + "_sd"))) for m in metrics
                 if num(rec.get(m + "_seeds")) is not None}
        step, iters = num(rec.get("step")), int(num(rec["iters"]))
        row.update(source=rec.get("source") or source or os.path.splitext(os.path.basename(path))[0],
                   model=rec["model"], data=rec["data"], images=num(rec.get("images")), iters=iters, step=step,
                   train_loss=num(rec["train_loss"]), val_loss=num(rec["val_loss"]),
                   val_noise=num(rec.get("val_noise")),
                   overfitting_live=True if rec.get("overfitting_live") == "1" else None, seeds=seeds,
                   partial=rec.get("partial") == "1" or (step is not None and step < iters))
        rows.append(row)
    return rows


def one_per_run(rows, left_out):
    """One row per (source, model, data, iterations): a finished run beats an unfinished one, then the first
    given wins (two rows of one run, e.g. --csv analysis/paper/runs.csv --paper, would count it twice)."""
    keep, name = {}, lambda r: r.get("run_dir") or f"{r['source']} {r['model']} {r['data']} {kilo(r['iters'])}"
    for r in rows:
        key = (r["source"], r["model"], r["data"], r["iters"])
        old = keep.setdefault(key, r)
        if old is not r:
            if old.get("partial") and not r.get("partial"):
                keep[key], old, r = r, r, old
            same = all(old.get(k) == r.get(k) for k in ("train_loss", "val_loss", "step"))
            left_out.append((name(r), f"a duplicate of {name(old)}" + (" (same losses)" if same else ""), {}))
    if len(keep) < len(rows):
        note(f"{len(rows) - len(keep)} duplicate run(s) left out (one row per source, model, data and iterations)")
    return list(keep.values())


# ------------------------------------------------------------------------------------ analysis

def resolution(values):
    """One unit of the last digit the values were written with: 0.0001 for the paper's 0.4820, 0 for
    the full floats of our summaries (whose differences are exact)."""
    for k in range(9):
        if all(abs(round(v, k) - v) < 1e-12 for v in values):
            return 10.0 ** -k
    return 0.0


def tolerance(rows):
    """(the rise a validation loss must exceed to count as overfitting, how it was found). A difference of
    two rounded values is uncertain by one unit of their last digit; a difference of two losses that each
    wobble by s has deviation s*sqrt(2), and we ask for two of those."""
    res = resolution([r["val_loss"] for r in rows if r.get("val_loss") is not None])
    noise = [r["val_noise"] for r in rows if r.get("val_noise") is not None]
    s = float(np.median(noise)) if noise else None
    tol = max(res, 2 * math.sqrt(2) * s if s else 0.0)
    if s and tol > res:
        return tol, (f"2*sqrt(2) x {s:.2g}, the median noise of a logged val loss about its trend, "
                     f"over {len(noise)} runs")
    return tol, "the resolution of the losses as written" + ("" if noise else
                                                             "; no logged curves to measure their noise")


def overfit_flags(rows, tol, shortest=None, whole_group=False):
    """({id(row): True | False | None}, [the rises that counted]). A run overfits when its validation loss
    is above the lowest of the shorter finished runs of the same model and data by more than tol; the
    shortest run gets `shortest` (None: unknown). whole_group: every run of a group with a rise overfits."""
    groups, flags, rises = {}, {}, []
    for r in rows:
        if not r.get("partial") and r.get("val_loss") is not None:
            groups.setdefault((r.get("source", ""), r["model"], r["data"]), []).append(r)
    # "shorter run", not "previous length": 125K 0.47, 250K 0.50, 500K 0.49 overfits twice
    for runs in groups.values():
        for r in runs:
            shorter = [s["val_loss"] for s in runs if s["iters"] < r["iters"]]
            rise = r["val_loss"] - min(shorter) if shorter else None
            flags[id(r)] = shortest if rise is None else rise > tol
            rises += [rise] if flags[id(r)] and rise is not None else []
        if whole_group and len({r["iters"] for r in runs}) > 1:
            flags.update({id(r): any(flags[id(s)] for s in runs) for r in runs})
    return flags, rises


def find_overfitting(rows, tol=0.0):
    """Set r['overfit'] (None when unknown) by the rule of overfit_flags. Returns {(source, model, data): [iters]}."""
    flags, found = overfit_flags(rows, tol)[0], {}
    for r in sorted(rows, key=lambda r: r["iters"]):
        r["overfit"] = flags.get(id(r))
        if r["overfit"]:
            found.setdefault((r.get("source", ""), r["model"], r["data"]), []).append(r["iters"])
    return found


def cell(rows, loss, m):
    r, n = pearson([row.get(loss) for row in rows], [row.get(m) for row in rows])
    return {"r": r, "n": n}  # n stays even when r is None: it says why there is no r


def within_model(rows, loss, m):
    """Pearson r with each model's mean loss and mean metric removed: does the loss still order the runs
    once model size (which lowers the loss and raises the accuracy at once) is taken out?"""
    x, y, k = [], [], 0
    for mo in sorted({r["model"] for r in rows}):
        pairs = [(r[loss], r[m]) for r in rows if r["model"] == mo and r.get(loss) is not None and r.get(m) is not None]
        if len(pairs) >= 2:  # one run of a model has no deviation from its mean
            a, b = np.array(pairs, dtype=float).T
            x, y, k = x + list(a - a.mean()), y + list(b - b.mean()), k + 1
    return dict(cell([{"l": a, "m": b} for a, b in zip(x, y)], "l", "m"), models=k)


def losses_of(rows):
    return [l for l in ("train_loss", "val_loss") if any(r.get(l) is not None for r in rows)]


def correlations(rows, metrics):
    """{subset: {loss: {metric: {'r', 'n'}}}} over the finished runs: all, overfit, non_overfit, and with
    several models each model alone and all of them within models. The paper's point: train loss flips
    sign on overfitting runs, val loss does not."""
    done = [r for r in rows if not r.get("partial")]
    subsets = {"all": done, "overfit": [r for r in done if r.get("overfit") is True],
               "non_overfit": [r for r in done if r.get("overfit") is False]}
    models = sorted({r["model"] for r in done}, key=model_key)
    out = {name: {loss: {m: cell(sub, loss, m) for m in metrics} for loss in ("train_loss", "val_loss")}
           for name, sub in subsets.items()}
    if len(models) > 1:
        out["within_model"] = {loss: {m: within_model(done, loss, m) for m in metrics}
                               for loss in ("train_loss", "val_loss")}
        for mo in models:
            sub = [r for r in done if r["model"] == mo]
            out[f"model {mo}"] = {loss: {m: cell(sub, loss, m) for m in metrics} for loss in ("train_loss", "val_loss")}
    return out


def overfit_rules(rows, metrics, tol):
    """{rule: {loss: {metric: {'overfit': cell, 'non_overfit': cell}}}}: the two subsets' r under the rule
    and the reasonable alternatives to it, so that a reader sees what those numbers depend on."""
    done = [r for r in rows if not r.get("partial")]
    rises = overfit_flags(done, tol)[1]
    low = min(rises, default=None)  # the least certain rise that counted: the first a stricter rule drops
    rules = {f"the rule (tolerance {tol:.2g}, shortest run unknown)": {},
             "shortest run counted as not overfitting": dict(shortest=False),
             "no tolerance: any rise": dict(tol=0.0) if tol > 0 else None,
             f"smallest counted rise (+{low or 0:.4f}) not counted": low and dict(tol=low),
             "whole model-data groups with a rise": dict(whole_group=True),
             "whole groups, smallest rise not counted": low and dict(tol=low, whole_group=True)}
    out = {}
    for name, kw in [(name, kw) for name, kw in rules.items() if kw is not None]:
        flags = overfit_flags(done, **dict(dict(tol=tol), **kw))[0]
        out[name] = {loss: {m: {k: cell([r for r in done if flags.get(id(r)) is f], loss, m)
                                for k, f in (("overfit", True), ("non_overfit", False))} for m in metrics}
                     for loss in losses_of(done)}
    return out


# ------------------------------------------------------------------------------------ prediction

# Finding 3 of arXiv 2206.04664 (sec. 4) as a tool (--predict above): a grid need not fine-tune every run to know
# which are worth it. One intercept per model, because model size moves the metric by itself; one slope shared by
# the models, because it is what the loss adds within a model, and sharing it lets a model with few fine-tuned
# runs borrow the others' evidence. The baseline, each model's mean, is the same fit without the loss column.
LEVEL = 0.90
MIN_RUNS = 2  # fine-tuned runs a model needs: one places its intercept, and leaving one out must leave one


def t_quantile(p, dof):
    """The p-quantile (p > 0.5) of Student's t with `dof` degrees of freedom (a whole number, or math.inf), by
    bisection on its exact distribution: for whole dof, P(|T| < t) is a finite sum of powers of cos(theta),
    theta = atan(t / sqrt(dof)) (Abramowitz and Stegun 26.7.3 and 26.7.4), so scipy is not needed."""
    def central(t):  # P(|T| < t)
        if math.isinf(dof) or dof > 10000:  # the normal's, within 2e-4 of t's; the sum would need dof / 2 terms
            return math.erf(t / math.sqrt(2))
        th = math.atan(t / math.sqrt(dof))
        c2, term, total = math.cos(th) ** 2, 1.0, 1.0
        for k in range(1, dof // 2):
            term *= c2 * ((2 * k - 1) / (2 * k) if dof % 2 == 0 else 2 * k / (2 * k + 1))
            total += term
        if dof % 2 == 0:
            return math.sin(th) * total
        return 2 / math.pi * (th + (math.sin(th) * math.cos(th) * total if dof > 1 else 0))
    lo, hi = 0.0, 1.0
    while central(hi) < 2 * p - 1:
        hi *= 2
    for _ in range(60):
        lo, hi = ((lo + hi) / 2, hi) if central((lo + hi) / 2) < 2 * p - 1 else (lo, (lo + hi) / 2)
    return (lo + hi) / 2


def ols(models, x, y):
    """Least squares of y on one intercept per model and, unless x is None, one slope on x shared by the models.
    Returns predict(model, x0) -> (value, half width of its LEVEL prediction interval), or None when the runs
    cannot give an interval (no residual degree of freedom, or an x that varies within no model). The interval
    is t * s * sqrt(1 + v' (X'X)^-1 v): s, the residual sd, is the noise of a new run; the leverage term, the
    uncertainty of the fitted line at v (wider for a loss far from the fitted runs', or a model with few runs)."""
    names = sorted(set(models))
    row = lambda m, v: [float(m == n) for n in names] + ([] if x is None else [v])
    X = np.array([row(m, v) for m, v in zip(models, [None] * len(models) if x is None else x)])
    y = np.asarray(y, dtype=float)
    coef, _, rank, _ = np.linalg.lstsq(X, y, rcond=None)
    dof = len(y) - X.shape[1]  # n - models - 1 (the slope), or n - models for the baseline
    if rank < X.shape[1] or dof < 1:
        return None
    s, inv = math.sqrt(((y - X @ coef) ** 2).sum() / dof), np.linalg.inv(X.T @ X)
    t = t_quantile((1 + LEVEL) / 2, dof)

    def predict(model, x0=None):
        v = np.array(row(model, x0))
        return float(v @ coef), t * s * math.sqrt(1 + v @ inv @ v)
    return predict


def fit_runs(rows, metric, loss):
    """(the runs a fit of `metric` on `loss` uses, {model: why it is left out}): the finished pre-trainings that
    have both (a run from scratch has no loss), of the models with MIN_RUNS of them."""
    runs = [r for r in rows if r["iters"] and not r.get("partial") and r.get(metric) is not None
            and r.get(loss) is not None]
    count = {}
    for r in runs:
        count[r["model"]] = count.get(r["model"], 0) + 1
    few = {m: f"model {m}: {n} fine-tuned run(s) with a {loss}, a fit needs {MIN_RUNS}"
           for m, n in count.items() if n < MIN_RUNS}
    return [r for r in runs if r["model"] not in few], few


def leave_one_out(runs, metric, loss):
    """Each run predicted by the fit on all the others (loss None: the model-mean baseline): ({'mae',
    'coverage90', 'n'}, [(run, predicted, half width)]), or (None, []) when a fit has no degree of freedom left."""
    points = []
    for i, r in enumerate(runs):
        rest = runs[:i] + runs[i + 1:]
        fit = ols([q["model"] for q in rest], loss and [q[loss] for q in rest], [q[metric] for q in rest])
        if fit is None:
            return None, []
        points.append((r, *fit(r["model"], loss and r[loss])))
    errors = np.array([abs(p - r[metric]) for r, p, h in points])
    inside = errors <= np.array([h for r, p, h in points])
    return dict(mae=float(errors.mean()), coverage90=float(inside.mean()), n=len(points)), points


def predict_runs(rows, targets, metric):
    """`metric` predicted from the validation loss for each run of `targets`, by the fit on the runs of `rows`
    that have it: ([(run, predicted, half width)] best first, [(run, why it cannot be predicted)])."""
    runs, few = fit_runs(rows, metric, "val_loss")
    fit = ols([r["model"] for r in runs], [r["val_loss"] for r in runs], [r[metric] for r in runs]) if runs else None
    models = {r["model"] for r in runs}

    def why_not(r):
        if r.get("partial"):
            return "an unfinished pre-training"
        if r.get("val_loss") is None:
            return "no validation loss"
        if r["model"] not in models:
            return few.get(r["model"], f"model {r['model']}: no fine-tuned run with a val_loss, a fit needs {MIN_RUNS}")
        return None if fit else f"{len(runs)} fine-tuned runs are too few for a fit (it needs models + 2)"
    done = [(r, *fit(r["model"], r["val_loss"])) for r in targets if not why_not(r)]
    cannot = [(r, why_not(r)) for r in targets if why_not(r)]
    return sorted(done, key=lambda p: -p[1]), cannot


# ------------------------------------------------------------------------------------ tables and figures

def model_key(m):
    return MODELS.index(m) if m in MODELS else len(MODELS), m


def ordered(rows):
    """Sort rows: models by size, data by number of images (the data-size axis), then iterations."""
    size = {}
    for r in rows:  # an in-progress run may not know its subset size yet: borrow it from its peers
        size[r["data"]] = size.get(r["data"]) or r.get("images")
    for r in rows:
        r["images"] = r.get("images") or size[r["data"]]
    datas = sorted(size, key=lambda d: (size[d] is None, size[d] or 0, d))
    rows.sort(key=lambda r: (model_key(r["model"]), datas.index(r["data"]), r["iters"]))
    return sorted({r["model"] for r in rows}, key=model_key), datas


def kilo(i):
    return f"{i // 1000}K" if i >= 1000 and i % 1000 == 0 else str(i)


def fmt(v, digits):
    return "—" if v is None else f"{v:.{digits}f}"


def md_table(header, body):
    return "\n".join("| " + " | ".join(map(str, l)) + " |" for l in [header, ["---"] * len(header)] + body)


def with_seeds(r, m):
    """'61.50 (n=3, sd 2.12)': a mean over downstream runs says over how many, and how far apart they were."""
    n, sd = r.get("seeds", {}).get(m, (None, None))
    return fmt(r.get(m), 2) + ("" if n is None or r.get(m) is None else
                               f" (n={n}" + (f", sd {sd:.2f})" if sd is not None else ")"))


def tables(rows, models, datas, metrics, overfit, corr, rules, tol, tol_text):
    """The markdown report: results grid, best metric (from scratch beside it), overfitting, correlations."""
    done = [r for r in rows if not r.get("partial")]
    iters = sorted({r["iters"] for r in rows if r["iters"]})  # 0: from scratch, no pre-training to show
    # the grid, one line per (model, data), cells "val loss / metric" as in the paper's table
    losses = losses_of(rows)
    cells = {(r["model"], r["data"], r["iters"]): r for r in rows}
    show = lambda r: " / ".join([fmt(r.get(l), 4) for l in losses] + [with_seeds(r, m) for m in metrics]) \
        + ("*" if r.get("partial") else "")
    grid = [[m, d] + [show(cells[m, d, i]) if (m, d, i) in cells else "" for i in iters]
            for m in models for d in datas if any((m, d, i) in cells for i in iters)]
    seeds = " (mean of n downstream runs, their sd)" if any(r.get("seeds") for r in rows) else ""
    out = [f"### Results: {' / '.join(losses + metrics)}{seeds}",
           md_table(["model", "data"] + list(map(kilo, iters)), grid)]
    if len(done) < len(rows):
        out.append("\n\\* unfinished (no summary.json, or stopped before its last step): last logged values, "
                   "left out of the tables below and of the correlations")
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
    # overfitting groups with their val loss by length, so a reader sees the rise, the data-scaling paper's
    # sign of overfitting (arXiv 2206.04664)
    body = [[mo, d, ", ".join(f"{kilo(r['iters'])} {r['val_loss']:.4f}" for r in done
                              if (r["model"], r["data"]) == (mo, d) and r.get("val_loss") is not None),
             ", ".join(map(kilo, its))] for (source, mo, d), its in overfit.items()]
    out += [f"\n### Overfitting: the val loss is above that of a shorter run of the same model and data by more "
            f"than {tol:.2g} ({tol_text}); the shortest run of each: unknown",
            md_table(["model", "data", "val loss by iterations", "overfitting runs"], body) if body
            else "none found (it takes two or more lengths of the same model and data)"]
    live = [f"{r['model']} {r['data']} {kilo(r['iters'])}" for r in rows if r.get("overfitting_live")]
    out += ([f"\nFlagged by their own log (the val loss rose at two evaluations in a row): {', '.join(live)}"]
            if live else [])
    # n in every cell: an r from 4 runs and an r from 63 runs are not the same evidence
    body = [[sub.replace("within_model", "within models"), loss] + [f"{fmt(c['r'], 3)} (n={c['n']})"
                                                                     for c in per_metric.values()]
            for sub, per_loss in corr.items() for loss, per_metric in per_loss.items() if loss in losses]
    no_loss = " (no train_loss in these runs)" if losses == ["val_loss"] else ""
    out += [f"\n### Pearson r of the pre-training loss with each fine-tuning metric (n = runs){no_loss}",
            md_table(["runs", "loss"] + metrics, body) if metrics else "no fine-tuning metrics yet"]
    if metrics and rules:
        body = [[rule, loss] + [" / ".join(f"{fmt(c[k]['r'], 3)} (n={c[k]['n']})" for k in ("overfit", "non_overfit"))
                                for c in per_metric.values()]
                for rule, per_loss in rules.items() for loss, per_metric in per_loss.items()]
        out += ["\n### Overfit / non-overfit r under other overfitting rules",
                md_table(["rule", "loss"] + metrics, body)]
    return "\n".join(out)


def figures(rows, models, datas, metrics, corr, out, suffix):
    """Val loss vs iterations; each metric vs data size and vs the two losses, with the baseline from
    scratch as a horizontal line. Per-model panels share their y-axis, so models compare at a glance as
    they do in the tables. Returns the PNG paths."""
    paths, iters = [], sorted({r["iters"] for r in rows if r["iters"]})
    scratch = {r["model"]: r for r in rows if r["iters"] == 0}  # no pre-training: no loss, no data size
    datas = [d for d in datas if any(r["data"] == d and r["iters"] for r in rows)]
    panels = lambda n, share: plt.subplots(1, n, figsize=(4.2 * n, 3.8), squeeze=False, layout="constrained",
                                           sharex=share, sharey=share)

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

    fig, axes = panels(len(models), True)  # 1. one panel per model, one line per data size
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
    # the data axis is the number of images, on a log scale (10 % to IN-22K is a factor of 110); data of
    # unknown size leave only an order, and then the axis says so
    images = {r["data"]: r.get("images") for r in rows}
    known = all(images.get(d) for d in datas)
    xpos = {d: images[d] if known else i for i, d in enumerate(datas)}
    for m in [m for m in metrics if any(r.get(m) is not None for r in rows)]:
        fig, axes = panels(len(models), True)  # 2. one panel per model, one line per training length
        for ax, mo in zip(axes[0], models):
            for i in iters:
                run = [r for r in rows if (r["model"], r["iters"]) == (mo, i) and r.get(m) is not None
                       and not r.get("partial")]
                if run:  # error bars: the sd of the downstream runs (seeds) each point is the mean of
                    sd = [(r.get("seeds", {}).get(m) or (1, None))[1] or 0 for r in run]
                    ax.errorbar([xpos[r["data"]] for r in run], [r[m] for r in run], yerr=sd, fmt="o-",
                                capsize=3, label=f"{kilo(i)} iters")
            baseline(ax, m, [mo], "from scratch")
            ax.set(title=f"SwinV2-{mo}", ylabel=m, xlabel="pre-training images (log scale)" if known else
                   "pre-training data (ordered by size, evenly spaced)")
            if known:
                ax.set_xscale("log")
            ax.set_xticks([xpos[d] for d in datas], datas, rotation=30, ha="right", fontsize=8)
            ax.minorticks_off()
        save(fig, axes, f"{m}_vs_data")
        fig, axes = panels(2, False)  # 3. the paper's correlation figure: green and red circles
        for ax, loss in zip(axes[0], ("val_loss", "train_loss")):
            for flag, style in ((False, dict(c="green", label="not overfitting")),
                                (True, dict(c="red", label="overfitting")),
                                (None, dict(facecolors="none", edgecolors="gray", label="unknown (shortest run)"))):
                xy = [(r[loss], r[m]) for r in rows if r["iters"] and not r.get("partial")
                      and r.get("overfit") is flag and r.get(loss) is not None and r.get(m) is not None]
                sub = corr.get({False: "non_overfit", True: "overfit"}.get(flag), {}).get(loss, {}).get(m)
                if xy:  # each group's own r in the legend: the table's numbers, on the figure
                    label = style.pop("label") + (f": r = {fmt(sub['r'], 3)}" if sub else "") + f", n = {len(xy)}"
                    ax.scatter(*zip(*xy), alpha=0.7, label=label, **style)
            baseline(ax, m, models, "SwinV2-{} from scratch")
            if not ax.collections:  # the paper released no training losses, for one
                ax.text(0.5, 0.5, f"no runs with a {loss}", ha="center", transform=ax.transAxes)
            c, w = corr["all"][loss][m], corr.get("within_model", {}).get(loss, {}).get(m)
            ax.set(xlabel=f"pre-training {loss.replace('_', ' ')}", ylabel=m,
                   title=f"all: r = {fmt(c['r'], 3)}, n = {c['n']}"
                         + (f"\nwithin models: r = {fmt(w['r'], 3)}" if w else ""))
        save(fig, axes, f"{m}_vs_loss")
    return paths


def predict_figure(points, metric, out, suffix):
    """One panel per fit (val loss, train loss, model mean): each held-out run's prediction against its measured
    metric, with its interval, one colour per model, on the line where they are equal."""
    fig, axes = plt.subplots(1, len(points), figsize=(4.4 * len(points), 4.2), squeeze=False, layout="constrained",
                             sharex=True, sharey=True)
    what = dict(val_loss="from the val loss", train_loss="from the train loss", model_mean="each model's mean")
    for ax, (fit, (res, pts)) in zip(axes[0], points.items()):
        for mo in sorted({r["model"] for r, _, _ in pts}, key=model_key):
            x, y, h = zip(*[(r[metric], p, h) for r, p, h in pts if r["model"] == mo])
            ax.errorbar(x, y, yerr=h, fmt="o", ms=4, capsize=2, alpha=0.8, label=f"SwinV2-{mo}")
        ends = [min(r[metric] for r, _, _ in pts), max(r[metric] for r, _, _ in pts)]
        ax.plot(ends, ends, "k--", lw=1, label="predicted = measured")
        ax.set(xlabel=f"measured {metric}", ylabel=f"predicted, leave-one-out ({LEVEL * 100:.0f} % interval)",
               title=f"{what[fit]}: MAE {res['mae']:.2f}\n"
                     f"{res['coverage90'] * 100:.0f} % of {res['n']} inside the interval")
        ax.legend(fontsize=8)
    path = os.path.join(out, f"{metric}_predicted{suffix}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def predictions(rows, metrics, out, suffix):
    """--predict: per metric, the leave-one-out table (the fit on the val loss, on the train loss, each model's
    mean), the finished pre-trainings without that metric predicted from their val loss, best first ("fine-tune
    these first"), and those it cannot predict, with why; predictions{suffix}.json and one figure per metric (the
    held-out runs, predicted against measured). Returns (markdown, the PNG paths)."""
    name = lambda r: r.get("run_dir") or f"{r['model']} {r['data']} {kilo(r['iters'])}"
    loo, ranked, cannot, body, pngs = {}, [], [], [], []
    for m in metrics:
        runs, few = fit_runs(rows, m, "val_loss")
        train_runs, few_train = fit_runs(rows, m, "train_loss")
        for why in list(few.values()) + list(few_train.values()):
            note(f"{m}: {why}; skipped")
        fits = {"val_loss": (runs, "val_loss"), "train_loss": (train_runs, "train_loss"), "model_mean": (runs, None)}
        points = {k: leave_one_out(use, m, loss) for k, (use, loss) in fits.items() if use}
        if points.get("val_loss", (None,))[0]:
            loo[m] = {k: points.get(k, (None,))[0] for k in fits}
            cell = lambda c: "n/a" if c is None else f"{c['mae']:.2f} ({c['coverage90'] * 100:.0f} % of {c['n']})"
            body.append([m] + [cell(c) for c in loo[m].values()])
            pngs.append(predict_figure({k: v for k, v in points.items() if v[0]}, m, out, suffix))
        else:
            note(f"{m}: {len(runs)} fine-tuned run(s) of {len({r['model'] for r in runs})} model(s) are too few for a "
                 "leave-one-out fit on the val loss (it needs models + 3); skipped")
        done, no = predict_runs(rows, [r for r in rows if r["iters"] and r.get(m) is None], m)
        ranked += [dict(run=name(r), model=r["model"], metric=m, predicted=p, lo90=p - h, hi90=p + h)
                   for r, p, h in done]
        cannot += [dict(run=name(r), metric=m, why=why) for r, why in no]
    with open(os.path.join(out, f"predictions{suffix}.json"), "w") as f:
        json.dump(dict(loo=loo, predictions=ranked, cannot=cannot), f, indent=1)
    text = [f"\n### Each metric predicted from the pre-training loss, leave-one-out: mean absolute error (share of "
            f"the held-out runs inside the {LEVEL * 100:.0f} % prediction interval, of n)",
            md_table(["metric", "from the val loss", "from the train loss", "each model's mean"], body) if body
            else "no metric has enough fine-tuned runs for a fit"]
    text += [f"\n### Fine-tune these first: predicted from the val loss ({LEVEL * 100:.0f} % interval), best first",
             md_table(["metric", "run", "model", "predicted", "interval"], [
                 [p["metric"], p["run"], p["model"], f"{p['predicted']:.2f}", f"{p['lo90']:.2f} to {p['hi90']:.2f}"]
                 for p in ranked]) if ranked else "none" + ("" if cannot else ": every finished pre-training has "
                                                             "all its metrics")]
    why = {}
    for c in cannot:  # one line per reason, not per run
        why.setdefault((c["metric"], c["why"]), []).append(c["run"])
    text += [f"\nCannot predict ({len(cannot)}):"] + [f"- {m}, {w}: {', '.join(rs)}" for (m, w), rs in why.items()] \
        if cannot else []
    return "\n" + "\n".join(text), pngs


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


def check_recipes(src, rows, pool):
    """Refuse to pool pre-training runs of different recipes in one r, unless asked: their losses measure
    different things (another image size, mask or validation set moves the loss, not the model)."""
    recipes = {}
    for r in rows:
        if r.get("recipe"):  # a table's rows do not say
            recipes.setdefault(json.dumps(r["recipe"], sort_keys=True), r)
    if len(recipes) > 1 and not pool:
        a, b = list(recipes.values())[:2]
        raise SystemExit(f"analyze.py: the {src} runs have {len(recipes)} pre-training recipes ({a['run_dir']} and "
                         f"{b['run_dir']}: {differ(a['recipe'], b['recipe'])}); analyze them separately, or pass "
                         "--pool_recipes")


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", help="run dirs of mim.py and of the downstream scripts; globs allowed "
                   "(default out/*)")
    p.add_argument("--csv", help="a table: model,data,iters,train_loss,val_loss and one column per metric")
    p.add_argument("--paper", action="store_true", help="add the authors' 63 released runs (paper_runs.csv)")
    p.add_argument("--out", help="folder for tables.md, runs.csv, correlations.json, PNGs (default analysis, "
                   "analysis/paper for --paper alone); refused if it holds another analysis")
    p.add_argument("--overfit_tol", type=float, default=None, help="the rise of the val loss that counts as "
                   "overfitting; default: the losses' own spread (see above)")
    p.add_argument("--pool_recipes", action="store_true", help="pool pre-training runs of different recipes "
                   "(image size, window, mask, target normalisation, validation set) in one r")
    p.add_argument("--predict", action="store_true", help="predict each metric from the val loss: leave-one-out "
                   "errors against the train loss and each model's mean, the runs to fine-tune first "
                   "(predictions.json, {metric}_predicted.png)")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    patterns = args.runs or ([] if args.csv or args.paper else ["out/*"])  # out/* only by default
    out = args.out or ("analysis/paper" if args.paper and not patterns and not args.csv else "analysis")
    rel = lambda p: os.path.relpath(os.path.abspath(p), os.path.abspath(out))
    inputs = dict(runs=sorted({rel(p) for p in patterns}), csv=args.csv and rel(args.csv), paper=args.paper)
    command = shlex.join(["analyze.py"] + (sys.argv[1:] if argv is None else argv))
    old_files = own_files(out, inputs)
    left_out = []  # (what, why, its metrics): every input that counts nowhere, named
    rows = load_runs(patterns, left_out) + (load_csv(args.csv) if args.csv else [])
    rows += load_csv(PAPER_CSV, source="paper") if args.paper else []
    if not rows:
        raise SystemExit(f"analyze.py: no runs found in {' '.join(patterns) or args.csv}; "
                         "pass run directories, --csv FILE or --paper")
    rows = one_per_run(rows, left_out)
    sources = sorted({r["source"] for r in rows}, key=lambda s: (s == "paper", s != "ours", s))  # ours first
    for src in sources:  # before anything is written
        check_recipes(src, [r for r in rows if r["source"] == src], args.pool_recipes)
    os.makedirs(out, exist_ok=True)
    write_manifest(out, command, inputs, old_files)  # claims the folder before writing into it
    written = ["tables.md", "runs.csv"]
    report, in_order = [], []
    # ours and the paper's side by side, never mixed in one statistic: our losses come from
    # another validation protocol (and maybe tiny models), so a pooled r would mean nothing
    for src in sources:
        sub = [r for r in rows if r["source"] == src]
        models, datas = ordered(sub)
        metrics = sorted({k for r in sub for k in r if k not in META})
        pre = [r for r in sub if r["iters"]]  # from scratch (0 iterations): no pre-training loss to judge
        tol, tol_text = (args.overfit_tol, "--overfit_tol") if args.overfit_tol is not None else tolerance(pre)
        overfit = find_overfitting(pre, tol)  # flags the rows; the correlation subsets need it first
        corr, rules = correlations(pre, metrics), overfit_rules(pre, metrics, tol)
        unfinished = [r.get("run_dir") or f"{r['model']} {r['data']} {kilo(r['iters'])}"
                      for r in pre if r.get("partial")]
        if unfinished:
            note(f"{len(unfinished)} unfinished {src} run(s) left out of the correlations: {', '.join(unfinished)}")
        suffix = "" if src == sources[0] else f"_{src}"  # the first source gets the plain file names
        written.append(f"correlations{suffix}.json")
        with open(os.path.join(out, written[-1]), "w") as f:
            json.dump(dict(corr, overfit_tolerance=tol, overfit_rules=rules), f, indent=1)
        pngs = figures(sub, models, datas, metrics, corr, out, suffix)
        predicted, more = predictions(sub, metrics, out, suffix) if args.predict else ("", [])
        written += [os.path.basename(p) for p in pngs + more] + ([f"predictions{suffix}.json"] if args.predict else [])
        report.append(f"## {src} runs ({len(sub)})\n\n"
                      + tables(sub, models, datas, metrics, overfit, corr, rules, tol, tol_text) + predicted
                      + "\n\nFigures: " + ", ".join(pngs + more) + "\n")
        in_order += sub
    if left_out:
        values = lambda v: ", ".join(f"{k} {x:.2f}" for k, x in v.items())
        report.append(f"## Left out ({len(left_out)})\n\n"
                      + md_table(["run", "why", "its metrics"], [[d, why, values(v)] for d, why, v in left_out]) + "\n")
    print("\n".join(report))
    with open(os.path.join(out, "tables.md"), "w") as f:
        f.write("\n".join(report))
    metrics = sorted({k for r in in_order for k in r if k not in META})
    # flags as 0/1, 500000.0 as 500000, a missing value as an empty cell
    whole = lambda v: isinstance(v, bool) or (isinstance(v, float) and v.is_integer())
    fmt_cell = lambda v: "" if v is None else int(v) if whole(v) else v
    header = CSV_COLS + [m + s for m in metrics for s in ("",) + SEED_COLS]
    seeds = lambda r, m: list(r.get("seeds", {}).get(m, (None, None)))
    with open(os.path.join(out, "runs.csv"), "w", newline="") as f:
        csv.writer(f).writerows([header] + [[fmt_cell(v) for v in [r.get(c) for c in CSV_COLS]
                                             + [x for m in metrics for x in [r.get(m)] + seeds(r, m)]]
                                            for r in in_order])
    for f in set(old_files) - set(written):  # e.g. the figures of a metric that is gone since
        if os.path.isfile(os.path.join(out, f)):
            os.remove(os.path.join(out, f))
    write_manifest(out, command, inputs, written)


if __name__ == "__main__":
    main()
