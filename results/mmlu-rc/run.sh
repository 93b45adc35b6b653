#!/bin/bash
# Issue 20: the MMLU comparison of configs/mmlu-rc.yaml, end to end and resumable (rerun the same command to go on).
# A GPU job: scored on the whole MMLU test split, a SmolLM2 cell takes about 1 h of one core of the 2-core AMX Xeon
# these results come from and the table about 90 core-hours (results/README.md section 22).
#   1. the tuned rule at 1% and 5% (configs/mmlu-rc-tuning.yaml): epochs per model and budget on MMLU validation;
#   2. base and full (whole 10,000-row sample) per model with the comparison's 3 epochs, 3 seeds;
#   3. per (model, budget), the arms trained at the budget with the epochs step 1 chose; the experts, LESS, match and
#      distillation are computed once (first run) and linked into the other runs' folders;
#   4. the joined table and paired differences against random: results/mmlu-rc/table.md.
#   bash results/mmlu-rc/run.sh                     (one GPU or CPU process)
#   RUNNER="torchrun --nproc-per-node 8 -m textdistill.cli" bash results/mmlu-rc/run.sh    (several GPUs)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-results/mmlu-rc}; RUNNER=${RUNNER:-textdistill}; OPTS=${OPTS:---no-progress}
MODELS="smollm2-135m gemma3-270m"

for budget in 1% 5%; do
  $RUNNER validity configs/mmlu-rc-tuning.yaml --budget $budget --output $OUT/tuning-${budget%\%}pct $OPTS
done

$RUNNER experiment configs/mmlu-rc.yaml --methods "[base,full]" --output $OUT/base-full $OPTS

stages=""   # the first arms run's folder: its experts, selections and distillation are the others' too
for budget in 1% 5%; do
  for model in $MODELS; do
    epochs=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['epochs'])" \
             $OUT/tuning-${budget%\%}pct/tuning/$model.json)
    run=$OUT/$model-${budget%\%}pct; mkdir -p $run
    if [ -n "$stages" ]; then
      for stage in $stages/experts-* $stages/selections $stages/distill; do
        case $stage in *.lock) continue ;; esac   # each folder keeps its own locks
        name=$(basename $stage)
        if [ -e $stage ] && [ ! -e $run/$name ]; then ln -s ../$(basename $stages)/$name $run/; fi
      done
    fi
    $RUNNER experiment configs/mmlu-rc.yaml --models "[$model]" --budgets "[\"$budget\"]" --recipe.epochs $epochs \
        --methods "[random,less,match,performance,distilled]" --output $run $OPTS
    stages=${stages:-$run}
  done
done

python $OUT/table.py $OUT/base-full $OUT/*-1pct $OUT/*-5pct --output $OUT/table.md
