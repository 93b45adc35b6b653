#!/bin/bash
# After a distill-pm search: train its text on both receivers (3 seeds, each receiver's tuned recipe:
# configs/arc-easy-tuned-1pct.yaml, SmolLM2 15 epochs, Gemma-3 3), then score each adapter with per-question records
# on ARC-Easy test 0-499 (comparison-slice) and 1000-1999 (study-slice). One process per core.
#   bash bench/text_arm_replication.sh RUN_FOLDER ARM SCRATCH
set -u
cd "$(dirname "$0")/.."
R=$1; ARM=$2; SCRATCH=$3
until [ -f $R/summary.json ] && [ -f $R/distilled.jsonl ]; do sleep 30; done
echo "$(date +%T) search done"
mkdir -p $R/arms
arm() { python bench/text_arm.py configs/arc-easy-tuned-1pct.yaml $R/arms $ARM --data $R/distilled.jsonl \
  --model smollm2-135m:15 --model gemma3-270m:3 --scratch $SCRATCH; }
arm > $R/arms/text-arm-a.log 2>&1 & arm > $R/arms/text-arm-b.log 2>&1; wait
echo "$(date +%T) arms done"; tail -2 $R/arms/text-arm-b.log
evals() {
  model=$1
  for seed in 0 1 2; do
    for slice in "0 500 comparison-slice" "1000 1000 study-slice"; do
      set -- $slice
      out=$R/$3/$model/$ARM/seed$seed
      [ -f $out/results.json ] && continue
      textdistill eval --model $model --adapter $SCRATCH/$model/$ARM/seed$seed --task arc-easy \
        --split test --offset $1 --limit $2 --log-samples --output $out/results.json --threads 1 --no-progress \
        > /dev/null 2>&1 || echo "FAILED $out"
      echo "$(date +%T) $out $(python -c "import json;print(json.load(open('$out/results.json'))['results']['arc-easy']['acc,none'])")"
    done
  done
}
evals smollm2-135m & evals gemma3-270m; wait
echo "$(date +%T) evals done"
