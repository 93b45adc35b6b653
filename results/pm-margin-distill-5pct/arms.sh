#!/bin/bash
# The 5% distillation on the margin against its start, on both receivers (results/README.md section 21): the
# distilled text trained with each receiver's tuned 5% recipe (SmolLM2 6 epochs, Gemma-3 3 epochs) and 3 seeds,
# scored on ARC-Easy test 0-499; Gemma-3 also on the start rows (SmolLM2's start is the `performance` arm of
# results/arc-easy-tuned-5pct, the same rows and recipe); SmolLM2's start seed 0 once more through this route as a
# check; and Gemma-3 on the LESS 5% rows (its best 5% baseline, whose cells in results/arc-easy-cpu-v2 predate
# per-question records), so that the text pairs with it. Two processes, one per core: each takes the cells whose lock it gets.
cd "$(dirname "$0")/../.."
O=results/pm-margin-distill-5pct
SEL=results/arc-easy-tuned-5pct/selections/performance-5pct-seed0-smollm2-135m-5ac6fd9a.json
arms() {
  python bench/text_arm.py configs/arc-easy-tuned-5pct.yaml $O/arms distilled-margin --data $O/distilled.jsonl \
    --model smollm2-135m:6 --model gemma3-270m:3 --scratch /tmp/text-arm-5pct
  python bench/text_arm.py configs/arc-easy-tuned-5pct.yaml $O/arms start --data arc-easy:train --selection $SEL \
    --model gemma3-270m:3 --scratch /tmp/text-arm-5pct
  python bench/text_arm.py configs/arc-easy-tuned-5pct.yaml $O/arms route-check --data arc-easy:train \
    --selection $SEL --model smollm2-135m:6 --seeds 0 --scratch /tmp/text-arm-5pct
  python bench/text_arm.py configs/arc-easy-tuned-5pct.yaml $O/arms less --data arc-easy:train \
    --selection results/arc-easy-cpu-v2/selections/less-5pct-seed0-10392c72.json --model gemma3-270m:3 \
    --scratch /tmp/text-arm-5pct
}
arms > $O/arms-a.log 2>&1 &
sleep 30
arms > $O/arms-b.log 2>&1 &
wait
