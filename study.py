"""
The paper as one object: plan the grid's cost, launch it (SLURM jobs with torchrun inside, or this machine),
watch every run. "On Data Scaling in Masked Image Modeling" is 63 SimMIM pre-trainings (paper_runs.csv: sizes
S/B/L/H/g x 10/20/50/100 % of IN-1K and IN-22K x 125K/250K/500K iterations), each fine-tuned on IN-1K, and
the S/B/L ones also on iNaturalist 2018, COCO and ADE20K (arXiv 2206.04664). This file teaches four things:

  1. What a run costs: model FLOPs per image, counted layer by layer as torch's FlopCounterMode counts them
     (bench.py's number; a test checks they agree), x images seen / (utilisation x peak FLOP/s) = GPU-hours.
  2. How a multi-node torchrun job survives a time limit or a preemption on SLURM: signal, save, requeue,
     resume (SBATCH below, each line with its reason).
  3. How to read a run's state from its files alone: the run directory that train.py writes (args.json,
     log.jsonl, ckpt.pt, summary.json).
  4. Which pre-trainings are worth fine-tuning: the paper's Finding 3 (the validation loss predicts fine-tuning,
     sec. 4) turned into a prediction of top-1 with its interval (analyze.py's fit), to fine-tune the best first.

    python study.py plan --grid paper                                # GPU-hours of the 63 runs and their fine-tunes
    python study.py plan --grid paper --bench gpu_report.json        # measured img/s (bench.py --what gpu) instead
    python study.py launch --grid paper --executor slurm --out study/paper --nodes 2 --partition gpu
    bash study/paper/submit.sh                                       # pre-trainings, then fine-tunes (afterok)
    python study.py status study/paper                               # one row per run, read from its directory
    python study.py launch --grid miniature --executor local --out study/mini   # this machine, run after run
    python study.py launch --grid paper --executor slurm --out study/paper --tasks none   # pre-trainings only...
    python study.py launch --grid paper --executor slurm --out study/paper --finetune_top 2 --predict_from paper
                                                  # ...then fine-tune the 2 best-predicted finished runs of each size

A grid FILE is a CSV with the header model,data,frac,iters and optional columns images (training images of a
data path) and tasks (downstream tasks of the row, space-separated: in1k inat18 coco ade20k synthetic). data is
IN-1K, IN-22K, synthetic or a path. study.py imports no torch: it reads and writes files and runs the scripts.
"""
import argparse
import contextlib
import csv
import fcntl
import glob
import io
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

import analyze  # its fit of top-1 on the validation loss (Finding 3), for status and --finetune_top

ROOT = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# what a grid is made of: model sizes, pre-training data, downstream tasks

# SwinV2 sizes: width C, depths, head dim, pre-training image size and window. A copy of swinv2.PRESETS and
# SwinV2Config's defaults, so that planning needs no torch; tests/test_study.py checks that the copy is exact.
SIZES = {
    "S": (96, (2, 2, 18, 2), 32, 192, 12), "B": (128, (2, 2, 18, 2), 32, 192, 12),
    "L": (192, (2, 2, 18, 2), 32, 192, 12), "H": (352, (2, 2, 18, 2), 32, 192, 12),
    "g": (448, (2, 2, 18, 2), 32, 192, 12),
    "tiny": (32, (2, 2, 2, 2), 32, 64, 4), "nano": (16, (2, 2, 2, 2), 16, 64, 4),
}
PAPER_SIZES = ("S", "B", "L", "H", "g")
# A first try per GPU on 80 GB (unmeasured; docs/study.md), and the sizes that need --grad_ckpt. Both flags are free:
# they change memory and speed, never the result, and a resumed run may change them.
MICRO_BATCH = {"S": 128, "B": 128, "L": 64, "H": 64, "g": 32}
GRAD_CKPT = ("H", "g")

# pre-training data: folder under --data_root ('synthetic' is built in), extra mim.py flags, training images
DATASETS = {
    "IN-1K": ("imagenet", (), 1281167),
    "IN-22K": ("in22k/train.txt", ("--val_data", "{root}/imagenet/val"), 14197122),  # validation loss on IN-1K val
    "synthetic": (None, ("--mask_patch", "16"), 2000),  # the miniature's 16 px cells (miniature.sh)
}
# downstream tasks: script, folder under --data_root, extra flags, training images, classes (0: a dense task)
TASKS = {
    "in1k": ("finetune.py", "imagenet", ("--task", "in1k"), 1281167, 1000),
    "inat18": ("finetune.py", "inat2018", (), 437513, 8142),
    "coco": ("detect.py", "coco", (), 118287, 0),
    "ade20k": ("segment.py", "ADEChallengeData2016", (), 20210, 0),
    "synthetic": ("finetune.py", None, (), 2000, 10),
}
# Each script's default schedule (its RECIPES; the tests check this copy): epochs or iterations, global batch,
# flag and value of the input size, window; "paper" for S..g, "demo" for nano and tiny.
SCHEDULES = {
    "mim.py": {"paper": ("--iters", 500000, 2048, "--img_size", 192, 12),
               "demo": ("--iters", 300, 64, "--img_size", 64, 4)},
    "finetune.py": {"paper": ("--epochs", 100, 2048, "--img_size", 224, 14),
                    "demo": ("--epochs", 3, 32, "--img_size", 64, 4)},
    "detect.py": {"paper": ("--epochs", 36, 16, "--img_size", 1024, 16),
                  "demo": ("--epochs", 3, 8, "--img_size", 128, 4)},
    "segment.py": {"paper": ("--iters", 160000, 16, "--crop", 512, 16),
                   "demo": ("--iters", 1000, 16, "--crop", 64, 4)},
}


def cell(model, data, frac, iters, images=None, tasks=()):
    """One pre-training of the grid and its downstream tasks, checked. images: training images of `data`
    (known for the named sets; for a path, the CSV may say), so that epochs can be printed."""
    if model not in SIZES:
        raise ValueError(f"model {model!r}: choose from {', '.join(SIZES)}")
    if not 0 < frac <= 1:
        raise ValueError(f"frac {frac:g} must be in (0, 1]")
    if iters < 1:
        raise ValueError(f"iters {iters} must be at least 1")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"task {unknown[0]!r}: choose from {', '.join(TASKS)}")
    images = images or (DATASETS[data][2] if data in DATASETS else None)
    return dict(model=model, data=data, frac=frac, iters=iters, images=images, tasks=tuple(tasks))


