#!/bin/bash
# Score the margin-distillation arms' adapters on ARC-Easy test questions no run has used: 500-999 and 2000-2375.
cd /work/main
R=results/pm-margin-distill-1pct
for spec in gemma3-270m:distilled-margin gemma3-270m:start gemma3-270m:less smollm2-135m:distilled-margin smollm2-135m:start; do
  model=${spec%%:*}; arm=${spec#*:}
  for seed in 0 1 2; do
    for slice in "500 500 test-500-999" "2000 376 test-2000-2375"; do
      set -- $slice
      out=$R/$3/$model/$arm/seed$seed
      [ -f $out/results.json ] && continue
      textdistill eval --model $model --adapter /tmp/text-arm/$model/$arm/seed$seed --task arc-easy --split test \
        --offset $1 --limit $2 --log-samples --output $out/results.json --threads 1 --no-progress > /dev/null || echo "FAILED $out"
      echo "$(date +%T) $out $(python -c "import json;print(json.load(open('$out/results.json'))['results']['arc-easy']['acc'])")"
    done
  done
done
