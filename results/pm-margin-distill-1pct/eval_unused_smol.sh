#!/bin/bash
cd /work/main
R=results/pm-margin-distill-1pct; model=smollm2-135m; arm=$1
for seed in 0 1 2; do
  for slice in "500 500 test-500-999" "2000 376 test-2000-2375"; do
    set -- $slice
    out=$R/$3/$model/$arm/seed$seed
    [ -f $out/results.json ] && continue
    textdistill eval --model $model --adapter /tmp/text-arm/$model/$arm/seed$seed --task arc-easy --split test \
      --offset $1 --limit $2 --log-samples --output $out/results.json --threads 1 --no-progress > /dev/null 2>&1 || echo "FAILED $out"
    echo "$(date +%T) $out"
  done
done