def paper_cells():
    """The 63 released runs (paper_runs.csv, whose data reads 'IN-1K 10%'): all fine-tuned on IN-1K, and S/B/L
    also on iNat18, COCO and ADE20K, the tasks the paper ran with those sizes only."""
    cells = []
    with open(os.path.join(ROOT, "paper_runs.csv")) as f:
        for row in csv.DictReader(line for line in f if not line.startswith("#")):
            data, _, pct = row["data"].partition(" ")
            extra = ("inat18", "coco", "ade20k") if row["model"] in ("S", "B", "L") else ()
            cells.append(cell(row["model"], data, float(pct.rstrip("%")) / 100 if pct else 1.0, int(row["iters"]),
                              tasks=("in1k",) + extra))
    return cells


def miniature_cells():
    """miniature.sh's grid: tiny and nano x 1, 2.5, 10, 100 % of the synthetic set x 600 and 150 steps (the
    longest first), each fine-tuned on the synthetic set; the grid adds seeds 0, 1, 2 and runs from scratch.
    (miniature.sh also runs detect.py and segment.py from tiny's 600-step runs: not part of this grid.)"""
    return [cell(m, "synthetic", frac, iters, tasks=("synthetic",))
            for m in ("tiny", "nano") for frac in (0.01, 0.025, 0.1, 1) for iters in (600, 150)]


