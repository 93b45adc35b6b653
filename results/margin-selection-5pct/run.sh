#!/bin/bash
# Selection by the held-out margin at 5% for Gemma-3-270M under its tuned recipe (3 epochs at 5%, as at 1%:
# results/validity-arc-easy-5pct/tuning/gemma3-270m.json), which is the comparison's recipe (configs/arc-easy-cpu-v2.yaml):
# the best of 16 random 113-row subsets (seeds 2000003+k, the draws of the 5% `performance` arm of section 13), each
# trained with seed 1 and scored by the gold answer's margin over the best distractor on ARC-Easy validation 285-569;
# then the chosen rows trained with 3 seeds and scored on ARC-Easy test 0-499. SmolLM2's 5% selection by the margin
# is the `performance` arm of configs/arc-easy-tuned-5pct.yaml (its own tuned recipe).
cd "$(dirname "$0")/../.."
O=results/margin-selection-5pct
textdistill select --method performance --data arc-easy:train --budget 5% --config configs/arc-easy-cpu-v2.yaml \
  --performance.seed 2000003 --performance.train_seed 1 --performance.rows arc-easy:validation \
  --performance.rows_offset 285 --performance.rows_limit 285 --performance.draws 16 --performance.score margin \
  --performance.models '[gemma3-270m]' --output $O/performance-margin-5pct-gemma3-270m.json --threads 1 --no-progress
python bench/text_arm.py configs/arc-easy-cpu-v2.yaml $O/arms performance-margin --data arc-easy:train \
  --selection $O/performance-margin-5pct-gemma3-270m.json --model gemma3-270m:3 --scratch /tmp/text-arm-margin5
