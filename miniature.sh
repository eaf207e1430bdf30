#!/usr/bin/env bash
# The paper in miniature (README, "The paper in miniature"): the data-scaling grid of the paper, sized
# for a 2-core CPU (75 minutes measured). 2 models (nano 0.6M, tiny 2.3M parameters) x 4 fractions
# (1, 2.5, 10, 100 %) of the 2000 synthetic training images x 2 lengths (150, 600 steps) = 16 SimMIM
# pre-trainings, each followed by three 3-epoch fine-tunes (seeds 0, 1, 2) on all 2000 labelled
# images, plus three fine-tunes from scratch per model as the baseline; then analyze.py (tables and
# figures in $FIGS).
#
#     bash miniature.sh                  # runs what is missing; Ctrl-C and run again to go on
#     OUT=out/mini2 bash miniature.sh    # another grid directory
#     SEEDS=0 bash miniature.sh          # one fine-tune per run: about 50 minutes, but see the README
#
# A run with a summary.json is complete and skipped; an interrupted one resumes from its ckpt.pt.
# Every flag not given here is the nano/tiny recipe of mim.py and finetune.py: nothing is tuned per run.
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-out/mini}
FIGS=${FIGS:-miniature}
SEEDS=${SEEDS:-0 1 2}

for model in tiny nano; do
  for frac in 0.01 0.025 0.1 1; do  # 20, 50, 200, 2000 images (nested subsets)
    for iters in 600 150; do        # the longest first: the overfitting runs show up early
      run=$OUT/${model}_frac${frac}_${iters}
      [ -f "$run/summary.json" ] || python mim.py --model "$model" --data synthetic --frac "$frac" \
          --iters "$iters" --out_dir "$run"
      for seed in $SEEDS; do        # one fine-tune's seed moves top-1 by several points here
        [ -f "$run/ft_s$seed/summary.json" ] || python finetune.py --model "$model" --data synthetic \
            --pretrained "$run" --seed "$seed" --out_dir "$run/ft_s$seed"
      done
    done
  done
  for seed in $SEEDS; do            # the baseline: analyze.py's "scratch" column and grey lines
    scratch=$OUT/scratch/${model}_s$seed
    [ -f "$scratch/summary.json" ] || python finetune.py --model "$model" --data synthetic --pretrained none \
        --seed "$seed" --out_dir "$scratch"
  done
done

python analyze.py "$OUT/*_frac*" "$OUT/*_frac*/ft_s*" "$OUT/scratch/*" --out "$FIGS"  # top-1: the mean over seeds
