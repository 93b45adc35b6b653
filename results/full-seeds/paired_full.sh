#!/bin/bash
# SmolLM2's distilled texts against full data, paired per question: full data's adapters of seeds 1 and 2
# (bench/text_arm.py, this folder; seed 0's adapter was not kept) scored with per-question records on test 0-499 and
# 1000-1999, then each text's seeds 1 and 2 against them (the k-th seed of one arm pairs with the k-th of the other).
# The adapters live in /tmp/text-arm (rerun bench/text_arm.py ... full ... --model smollm2-135m --seeds 1 2 to make them).
cd "$(dirname "$0")/../.."
F=results/full-seeds; m=smollm2-135m
for seed in 1 2; do
  for slice in "0 500 comparison-slice" "1000 1000 study-slice"; do
    set -- $slice
    out=$F/$3/$m/full/seed$seed
    [ -f $out/results.json ] && continue
    textdistill eval --model $m --adapter /tmp/text-arm/$m/full/seed$seed --task arc-easy --split test --offset $1 \
      --limit $2 --log-samples --output $out/results.json --threads 1 --no-progress > /dev/null 2>&1 || echo "FAILED $out"
    echo "$(date +%T) $out $(python -c "import json;print(json.load(open('$out/results.json'))['results']['arc-easy']['acc,none'])")"
  done
done
both() { echo "$1/comparison-slice/$m/$2/seed1+$1/study-slice/$m/$2/seed1,$1/comparison-slice/$m/$2/seed2+$1/study-slice/$m/$2/seed2"; }
for text in "distilled-margin-seed0 results/pm-margin-distill-1pct distilled-margin" \
            "distilled-margin-seed1 results/pm-margin-distill-1pct-seed1 distilled-margin" \
            "distilled-both results/pm-margin-both-distill-1pct distilled-both" \
            "start results/pm-margin-distill-1pct start"; do
  set -- $text
  [ -d $2/study-slice/$m/$3/seed2 ] || continue
  echo "== full vs $1"
  python bench/paired_accuracy.py --a full=$(both $F full) --b $1=$(both $2 $3) --output $F/paired-$m-$1-vs-full-both-slices.json
done
