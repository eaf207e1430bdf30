#!/usr/bin/env bash
# The paper in miniature (docs/miniature.md): the data-scaling grid of the paper, sized
# for a 2-core CPU. 2 models (nano 0.6M, tiny 2.3M parameters) x 4 fractions (1, 2.5, 10, 100 %) of the
# 2000 synthetic training images x 2 lengths (150, 600 steps) = 16 SimMIM pre-trainings, each followed
# by three fine-tunes (seeds 0, 1, 2; finetune.py's nano/tiny recipe, 3 epochs on all 2000 labelled
# images); three fine-tunes from scratch per model as the baseline; detect.py and segment.py (the
# paper's COCO and ADE20K) from tiny's 600-step pre-trainings and from scratch; then analyze.py
# (tables and figures in $FIGS).
#
#     bash miniature.sh                  # runs what is missing; Ctrl-C and run again to go on
#     OUT=out/mini2 bash miniature.sh    # another grid directory
#     JOBS=1 bash miniature.sh           # one run at a time, on every core
#     SEEDS=0 bash miniature.sh          # one fine-tune per run: faster, but see docs/miniature.md on seeds
#
# Runs go JOBS at a time, the cores shared among them (on 2 cores two 1-thread runs do about 1.25x the
# work of one 2-thread run): first the pre-trainings, then the runs that start from them, longest
# first. Each run's output is appended to $OUT/logs/. A run with a summary.json is complete and skipped;
# an interrupted one resumes from its ckpt.pt; a failed one stops the script after the running ones. Every flag not given here is the script's nano/tiny recipe.
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-out/mini}
FIGS=${FIGS:-miniature}
SEEDS=${SEEDS:-0 1 2}
JOBS=${JOBS:-2}
[[ $JOBS =~ ^[1-9][0-9]*$ ]] || { echo "JOBS=$JOBS: want a whole number of runs at a time, 1 or more" >&2; exit 2; }
mkdir -p "$OUT/logs"
todo=()
queue() {  # queue RUN_DIR SCRIPT FLAGS...: the run, unless it is complete; its output is appended to $OUT/logs/
  local log=$OUT/logs/$(echo "${1#"$OUT"/}" | tr / _).txt
  [ -f "$1/summary.json" ] || todo+=("$(printf '%q ' python "${@:2}" --out_dir "$1")>> $(printf '%q' "$log") 2>&1")
}
drain() {  # run the queued runs, JOBS at a time, then empty the queue
  # A failed run (exit 255 to xargs) starts no new run; the running ones finish and the script stops.
  # Ctrl-C reaches every run, which saves and stops; xargs ignores it, so it waits for them.
  local threads=$(( $(nproc) / JOBS > 0 ? $(nproc) / JOBS : 1 ))
  [ ${#todo[@]} -eq 0 ] || printf '%s\n' "${todo[@]}" | (trap '' INT; OMP_NUM_THREADS=$threads exec xargs -d '\n' \
      -P "$JOBS" -I{} bash -c '{} || { echo "failed: {}" >&2; exit 255; }')
  todo=()
}

for model in tiny nano; do
  for frac in 0.01 0.025 0.1 1; do  # 20, 50, 200, 2000 images (nested subsets)
    for iters in 600 150; do        # the longest first: the overfitting runs show up early
      queue "$OUT/${model}_frac${frac}_${iters}" mim.py --model "$model" --data synthetic --frac "$frac" --iters "$iters" \
        --mask_patch 16  # 16 px cells, 10 of 16 masked: the miniature's protocol (the demo's recipe uses 8 px)
    done
  done
done
drain

# the dense tasks, from one model's long runs and from scratch: detect.py takes longest, so it goes first
for frac in 0.01 0.025 0.1 1; do
  queue "$OUT/tiny_frac${frac}_600/det_s0" detect.py --model tiny --data synthetic --pretrained "$OUT/tiny_frac${frac}_600"
done
queue "$OUT/scratch/tiny_det_s0" detect.py --model tiny --data synthetic --pretrained none
for frac in 0.01 0.025 0.1 1; do
  queue "$OUT/tiny_frac${frac}_600/seg_s0" segment.py --model tiny --data synthetic --pretrained "$OUT/tiny_frac${frac}_600"
done
queue "$OUT/scratch/tiny_seg_s0" segment.py --model tiny --data synthetic --pretrained none
for model in tiny nano; do
  for frac in 0.01 0.025 0.1 1; do
    for iters in 600 150; do
      run=$OUT/${model}_frac${frac}_${iters}
      for seed in $SEEDS; do        # one fine-tune's seed moves top-1 by several points here
        queue "$run/ft_s$seed" finetune.py --model "$model" --data synthetic --pretrained "$run" --seed "$seed"
      done
    done
  done
  for seed in $SEEDS; do            # the baseline: analyze.py's "scratch" row and grey lines
    queue "$OUT/scratch/${model}_s$seed" finetune.py --model "$model" --data synthetic --pretrained none --seed "$seed"
  done
done
drain

python analyze.py "$OUT/*_frac*" "$OUT/*_frac*/ft_s*" "$OUT/*_frac*/det_s*" "$OUT/*_frac*/seg_s*" "$OUT/scratch/*" \
    --out "$FIGS"  # each metric: the mean over seeds
