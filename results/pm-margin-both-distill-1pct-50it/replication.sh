#!/bin/bash
# The two-receiver search continued from 28 to 50 iterations (a copy of results/pm-margin-both-distill-1pct's
# state.json, metrics.jsonl and diagnostics.jsonl, then `--iterations 50`), its text trained on both receivers (3
# seeds, each receiver's tuned recipe) and scored with per-question records on test 0-499 and 1000-1999.
cd "$(dirname "$0")/../.."
N=results/pm-margin-both-distill-1pct-50it
textdistill distill-pm --data arc-easy:train \
  --selection results/arc-easy-tuned-1pct/selections/performance-1pct-seed0-smollm2-135m-9bb08b6f.json \
  --config configs/arc-easy-pm-margin-both-distill-1pct.yaml --output $N --no-progress --iterations 50 > $N/search.log 2>&1
exec bash bench/text_arm_replication.sh $N distilled-both-50it /tmp/text-arm-both50
