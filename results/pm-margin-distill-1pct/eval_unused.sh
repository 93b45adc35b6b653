#!/bin/bash
# Score adapters of the margin-distillation arms on the ARC-Easy test questions no run had used: 500-999 and
# 2000-2375 (fp32, per-question records). Arguments: MODEL:ARM ... (adapters in /tmp/text-arm/MODEL/ARM/seedK, made by
# bench/text_arm.py). Run as: eval_unused.sh gemma3-270m:distilled-margin gemma3-270m:start gemma3-270m:less; and one
# process per arm for smollm2-135m:start and smollm2-135m:distilled-margin.
cd "$(dirname "$0")/../.."
R=results/pm-margin-distill-1pct
for spec in "$@"; do
  model=${spec%%:*}; arm=${spec#*:}
  for seed in 0 1 2; do
    for slice in "500 500 test-500-999" "2000 376 test-2000-2375"; do
      set -- $slice
      out=$R/$3/$model/$arm/seed$seed
      [ -f $out/results.json ] && continue
      textdistill eval --model $model --adapter /tmp/text-arm/$model/$arm/seed$seed --task arc-easy --split test \
        --offset $1 --limit $2 --log-samples --output $out/results.json --threads 1 --no-progress > /dev/null 2>&1 \
        || echo "FAILED $out"
      echo "$(date +%T) $out $(python -c "import json;print(json.load(open('$out/results.json'))['results']['arc-easy']['acc,none'])")"
    done
  done
done
