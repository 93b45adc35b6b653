#!/bin/bash
# SmolLM2's 5% arms on 1000 more test questions (1000-1999, the validity study's slice; the comparison never reports
# them), so that the distilled text's differences from LESS, its start and full data are paired over 1500 questions:
# each arm's seed-k adapter scored with per-question records (its answers on 0-499 are those of the comparison's
# cells), then paired_both_slices.py. The adapters are not kept in the repository: the experiment's cells under
# results/arc-easy-tuned-5pct/cells/*/adapter and arms.sh's scratch folder /tmp/text-arm-5pct (rerun them to make them).
cd "$(dirname "$0")/../.."
O=results/pm-margin-distill-5pct; m=smollm2-135m; C=results/arc-easy-tuned-5pct/cells/$m
jobs=()
for seed in 0 1 2; do
  jobs+=("less $C/less/5pct/seed$seed/adapter $seed" "start $C/performance/5pct/seed$seed/adapter $seed"
         "distilled-margin /tmp/text-arm-5pct/$m/distilled-margin/seed$seed $seed")
done
run() {   # every other job, from $1 (0 or 1)
  for ((i = $1; i < ${#jobs[@]}; i += 2)); do
    set -- ${jobs[$i]}
    out=$O/study-slice/$m/$1/seed$3
    [ -f $out/results.json ] && continue
    textdistill eval --model $m --adapter $2 --task arc-easy --split test --offset 1000 --limit 1000 --log-samples \
      --output $out/results.json --threads 1 --no-progress > /dev/null 2>&1 || echo "FAILED $out"
    echo "$(date +%T) $out $(python -c "import json;print(json.load(open('$out/results.json'))['results']['arc-easy']['acc,none'])")"
  done
}
run 0 & run 1 & wait
# the adapter route reproduces the in-memory cell: the distilled text's seed 0 on the comparison's 500 questions
out=$O/comparison-slice/$m/distilled-margin/seed0
[ -f $out/results.json ] || textdistill eval --model $m --adapter /tmp/text-arm-5pct/$m/distilled-margin/seed0 \
  --task arc-easy --split test --limit 500 --log-samples --output $out/results.json --threads 1 --no-progress > /dev/null 2>&1
python $O/paired_both_slices.py