def file_cells(path):
    """A user's grid: CSV rows model,data,frac,iters[,images][,tasks]; a bad row is named with what is valid."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(line for line in f if line.strip() and not line.startswith("#")))
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--grid {path}: cannot read it ({e})") from None
    if not rows or not {"model", "data", "frac", "iters"} <= set(rows[0]):
        raise ValueError(f"--grid {path}: want a CSV with the header model,data,frac,iters[,images][,tasks] "
                         "and one row per run")
    cells = []
    for i, row in enumerate(rows, 1):
        try:
            if None in row or any(row[k] is None for k in ("model", "data", "frac", "iters")):
                raise ValueError("wrong number of fields")
            images = int(row["images"]) if (row.get("images") or "").strip() else None
            cells.append(cell(row["model"].strip(), row["data"].strip(), float(row["frac"]), int(row["iters"]), images,
                              (row.get("tasks") or "").split()))
        except (ValueError, TypeError) as e:
            raise ValueError(f"--grid {path}, row {i} ({','.join(v or '' for v in row.values())}): {e}") from None
    return cells


def read_grid(spec):
    """(cells, default seeds, runs from scratch too) for --grid paper | miniature | FILE."""
    if spec == "paper":
        return paper_cells(), (0,), False
    if spec == "miniature":
        return miniature_cells(), (0, 1, 2), True
    if not os.path.isfile(spec):
        raise ValueError(f"--grid {spec!r}: use 'paper', 'miniature' or a CSV file "
                         "(model,data,frac,iters[,images][,tasks])")
    return file_cells(spec), (0,), False


# -----------------------------------------------------------------------------
# what a run costs: model FLOPs per image, images seen, GPU-hours


def encoder_flops(model, img, window):
    """Forward FLOPs of the encoder on one image, counted as FlopCounterMode counts them: 2 per multiply-add of
    every matmul and convolution (norms, softmax and GELU are not counted). Returns (per image, per forward):
    the two layers of the position-bias MLP run once per forward, whatever the batch."""
    C, depths, head_dim = SIZES[model][:3]
    res = img // 4  # patch 4
    per_image = 2 * res * res * C * 3 * 4 * 4  # patch embedding: a 4x4 stride-4 conv, 3 -> C channels
    mlp = [0, 0]  # position-bias MLP: Linear(2, 512), then Linear(512, heads)
    for i, depth in enumerate(depths):
        c, r = C * 2**i, res // 2**i  # width and side of stage i
        w, L = min(window, r), r * r  # a window larger than the map is clamped to it (192 px, w12: 12,12,12,6)
        # a block: qkv (3c x c), proj (c x c) and the MLP (4c x c twice): 24 L c^2; attention inside windows
        # of w*w tokens: q k^T and attn v, each 2 L (w*w) c
        per_image += depth * (24 * L * c * c + 4 * L * w * w * c)
        table = (2 * w - 1) ** 2  # relative offsets in a window
        mlp[0] += depth * 2 * table * 2 * 512
        mlp[1] += depth * 2 * table * 512 * (c // head_dim)
        if i < len(depths) - 1:  # patch merging: Linear(4c -> 2c) on L/4 tokens
            per_image += 4 * L * c * c
    return per_image, mlp


def train_flops(model, img, window, head, batch=None):
    """Model FLOPs of one training image, forward and backward. A matmul's backward costs two of its forwards
    (the gradients of its input and its weight), except where the input needs no gradient: the patch embedding
    (its input is the image) and the first layer of the position-bias MLP (a fixed table) cost one.
    head: 'simmim' (the 1x1 conv to 32*32*3 values per 32 px cell), a number of classes (a linear classifier),
    or 0 (detection, segmentation: the encoder alone, so the Mask R-CNN / UPerNet heads are missing: a lower
    bound). batch: the micro-batch that shares the per-forward MLP; None leaves it out (< 0.1 % at batch 32+)."""
    C, depths = SIZES[model][:2]
    forward, (mlp1, mlp2) = encoder_flops(model, img, window)
    top = C * 2 ** (len(depths) - 1)  # width of the last stage
    forward += 2 * (img // 32) ** 2 * top * 32 * 32 * 3 if head == "simmim" else 2 * top * head
    embed = 2 * (img // 4) ** 2 * C * 48
    return 3 * forward - embed + ((2 * mlp1 + 3 * mlp2) / batch if batch else 0)


def flag(flags, name, default=None):
    """The value a script will see for --name: argparse keeps the last one given."""
    value = default
    for i, word in enumerate(flags):
        if word == name and i + 1 < len(flags):
            value = flags[i + 1]
        elif word.startswith(name + "="):
            value = word.split("=", 1)[1]
    return value


def cost(job):
    """Images seen, epochs and training GFLOP per image of a job, from its own flags (so what is planned is
    what runs, with every --pretrain_args / --finetune_args override)."""
    f, m = job["flags"], job["model"]
    unit, length, batch, size_flag, img, window = SCHEDULES[job["script"]]["paper" if m in PAPER_SIZES else "demo"]
    if job["script"] == "mim.py":
        img, window = SIZES[m][3], SIZES[m][4]
    length, batch = int(flag(f, unit, length)), int(flag(f, "--batch_size", batch))
    img, window = int(flag(f, size_flag, img)), int(flag(f, "--window", window))
    if job["task"] is None:  # pre-training: iterations of `batch` images over a subset of round(frac * N)
        n = job["subset"]
        images, head = length * batch, "simmim"
    else:  # fine-tuning: epochs of N // batch steps (the scripts drop the last partial batch), or iterations
        n, head = TASKS[job["task"]][3], TASKS[job["task"]][4]
        images = length * (n // batch) * batch if unit == "--epochs" else length * batch
    return dict(images=images, epochs=images / n if n else None, batch=batch, img=img, window=window,
                gflop=train_flops(m, img, window, head) / 1e9)


def read_bench(path):
    """Measured img/s from `bench.py --what gpu --json` (one GPU): {(script, model, image, window, compiled): img/s}
    from its 'size X' rows (eager), 'compiled X' rows and its 'finetune' row."""
    try:
        report = json.load(open(path))
    except (OSError, ValueError) as e:
        raise ValueError(f"--bench {path}: not a readable bench.py --what gpu report ({e})") from None
    rates = {}
    for key, r in report.items():
        kind, _, name = key.partition(" ")
        if kind in ("size", "compiled") and name in SIZES and isinstance(r, dict):
            img_s = r.get("eager", {}).get("img_s") if kind == "size" else r.get("img_s")
            if img_s:
                rates["mim.py", name, SIZES[name][3], SIZES[name][4], kind == "compiled"] = img_s
    ft = report.get("finetune", {})
    if ft.get("img_s"):
        rates["finetune.py", ft["model"], ft["img_size"], ft["window"], False] = ft["img_s"]
    return rates


def gpu_hours(job, c, opt, rates):
    """(GPU-hours, where from): images / measured img/s when the report has this script, size, input and window
    (one GPU's rate, scaled linearly to many); else FLOPs / (--mfu x --peak_tflops)."""
    key = (job["script"], job["model"], c["img"], c["window"], "--compile" in job["flags"])
    if rates.get(key):
        return c["images"] / rates[key] / 3600, "measured"
    return c["images"] * c["gflop"] * 1e9 / (opt.mfu * opt.peak_tflops * 1e12) / 3600, "FLOPs"


# -----------------------------------------------------------------------------
# the runs of a grid: one pre-training per cell, then its fine-tunes


def cell_name(c):
    """B_in1k_frac0.5_125k: model, data, fraction, iterations."""
    tag = ({"IN-1K": "in1k", "IN-22K": "in22k"}.get(c["data"])
           or re.sub(r"\W+", "", os.path.basename(c["data"].rstrip("/")).split(".")[0]))
    n = c["iters"]
    return (f"{c['model']}_{tag or 'data'}_frac{c['frac']:g}_"
            f"{n // 1000 if n % 1000 == 0 else n}{'k' if n % 1000 == 0 else ''}")


def build_jobs(cells, opt, out, seeds, scratch):
    """Every run of the grid, each cell's pre-training before its fine-tunes: dicts with name, script, flags,
    out_dir, after (the pre-training a fine-tune waits for), model, task, nodes, processes."""
    root, jobs = opt.data_root, []
    gpus = opt.gpus_per_node or 8

    def downstream(task, model, pre, seed):
        script, folder, extra, _, _ = TASKS[task]
        out_dir = (os.path.join(pre["out_dir"], f"ft_{task}_s{seed}") if pre
                   else os.path.join(out, "runs", "scratch", f"{model}_{task}_s{seed}"))
        flags = ["--model", model, "--data", os.path.join(root, folder) if folder else "synthetic", *extra,
                 "--pretrained", pre["out_dir"] if pre else "none", "--seed", str(seed), "--out_dir", out_dir]
        name = f"{pre['name'] if pre else 'scratch_' + model}.{task}_s{seed}"
        return dict(name=name, script=script, flags=flags + shlex.split(opt.finetune_args), out_dir=out_dir,
                    after=pre and pre["name"], model=model, task=task, nodes=opt.ft_nodes, world=opt.ft_nodes * gpus)

    for c in cells:
        name = cell_name(c)
        folder, extra, _ = DATASETS.get(c["data"], (c["data"], (), None))
        data = c["data"] if c["data"] not in DATASETS else os.path.join(root, folder) if folder else "synthetic"
        out_dir = os.path.join(out, "runs", name)
        flags = ["--model", c["model"], "--data", data, *(e.format(root=root) for e in extra),
                 "--frac", f"{c['frac']:g}", "--iters", str(c["iters"]), "--out_dir", out_dir]
        world, user = opt.nodes * gpus, shlex.split(opt.pretrain_args)
        if c["model"] in PAPER_SIZES:  # a first micro-batch that fits (docs/study.md), never more than the batch allows
            batch = int(flag(user, "--batch_size", 2048))
            flags += ["--micro_batch", str(max(1, min(MICRO_BATCH[c["model"]], batch // world)))]
            flags += ["--grad_ckpt"] if c["model"] in GRAD_CKPT else []
        pre = dict(name=name, script="mim.py", flags=flags + user, out_dir=out_dir, after=None,
                   model=c["model"], task=None, nodes=opt.nodes, world=world, iters=c["iters"],
                   subset=round(c["frac"] * c["images"]) if c["images"] else None)
        jobs.append(pre)
        tasks = [t for t in c["tasks"] if opt.tasks is None or t in opt.tasks]
        jobs += [downstream(t, c["model"], pre, s) for t in tasks for s in seeds]
    if scratch:  # the baseline of analyze.py: each size and task fine-tuned from random weights
        pairs = {(c["model"], t): 0 for c in cells for t in c["tasks"] if opt.tasks is None or t in opt.tasks}
        jobs += [downstream(t, m, None, s) for (m, t) in pairs for s in seeds]
    names = [j["name"] for j in jobs]
    if len(set(names)) < len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"--grid: two rows make the same run {twice}: each (model, data, frac, iters) once")
    return jobs


# -----------------------------------------------------------------------------
# plan: the grid's cost


def plan(jobs, opt):
    """Print each run (images, epochs, GFLOP per image, GPU-hours, command) and the totals per size and kind.
    Returns the rows: (job, cost, GPU-hours, 'FLOPs' or 'measured')."""
    rates = read_bench(opt.bench) if opt.bench else {}
    rows = [(job, c, *gpu_hours(job, c, opt, rates)) for job in jobs for c in [cost(job)]]
    print(f"{'run':<40} {'images':>9} {'epochs':>8} {'GFLOP/img':>9} {'GPU-h':>9}  {'from':<8} command")
    for job, c, hours, source in rows:
        epochs = "?" if c["epochs"] is None else f"{c['epochs']:.1f}"
        print(f"{job['name']:<40} {c['images'] / 1e6:>8.1f}M {epochs:>8} {c['gflop']:>9.1f} {hours:>9.1f}  {source:<8} "
              f"{shlex.join([job['script']] + job['flags'])}")
    kinds = ["pretrain"] + [t for t in TASKS if any(job["task"] == t for job in jobs)]
    models, nothing = [m for m in SIZES if any(job["model"] == m for job in jobs)], "-"
    print(f"\nGPU-hours {''.join(f'{k:>12}' for k in kinds)}{'all':>12}")
    for m in models + ["all"]:
        cells = [[h for job, _, h, _ in rows if (job["task"] or "pretrain") == k and m in (job["model"], "all")]
                 for k in kinds]
        print(f"{m:<9} {''.join(f'{sum(h):>12.1f}' if h else f'{nothing:>12}' for h in cells)}"
              f"{sum(map(sum, cells)):>12.1f}")
    print(f"\nFLOPs: training FLOPs per image (forward + backward, as FlopCounterMode counts them) x images / "
          f"({opt.mfu:g} x {opt.peak_tflops:g} TFLOPS) (--mfu, --peak_tflops)." +
          (f" measured: images / img/s of {opt.bench}, one GPU's rate scaled linearly." if rates else "") +
          " coco and ade20k count the encoder only (no detection or UPerNet heads): lower bounds. Evaluations and"
          " activation recomputation (--grad_ckpt) are not counted: the utilisation has to cover them.")
    return rows


# -----------------------------------------------------------------------------
# launch on SLURM: one sbatch file per run, submit.sh in order
#
# Why the job file looks like this (what a user writing it by hand gets wrong; Slurm's source read at 284c3b9):
# - At the time limit slurmd sends SIGTERM to the job step, then to every step, the batch shell and its srun
#   included, and SIGKILL KillWait (30 s) later (src/slurmd/slurmd/req.c). srun answers SIGTERM by SIGKILL-ing
#   its tasks at once (src/srun/signals.c: "forcing job termination"): nothing can be saved then. Hence a
#   warning: --signal=B:USR1@N sends USR1 to this shell only, N s earlier (up to 60 s more: Slurm's resolution).
# - The shell passes it on as SIGTERM to the job step with `scancel --signal=TERM`, which signals the job's steps
#   but not the batch step (srun never sees it). Every process of the step gets it: torchrun, which forwards it
#   to its ranks and waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT s (30 by default: too short to save a 1B model) before
#   SIGKILL; each mim.py rank, which saves ckpt.pt at the end of the step and exits; data workers, which ignore
#   it (data.py).
# - Then `scontrol requeue` puts the job back in the queue under the same id (needs --requeue): the same script
#   and command run again and mim.py resumes from ckpt.pt. A requeued job is PENDING again, not finished, so its
#   afterok dependents keep waiting (Slurm's job_mgr.c). It requeues only if the log moved on: a hung run
#   would otherwise loop until the allocation is spent.
# - MAE and DINO do this with submitit (--signal=USR1@120 to every task; rank 0 checkpoints and requeues, SIGTERM
#   is ignored). Our scripts stop on SIGTERM, so the shell translates; no Python launcher is involved.
# - Preemption with PreemptMode=REQUEUE and a GraceTime sends SIGTERM to the job step (not to this shell): the
#   run saves, Slurm requeues. A plain scancel stops the job as the time limit does, keeping the last ckpt.pt.
# - The exit status is 0 only if summary.json exists, whatever the scripts exit with after a signal, so an
#   afterok fine-tune never starts from a half-trained encoder.

SBATCH = """#!/bin/bash
# {name}: {what}, written by study.py. A plain sbatch file: edit it freely, submit it with ../submit.sh.
#SBATCH --job-name={name}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={gpus}
#SBATCH --cpus-per-task={cpus}
#SBATCH --time={time}
#SBATCH --output={logs}/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@{warn}
{extra}
# {warn} s before the time limit this shell gets USR1: the run saves, and the job goes back in the queue
# under the same id to resume (study.py explains each step).
cd {root}
RUN={out_dir}
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)  # the rendezvous runs on the first node
PORT=$((20000 + SLURM_JOB_ID % 40000))  # two jobs sharing a node need two ports
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT={warn}  # torchrun lets the ranks save this long before SIGKILL (default 30 s)
last_step() {{ sed -n 's/^{{"step": \\([0-9]*\\).*/\\1/p' "$RUN/log.jsonl" 2>/dev/null | tail -n 1; }}
start=$(last_step)
got=""
trap 'got=USR1; scancel --signal=TERM "$SLURM_JOB_ID"' USR1  # to the job step only: srun would SIGKILL it
trap '[ -n "$got" ] || got=TERM' TERM  # cancelled or timed out: Slurm signals the step itself
srun --cpus-per-task="$SLURM_CPUS_PER_TASK" {command} &
pid=$!
while :; do
    wait "$pid"; rc=$?  # returns early when a signal arrives
    kill -0 "$pid" 2>/dev/null || break
done
[ -f "$RUN/summary.json" ] && exit 0  # complete: the only success, whatever the exit status
if [ "$got" = USR1 ] && [ "$(last_step)" != "$start" ]; then
    echo "study.py: time limit near, saved at step $(last_step): requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit $((rc ? rc : 1))
"""


def sbatch_file(job, opt, out):
    gpus = opt.gpus_per_node or 8
    command = (f'torchrun --nnodes "$SLURM_NNODES" --nproc_per_node {gpus} --rdzv_backend c10d '
               f'--rdzv_endpoint "$HEAD:$PORT" --rdzv_id "$SLURM_JOB_ID" {shlex.join([job["script"]] + job["flags"])}')
    extra = [f"#SBATCH --{k}={v}" for k, v in (("partition", opt.partition), ("account", opt.account),
                                               ("qos", opt.qos)) if v]
    extra += [f"#SBATCH {a}" for a in opt.sbatch] + (["#SBATCH --kill-on-invalid-dep=yes"] if job["after"] else [])
    what = ("SimMIM pre-training" if job["task"] is None
            else f"{job['task']} fine-tuning after {job['after'] or 'none (from scratch)'}")
    values = dict(name=job["name"], what=what, nodes=job["nodes"], gpus=gpus, cpus=gpus * opt.cpus_per_gpu,
                  time=opt.time, logs=shlex.quote(os.path.join(out, "logs")), warn=opt.signal_time,
                  extra="\n".join(extra), root=shlex.quote(ROOT), out_dir=shlex.quote(job["out_dir"]), command=command)
    return SBATCH.format(**values)


def submit_script(jobs):
    """Submits every job in order, a fine-tune with --dependency=afterok on its pre-training's job id. A run that
    is complete is skipped (its fine-tunes then wait for nothing), so rerunning it submits what is missing."""
    lines = ["#!/bin/bash",
             "# Submits these jobs in order; a fine-tune whose pre-training is submitted here waits for it (afterok),",
             "# one whose pre-training is not here (launch --finetune_top) starts at once. Complete runs",
             "# (summary.json) are skipped, so rerun it after a failure; jobs still queued would be submitted twice:",
             "# look at squeue first (the second would stop at the run directory's lock).",
             "set -euo pipefail", 'cd "$(dirname "$0")/jobs"', "declare -A id",
             "submit() { sbatch --parsable \"$@\" | cut -d';' -f1; }"]
    for job in jobs:
        done = shlex.quote(os.path.join(job["out_dir"], "summary.json"))
        after = f' ${{id[{job["after"]}]:+--dependency=afterok:${{id[{job["after"]}]}}}}' if job["after"] else ""
        lines.append(f'[ -f {done} ] || {{ id[{job["name"]}]=$(submit{after} {job["name"]}.sbatch); '
                     f'echo "{job["name"]}: job ${{id[{job["name"]}]}}"; }}')
    lines.append('echo "watch: python study.py status $(dirname "$PWD")"')
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# launch here: one run after another


def run_local(jobs, opt):
    """Run each job to its end with subprocess, skipping complete runs and the fine-tunes of a failed
    pre-training. Ctrl-C reaches the running script too (same terminal), which saves: we wait for it, then stop;
    SIGTERM is passed on the same way. Rerun the same command to go on."""
    gpus, failed, stop = opt.gpus_per_node or 1, [], []
    for job in jobs:
        if job["after"] in failed:
            print(f"skipped {job['name']}: {job['after']} failed", flush=True)
            failed.append(job["name"])
            continue
        if os.path.exists(os.path.join(job["out_dir"], "summary.json")):
            print(f"complete: {job['name']}", flush=True)
            continue
        launcher = ["python"] if gpus == 1 else ["torchrun", "--standalone", "--nproc_per_node", str(gpus)]
        print(f"$ {shlex.join(launcher + [job['script']] + job['flags'])}", flush=True)
        launcher[0] = sys.executable if gpus == 1 else launcher[0]  # this interpreter (its virtual environment)
        child = subprocess.Popen(launcher + [job["script"]] + job["flags"], cwd=ROOT)
        previous = signal.signal(signal.SIGTERM, lambda s, f: (stop.append(s), child.send_signal(signal.SIGTERM)))
        while True:
            try:
                rc = child.wait()
                break
            except KeyboardInterrupt:  # the child got it too and is saving: wait for it
                stop.append(signal.SIGINT)
        signal.signal(signal.SIGTERM, previous)
        if stop:
            print(f"stopped during {job['name']}; rerun the same command to go on", flush=True)
            return 128 + stop[0]
        if rc or not os.path.exists(os.path.join(job["out_dir"], "summary.json")):
            print(f"failed: {job['name']} (exit {rc})", flush=True)
            failed.append(job["name"])
    print(f"{len(jobs) - len(failed)} of {len(jobs)} runs complete"
          + (f"; failed or skipped: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def launch(jobs, opt, out, submit=None):
    """Write grid.json (the runs, for status) and, for SLURM, the job files and submit.sh; or run the grid here.
    submit: the names of the jobs to submit or run (--finetune_top's choice); None: all of them."""
    todo = [j for j in jobs if submit is None or j["name"] in submit]
    for job in jobs:
        batch = cost(job)["batch"]
        if batch % job["world"]:
            raise ValueError(f"--nodes/--ft_nodes x --gpus_per_node = {job['world']} processes do not divide "
                             f"the global batch {batch} of {job['name']}: use a divisor of it")
    manifest = dict(grid=opt.grid, executor=opt.executor, created=time.strftime("%Y-%m-%d %H:%M:%S"),
                    jobs=[dict(name=j["name"], script=j["script"], task=j["task"], model=j["model"], after=j["after"],
                               out_dir=j["out_dir"], iters=j.get("iters"),
                               command=shlex.join([j["script"]] + j["flags"]))
                         for j in jobs])
    files = {os.path.join(out, "grid.json"): json.dumps(manifest, indent=1) + "\n"}
    if opt.executor == "slurm":
        files.update({os.path.join(out, "jobs", j["name"] + ".sbatch"): sbatch_file(j, opt, out) for j in todo})
        files[os.path.join(out, "submit.sh")] = submit_script(todo)
    if opt.dry_run:
        for path, text in files.items():
            print(f"==> {path} <==\n{text}")
        if opt.executor == "local":
            for job in todo:
                print(shlex.join(["python", job["script"]] + job["flags"]))
        return 0
    os.makedirs(os.path.join(out, "logs" if opt.executor == "slurm" else ""), exist_ok=True)  # SLURM's output files
    for path, text in files.items():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    if opt.executor == "slurm":
        print(f"wrote {len(todo)} job files to {os.path.join(out, 'jobs')}; "
              f"submit them with: bash {os.path.join(out, 'submit.sh')}")
        return 0
    return run_local(todo, opt)


# -----------------------------------------------------------------------------
# which pre-trainings are worth fine-tuning: top-1 predicted from the validation loss (analyze.py's fit)


def read_runs(dirs):
    """analyze.py's rows of the runs in dirs, each paired with the downstream runs in its subfolders (study's
    ft_<task>_s<seed>, miniature.sh's ft_s0), read quietly: status says what state a run is in its own way."""
    found = [d for p in dirs for d in [p] + sorted(glob.glob(os.path.join(glob.escape(p), "*"))) if os.path.isdir(d)]
    with contextlib.redirect_stderr(io.StringIO()):
        return analyze.load_runs([glob.escape(d) for d in found])


def predict_top1(dirs, source="grid"):
    """(metric, {run dir: (predicted, half width of the 90 % interval)}, [(run dir, why not)], the models fitted)
    for the finished pre-trainings in dirs that have no fine-tuned top-1 yet. The fit is analyze.py's (one
    intercept per model, one slope on the validation loss shared by all) on the fine-tuned runs among them (the
    top-1 column most of them have: in1k_top1, synthetic_top1, ...), or with source 'paper' on the authors' 63
    runs (in1k_top1; their validation loss is SimMIM's on IN-1K val at 192 px: ours must be measured so too).
    metric is None when no run has a top-1 to fit."""
    rows = [r for r in read_runs(dirs) if r["iters"]]  # not the runs from scratch: they have no loss
    if source == "paper":
        fit_rows, metric = analyze.load_csv(analyze.PAPER_CSV, source="paper"), "in1k_top1"
    else:
        count = {}  # fine-tuned runs per top-1 column
        for r in rows:
            for k in [k for k in r if k.endswith("_top1") and r[k] is not None and not r.get("partial")]:
                count[k] = count.get(k, 0) + 1
        if not count:
            return None, {}, [], set()
        fit_rows, metric = rows, max(count, key=count.get)
    done, cannot = analyze.predict_runs(fit_rows, [r for r in rows if r.get(metric) is None], metric)
    fitted = {r["model"] for r in analyze.fit_runs(fit_rows, metric, "val_loss")[0]}
    return (metric, {os.path.realpath(r["run_dir"]): (p, h) for r, p, h in done},
            [(r["run_dir"], why) for r, why in cannot if not r.get("partial")], fitted)


def choose_finetunes(jobs, opt, out):
    """--finetune_top K: the names of the fine-tunes to launch now, those of the K finished pre-trainings of each
    model with the best predicted top-1 among the pre-trainings none of whose fine-tunes has started (the others
    are left alone, as a launch leaves complete runs); prints the ranking. Refused before anything is written
    when there is nothing to fit: no model with fine-tuned runs enough, and no --predict_from paper."""
    after = {}
    for j in jobs:
        if j["after"]:
            after.setdefault(j["after"], []).append(j)
    pre = [j for j in jobs if j["task"] is None]
    metric, predicted, cannot, fitted = predict_top1([j["out_dir"] for j in pre], opt.predict_from)
    if not fitted:
        raise ValueError(f"--finetune_top: no fine-tuned runs in {out} to predict top-1 from (a model needs "
                         f"{analyze.MIN_RUNS}); fine-tune some first (launch without --finetune_top), "
                         "or pass --predict_from paper")
    ranked = {}  # model -> [(predicted, half width, pre-training job)]
    for j in pre:
        p = predicted.get(os.path.realpath(j["out_dir"]))
        if p and after.get(j["name"]) and not any(os.path.exists(f["out_dir"]) for f in after[j["name"]]):
            ranked.setdefault(j["model"], []).append((*p, j))
    print(f"--finetune_top {opt.finetune_top}: {metric} predicted from the validation loss, fitted on the fine-tuned "
          f"runs of the {opt.predict_from} ({analyze.LEVEL * 100:.0f} % interval), best first per model")
    chosen = set()
    for model, runs in ranked.items():
        for i, (p, h, j) in enumerate(sorted(runs, key=lambda r: -r[0])):
            now = i < opt.finetune_top
            print(f"  {j['name']:<40} {p:7.2f} [{p - h:.2f}, {p + h:.2f}]  {'fine-tune' if now else 'not now'}")
            chosen |= {f["name"] for f in after[j["name"]]} if now else set()
    names = {os.path.realpath(j["out_dir"]): j["name"] for j in pre}
    for run_dir, why in cannot:
        print(f"  cannot predict {names.get(os.path.realpath(run_dir), run_dir)}: {why}")
    return chosen


# -----------------------------------------------------------------------------
# status: what each run directory says about itself

MAX_NON_FINITE = 10  # train.MAX_NON_FINITE: non-finite steps in a row stop a run
EVALS = ("val_loss", "top1", "box_ap", "miou")  # the evaluation each script logs: mim, finetune, detect, segment


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def log_rows(run_dir):
    """The rows of log.jsonl, up to the first one a kill cut in half (as train.RunDir reads them)."""
    rows = []
    try:
        with open(os.path.join(run_dir, "log.jsonl")) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    break
    except OSError:
        pass
    return rows


def lock_held(run_dir):
    """Is a live process holding the run's lock? A run holds a POSIX lock (lockf) on .lock for its whole life and
    writes 'process PID on HOST' in it (train.RunDir). For a holder on this machine, /proc/locks answers without
    touching the lock. For one on another node we must try to take it, shared and non-blocking, and let go at
    once: the only test across nodes (network file systems carry POSIX locks between them). For that instant a
    run starting there would be refused as 'in use', which is why it is never done locally."""
    path = os.path.join(run_dir, ".lock")
    try:
        holder = open(path).read()
        inode = os.stat(path).st_ino
    except OSError:
        return False
    m = re.match(r"process \d+ on (\S+)", holder)
    if m and m.group(1) == socket.gethostname() and os.path.exists("/proc/locks"):
        for line in open("/proc/locks"):
            if " POSIX " in line and any(w.count(":") == 2 and w.rsplit(":", 1)[1] == str(inode) for w in line.split()):
                return True
        return False
    with open(path) as f:
        try:
            fcntl.lockf(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.lockf(f, fcntl.LOCK_UN)
        return False


def nonfinite_streak(train):
    """Non-finite (skipped) steps in a row at the end of the log: the trailing rows in which every step was
    skipped, plus the skipped steps of the row before them, where the streak may have begun."""
    streak = 0
    for prev, row in zip(reversed([dict(step=0, skipped_steps=0)] + train[:-1]), reversed(train)):
        skipped = (row.get("skipped_steps") or 0) - (prev.get("skipped_steps") or 0)
        streak += skipped
        if skipped < row["step"] - prev["step"]:
            break
    return streak


def overfitting_step(rows):
    """The first step at which the validation loss had risen at two evaluations in a row: flagged by mim.py's
    live warning ("overfitting": true), or found in the val_loss rows (so a log without the flag is judged too)."""
    flagged = [r["step"] for r in rows if r.get("overfitting")]
    v = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    rises = [s2 for (_, a), (_, b), (s2, c) in zip(v, v[1:], v[2:]) if a < b < c]
    return min(flagged + rises, default=None)


def describe(run_dir, iters=None):
    """One row of the status table: state, step, img/s, ETA, latest evaluation, GPU-hours of the logged steps."""
    files = ("args.json", "log.jsonl", "ckpt.pt", "summary.json", ".lock")
    if not any(os.path.exists(os.path.join(run_dir, f)) for f in files):
        return dict(state="missing")
    args = read_json(os.path.join(run_dir, "args.json")) or {}
    summary, rows = read_json(os.path.join(run_dir, "summary.json")), log_rows(run_dir)
    identity = args.get("identity") or {}
    iters = args.get("iters") or identity.get("iters") or iters
    batch, world = identity.get("batch_size") or args.get("batch_size"), args.get("world_size") or 1
    train = [r for r in rows if "train_loss" in r]
    step = train[-1]["step"] if train else 0
    img_s = train[-1].get("img_per_s") if train else None
    # GPU-hours: each log row's steps took steps x batch / img/s seconds of every process's GPU
    seconds = sum((b["step"] - a["step"]) * batch / b["img_per_s"] for a, b in zip([dict(step=0)] + train, train)
                  if batch and b.get("img_per_s"))
    evals = [(k, r[k]) for r in rows for k in EVALS if r.get(k) is not None]
    out = dict(step=step, iters=iters, gpu_h=seconds * world / 3600,
               latest=f"{evals[-1][0]} {evals[-1][1]:.4g}" if evals else "")
    if summary is not None:
        out["state"] = "finished"
    elif lock_held(run_dir):
        out.update(state="running", img_s=img_s)
        if iters and batch and img_s:
            out["eta_s"] = (iters - step) * batch / img_s
    elif nonfinite_streak(train) >= MAX_NON_FINITE:
        out["state"] = "stopped: non-finite losses"
    else:  # killed, preempted, or stopped by a signal: a rerun resumes from its last ckpt.pt
        out["state"] = f"stopped at step {step}"
    over = overfitting_step(rows)
    if over is not None:
        out["state"] += f", overfitting at step {over}"
    return out


def status(paths, predict_from="grid"):
    """One row per run: the runs of a study folder (its grid.json, missing ones included), or run directories
    (globs are expanded here, so quote them). A finished pre-training not fine-tuned yet also gets its predicted
    top-1 (predict_top1); the runs that cannot be predicted are named on stderr."""
    runs = []  # (name, run dir, iterations, task: None for a pre-training or unknown)
    for path in paths:
        manifest = read_json(os.path.join(path, "grid.json"))
        if manifest:
            runs += [(j["name"], j["out_dir"], j.get("iters"), j.get("task")) for j in manifest["jobs"]]
        elif glob.has_magic(path):
            runs += [(d, d, None, None) for d in sorted(glob.glob(path)) if os.path.isdir(d)]
        else:
            runs.append((path, path, None, None))
    if not runs:
        raise ValueError(f"status {' '.join(paths)}: no run directories there")
    metric, predicted, cannot, _ = predict_top1([d for _, d, _, task in runs if task is None], predict_from)
    names, why = {os.path.realpath(d): name for name, d, _, _ in runs}, {}
    for run_dir, reason in cannot:  # one line per reason
        why.setdefault(reason, []).append(names.get(os.path.realpath(run_dir), run_dir))
    for reason, dirs in why.items():
        print(f"note: cannot predict {metric} of {', '.join(dirs)}: {reason}", file=sys.stderr)
    width = max(len(name) for name, _, _, _ in runs)
    column = f"  {metric} predicted ({analyze.LEVEL * 100:.0f} %)" if predicted else ""
    print(f"{'run':<{width}}  {'state':<40} {'step':>15} {'img/s':>8} {'ETA':>7}  {'latest eval':<16} {'GPU-h':>8}"
          + column)
    for name, run_dir, iters, _ in runs:
        r = describe(run_dir, iters)
        step = "" if r["state"] == "missing" else f"{r['step']}/{r['iters'] or '?'}"
        eta = f"{int(r['eta_s'] // 3600)}h{int(r['eta_s'] % 3600 // 60):02d}" if "eta_s" in r else ""
        img_s = f"{r['img_s']:.0f}" if r.get("img_s") else ""
        gpu_h = f"{r['gpu_h']:.2f}" if "gpu_h" in r else ""
        p, h = predicted.get(os.path.realpath(run_dir), (None, None))
        guess = f"  {p:.2f} [{p - h:.2f}, {p + h:.2f}]" if p is not None else ""
        print(f"{name:<{width}}  {r['state']:<40} {step:>15} {img_s:>8} {eta:>7}  {r.get('latest', ''):<16} {gpu_h:>8}"
              + guess)
    return 0


# -----------------------------------------------------------------------------
# command line


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (the usage of three sub-commands is long)."""

    def error(self, message):
        sys.exit(f"error: {message} (see: python {self.prog} --help)")


def positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
        return value
    return parse


def fraction(text):
    value = positive(float)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be in (0, 1]")
    return value


def task_list(text):
    tasks = [] if text == "none" else text.split(",")
    for t in tasks:
        if t not in TASKS:
            raise argparse.ArgumentTypeError(f"{t!r} is no task: use none or some of {','.join(TASKS)}")
    return tasks


def seed_list(text):
    if not re.fullmatch(r"\d+(,\d+)*", text):
        raise argparse.ArgumentTypeError(f"{text!r}: want seeds like 0 or 0,1,2")
    return tuple(int(s) for s in text.split(","))


def slurm_time(text):
    if not re.fullmatch(r"(\d+-)?\d+(:\d\d){0,2}", text):
        raise argparse.ArgumentTypeError(f"{text!r}: want SLURM's [days-]hours:minutes:seconds, "
                                         "e.g. 24:00:00 or 2-00:00:00")
    return text


def get_parser():
    grid = argparse.ArgumentParser(add_help=False)
    g = grid.add_argument_group("the grid")
    g.add_argument("--grid", default="paper",
                   help="paper (paper_runs.csv: 63 runs), miniature (miniature.sh's 16) or a CSV file")
    g.add_argument("--out", default=None,
                   help="study folder: grid.json, jobs/, logs/, runs/<run>/; default study/<grid>")
    g.add_argument("--tasks", type=task_list, default=None,
                   help=f"downstream tasks to keep, comma-separated ({','.join(TASKS)}) or none; default: each row's")
    g.add_argument("--seeds", type=seed_list, default=None,
                   help="fine-tuning seeds, e.g. 0,1,2; default 0 (miniature 0,1,2)")
    g.add_argument("--data_root", default="data",
                   help="holds imagenet/, in22k/train.txt, inat2018/, coco/, ADEChallengeData2016/")
    g.add_argument("--pretrain_args", default="",
                   help="more mim.py flags for every pre-training, as one string: --pretrain_args='--workers 10'")
    g.add_argument("--finetune_args", default="",
                   help="more flags for every downstream script, as one string (the last of a flag wins)")
    g.add_argument("--nodes", type=positive(int), default=1, help="nodes per pre-training job")
    g.add_argument("--ft_nodes", type=positive(int), default=1, help="nodes per downstream job")
    g.add_argument("--gpus_per_node", type=positive(int), default=None,
                   help="GPUs (processes) per node; default 8 (local: 1)")
    p = Parser(prog="study.py", description="the paper's grid: plan its cost, launch it, watch it")
    sub = p.add_subparsers(dest="command", required=True)
    pl = sub.add_parser("plan", parents=[grid], help="each run's command, images, epochs, GPU-hours; totals")
    pl.add_argument("--mfu", type=fraction, default=0.2,
                    help="model FLOPs utilisation assumed, in (0, 1]; 0.2 (NVIDIA's NeMo ViT-g performance page: "
                         "about 29 %% MFU on H100, untuned; a narrow SwinV2 stays below that)")
    pl.add_argument("--peak_tflops", type=positive(float), default=989,
                    help="dense bf16 peak of a GPU in TFLOPS; 989 = H100 SXM, H200")
    pl.add_argument("--bench", default=None,
                    help="a `bench.py --what gpu --json` report: its measured img/s replace the FLOPs estimate "
                         "where they apply")
    la = sub.add_parser("launch", parents=[grid], help="sbatch files + submit.sh (slurm), or run the grid here (local)")
    la.add_argument("--executor", choices=["slurm", "local"], required=True,
                    help="slurm: write job files; local: run one after another")
    la.add_argument("--dry_run", action="store_true",
                    help="print the files (and commands) instead of writing or running them")
    la.add_argument("--time", type=slurm_time, default="24:00:00",
                    help="time limit per job; a run longer than this is requeued and resumes")
    la.add_argument("--partition", default=None, help="#SBATCH --partition")
    la.add_argument("--account", default=None, help="#SBATCH --account")
    la.add_argument("--qos", default=None, help="#SBATCH --qos")
    la.add_argument("--sbatch", action="append", default=[],
                    help="any other #SBATCH option, repeatable: --sbatch=--mem=0")
    la.add_argument("--cpus_per_gpu", type=positive(int), default=8,
                    help="CPU cores per GPU (data loading: docs/troubleshooting.md, 5-12 per GPU)")
    la.add_argument("--signal_time", type=positive(int), default=300,
                    help="seconds before the time limit at which a job saves and requeues")
    la.add_argument("--finetune_top", type=positive(int), default=None, metavar="K",
                    help="launch only fine-tunes: those of the K finished pre-trainings of each model with the best "
                         "top-1 predicted from their validation loss (status shows it), among those not fine-tuned yet")
    st = sub.add_parser("status", help="one row per run, from the run directories' files")
    st.add_argument("paths", nargs="+", help="a study folder (its grid.json), run directories, or quoted globs of them")
    for parser in (la, st):
        parser.add_argument("--predict_from", choices=["grid", "paper"], default="grid",
                            help="fit top-1 on the validation loss of the grid's own fine-tuned runs, or of the "
                                 "paper's 63 (paper_runs.csv; IN-1K top-1, SwinV2 S..g)")
    return p


def main(argv=None):
    opt = get_parser().parse_args(argv)
    try:
        if opt.command == "status":
            return status(opt.paths, opt.predict_from)
        cells, seeds, scratch = read_grid(opt.grid)
        out = opt.out or os.path.join("study", os.path.splitext(os.path.basename(opt.grid))[0])
        if opt.command == "plan":
            plan(build_jobs(cells, opt, out, opt.seeds or seeds, scratch), opt)
            return 0
        if opt.executor == "local" and (opt.nodes, opt.ft_nodes) != (1, 1):
            raise ValueError("--executor local runs on this machine: --nodes 1 --ft_nodes 1")
        if opt.executor == "local":
            opt.gpus_per_node = opt.gpus_per_node or 1
        out = os.path.abspath(out)
        jobs = build_jobs(cells, opt, out, opt.seeds or seeds, scratch)
        if opt.finetune_top is None:
            return launch(jobs, opt, out)
        chosen = choose_finetunes(jobs, opt, out)
        if not chosen:
            print("--finetune_top: no finished pre-training without fine-tunes can be predicted yet; nothing launched")
            return 0
        # grid.json keeps the pre-trainings, the runs from scratch and the fine-tunes chosen now or started before
        return launch([j for j in jobs if not j["after"] or j["name"] in chosen or os.path.exists(j["out_dir"])],
                      opt, out, chosen)
    except ValueError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    sys.exit(main())
