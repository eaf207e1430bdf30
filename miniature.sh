#!/usr/bin/env bash
# The paper in miniature (README, "The paper in miniature"): the data-scaling grid of the paper, sized
# for a 2-core CPU (about 50 minutes). 2 models (nano 0.6M, tiny 2.3M parameters) x 4 fractions
# (1, 2.5, 10, 100 %) of the 2000 synthetic training images x 2 lengths (150, 600 steps) = 16 SimMIM
# pre-trainings, each followed by a 3-epoch fine-tune on all 2000 labelled images, plus one
# fine-tune from scratch per model as the baseline; then analyze.py (tables and figures in $FIGS).
#
#     bash miniature.sh                  # runs what is missing; Ctrl-C and run again to go on
#     OUT=out/mini2 bash miniature.sh    # another grid directory
#
# A run with a summary.json is complete and skipped; an interrupted one resumes from its ckpt.pt.
# Every flag not given here is the nano/tiny recipe of mim.py and finetune.py: nothing is tuned per run.
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-out/mini}
FIGS=${FIGS:-miniature}

for model in tiny nano; do
  for frac in 0.01 0.025 0.1 1; do  # 20, 50, 200, 2000 images (nested subsets)
    for iters in 600 150; do        # the longest first: the overfitting runs show up early
      run=$OUT/${model}_frac${frac}_${iters}
      [ -f "$run/summary.json" ] || python mim.py --model "$model" --data synthetic --frac "$frac" \
          --iters "$iters" --out_dir "$run"
      [ -f "$run/ft/summary.json" ] || python finetune.py --model "$model" --data synthetic \
          --pretrained "$run" --out_dir "$run/ft"
    done
  done
  scratch=$OUT/scratch/$model       # outside the glob below: analyze.py pairs fine-tunes with pre-trainings
  [ -f "$scratch/summary.json" ] || python finetune.py --model "$model" --data synthetic --pretrained none \
      --out_dir "$scratch"
done

python analyze.py "$OUT/*_frac*" "$OUT/*_frac*/ft" --out "$FIGS"
for s in "$OUT"/scratch/*/summary.json; do
  python -c "import json,sys; s=json.load(open(sys.argv[1])); print(f\"from scratch: {s['model']} best top-1 {s['best_top1']:.1f} %\")" "$s"
done
